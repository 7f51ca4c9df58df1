#!/usr/bin/env bash
# The joint-training benchmark (issue 14) on a GPU machine, in two halves, as
# bench/gpu_check.sh does it.
#
#   bench/gpu_joint.sh prepare     (here, with the Rust toolchain)
#       builds joint-bench and puts it, stripped (3 MB), into .gpu/ (git-ignored)
#       beside Fashion-MNIST's files in .gpu/data/ (30 MB); what
#       `gpu_check.sh prepare` left there stays. Then run the other half on the
#       GPU machine with `.gpu` carried, e.g. through the device tool: command
#       `bench/gpu_joint.sh run`, carry [".gpu"], timeout 540.
#
#   bench/gpu_joint.sh run [joint_bench.py flags]   (on the GPU machine: no toolchain, no network)
#       uses the machine's own torch 2.11 (python3) for libtorch and for the
#       PyTorch side, checks that both see CUDA, and runs
#       `bench/joint_bench.py --device cuda` (MLP, LeNet, ResNet18; K = 2, 4, 8;
#       both kinds of joint kernels) under a time limit. The log, the table
#       (.txt) and every measurement (.json) go to $OUT (or .gpu/out); copy the
#       last two to bench/results/.
#
#   bench/gpu_joint.sh check       (here, after prepare)
#       the `run` half on the CPU with tiny sizes: the packed binary, the
#       library path, the data path, the Python side and the files written,
#       so a mistake shows here and not on the GPU's clock.
set -euo pipefail
cd "$(dirname "$0")/.."

# run_half DEVICE SECONDS [joint_bench.py flags]: the GPU machine's half.
run_half() {
  local device="$1" limit="$2"
  shift 2
  out="${OUT:-.gpu/out}"
  mkdir -p "$out"
  # libtorch from the machine's torch, the binary and the data from .gpu/.
  torch_lib="$(python3 -c 'import torch, os; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
  export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export NT_JOINT_BENCH="$PWD/.gpu/joint-bench" NT_FASHION_MNIST="$PWD/.gpu/data" PYTHONUNBUFFERED=1
  [ -x "$NT_JOINT_BENCH" ] || { echo "no $NT_JOINT_BENCH: run '$0 prepare' and carry .gpu" >&2; exit 1; }
  {
    date -u +"%Y-%m-%d %H:%M UTC"
    if [ "$device" = cuda ]; then
      nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    fi
    python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())'
    # libtorch through the binary must see the device too (it loads libtorch_cuda.so itself).
    "$NT_JOINT_BENCH" --device "$device" --arch mlp --k 2 --batch 8 --steps 1 --warmup-steps 0 --no-sequential
    local t0=$SECONDS
    status=0
    timeout "$limit" python3 bench/joint_bench.py --device "$device" --out-dir "$out" "$@" || status=$?
    echo "== joint_bench.py: exit $status, $((SECONDS - t0)) s"
    ls -l "$out"
    exit "$status"
  } 2>&1 | tee "$out/gpu_joint.log"
}

case "${1:-}" in
prepare)
  . scripts/env.sh
  cargo build --release -p nt-bench --bin joint-bench
  mkdir -p .gpu/data
  strip -o .gpu/joint-bench target/release/joint-bench
  cp "$NT_FASHION_MNIST"/*.gz .gpu/data/
  du -sh .gpu
  ;;
run)
  shift
  # About 4 minutes on an H200; the limit leaves room inside a 10-minute command.
  run_half cuda 480 --kernels both "$@"
  ;;
check)
  shift
  # This machine's torch venv stands in for the GPU machine's python3.
  . scripts/env.sh
  OUT="${OUT:-.gpu/out-check}" run_half cpu 300 --k 2 --steps 2 --batch 8 --repeats 1 \
    --warmup-steps 1 --quiet-wait 0 --tag check "$@"
  ;;
*)
  echo "usage: $0 prepare|run|check [joint_bench.py flags]" >&2
  exit 2
  ;;
esac
