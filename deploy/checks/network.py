"""The NetworkPolicies of one rendering of deploy/, evaluated offline.

    network.py TARGET RENDERED.yaml

Every pod the rendering creates must be isolated for ingress and egress
(selected by a policy of each type), and the connections the policies allow
must be exactly the ones listed in EXPECTED for the target: no more, no
fewer. A connection is (source, destination, port/protocol); it is allowed
when the source's egress policies and the destination's ingress policies
both let it through, as Kubernetes evaluates them. Only the side inside
nt's namespace is evaluated for a peer outside it.

Peers are the rendered pods (named after their workload) and stand-ins for
what lies outside: kube-dns, Prometheus, clients and strangers in other
namespaces and in nt's own, and a few IP addresses. Ports are numeric here
(a named port in a policy is resolved against the destination's container
ports). Policies with ipBlock are taken to match only the IP stand-ins,
never pods, which is how clusters treat pod traffic in practice.

Prints one ERROR line per finding on stderr; exits 1 when there is any.
"""
import ipaddress
import sys

import yaml

# What each rendering must allow, and nothing else. Keep in step with
# deploy/base/networkpolicy.yaml and the overlays' store rules.
_COMMON = {
    ("nt-worker", "nt-server", "7070/TCP"),
    ("client", "nt-server", "7070/TCP"),
    ("client-here", "nt-server", "7070/TCP"),
    ("prometheus", "nt-server", "9090/TCP"),
    ("prometheus", "nt-worker", "9091/TCP"),
} | {
    (src, "kube-dns", f"53/{proto}")
    for src in ("nt-server", "nt-worker", "client-here")
    for proto in ("UDP", "TCP")
}
# The external S3 of the base and prod: HTTPS to public addresses (also STS,
# for IRSA) and the EKS Pod Identity agent.
_EXTERNAL_STORE = {
    (src, dst, port)
    for src in ("nt-server", "nt-worker")
    for dst, port in (("public address", "443/TCP"), ("pod identity agent", "80/TCP"))
}
EXPECTED = {
    "base": _COMMON | _EXTERNAL_STORE,
    "dev": _COMMON
    | {(src, "seaweedfs", "8333/TCP") for src in ("nt-server", "nt-worker")},
    "prod": _COMMON
    | _EXTERNAL_STORE
    | {("nt-nightly", "nt-server", "7070/TCP")}
    | {("nt-nightly", "kube-dns", f"53/{proto}") for proto in ("UDP", "TCP")},
}

# Stand-ins outside the rendering: name -> (namespace or None for "nt's
# own", labels). They are where real clusters put these pods.
OUTSIDE_PODS = {
    "kube-dns": ("kube-system", {"k8s-app": "kube-dns"}),
    "prometheus": ("monitoring", {"app.kubernetes.io/name": "prometheus"}),
    "client": ("apps", {"nt-client": "true"}),
    "stranger": ("apps", {"app": "other"}),
    "client-here": (None, {"nt-client": "true"}),
    "stranger-here": (None, {"app": "other"}),
}
OUTSIDE_IPS = {
    "public address": "52.216.8.10",
    "private address": "10.1.2.3",
    "instance metadata": "169.254.169.254",
    "pod identity agent": "169.254.170.23",
}
# Ports tried besides those the rendering names.
EXTRA_PORTS = {(53, "UDP"), (53, "TCP"), (80, "TCP"), (443, "TCP"), (8080, "TCP")}


class Pod:
    def __init__(self, name, namespace, labels, ports=None, ours=True):
        self.name = name
        self.namespace = namespace
        self.labels = labels
        self.ports = ports or {}  # container port name -> (number, protocol)
        self.ours = ours  # in nt's namespace: its policies apply


class Address:
    def __init__(self, name, ip):
        self.name = name
        self.ip = ipaddress.ip_address(ip)
        self.ours = False


def selects(selector, labels):
    """A LabelSelector against a label map; None selects nothing."""
    if selector is None:
        return False
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for e in selector.get("matchExpressions") or []:
        key, op, values = e["key"], e["operator"], e.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def namespace_labels(name):
    return {"kubernetes.io/metadata.name": name}


def peer_matches(peer, policy_ns, other):
    if "ipBlock" in peer:
        if not isinstance(other, Address):
            return False
        block = peer["ipBlock"]
        if other.ip not in ipaddress.ip_network(block["cidr"]):
            return False
        return not any(other.ip in ipaddress.ip_network(c) for c in block.get("except") or [])
    if isinstance(other, Address):
        return False
    if "namespaceSelector" in peer:
        if not selects(peer["namespaceSelector"], namespace_labels(other.namespace)):
            return False
    elif other.namespace != policy_ns:
        return False
    return "podSelector" not in peer or selects(peer["podSelector"], other.labels)


