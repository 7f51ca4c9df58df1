# The README's commands. Every target sources scripts/env.sh so cargo finds
# the torch virtualenv and the binaries find libtorch at run time.
SHELL := /bin/bash
ENV := . scripts/env.sh &&

.PHONY: setup build test fmt lint bench bench-fusion bench-throughput bench-paper gpu-check

setup:
	./scripts/setup.sh

build: setup
	$(ENV) cargo build --release --workspace

test: setup
	$(ENV) cargo build --workspace --all-targets
	$(ENV) cargo test --workspace -- --test-threads 2
	$(ENV) deploy/validate.sh

fmt:
	cargo fmt --all

lint: setup
	cargo fmt --all --check
	$(ENV) cargo clippy --workspace --all-targets -- -D warnings

bench: bench-fusion bench-throughput bench-paper

bench-fusion: build
	$(ENV) python3 bench/fusion_bench.py

bench-throughput: build
	$(ENV) python3 bench/throughput.py

bench-paper: build
	$(ENV) python3 bench/reproduce_paper.py

# Packs .gpu/ for the GPU machine; run `bench/gpu_check.sh run` there.
gpu-check:
	bench/gpu_check.sh prepare
