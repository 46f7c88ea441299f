#!/usr/bin/env bash
# Installs nvcc 13.0 (a relocatable toolkit from five pinned PyPI wheels) into .cuda/.
# Idempotent: does nothing when .cuda/bin/nvcc already runs. Exactly 13.0.x, because the
# GPU machines run a CUDA 13.0 driver that cannot load PTX from a newer nvcc.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dest="$root/.cuda"
if [ -x "$dest/bin/nvcc" ] && "$dest/bin/nvcc" --version 2>/dev/null | grep -q 'release 13.0'; then
  echo "setup-cuda: nvcc 13.0 already in $dest"
  exit 0
fi
py="$(command -v python3 || command -v python)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
"$py" -m pip download --quiet --no-deps -d "$tmp/wheels" \
  nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
  nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85
mkdir -p "$tmp/unpacked"
for whl in "$tmp"/wheels/*.whl; do
  "$py" -m zipfile -e "$whl" "$tmp/unpacked"
done
rm -rf "$dest"
mv "$tmp/unpacked/nvidia/cu13" "$dest"
chmod +x "$dest"/bin/* "$dest"/nvvm/bin/* 2>/dev/null || true
"$dest/bin/nvcc" --version | tail -n 2
# build.rs looks for nvcc only when cargo re-runs it, and a run that found none watches no path
# that the install changes: a newer build.rs makes the next build pick the kernels up.
touch "$root/build.rs"
echo "setup-cuda: installed nvcc into $dest"
