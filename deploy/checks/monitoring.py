"""The Prometheus Operator resources of one rendering of deploy/, checked by
structure (kubernetes-validate has no schema for these CRDs, and promtool is
not installed here, so PromQL is not parsed in full).

    monitoring.py TARGET RENDERED.yaml SERVER_METRICS_RS WORKER_METRICS_RS

When the rendering has monitoring.coreos.com resources:

* a ServiceMonitor selects the Service nt-server by its labels and scrapes
  the named port that leads to the coordinator's NT_METRICS_LISTEN;
* a PodMonitor selects the worker pods and scrapes the named container port
  of their NT_HEALTH_LISTEN;
* the PrometheusRule has the alerts nt promises (REQUIRED_ALERTS), each with
  an expression, a severity and a summary, and a valid `for`;
* every metric an expression names is exported by nt (the names are read
  from server/src/metrics.rs and worker/src/metrics.rs; histograms add
  _bucket, _sum and _count) or is one of the few outside ones in
  OUTSIDE_METRICS, and carries namespace="<the rendering's namespace>";
* the CronJob a nightly alert names is rendered.

Prints one ERROR line per finding on stderr; exits 1 when there is any.
"""
import re
import sys

import yaml

REQUIRED_ALERTS = {
    "NtQueueStuck",
    "NtLeaseExpiries",
    "NtRunFailed",
    "NtNightlyFailed",
    "NtNightlyMissed",
}
# Metrics that are not nt's, and where they come from.
OUTSIDE_METRICS = {
    "up": "Prometheus, per scrape target",
    "kube_job_failed": "kube-state-metrics",
    "kube_job_status_start_time": "kube-state-metrics",
    "kube_cronjob_created": "kube-state-metrics",
    "kube_cronjob_status_last_successful_time": "kube-state-metrics",
}
SEVERITIES = {"critical", "warning", "info"}
PROMQL_WORDS = {
    "and", "or", "unless", "bool", "by", "without", "on", "ignoring",
    "group_left", "group_right", "offset", "inf", "nan",
}
IDENT = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
DURATION = re.compile(r"^([0-9]+(ms|s|m|h|d|w|y))+$")


def exported_metrics(*sources):
    names = set()
    for path in sources:
        text = open(path).read()
        names |= set(re.findall(r'"(nt_[a-z0-9_]+)"', text))
        for h in re.findall(r'HistogramOpts::new\(\s*"(nt_[a-z0-9_]+)"', text):
            names |= {f"{h}_bucket", f"{h}_sum", f"{h}_count"}
    return names


def metric_references(expr):
    """(name, matchers text) for every series selector in a PromQL expression."""
    refs = []
    # Selectors with label matchers; then drop them, strings, ranges and
    # grouping clauses, and what is left that is no function call or
    # keyword is a bare metric name.
    for name, matchers in re.findall(rf"({IDENT})?\s*\{{([^}}]*)\}}", expr):
        refs.append((name, matchers))
    rest = re.sub(rf"({IDENT})?\s*\{{[^}}]*\}}", " SELECTOR ", expr)
    rest = re.sub(r'"(?:[^"\\]|\\.)*"', " ", rest)
    rest = re.sub(r"\[[^\]]*\]", " ", rest)
    rest = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", rest)
    rest = re.sub(r"\boffset\s+\S+", " ", rest)
    for m in re.finditer(rf"(?<![\w.])({IDENT})(\s*\()?", rest):
        word, call = m.group(1), m.group(2)
        if call or word == "SELECTOR" or word.lower() in PROMQL_WORDS:
            continue
        refs.append((word, ""))
    return refs


def label_value(matchers, label):
    m = re.search(rf'\b{label}\s*=\s*"([^"]*)"', matchers)
    return m.group(1) if m else None


def listen_port(container, variable):
    for e in container.get("env", []):
        if e["name"] == variable and e.get("value"):
            return int(e["value"].rsplit(":", 1)[1])
    return None


