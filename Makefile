# The README's commands. Every target sources scripts/env.sh so cargo finds
# the torch virtualenv and the binaries find libtorch at run time.
SHELL := /bin/bash
ENV := . scripts/env.sh &&

.PHONY: setup build demo test fuzz fmt lint bench bench-fusion bench-throughput bench-paper bench-pipeline bench-comparison bench-data soak gpu-check

setup:
	./scripts/setup.sh

build: setup
	$(ENV) cargo build --release --workspace

# The embedded demo: in-process coordinator and worker, local store, Fashion-MNIST.
demo: setup
	$(ENV) cargo build --release -p ntctl
	$(ENV) target/release/ntctl run examples/fashion-mlp.yaml --local --plot nt-demo-curves.png

# CARGO_INCREMENTAL=0: a fresh clone gains nothing from incremental caches,
# which would add gigabytes to the build's disk footprint.
test: export CARGO_INCREMENTAL := 0
test: setup
	$(ENV) cargo build --workspace --all-targets
	$(ENV) python3 scripts/check_layout.py .
	$(ENV) cargo test --workspace -- --test-threads 2
	$(ENV) deploy/validate.sh
	$(ENV) python3 -m pytest -q python/tests

# Mutates the fuzz corpus for NT_FUZZ_SECONDS per target (default 60) and
# writes bench/results/fuzz.md; new inputs and crashes land in fuzz/corpus/.
fuzz:
	$(ENV) cargo run --profile fuzz -p nt-fuzz --bin fuzz-drive -- --seconds $${NT_FUZZ_SECONDS:-60}

fmt:
	cargo fmt --all

lint: setup
	cargo fmt --all --check
	$(ENV) cargo clippy --workspace --all-targets -- -D warnings
	$(ENV) python3 scripts/check_layout.py .

bench: bench-fusion bench-throughput bench-paper bench-pipeline bench-data

# POT (the reference OT's exact solver) only for this benchmark, installed on demand.
bench-fusion: build
	$(ENV) (python3 -c 'import ot' 2>/dev/null || python3 -m pip install --quiet 'POT==0.9.7.post1')
	$(ENV) python3 bench/fusion_bench.py --json target/bench-fusion.json --plot target/bench-fusion.svg

# torchvision (the baseline's ImageFolder) only for this benchmark, installed on demand.
bench-data: build
	$(ENV) (python3 -c 'import torchvision' 2>/dev/null || python3 -m pip install --quiet 'torchvision==0.26.0')
	$(ENV) python3 bench/image_folder.py --repeat 3

bench-throughput: build
	$(ENV) python3 bench/throughput.py

bench-paper: build
	$(ENV) python3 bench/reproduce_paper.py

# The paper's comparison (README, "The paper's comparison"): MLP and LeNet on
# Fashion-MNIST, K = 2, 4, 8, three seeds; results in bench/results/paper-comparison/.
# Not part of `bench`: about an hour and a half on 2 CPU cores.
NT_COMPARISON_STORE ?= $${TMPDIR:-/tmp}/nt-paper-store
bench-comparison: build
	$(ENV) for model in mlp lenet; do \
		target/release/ntctl experiment examples/paper-$$model.yaml --local --slots 2 --threads 1 \
			--store $(NT_COMPARISON_STORE) --seeds 1,2,3 --members 2,4,8 \
			--out bench/results/paper-comparison/$$model || exit 1; \
	done

bench-pipeline: build
	$(ENV) target/release/coordinator-bench
	$(ENV) target/release/storage-bench
	$(ENV) target/release/run-overhead --epochs 10

# Not part of `bench`: 1,000 runs held for at least 10 minutes (see README,
# Performance). Fails when a run or task is lost or duplicated.
soak: build
	$(ENV) $${CARGO_TARGET_DIR:-target}/release/soak --runs 1000 --workers 64 --watchers 20 \
		--min-seconds 600 --out bench/results/soak-$$(date +%F)-cpu$$(nproc).txt

# Packs .gpu/ for the GPU machine; run `bench/gpu_check.sh run` there.
gpu-check:
	bench/gpu_check.sh prepare
