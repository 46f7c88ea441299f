#!/usr/bin/env bash
# Puts what python/gpu_check.py needs on a GPU machine (no Rust, no network) into DEST/python:
# the abi3 wheel (built here with maturin when absent; it embeds the CUDA kernels when nvcc is
# found as build.rs finds it), gpu_check.py and the test modules it reuses.
# On the GPU machine, one line runs it (torch with CUDA must be there; pytest is optional):
#   python3 -m zipfile -e "$B"/python/lkconv-*.whl "$B/python/site" && \
#     PYTHONPATH="$B/python/site" python3 "$B/python/gpu_check.py" --out "$OUT"
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
dest="${1:?usage: python/bundle.sh DEST}"
mkdir -p "$dest/python/tests"
if ! ls "$here"/target/wheels/lkconv-*.whl >/dev/null 2>&1; then
  maturin="$(command -v maturin || echo "$here/.venv/bin/maturin")"
  "$maturin" build --release --quiet -m "$here/Cargo.toml" -o "$here/target/wheels"
fi
cp "$here"/target/wheels/lkconv-*.whl "$here/gpu_check.py" "$dest/python/"
cp "$here"/tests/checks.py "$here"/tests/test_modules.py "$here"/tests/test_torch_ops.py "$dest/python/tests/"