def main():
    target, path, *metric_sources = sys.argv[1:]
    docs = [d for d in yaml.safe_load_all(open(path)) if d]
    errors = []
    monitoring = [d for d in docs if d["apiVersion"].startswith("monitoring.coreos.com/")]
    if not monitoring:
        return 0  # the rendering leaves Prometheus Operator resources out
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], {})[d["metadata"]["name"]] = d
    namespace = {d["metadata"].get("namespace", "default") for d in monitoring}.pop()
    exported = exported_metrics(*metric_sources)
    if "nt_queue_depth_tasks" not in exported:
        errors.append(f"no nt metrics found in {metric_sources}")

    # The coordinator's /metrics through its Service.
    service = by_kind.get("Service", {}).get("nt-server")
    server = by_kind.get("Deployment", {}).get("nt-server")
    monitors = by_kind.get("ServiceMonitor", {}).values()
    if not monitors:
        errors.append("no ServiceMonitor")
    if service and server:
        container = server["spec"]["template"]["spec"]["containers"][0]
        want = listen_port(container, "NT_METRICS_LISTEN")
        named = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
        ports = {
            p["name"]: named.get(p.get("targetPort"), p.get("targetPort"))
            for p in service["spec"]["ports"]
        }
        labels = service["metadata"].get("labels", {})
        good = [
            m
            for m in monitors
            if all(labels.get(k) == v for k, v in m["spec"]["selector"].get("matchLabels", {}).items())
            and any(ports.get(e.get("port")) == want for e in m["spec"].get("endpoints", []))
        ]
        if not good:
            errors.append(
                f"no ServiceMonitor selects Service nt-server and scrapes its port for "
                f"NT_METRICS_LISTEN ({want})"
            )

    # The workers' /metrics on their pods.
    worker = by_kind.get("Deployment", {}).get("nt-worker")
    if worker:
        template = worker["spec"]["template"]
        container = template["spec"]["containers"][0]
        want = listen_port(container, "NT_HEALTH_LISTEN")
        named = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
        labels = template["metadata"].get("labels", {})
        good = [
            m
            for m in by_kind.get("PodMonitor", {}).values()
            if all(labels.get(k) == v for k, v in m["spec"]["selector"].get("matchLabels", {}).items())
            and any(
                named.get(e.get("port")) == want and e.get("path", "/metrics") == "/metrics"
                for e in m["spec"].get("podMetricsEndpoints", [])
            )
        ]
        if not good:
            errors.append(f"no PodMonitor scrapes the workers' NT_HEALTH_LISTEN port ({want})")

    # The alerts.
    rules = by_kind.get("PrometheusRule", {}).values()
    if not rules:
        errors.append("no PrometheusRule")
    alerts = set()
    cronjobs = set(by_kind.get("CronJob", {}))
    for pr in rules:
        groups = pr.get("spec", {}).get("groups") or []
        if not groups:
            errors.append(f"PrometheusRule/{pr['metadata']['name']}: no groups")
        for g in groups:
            if not g.get("name") or not g.get("rules"):
                errors.append(f"PrometheusRule/{pr['metadata']['name']}: a group without name or rules")
            for r in g.get("rules") or []:
                name = r.get("alert") or r.get("record")
                at = f"PrometheusRule/{pr['metadata']['name']} {name}"
                if not name:
                    errors.append(f"{at}: neither alert nor record")
                    continue
                expr = r.get("expr")
                if not isinstance(expr, str) or not expr.strip():
                    errors.append(f"{at}: no expr")
                    continue
                if expr.count("(") != expr.count(")") or expr.count("{") != expr.count("}"):
                    errors.append(f"{at}: unbalanced brackets in expr")
                if "alert" in r:
                    alerts.add(name)
                    if r.get("labels", {}).get("severity") not in SEVERITIES:
                        errors.append(f"{at}: labels.severity must be one of {sorted(SEVERITIES)}")
                    if not r.get("annotations", {}).get("summary"):
                        errors.append(f"{at}: no annotations.summary")
                if "for" in r and not DURATION.match(str(r["for"])):
                    errors.append(f"{at}: `for: {r['for']}` is not a duration")
                refs = metric_references(expr)
                if not refs:
                    errors.append(f"{at}: names no metric")
                for metric, matchers in refs:
                    if metric.startswith("nt_"):
                        if metric not in exported:
                            errors.append(f"{at}: nt does not export {metric}")
                    elif metric not in OUTSIDE_METRICS:
                        errors.append(f"{at}: unknown metric {metric!r} (not nt's, not in OUTSIDE_METRICS)")
                    ns = label_value(matchers, "namespace")
                    if ns != namespace:
                        errors.append(f"{at}: {metric} needs namespace=\"{namespace}\" (has {ns!r})")
                    cj = label_value(matchers, "cronjob")
                    if cj is not None and cj not in cronjobs:
                        errors.append(f"{at}: CronJob {cj} is not rendered")
                    job = re.search(r'\bjob_name\s*=~\s*"([^".*]+)-\.\*"', matchers)
                    if job and job.group(1) not in cronjobs:
                        errors.append(f"{at}: jobs of CronJob {job.group(1)} are named, it is not rendered")
    for missing in sorted(REQUIRED_ALERTS - alerts):
        errors.append(f"alert {missing} is missing")

    for e in errors:
        print(f"ERROR - {target}: monitoring: {e}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
