#!/usr/bin/env bash
# Builds the lkconv wheel (maturin, abi3) and runs python/tests with pytest, in a venv at
# python/.venv holding the pinned environment of python/requirements-ci.txt (installed once;
# reinstalled when that file changes). Run by .ci/run; runs as well by hand from anywhere.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="$here/.venv"
stamp="$venv/.requirements-ci.txt"
if ! cmp -s "$here/requirements-ci.txt" "$stamp" 2>/dev/null; then
  echo "== python: installing the pinned test environment into python/.venv"
  rm -rf "$venv"
  python3 -m venv "$venv"
  start=$SECONDS
  "$venv/bin/pip" install --quiet --no-deps -r "$here/requirements-ci.txt"
  echo "   installed in $((SECONDS - start)) s"
  cp "$here/requirements-ci.txt" "$stamp"
fi
echo "== python: cargo fmt --check, cargo clippy -D warnings (python/ is its own workspace)"
cargo fmt --check --manifest-path "$here/Cargo.toml"
# (the lint needs no CUDA kernels: skip nvcc for it; the wheel below embeds them)
LKCONV_NO_NVCC=1 cargo clippy --quiet --manifest-path "$here/Cargo.toml" --all-targets -- -D warnings
echo "== python: maturin build --release (abi3 wheel)"
rm -rf "$here/target/wheels"
"$venv/bin/maturin" build --release --quiet -m "$here/Cargo.toml" -o "$here/target/wheels"
"$venv/bin/pip" install --quiet --no-deps --force-reinstall "$here"/target/wheels/lkconv-*.whl
echo "== python: pytest python/tests"
# From outside python/, so that the installed wheel, not the source folder, is imported.
cd "$here/.."
set +e
"$venv/bin/pytest" -q -rs -p no:cacheprovider python/tests
rc=$?
set -e
case $rc in
  0) ;;
  5) echo "python: pytest collected no tests"; exit 1 ;;
  *) echo "python: pytest failed (exit $rc)"; exit 1 ;;
esac
