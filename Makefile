# The README's commands. Every target sources scripts/env.sh so cargo finds
# the torch virtualenv and the binaries find libtorch at run time.
SHELL := /bin/bash
ENV := . scripts/env.sh &&

.PHONY: setup build test fmt lint bench-fusion

setup:
	./scripts/setup.sh

build: setup
	$(ENV) cargo build --release --workspace

test: setup
	$(ENV) cargo build --workspace --all-targets
	$(ENV) cargo test --workspace -- --test-threads 2

fmt:
	cargo fmt --all

lint: setup
	cargo fmt --all --check
	$(ENV) cargo clippy --workspace --all-targets -- -D warnings

bench-fusion: build
	$(ENV) python3 bench/fusion_bench.py