def port_matches(ports, port, proto, dst):
    if not ports:
        return True
    for p in ports:
        if p.get("protocol", "TCP") != proto:
            continue
        want = p.get("port")
        if want is None:
            return True
        if isinstance(want, str):
            named = dst.ports.get(want) if isinstance(dst, Pod) else None
            if named == (port, proto):
                return True
            continue
        if want <= port <= p.get("endPort", want):
            return True
    return False


def policy_types(policy):
    spec = policy["spec"]
    return spec.get("policyTypes") or (["Ingress"] + (["Egress"] if "egress" in spec else []))


def side_allows(policies, pod, kind, peer, port, proto, dst):
    """Whether `pod`'s policies of `kind` (Ingress/Egress) admit `peer`."""
    field, peers_key = ("ingress", "from") if kind == "Ingress" else ("egress", "to")
    selecting = [
        p
        for p in policies
        if p["ns"] == pod.namespace
        and kind in policy_types(p)
        and selects(p["spec"].get("podSelector", {}), pod.labels)
    ]
    if not selecting:
        return True  # not isolated
    for p in selecting:
        for rule in p["spec"].get(field) or []:
            peers = rule.get(peers_key)
            if peers and not any(peer_matches(x, p["ns"], peer) for x in peers):
                continue
            if port_matches(rule.get("ports"), port, proto, dst):
                return True
    return False


def allowed(policies, src, dst, port, proto):
    if src.ours and not side_allows(policies, src, "Egress", dst, port, proto, dst):
        return False
    if dst.ours and not side_allows(policies, dst, "Ingress", src, port, proto, dst):
        return False
    return True


def rendered_pods(docs, namespace):
    for d in docs:
        kind, name = d["kind"], d["metadata"]["name"]
        if kind in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            template = d["spec"]["template"]
        elif kind == "CronJob":
            template = d["spec"]["jobTemplate"]["spec"]["template"]
        elif kind == "Pod":
            template = d
        else:
            continue
        ports = {}
        for c in template["spec"].get("containers", []):
            for p in c.get("ports", []):
                if "name" in p:
                    ports[p["name"]] = (p["containerPort"], p.get("protocol", "TCP"))
        yield Pod(name, namespace, template.get("metadata", {}).get("labels", {}), ports)


def main():
    target, path = sys.argv[1], sys.argv[2]
    docs = [d for d in yaml.safe_load_all(open(path)) if d]
    errors = []
    # The base is namespace-less; its objects share whatever namespace it is
    # applied to.
    namespaces = {d["metadata"].get("namespace", "default") for d in docs if d["kind"] != "Namespace"}
    if len(namespaces) != 1:
        errors.append(f"resources in several namespaces {sorted(namespaces)}; expected one")
    namespace = sorted(namespaces)[0]

    policies = []
    for d in docs:
        if d["kind"] == "NetworkPolicy":
            policies.append(dict(d, ns=d["metadata"].get("namespace", "default")))

    pods = list(rendered_pods(docs, namespace))
    if not pods:
        errors.append("no pods rendered")
    for pod in pods:
        for kind in ("Ingress", "Egress"):
            if not any(
                kind in policy_types(p) and selects(p["spec"].get("podSelector", {}), pod.labels)
                for p in policies
                if p["ns"] == pod.namespace
            ):
                errors.append(f"{pod.name}: no NetworkPolicy isolates its {kind.lower()}")

    outside = [
        Pod(name, ns or namespace, labels, ours=ns is None)
        for name, (ns, labels) in OUTSIDE_PODS.items()
    ] + [Address(name, ip) for name, ip in OUTSIDE_IPS.items()]
    peers = pods + outside

    ports = set(EXTRA_PORTS)
    for pod in pods:
        ports |= set(pod.ports.values())
    for p in policies:
        for rule in (p["spec"].get("ingress") or []) + (p["spec"].get("egress") or []):
            for port in rule.get("ports") or []:
                if isinstance(port.get("port"), int):
                    ports.add((port["port"], port.get("protocol", "TCP")))

    found = set()
    for src in peers:
        for dst in peers:
            if not (src.ours or dst.ours):
                continue  # neither side is nt's to decide
            for port, proto in sorted(ports):
                if allowed(policies, src, dst, port, proto):
                    found.add((src.name, dst.name, f"{port}/{proto}"))

    expected = EXPECTED.get(target)
    if expected is None:
        errors.append(f"no expected connections for target {target}: add them to {__file__}")
    else:
        for s, d, p in sorted(found - expected):
            errors.append(f"allowed but not expected: {s} -> {d} {p}")
        for s, d, p in sorted(expected - found):
            errors.append(f"expected but denied: {s} -> {d} {p}")

    for e in errors:
        print(f"ERROR - {target}: network: {e}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
