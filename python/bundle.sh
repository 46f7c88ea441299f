#!/usr/bin/env bash
# Puts what python/gpu_check.py needs on a GPU machine (no Rust, no network) into DEST/python:
# the abi3 wheel (built here with maturin; it embeds the CUDA kernels when nvcc is found as
# build.rs finds it, for LKCONV_CUDA_ARCHS when set), gpu_check.py and the test modules it reuses.
# scripts/gpu-bundle.sh calls it with LKCONV_WHEEL_FRESH=1 (a wheel built now, from these
# sources); otherwise a wheel already in python/target/wheels is reused.
# maturin: on PATH, in python/.venv (python/ci.sh), or installed here, pinned as in
# requirements-ci.txt, into python/target/maturin-venv.
# On the GPU machine, one line runs it (torch with CUDA must be there; pytest is optional):
#   python3 -m zipfile -e "$B"/python/lkconv-*.whl "$B/python/site" && \
#     PYTHONPATH="$B/python/site" python3 "$B/python/gpu_check.py" --out "$OUT"
# (scripts/gpu-run.sh does this as its step after torch_compare).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
dest="${1:?usage: python/bundle.sh DEST}"
wheels="$here/target/wheels"
if [ "${LKCONV_WHEEL_FRESH:-0}" = 1 ] || ! ls "$wheels"/lkconv-*.whl >/dev/null 2>&1; then
  maturin="$(command -v maturin || true)"
  [ -z "$maturin" ] && [ -x "$here/.venv/bin/maturin" ] && maturin="$here/.venv/bin/maturin"
  if [ -z "$maturin" ]; then
    pin="$(grep -E '^maturin==' "$here/requirements-ci.txt")"
    venv="$here/target/maturin-venv"
    if [ ! -x "$venv/bin/maturin" ] || ! "$venv/bin/pip" freeze 2>/dev/null | grep -qx "$pin"; then
      echo "python/bundle.sh: installing $pin into python/target/maturin-venv" >&2
      rm -rf "$venv"
      python3 -m venv "$venv"
      "$venv/bin/pip" install --quiet "$pin"
    fi
    maturin="$venv/bin/maturin"
  fi
  wheels="$(mktemp -d)"
  trap 'rm -rf "$wheels"' EXIT
  "$maturin" build --release --quiet -m "$here/Cargo.toml" -o "$wheels"
fi
mkdir -p "$dest/python/tests"
cp "$wheels"/lkconv-*.whl "$here/gpu_check.py" "$dest/python/"
cp "$here"/tests/checks.py "$here"/tests/run_seed.py "$here"/tests/test_modules.py "$here"/tests/test_torch_ops.py \
  "$dest/python/tests/"
