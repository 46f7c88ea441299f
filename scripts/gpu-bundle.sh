#!/usr/bin/env bash
# Builds the GPU bundle: everything a GPU machine without Rust needs to test and benchmark
# lkconv, in target/gpu-bundle/ (at most 60 MiB), run there with
#
#     OUT=/some/dir bash target/gpu-bundle/run.sh
#
# (the device tool: carry ["target/gpu-bundle"], command "bash target/gpu-bundle/run.sh").
# Contents: the release test binaries (`cargo test --release --no-run`), the bench binaries
# (`cargo bench --no-run`), the `lkconv` CLI, all stripped, plus scripts/torch_compare.py and
# run.sh (GPU.md step 4). The kernels must be compiled in: nvcc is found as build.rs finds it
# (NVCC, CUDA_PATH, CUDA_HOME, .cuda/, PATH); when none is there, scripts/setup-cuda.sh
# installs it into .cuda/. Honours CARGO_TARGET_DIR for the build itself.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
unset LKCONV_NO_NVCC
limit_mib=60
bundle="$root/target/gpu-bundle"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

say() { printf 'gpu-bundle: %s\n' "$*" >&2; }

if [ -z "${NVCC:-}${CUDA_PATH:-}${CUDA_HOME:-}" ] && [ ! -x .cuda/bin/nvcc ] && ! command -v nvcc >/dev/null 2>&1; then
  say "no nvcc found: installing it with scripts/setup-cuda.sh"
  bash scripts/setup-cuda.sh
fi

# Prints "kind<TAB>name<TAB>executable<TAB>test" for every executable cargo reports.
artifacts() {
  python3 -c '
import json, sys
for line in sys.stdin:
    line = line.strip()
    if not line.startswith("{"):
        continue
    m = json.loads(line)
    if m.get("reason") != "compiler-artifact" or not m.get("executable"):
        continue
    t = m["target"]
    print("%s\t%s\t%s\t%s" % (",".join(t["kind"]), t["name"], m["executable"], str(m["profile"]["test"]).lower()))
'
}

# LKCONV_BUNDLE_KEEP_GOING=1: bundle whatever builds (`cargo build --keep-going` with the same
# profiles as `cargo test --release --no-run` / `cargo bench --no-run`) and list the targets
# that failed in BUILD-INFO.txt, instead of stopping at the first build error.
keep_going="${LKCONV_BUNDLE_KEEP_GOING:-0}"
build_failed=""
build() { # name cargo-args...
  local name="$1"
  shift
  if ! cargo "$@" --message-format=json 2>"$tmp/$name.err" | artifacts >"$tmp/$name.tsv"; then
    grep -E '^error' "$tmp/$name.err" >&2 || cat "$tmp/$name.err" >&2
    if [ "$keep_going" != 1 ]; then
      say "cargo $* failed (LKCONV_BUNDLE_KEEP_GOING=1 bundles what builds)"
      exit 1
    fi
    build_failed+="$(grep -E '^error: could not compile' "$tmp/$name.err" | sort -u)"$'\n'
  fi
}
if [ "$keep_going" = 1 ]; then
  say "building release test binaries (keep going)"
  build tests build --release --tests --keep-going
  say "building bench binaries (keep going)"
  build benches build --profile bench --benches --keep-going
else
  say "building release test binaries"
  build tests test --release --no-run
  say "building bench binaries"
  build benches bench --no-run
fi
say "building the lkconv CLI"
cargo build --release --bin lkconv --message-format=json 2>"$tmp/cli.err" | artifacts >"$tmp/cli.tsv" \
  || { cat "$tmp/cli.err" >&2; exit 1; }
grep -h 'warning: lkconv@' "$tmp/tests.err" "$tmp/benches.err" "$tmp/cli.err" | sort -u >&2 || true

cli="$(awk -F'\t' '$1 == "bin" && $2 == "lkconv" && $4 == "false" { print $3 }' "$tmp/cli.tsv" | tail -n 1)"
[ -x "$cli" ] || { say "no lkconv executable in cargo's output"; exit 1; }
cli_info="$("$cli" info 2>&1 || true)"
if ! grep -q '^CUDA kernels: compiled' <<<"$cli_info"; then
  printf '%s\n' "$cli_info" >&2
  if [ "${LKCONV_BUNDLE_ALLOW_NO_KERNELS:-0}" != 1 ]; then
    say "the build has no CUDA kernels (nvcc missing or failed): refusing to bundle (LKCONV_BUNDLE_ALLOW_NO_KERNELS=1 overrides)"
    exit 1
  fi
