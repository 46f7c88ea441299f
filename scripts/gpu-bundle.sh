#!/usr/bin/env bash
# Builds the GPU bundle: what a GPU machine without Rust needs for one prepared run
# (scripts/gpu-run.sh, BENCHMARKS.md "The first GPU run"), in target/gpu-bundle/ (under 60 MiB;
# the device tool carries 64 MiB), started there with
#
#     bash target/gpu-bundle/run.sh          # logs and summary.txt in $OUT (default ./out)
#
# Contents: the test binaries with GPU tests (tests/cuda.rs, tests/model.rs, and
# tests/concurrency.rs, tests/tensor_core.rs when they exist), the GPU criterion harness (benches/gpu.rs), the `lkconv` CLI, all stripped, plus
# torch_compare.py, run.sh and bundle.env, and python/ (python/bundle.sh: the lkconv.torch wheel,
# gpu_check.py). The CPU-only test binaries are not bundled.
# The kernels are compiled for sm_90 only (`LKCONV_CUDA_ARCHS=90`: the H100/H200 the run gets;
# set LKCONV_CUDA_ARCHS to override, empty for build.rs's default list), in a target folder of
# its own (CARGO_TARGET_DIR, default target/gpu-bundle-build) so that the everyday build keeps
# its fatbin. nvcc is found as build.rs finds it (NVCC, CUDA_PATH, CUDA_HOME, .cuda/, PATH);
# when there is none, scripts/setup-cuda.sh installs it into .cuda/.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
unset LKCONV_NO_NVCC
export LKCONV_CUDA_ARCHS="${LKCONV_CUDA_ARCHS-90}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target/gpu-bundle-build}"
limit_mib=60
bundle="$root/target/gpu-bundle"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
t0=$(date +%s)

say() { printf 'gpu-bundle: %s\n' "$*" >&2; }

if [ -z "${NVCC:-}${CUDA_PATH:-}${CUDA_HOME:-}" ] && [ ! -x .cuda/bin/nvcc ] && ! command -v nvcc >/dev/null 2>&1; then
  say "no nvcc found: installing it with scripts/setup-cuda.sh"
  bash scripts/setup-cuda.sh
fi

# Prints "kind<TAB>name<TAB>executable" for every executable cargo reports.
artifacts() {
  python3 -c '
import json, sys
for line in sys.stdin:
    if not line.startswith("{"):
        continue
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        print("%s\t%s\t%s" % (",".join(m["target"]["kind"]), m["target"]["name"], m["executable"]))
'
}

# The test targets with GPU tests (run.sh runs only their CUDA tests).
test_targets=(--test cuda --test model)
for t in concurrency tensor_core; do
  [ -f "tests/$t.rs" ] && test_targets+=(--test "$t")
done

