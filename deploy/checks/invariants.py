"""nt's invariants in one rendering of deploy/: one Recreate coordinator and
its Service, the workers' grace above their own shutdown grace, NT_DEVICE
consistent with GPU limits, the CronJob's Forbid, every referenced ConfigMap,
Secret and ServiceAccount rendered, nt's S3 keys optional (the AWS credential
chain otherwise), and the hardening of every container.

    invariants.py TARGET RENDERED.yaml

Prints one ERROR line per finding on stderr; exits 1 when there is any.
"""
import sys
import yaml

target, path = sys.argv[1], sys.argv[2]
docs = [d for d in yaml.safe_load_all(open(path)) if d]
errors = []
by_kind = {}
for d in docs:
    by_kind.setdefault(d["kind"], {})[d["metadata"]["name"]] = d

# Secrets that the manifests reference but must not create (made by hand).
EXTERNAL_SECRETS = {"nt-secrets"}
# Containers that run nt itself (their S3 credentials follow nt's rules).
NT_BINARIES = {"nt-server", "nt-worker"}

def pod_specs():
    for kind in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        for name, d in by_kind.get(kind, {}).items():
            yield f"{kind}/{name}", d["spec"]["template"]["spec"]
    for name, d in by_kind.get("CronJob", {}).items():
        yield f"CronJob/{name}", d["spec"]["jobTemplate"]["spec"]["template"]["spec"]

def env_of(container):
    return {e["name"]: e.get("value") for e in container.get("env", [])}

# The coordinator: exactly one, never two at once.
server = by_kind.get("Deployment", {}).get("nt-server")
if server is None:
    errors.append("no Deployment nt-server")
else:
    if server["spec"].get("replicas") != 1:
        errors.append("Deployment/nt-server: replicas must be 1")
    if server["spec"].get("strategy", {}).get("type") != "Recreate":
        errors.append("Deployment/nt-server: strategy must be Recreate")
if "nt-server" not in by_kind.get("Service", {}):
    errors.append("no Service nt-server")

# Workers: the pod's grace must outlast the worker's own shutdown grace.
worker = by_kind.get("Deployment", {}).get("nt-worker")
if worker is None:
    errors.append("no Deployment nt-worker")
else:
    spec = worker["spec"]["template"]["spec"]
    grace = spec.get("terminationGracePeriodSeconds", 30)
    env = env_of(spec["containers"][0])
    own = int(env.get("NT_SHUTDOWN_GRACE_SECS") or 30)
    if grace <= own:
        errors.append(
            f"Deployment/nt-worker: terminationGracePeriodSeconds {grace} "
            f"must exceed NT_SHUTDOWN_GRACE_SECS {own}")
    gpus = spec["containers"][0].get("resources", {}).get("limits", {}).get("nvidia.com/gpu")
    device = env.get("NT_DEVICE", "auto")
    if gpus and not device.startswith("cuda") and device != "auto":
        errors.append(f"Deployment/nt-worker: GPU requested but NT_DEVICE={device}")
    if device.startswith("cuda") and not gpus:
        errors.append("Deployment/nt-worker: NT_DEVICE=cuda without an nvidia.com/gpu limit")

for name, cj in by_kind.get("CronJob", {}).items():
    if cj["spec"].get("concurrencyPolicy") != "Forbid":
        errors.append(f"CronJob/{name}: concurrencyPolicy must be Forbid")

# References, hardening.
configmaps = set(by_kind.get("ConfigMap", {}))
secrets = set(by_kind.get("Secret", {})) | EXTERNAL_SECRETS
for where, spec in pod_specs():
    psc = spec.get("securityContext", {})
    for c in spec.get("containers", []) + spec.get("initContainers", []):
        at = f"{where} container {c['name']}"
        if not c.get("command"):
            errors.append(f"{at}: no command (the image only prints help)")
        sc = c.get("securityContext", {})
        if not (sc.get("runAsNonRoot", psc.get("runAsNonRoot"))):
            errors.append(f"{at}: runAsNonRoot is not set")
        if sc.get("allowPrivilegeEscalation") is not False:
            errors.append(f"{at}: allowPrivilegeEscalation must be false")
        if "ALL" not in sc.get("capabilities", {}).get("drop", []):
            errors.append(f"{at}: capabilities must drop ALL")
        for src in c.get("envFrom", []):
            if "configMapRef" in src and src["configMapRef"]["name"] not in configmaps:
                errors.append(f"{at}: ConfigMap {src['configMapRef']['name']} is not rendered")
            if "secretRef" in src and src["secretRef"]["name"] not in secrets:
                errors.append(f"{at}: Secret {src['secretRef']['name']} is not rendered")
        for e in c.get("env", []):
            ref = e.get("valueFrom", {})
            if "configMapKeyRef" in ref and ref["configMapKeyRef"]["name"] not in configmaps:
                errors.append(f"{at}: ConfigMap {ref['configMapKeyRef']['name']} is not rendered")
            if "secretKeyRef" in ref and ref["secretKeyRef"]["name"] not in secrets:
                errors.append(f"{at}: Secret {ref['secretKeyRef']['name']} is not rendered")
            # nt's S3 keys are optional: without them the AWS credential
            # chain (IRSA, Pod Identity) applies.
            if (
                c.get("command", [""])[0] in NT_BINARIES
                and e["name"].startswith("AWS_")
                and "secretKeyRef" in ref
                and ref["secretKeyRef"].get("optional") is not True
            ):
                errors.append(f"{at}: {e['name']} must come from an optional secretKeyRef")
    account = spec.get("serviceAccountName")
    if account and account != "default" and account not in by_kind.get("ServiceAccount", {}):
        errors.append(f"{where}: ServiceAccount {account} is not rendered")
    # The IRSA webhook projects a token readable by the pod's fsGroup only.
    role = by_kind.get("ServiceAccount", {}).get(account, {}).get("metadata", {}).get(
        "annotations", {}).get("eks.amazonaws.com/role-arn")
    if role and not psc.get("fsGroup"):
        errors.append(f"{where}: ServiceAccount {account} has an IAM role but the pod no fsGroup")
    for v in spec.get("volumes", []):
        if "configMap" in v and v["configMap"]["name"] not in configmaps:
            errors.append(f"{where}: volume {v['name']}: ConfigMap {v['configMap']['name']} is not rendered")
        if "secret" in v and v["secret"]["secretName"] not in secrets:
            errors.append(f"{where}: volume {v['name']}: Secret {v['secret']['secretName']} is not rendered")

for e in errors:
    print(f"ERROR - {target}: {e}", file=sys.stderr)
sys.exit(1 if errors else 0)
