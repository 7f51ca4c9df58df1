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
  # ntctl alone: `ntctl run --local` holds the coordinator and the worker, and
  # the 64 MiB that travels has no room for nt-worker beside the data set.
  for b in ntctl; do
    [ -x "target/release/$b" ] && strip -o ".gpu/$b" "target/release/$b"
  done
  . scripts/env.sh
  cp "$NT_FASHION_MNIST"/*.gz .gpu/data/
  du -sh .gpu
  ;;
run)
  # Each step has its own time limit, so one that hangs loses only itself;
  # every step's output lands in $OUT as it goes.
  out="${OUT:-.gpu/out}"
  mkdir -p "$out"
  torch_lib="$(python3 -c 'import torch, os; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
  export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export NTCTL="$PWD/.gpu/ntctl" NT_FASHION_MNIST="$PWD/.gpu/data" PYTHONUNBUFFERED=1
  step() { # step SECONDS NAME COMMAND...
    local limit="$1" name="$2"; shift 2
    echo "== $name"
    local t0=$SECONDS
    timeout "$limit" "$@" || echo "!! $name failed (exit $?)"
    echo "== $name: $((SECONDS - t0)) s"
  }
  {
    date -u +"%Y-%m-%d %H:%M UTC"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
    work="$(mktemp -d)"
    # The embedded demo with its worker on the GPU, one task at a time, then two.
    for slots in 1 2; do
      step 150 "demo on cuda, $slots slot(s)" "$NTCTL" run examples/fashion-mlp.yaml --local \
        --worker-device cuda --slots "$slots" --store "$work/store$slots" --plot "$out/curves-cuda.png"
    done
    # Offline: members on CUDA, fused, and the fused model evaluated on CUDA and
    # on the CPU (the two accuracies must agree).
    for seed in 1 2; do
      step 60 "train member $seed" "$NTCTL" train --arch mlp --device cuda --epochs 10 --seed "$seed" -o "$work/m$seed.safetensors"
    done
    step 60 "fuse" "$NTCTL" fuse --method nt -o "$work/nt.safetensors" "$work/m1.safetensors" "$work/m2.safetensors"
    step 60 "eval fused on cuda" "$NTCTL" eval --device cuda "$work/nt.safetensors"
    step 60 "eval fused on cpu" "$NTCTL" eval --device cpu "$work/nt.safetensors"
    step 60 "eval ensemble on cuda" "$NTCTL" eval --device cuda "$work/m1.safetensors" "$work/m2.safetensors"
    step 200 "throughput fp32" python3 bench/throughput.py --device cuda --repeat 3 --json "$out/throughput-cuda.json"
    step 120 "throughput bf16" python3 bench/throughput.py --device cuda --repeat 3 --bf16 --models resnet18 --json "$out/throughput-cuda-bf16.json"
  } 2>&1 | tee "$out/gpu_check.log"
  ;;
*)
  echo "usage: $0 prepare|run" >&2
  exit 2
  ;;
esac