fi

rm -rf "$bundle"
mkdir -p "$bundle/bin"
copy() { # src dest-name
  cp "$1" "$bundle/bin/$2"
  strip "$bundle/bin/$2" 2>/dev/null || say "warning: could not strip $2"
  chmod +x "$bundle/bin/$2"
}
while IFS=$'\t' read -r kind name exe is_test; do
  [ "$is_test" = true ] || continue
  case "$kind" in
    lib|rlib|cdylib|staticlib|*lib*) copy "$exe" "test-lib-$name" ;;
    bin) copy "$exe" "test-bin-$name" ;;
    test) copy "$exe" "test-$name" ;;
    *) ;;
  esac
done <"$tmp/tests.tsv"
while IFS=$'\t' read -r kind name exe _; do
  [ "$kind" = bench ] && copy "$exe" "bench-$name"
done <"$tmp/benches.tsv"
copy "$cli" lkconv
cp scripts/torch_compare.py "$bundle/torch_compare.py"
# Tests that run the CLI find it at the path cargo baked in (CARGO_BIN_EXE_lkconv); run.sh
# links the bundled CLI there when that path does not exist on the GPU machine.
printf '%s\n' "$cli" >"$bundle/cli-build-path.txt"
# Likewise tests that read files through CARGO_MANIFEST_DIR (tests/data): run.sh links this
# checkout's path to the repository copy it runs in.
printf '%s\n' "$root" >"$bundle/manifest-dir.txt"
"$cli" info >"$bundle/BUILD-INFO.txt" 2>&1 || true
{
  echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ) from $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet 2>/dev/null || echo '+dirty')"
  rustc --version
  if [ -n "${build_failed//[$'\n']/}" ]; then
    echo "NOT BUNDLED (build failed):"
    printf '%s' "$build_failed"
  fi
} >>"$bundle/BUILD-INFO.txt"

size_mib() { du -sm "$1" | cut -f1; }
if [ "$(size_mib "$bundle")" -gt "$limit_mib" ]; then
  say "raw binaries are $(size_mib "$bundle") MiB: packing them into bins.tar.xz"
  tar -C "$bundle" -cf - bin | xz -9 -T0 >"$bundle/bins.tar.xz"
  rm -rf "$bundle/bin"
fi

cat >"$bundle/run.sh" <<'RUN_SH'
#!/usr/bin/env bash
# The GPU run (GPU.md step 4), generated by scripts/gpu-bundle.sh. Logs go to $OUT (8 files):
# summary.txt, env.log, tests.log, sanitizer.log, criterion.log, cli-bench.json, torch.json,
# run.log. Every step runs even when an earlier one fails; each is recorded PASS / FAIL /
# TIMEOUT / SKIP, and the summary table is printed last. Budgets (seconds) can be changed
# through the environment: TOTAL_S (whole run, default 480), TEST_S, SAN_S, BENCH_S,
# BENCH_BUDGET_S, CPU_BENCH_S, CLI_S, MODEL_S, TORCH_S, TORCH_BUDGET_S.
set -u
here="$(cd "$(dirname "$0")" && pwd)"
OUT="${OUT:-$here/out}"
mkdir -p "$OUT"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
t_start=$(date +%s)
runlog="$OUT/run.log"
: >"$runlog"
summary=()

if [ -f "$here/bins.tar.xz" ]; then
  if command -v xz >/dev/null 2>&1; then
    xz -dc "$here/bins.tar.xz" | tar -C "$work" -xf -
  else
    python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' "$here/bins.tar.xz" "$work"
  fi
else
  cp -r "$here/bin" "$work/bin"
