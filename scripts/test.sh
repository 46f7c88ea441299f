#!/usr/bin/env bash
# Every test of the project (README's test command; .ci/run runs it on a fresh machine). Installs
# what the tests need on first use: nvcc 13.0 into .cuda/, NumPy for the C ABI's Python tests,
# and the Python package's pinned test environment (python/.venv, by python/ci.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
echo "== setup: nvcc 13.0 into .cuda/ (so the tests prove the CUDA kernels compile)"
bash scripts/setup-cuda.sh
echo "== setup: NumPy 2.2.6 (the C ABI's Python ctypes tests)"
bash scripts/setup-numpy.sh
echo "== cargo fmt --check"
cargo fmt --check
echo "== cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets -- -D warnings
echo "== the C library (liblkconv.so/.a) that capi's C and Python tests link"
cargo build --release -p lkconv-capi
echo "== cargo test --release (library, CLI, simulator, C ABI; GPU tests skip without a GPU)"
cargo test --release
echo "== candle op (feature candle, CPU): clippy, tests, doc-test"
cargo clippy -p lkconv --lib --tests --features candle -- -D warnings
cargo test --release -p lkconv --features candle --test candle
cargo test --release -p lkconv --features candle --doc candle
echo "== GPU tests that skipped themselves (they print why; captured above):"
cargo test --release --quiet --test cuda --test model -- --show-output 2>&1 | grep -B1 "^skipped" | grep -v "^--$" || echo "(none skipped)"
echo "== fuzz: 30 s per target (safetensors, checkpoint, conv_problem) from fuzz/corpus; fails on a panic, a hang or an oversized allocation"
LKCONV_FUZZ_SECONDS=30 cargo test --release --test fuzz
echo "== cargo bench --no-run"
cargo bench --no-run
echo "== CLI smoke: lkconv info"
cargo run --release --quiet -- info
echo "== Python package (python/ci.sh): abi3 wheel by maturin, pytest python/tests"
bash python/ci.sh
