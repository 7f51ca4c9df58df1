#!/usr/bin/env bash
# The GPU check, in two halves.
#
#   bench/gpu_check.sh prepare     (here, with the Rust toolchain)
#       builds release binaries and packs what the GPU machine needs into
#       .gpu/ (git-ignored): stripped binaries and the Fashion-MNIST files.
#       Then run the other half on the GPU machine with `.gpu` carried, e.g.
#       through the device tool: command `bench/gpu_check.sh run`, carry [".gpu"].
#
#   bench/gpu_check.sh run         (on the GPU machine: no toolchain, no network)
#       uses the machine's own torch 2.11 for libtorch, trains two members on
#       CUDA, fuses them, fine-tunes and evaluates, then runs the throughput
#       comparison against PyTorch eager on CUDA. Logs go to $OUT (or .gpu/out).
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
prepare)
  make build
  rm -rf .gpu && mkdir -p .gpu/data
  for b in ntctl nt-worker; do
    [ -x "target/release/$b" ] && strip -o ".gpu/$b" "target/release/$b"
  done
  . scripts/env.sh
  cp "$NT_FASHION_MNIST"/*.gz .gpu/data/
  du -sh .gpu
  ;;
run)
  out="${OUT:-.gpu/out}"
  mkdir -p "$out"
  torch_lib="$(python3 -c 'import torch, os; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
  export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export NTCTL="$PWD/.gpu/ntctl" NT_FASHION_MNIST="$PWD/.gpu/data"
  {
    date -u +"%Y-%m-%d %H:%M UTC"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
    work="$(mktemp -d)"
    for seed in 1 2; do
      "$NTCTL" train --arch mlp --device cuda --epochs 10 --seed "$seed" -o "$work/m$seed.safetensors"
    done
    "$NTCTL" fuse --method nt -o "$work/nt.safetensors" "$work/m1.safetensors" "$work/m2.safetensors"
    "$NTCTL" eval --device cuda "$work/nt.safetensors"
    "$NTCTL" train --init "$work/nt.safetensors" --device cuda --epochs 10 --seed 100 -o "$work/nt-ft.safetensors"
    "$NTCTL" eval --device cuda "$work/m1.safetensors" "$work/m2.safetensors"
    "$NTCTL" eval --device cuda "$work/nt-ft.safetensors"
    python3 bench/throughput.py --device cuda --repeat 3 --json "$out/throughput-cuda.json"
    python3 bench/throughput.py --device cuda --repeat 3 --bf16 --models resnet18 --json "$out/throughput-cuda-bf16.json"
  } 2>&1 | tee "$out/gpu_check.log"
  ;;
*)
  echo "usage: $0 prepare|run" >&2
  exit 2
  ;;
esac