fi
chmod +x "$work"/bin/* 2>/dev/null
cp "$here/torch_compare.py" "$work/"
# The device tool starts run.sh in the repository root of its copy of the working tree.
repo_copy="$(cd "$here/../.." && pwd)"
if [ -f "$here/manifest-dir.txt" ]; then
  m="$(cat "$here/manifest-dir.txt")"
  if [ -n "$m" ] && [ ! -e "$m" ] && [ -f "$repo_copy/Cargo.toml" ]; then
    mkdir -p "$(dirname "$m")" 2>/dev/null && ln -s "$repo_copy" "$m" 2>/dev/null \
      && echo "linked $m -> $repo_copy (for tests that read CARGO_MANIFEST_DIR)" >>"$runlog"
  fi
fi
if [ -f "$here/cli-build-path.txt" ]; then
  p="$(cat "$here/cli-build-path.txt")"
  if [ -n "$p" ] && [ ! -e "$p" ]; then
    mkdir -p "$(dirname "$p")" 2>/dev/null && ln -s "$work/bin/lkconv" "$p" 2>/dev/null \
      && echo "linked $p -> bundled lkconv (for tests that run the CLI)" >>"$runlog"
  fi
fi
cd "$work"
bin="$work/bin"

# record NAME STATUS SECONDS NOTE
record() { summary+=("$(printf '%-40s %-8s %5ss  %s' "$1" "$2" "$3" "$4")"); }

# Seconds left of the whole run's budget (TOTAL_S, default 480: the summary must be written
# before the device tool's own time limit ends the run).
left() { echo $(( ${TOTAL_S:-480} - ($(date +%s) - t_start) )); }

# step NAME LIMIT_S LOG CMD...: runs CMD with a timeout (capped by what is left of the run's
# budget), appending to LOG, and records it; skipped when the budget is spent.
step() {
  local name="$1" limit="$2" log="$3"
  shift 3
  local t0 rc status
  if [ "$(left)" -lt 15 ]; then
    record "$name" SKIP 0 "run budget (TOTAL_S=${TOTAL_S:-480}) spent"
    return 0
  fi
  [ "$(left)" -lt "$limit" ] && limit="$(left)"
  t0=$(date +%s)
  printf '\n===== %s (limit %ss): %s\n' "$name" "$limit" "$*" >>"$log"
  timeout -k 10 "$limit" "$@" >>"$log" 2>&1
  rc=$?
  status=PASS
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then status=TIMEOUT; elif [ $rc -ne 0 ]; then status=FAIL; fi
  printf '===== %s: %s (rc %s, %ss)\n' "$name" "$status" "$rc" "$(( $(date +%s) - t0 ))" >>"$log"
  record "$name" "$status" "$(( $(date +%s) - t0 ))" "rc=$rc"
  return $rc
}

# cuBLAS for the im2col baseline: add every directory holding libcublas (CUDA toolkit, pip
# wheels such as PyTorch's nvidia-* packages) to the loader path.
cublas_dirs="$( { ls -d /usr/local/cuda*/lib64 /usr/local/cuda*/targets/*/lib 2>/dev/null
  python3 - <<'PY' 2>/dev/null
import glob, os, site, sys
roots = []
try:
    roots += site.getsitepackages()
except Exception:
    pass
try:
    roots.append(site.getusersitepackages())
except Exception:
    pass
roots += [p for p in sys.path if p.endswith("site-packages")]
seen = set()
for r in roots:
    for pat in ("nvidia/*/lib/libcublas.so*", "nvidia/cu*/lib/libcublas.so*", "torch/lib/libcublas.so*"):
        for p in glob.glob(os.path.join(r, pat)):
            d = os.path.dirname(p)
            if d not in seen:
                seen.add(d)
                print(d)
PY
} | while read -r d; do ls "$d"/libcublas.so* >/dev/null 2>&1 && echo "$d"; done | sort -u | paste -sd: -)"
if [ -n "$cublas_dirs" ]; then
  export LD_LIBRARY_PATH="${cublas_dirs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
sanitizer="$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer /usr/local/cuda*/compute-sanitizer/compute-sanitizer 2>/dev/null | head -n 1)"

# 1. the machine
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  cat "$here/BUILD-INFO.txt" 2>/dev/null
  echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
  echo "compute-sanitizer: ${sanitizer:-not found}"
  echo "bundle binaries:"; ls -la "$bin"
} >"$OUT/env.log" 2>&1
step "nvidia-smi" 60 "$OUT/env.log" nvidia-smi
step "lkconv info" 60 "$OUT/env.log" "$bin/lkconv" info