# LKCONV_BUNDLE_KEEP_GOING=1: bundle whatever builds and list what failed in BUILD-INFO.txt.
keep=()
[ "${LKCONV_BUNDLE_KEEP_GOING:-0}" = 1 ] && keep=(--keep-going)
build_failed=""
build() { # name cargo-args...
  local name="$1"
  shift
  if ! cargo "$@" "${keep[@]}" --message-format=json 2>"$tmp/$name.err" | artifacts >"$tmp/$name.tsv"; then
    grep -E '^(error|warning: unused)' "$tmp/$name.err" >&2 || tail -n 30 "$tmp/$name.err" >&2
    if [ ${#keep[@]} -eq 0 ]; then
      say "cargo $* failed (LKCONV_BUNDLE_KEEP_GOING=1 bundles what builds)"
      exit 1
    fi
    build_failed+="$(grep -E '^error: could not compile' "$tmp/$name.err" | sort -u)"$'\n'
  fi
}
say "building for sm_${LKCONV_CUDA_ARCHS:-<build.rs default>} in $CARGO_TARGET_DIR"
say "building the GPU test binaries (${test_targets[*]})"
build tests test --release --no-run -p lkconv "${test_targets[@]}"
say "building the GPU criterion harness"
build benches bench --no-run -p lkconv --bench gpu
say "building the lkconv CLI"
build cli build --release -p lkconv --bin lkconv
grep -h 'warning: lkconv@' "$tmp"/*.err | sort -u >&2 || true

cli="$(awk -F'\t' '$1 == "bin" && $2 == "lkconv" { print $3 }' "$tmp/cli.tsv" | tail -n 1)"
[ -x "$cli" ] || { say "no lkconv executable in cargo's output"; exit 1; }
cli_info="$("$cli" info 2>&1 || true)"
if ! grep -q '^CUDA kernels: compiled' <<<"$cli_info"; then
  printf '%s\n' "$cli_info" >&2
  if [ "${LKCONV_BUNDLE_ALLOW_NO_KERNELS:-0}" != 1 ]; then
    say "the build has no CUDA kernels (nvcc missing or failed): refusing to bundle (LKCONV_BUNDLE_ALLOW_NO_KERNELS=1 overrides)"
    exit 1
  fi
fi
t_build=$(( $(date +%s) - t0 ))

rm -rf "$bundle"
mkdir -p "$bundle/bin"
copy() { # src dest-name
  cp "$1" "$bundle/bin/$2"
  strip "$bundle/bin/$2" 2>/dev/null || say "warning: could not strip $2"
  chmod +x "$bundle/bin/$2"
}
while IFS=$'\t' read -r kind name exe; do
  [ "$kind" = test ] && copy "$exe" "test-$name"
done <"$tmp/tests.tsv"
while IFS=$'\t' read -r kind name exe; do
  [ "$kind" = bench ] && copy "$exe" "bench-$name"
done <"$tmp/benches.tsv"
copy "$cli" lkconv
cp scripts/torch_compare.py "$bundle/torch_compare.py"
cp scripts/gpu-run.sh "$bundle/run.sh"
chmod +x "$bundle/run.sh"
# The Python package (lkconv.torch) for run.sh's python step: the abi3 wheel built now for the
# same architectures, python/gpu_check.py and the test modules it reuses (python/bundle.sh).
# Without it the bundle still serves; run.sh then skips that step and says why.
say "building the Python wheel and bundling python/gpu_check.py (python/bundle.sh)"
python_bundled="yes"
if ! LKCONV_WHEEL_FRESH=1 bash python/bundle.sh "$bundle" >"$tmp/python.err" 2>&1; then
  tail -n 20 "$tmp/python.err" >&2
  say "warning: python/bundle.sh failed: the bundle has no Python package (run.sh skips its python step)"
  python_bundled="no: python/bundle.sh failed: $(grep -m1 -iE 'error' "$tmp/python.err" || tail -n 1 "$tmp/python.err")"
  rm -rf "$bundle/python"
fi
# Tests read tests/data through the CARGO_MANIFEST_DIR baked in here: run.sh links this path
# to the repository copy it runs in.
printf '%s\n' "$root" >"$bundle/manifest-dir.txt"

# hook: the tensor-core kernels (`--impl tc`) join the bench and torch steps once lkconv has them
has_tc=0
if "$cli" bench --device sim --impl tc --op fwd --dtype bf16 --shape 1,1,8,8 --kernel 3 --reps 1 --json \
  >/dev/null 2>"$tmp/tc.err" || ! grep -qi 'unknown impl' "$tmp/tc.err"; then
  has_tc=1
fi
built="$(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet HEAD 2>/dev/null || echo '+dirty') $(date -u +%Y-%m-%dT%H:%M:%SZ)"
printf 'BUILT="%s"\nHAS_TC=%s\n' "$built" "$has_tc" >"$bundle/bundle.env"
{
  echo "built: $built, LKCONV_CUDA_ARCHS=${LKCONV_CUDA_ARCHS}, tensor-core impl: $has_tc"
  echo "python package (lkconv.torch wheel, gpu_check.py): $python_bundled"
  rustc --version
  printf '%s\n' "$cli_info"
  if [ -n "${build_failed//[$'\n']/}" ]; then
    echo "NOT BUNDLED (build failed):"
    printf '%s' "$build_failed"
  fi
} >"$bundle/BUILD-INFO.txt"

size_mib() { du -sm "$1" | cut -f1; }
if [ "$(size_mib "$bundle")" -gt "$limit_mib" ]; then
  say "raw binaries are $(size_mib "$bundle") MiB: packing them into bins.tar.xz"
  tar -C "$bundle" -cf - bin | xz -6 -T0 >"$bundle/bins.tar.xz"
  rm -rf "$bundle/bin"
fi

size="$(du -sb "$bundle" | cut -f1)"
say "bundle: $bundle, $(du -sh "$bundle" | cut -f1) ($size bytes); build ${t_build}s, total $(( $(date +%s) - t0 ))s"
ls -la "$bundle" "$bundle/bin" 2>/dev/null >&2 || ls -la "$bundle" >&2
if [ "$size" -gt $((limit_mib * 1024 * 1024)) ]; then
  say "bundle is larger than ${limit_mib} MiB"
  exit 1
fi
echo "$bundle"