# 2. every test binary, a GPU required (the CUDA tests first)
tests=()
[ -x "$bin/test-cuda" ] && tests+=("$bin/test-cuda")
for t in "$bin"/test-*; do [ "$t" = "$bin/test-cuda" ] || tests+=("$t"); done
for t in "${tests[@]}"; do
  [ -x "$t" ] || continue
  step "test $(basename "$t")" "${TEST_S:-240}" "$OUT/tests.log" env LKCONV_REQUIRE_GPU=1 "$t" --test-threads 4
done
tr_summary="$(grep -h '^test result:' "$OUT/tests.log" 2>/dev/null | awk '{p+=$4; f+=$6} END {printf "%d passed, %d failed", p, f}')"

# 3. one small test under compute-sanitizer
if [ -n "$sanitizer" ] && [ -x "$bin/test-cuda" ]; then
  for tool in memcheck racecheck; do
    step "compute-sanitizer $tool" "${SAN_S:-100}" "$OUT/sanitizer.log" \
      env LKCONV_REQUIRE_GPU=1 "$sanitizer" --tool "$tool" --error-exitcode 17 "$bin/test-cuda" sanitizer_small --exact --test-threads 1
  done
  # the GPU-resident RepLKNet forward (element-wise kernels, cuBLAS 1x1 convs) on the golden input
  if [ -x "$bin/test-model" ]; then
    step "compute-sanitizer memcheck (model)" "${SAN_MODEL_S:-90}" "$OUT/sanitizer.log" \
      env LKCONV_REQUIRE_GPU=1 "$sanitizer" --tool memcheck --error-exitcode 17 "$bin/test-model" golden_cuda_both_forms --exact --test-threads 1
  fi
  san_summary="$(grep -h 'ERROR SUMMARY' "$OUT/sanitizer.log" | tr '\n' ' ')"
else
  record "compute-sanitizer" SKIP 0 "compute-sanitizer or test-cuda not found"
  san_summary="not run"
fi

# 3b. the whole RepLKNet-31B forward pass resident on the GPU, batch 64 at 224 (CUDA events,
#     images/s), f32 and bf16 storage (weights, activations; f32 arithmetic)
model_lines=()
for dt in f32 bf16; do
  step "lkconv bench --model 31b cuda b64 $dt" "${MODEL_S:-90}" "$work/model-$dt.log" \
    "$bin/lkconv" bench --model 31b --device cuda --batch 64 --dtype "$dt" --reps 10
  cat "$work/model-$dt.log" >>"$runlog" 2>/dev/null
  l="$(grep -h 'images/s' "$work/model-$dt.log" 2>/dev/null | tail -n 1)"
  model_lines+=("$dt: ${l:-no result (see run.log)}")
done

# 4. the benchmarks, short measurement times
if [ -x "$bin/bench-gpu" ]; then
  step "bench gpu (criterion, quick)" "${BENCH_S:-150}" "$OUT/criterion.log" \
    env LKCONV_BENCH_QUICK=1 LKCONV_BENCH_BUDGET_S="${BENCH_BUDGET_S:-100}" "$bin/bench-gpu" --bench
fi
for b in "$bin"/bench-*; do
  [ "$b" = "$bin/bench-gpu" ] && continue
  [ -x "$b" ] || continue
  step "bench $(basename "$b") (CPU, partial)" "${CPU_BENCH_S:-30}" "$OUT/criterion.log" \
    env LKCONV_BENCH_QUICK=1 "$b" --bench --warm-up-time 0.1 --measurement-time 0.3 --sample-size 10
done

# 5. lkconv bench --device cuda --json: ours vs naive vs im2col, per dtype, shape and impl
#    (one JSON array per line in cli-bench.json; errors go to run.log)
cli_t0=$(date +%s)
cli_fail=0
cli_oom=0
cli_runs=0
: >"$OUT/cli-bench.json"
shapes=("" "64,128,56,56:31" "64,256,28,28:29" "64,512,14,14:27" "64,1024,7,7:13" "64,384,32,32:31" "8,128,256,200:31")
for dt in f32 f16 bf16; do
  for sh in "${shapes[@]}"; do
    imps="fast naive im2col"
    [ "$dt" = f32 ] || imps+=" tc" # the tensor-core path (f16/bf16 only; sm_80+)
    for imp in $imps; do
      if [ $(( $(date +%s) - cli_t0 )) -gt "${CLI_S:-60}" ] || [ "$(left)" -lt 150 ]; then
        echo "cli bench: time budget spent, skipping $dt $sh $imp" >>"$runlog"
        continue
      fi
      args=(bench --device cuda --json --dtype "$dt" --impl "$imp" --reps 5)
      [ -n "$sh" ] && args+=(--shape "${sh%%:*}" --kernel "${sh##*:}")
      cli_runs=$((cli_runs + 1))
      echo "== lkconv ${args[*]}" >>"$runlog"
      if ! timeout -k 5 60 "$bin/lkconv" "${args[@]}" >>"$OUT/cli-bench.json" 2>"$work/cli.err"; then
        if grep -qiE 'out of memory|OUT_OF_MEMORY' "$work/cli.err"; then
          cli_oom=$((cli_oom + 1))
          echo "   (does not fit in device memory)" >>"$work/cli.err"
        else
          cli_fail=$((cli_fail + 1))
          echo "   (failed)" >>"$work/cli.err"
        fi
      fi
      cat "$work/cli.err" >>"$runlog"
    done
  done
done
if [ $cli_fail -eq 0 ]; then cli_status=PASS; else cli_status=FAIL; fi
record "lkconv bench --device cuda --json" "$cli_status" "$(( $(date +%s) - cli_t0 ))" \
  "$cli_runs runs, $cli_fail failed, $cli_oom too large for device memory (im2col)"

# 6. PyTorch: correctness against ours on small shapes, timings on the benchmark shapes
torch_budget="${TORCH_BUDGET_S:-70}"
[ "$(left)" -lt $((torch_budget + 40)) ] && torch_budget=$(( $(left) - 40 ))
[ "$torch_budget" -lt 5 ] && torch_budget=5
step "torch_compare.py" "${TORCH_S:-180}" "$runlog" \
  python3 "$work/torch_compare.py" --lkconv "$bin/lkconv" --ours "$OUT/cli-bench.json" \
  --out "$OUT/torch.json" --budget-s "$torch_budget" --model-ours "$work/model-f32.log" "$work/model-bf16.log"

# 7. summary, printed last
{
  echo "lkconv GPU bundle run, $(date -u +%Y-%m-%dT%H:%M:%SZ), $(( $(date +%s) - t_start ))s in all"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null | sed 's/^/gpu: /'
  echo "tests: ${tr_summary:-none}"
  echo "sanitizer: ${san_summary}"
  printf '%-40s %-8s %6s  %s\n' STEP STATUS TIME NOTE
  printf '%s\n' "${summary[@]}"
  echo "--- criterion (quick), f32 fast and naive: time [low median high], throughput in FLOP/s ---"
  awk '/^(f32|f16|bf16)\// { name = $1 }
       /time:/ && name != "" { t = $0; sub(/^.*time: */, "", t) }
       /thrpt:/ && name != "" { r = $0; sub(/^.*thrpt: */, "", r); print name, t, r; name = "" }' \
    "$OUT/criterion.log" 2>/dev/null | grep -E '^f32/.*/(fast|naive) ' | cut -c1-150 | head -n 60
  echo "--- RepLKNet-31B on the GPU (lkconv bench --model 31b --device cuda --batch 64) ---"
  printf '%s\n' "${model_lines[@]}"
  sed -n '/== RepLKNet-31B forward/,/^$/p' "$runlog" | head -n 12
  echo "--- torch_compare ---"
  sed -n '/== timings/,$p' "$runlog" | head -n 80
} >"$OUT/summary.txt" 2>&1
cat "$OUT/summary.txt"
RUN_SH
chmod +x "$bundle/run.sh"

size="$(du -sb "$bundle" | cut -f1)"
size_h="$(du -sh "$bundle" | cut -f1)"
say "bundle: $bundle ($size_h)"
ls -la "$bundle" "$bundle/bin" 2>/dev/null >&2 || ls -la "$bundle" >&2
if [ "$size" -gt $((limit_mib * 1024 * 1024)) ]; then
  say "bundle is larger than ${limit_mib} MiB"
  exit 1
fi
echo "$bundle"
