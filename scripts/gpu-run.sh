#!/usr/bin/env bash
# The GPU run: copied by scripts/gpu-bundle.sh into target/gpu-bundle/run.sh and started on the
# GPU machine (the device tool: carry ["target/gpu-bundle"], command
# "bash target/gpu-bundle/run.sh", timeout_s 540). BENCHMARKS.md "The first GPU run" says how.
#
# Order (most valuable results first; each step has a time limit; the limits add up to 480 s
# with the tensor-core tests, and TOTAL_S = 480 s caps the whole run, so that the summary is
# written before the device tool stops the run):
#   1 env       nvidia-smi, lkconv info; no GPU -> every GPU step is skipped, exit 3 at once
#   2 tests     the CUDA tests of the cuda, model, concurrency (and tensor_core) test binaries
#               (not the simulator twins), LKCONV_REQUIRE_GPU=1
#   3 bench     lkconv bench --device cuda --json: fast at N=64 and N=1 (f32, bf16, f16),
#               then naive and im2col at N=1
#   4 torch     scripts/torch_compare.py: PyTorch (cuDNN) vs lkconv, timings and a check
#   4b python   python/gpu_check.py (bundled by python/bundle.sh): lkconv.torch's checks on CUDA
#               tensors, then dwconv2d vs cuDNN timings (--quick, stopped at its deadline)
#   5 model     RepLKNet-31B batch 64, f32 and bf16: lkconv, then PyTorch eager
#   6 criterion the GPU criterion harness, quick
#   7 sanitizer compute-sanitizer memcheck and racecheck on one small test
#   8 harness   kernels/bench (the nvcc tuning harness) builds and checks, if time is left
# $OUT gets at most 8 files, each written as its step runs (a step cut short by the device
# tool's limit still leaves what it wrote): summary.txt (rewritten after every step, printed
# last), env.log, tests.log, bench.jsonl (one JSON array per lkconv bench call), perf.log
# (bench errors, torch, python and model output), torch.json, torch-model.json, extra.log
# (python_gpu_check.log and python_gpu_timing.json, criterion, sanitizer, harness). A step limit can be changed with its variable (LIMIT_TESTS=... etc.).
# LD_LIBRARY_PATH (LK_LIBRARY_PATH if given, the toolkit's cuBLAS, then pip wheels') is set for
# lkconv's own commands only. Exit status: 0 all steps passed, 1 a step failed or timed out,
# 3 no GPU.
set -u
here="$(cd "$(dirname "$0")" && pwd)"
OUT="${OUT:-$here/out}"
mkdir -p "$OUT"
TOTAL_S="${TOTAL_S:-480}"
t_start=$(date +%s)
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# shellcheck disable=SC1091
[ -f "$here/bundle.env" ] && . "$here/bundle.env"   # HAS_TC=0|1, BUILT=..., written by the bundler

: >"$OUT/env.log"
: >"$OUT/tests.log"
: >"$OUT/bench.jsonl"
: >"$OUT/perf.log"
: >"$OUT/extra.log"
steps=()       # "NAME|STATUS|SECONDS|NOTE"
headline=""

elapsed() { echo $(( $(date +%s) - t_start )); }
left() { echo $(( TOTAL_S - $(elapsed) )); }
note() { printf '[%4ss] %s\n' "$(elapsed)" "$*" >&2; }
record() { steps+=("$1|$2|$3|$4"); write_summary; }

# ---- unpack -------------------------------------------------------------------------------
if [ -f "$here/bins.tar.xz" ]; then
  mkdir -p "$work/bin"
  if command -v xz >/dev/null 2>&1; then
    xz -dc "$here/bins.tar.xz" | tar -C "$work" -xf -
  else
    python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' "$here/bins.tar.xz" "$work"
  fi
  bin="$work/bin"
else
  bin="$here/bin"
fi
chmod +x "$bin"/* 2>/dev/null
# The device tool starts this in the repository root of its copy of the working tree.
repo="$(cd "$here/../.." && pwd)"
# Tests read tests/data through the CARGO_MANIFEST_DIR baked in at build time: link it here.
if [ -f "$here/manifest-dir.txt" ]; then
  m="$(cat "$here/manifest-dir.txt")"
  if [ -n "$m" ] && [ ! -e "$m" ] && [ -f "$repo/Cargo.toml" ]; then
    mkdir -p "$(dirname "$m")" 2>/dev/null && ln -s "$repo" "$m" 2>/dev/null
  fi
fi

# ---- lkconv's library path: the CUDA toolkit's cuBLAS first, then pip wheels' (torch's) -----
lk_ld="$( { [ -n "${LK_LIBRARY_PATH:-}" ] && tr ':' '\n' <<<"$LK_LIBRARY_PATH"
  ls -d /usr/local/cuda/lib64 /usr/local/cuda/targets/*/lib /usr/local/cuda-*/lib64 2>/dev/null
  python3 - <<'PY' 2>/dev/null
import glob, os, site, sys
roots = list(getattr(site, "getsitepackages", lambda: [])()) + [site.getusersitepackages()]
roots += [p for p in sys.path if p.endswith("-packages")]
for r in dict.fromkeys(roots):
    for pat in ("nvidia/*/lib/libcublas.so*", "nvidia/cu*/lib/libcublas.so*", "torch/lib/libcublas.so*"):
        for p in sorted(glob.glob(os.path.join(r, pat))):
            print(os.path.dirname(p))
PY
} | while read -r d; do
  { [ -n "${LK_LIBRARY_PATH:-}" ] && [[ ":$LK_LIBRARY_PATH:" == *":$d:"* ]]; } || ls "$d"/libcublas.so* >/dev/null 2>&1 && echo "$d"
done | awk 'NF && !seen[$0]++' | paste -sd: -)"
# "${LK[@]}" CMD...: runs one of lkconv's commands with that path (never exported for the run).
lk_path="$(printf '%s:%s' "$lk_ld" "${LD_LIBRARY_PATH:-}" | sed 's/^://; s/:$//')"
LK=(env)
[ -n "$lk_path" ] && LK+=("LD_LIBRARY_PATH=$lk_path")
# torch_compare.py runs our CLI through this wrapper, itself with torch's own library path.
{
  echo '#!/usr/bin/env bash'
  printf 'exec'
  printf ' %q' "${LK[@]}" "$bin/lkconv"
  echo ' "$@"'
} >"$work/lkconv"
chmod +x "$work/lkconv"

# step NAME LIMIT LOG CMD...: runs CMD with `timeout` (capped by what is left of TOTAL_S),
# appending its output to LOG, and records PASS / FAIL / TIMEOUT; SKIP when no time is left.
step() {
  local name="$1" limit="$2" log="$3"
  shift 3
  if [ "$(left)" -lt 8 ]; then
    record "$name" SKIP 0 "run budget TOTAL_S=${TOTAL_S}s spent"
    return 0
  fi
  [ "$(left)" -lt "$limit" ] && limit="$(left)"
  local t0 rc status
  t0=$(date +%s)
  note "$name (limit ${limit}s)"
  printf '\n===== %s (limit %ss): %s\n' "$name" "$limit" "$*" >>"$log"
  timeout -k 5 "$limit" "$@" >>"$log" 2>&1 </dev/null
  rc=$?
  status=PASS
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then status=TIMEOUT; elif [ $rc -ne 0 ]; then status=FAIL; fi
  printf '===== %s: %s (exit %s, %ss)\n' "$name" "$status" "$rc" "$(( $(date +%s) - t0 ))" >>"$log"
  record "$name" "$status" "$(( $(date +%s) - t0 ))" "exit $rc"
  return $rc
}
skip() { record "$1" SKIP 0 "$2"; }

# ---- the summary (rewritten after every step) -----------------------------------------------
write_summary() {
  {
    echo "lkconv GPU run: $(date -u +%Y-%m-%dT%H:%M:%SZ), $(elapsed)s of TOTAL_S=${TOTAL_S}s; bundle ${BUILT:-?}"
    [ -n "${gpu_line:-}" ] && echo "gpu: $gpu_line"
    [ -n "$headline" ] && echo "$headline"
    local t
    t="$(grep -h '^test result:' "$OUT/tests.log" 2>/dev/null | awk '{p+=$4; f+=$6; i+=$8} END {if (NR) printf "%d passed, %d failed, %d ignored (%d binaries)", p, f, i, NR}')"
    echo "tests: ${t:-not run}"
    grep -h '^test .* FAILED$' "$OUT/tests.log" 2>/dev/null | sed 's/^/  /' | head -n 30
    local py
    py="$(grep -h -e '^correctness: ' -e '^gpu_check: ' "$OUT/perf.log" 2>/dev/null | paste -sd';' - | sed 's/;/; /g')"
    [ -n "$py" ] && echo "python (lkconv.torch): $py"
    echo
    printf '%-34s %-7s %5s  %s\n' STEP STATUS TIME NOTE
    local s
    for s in "${steps[@]}"; do
      IFS='|' read -r a b c d <<<"$s"
      printf '%-34s %-7s %4ss  %s\n' "$a" "$b" "$c" "$d"
    done
    if [ -s "$OUT/bench.jsonl" ] || [ -s "$OUT/torch.json" ]; then
      echo
      python3 "$here/torch_compare.py" --summary "$OUT" 2>&1 | head -n 120
    fi
    if grep -q 'ERROR SUMMARY' "$OUT/extra.log" 2>/dev/null; then
      echo; echo "sanitizer:"; grep -h -e '^===== sanitizer [a-z]*: ' -e 'ERROR SUMMARY' "$OUT/extra.log" | sed 's/^/  /'
    fi
    echo
    echo "files: $(cd "$OUT" && ls | tr '\n' ' ')"
  } >"$work/summary.txt" 2>&1
  cp "$work/summary.txt" "$OUT/summary.txt"
}

# ---- 1. the machine ---------------------------------------------------------------------------
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  cat "$here/BUILD-INFO.txt" 2>/dev/null
  echo "lkconv's LD_LIBRARY_PATH prefix: ${lk_ld:-<none found>}"
  echo "python3: $(command -v python3 || echo none)"
  echo "bundle binaries:"; ls -la "$bin"
} >>"$OUT/env.log" 2>&1
gpu_line="$(timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null | head -n 1)"
step "nvidia-smi" 10 "$OUT/env.log" nvidia-smi
step "lkconv info" 20 "$OUT/env.log" "${LK[@]}" "$bin/lkconv" info
if ! sed -n '/===== lkconv info/,$p' "$OUT/env.log" | grep -q '^CUDA devices:$'; then
  reason="$(sed -n '/===== lkconv info/,$p' "$OUT/env.log" | grep -m1 '^CUDA devices' || echo 'lkconv info failed')"
  headline="NO GPU: ${reason}. Nothing was measured; every GPU step is skipped."
  for s in tests bench torch python model criterion sanitizer harness; do skip "$s" "no GPU"; done
  note "$headline"
  cat "$OUT/summary.txt"
  exit 3
fi

# ---- 2. tests (GPU test binaries only) ----------------------------------------------------------
# "binary|filter args|limit": the CUDA tests (not their simulator twins), the model's CUDA tests,
# the CUDA test of tests/concurrency.rs (threads on streams) and, when bundled, the CUDA test of
# tests/tensor_core.rs (every pass, f16 and bf16; its simulator tests run in CI)
for t in "test-cuda|--skip simulator|${LIMIT_TESTS:-75}" "test-model|cuda|${LIMIT_TESTS_MODEL:-30}" \
  "test-concurrency|cuda|${LIMIT_TESTS_CONCURRENCY:-20}" "test-tensor_core|cuda|${LIMIT_TESTS_TC:-25}"; do
  IFS='|' read -r name filter limit <<<"$t"
  [ -x "$bin/$name" ] || continue
  # shellcheck disable=SC2086
  step "$name${filter:+ ($filter)}" "$limit" "$OUT/tests.log" \
    "${LK[@]}" LKCONV_REQUIRE_GPU=1 "$bin/$name" $filter --test-threads 4
done

# ---- 3. lkconv bench --device cuda --json ---------------------------------------------------------
# One call per (dtype, impl, shape); "-" = the four RepLKNet-31B layers at N=1 (the default).
layers64=("64,128,56,56:31" "64,256,28,28:29" "64,512,14,14:27" "64,1024,7,7:13")
calls=()
for dt in f32 bf16 f16; do
  for s in "${layers64[@]}"; do calls+=("$dt fast $s"); done
  calls+=("$dt fast -")
  # hook: the tensor-core kernels (`--impl tc`, f16/bf16) when the bundled lkconv has them
  if [ "${HAS_TC:-0}" = 1 ] && [ "$dt" != f32 ]; then
    for s in "${layers64[@]}"; do calls+=("$dt tc $s"); done
    calls+=("$dt tc -")
  fi
done
for dt in f32 bf16 f16; do calls+=("$dt naive -" "$dt im2col -"); done
calls+=("f32 fast 64,384,32,32:31" "f32 fast 8,128,256,200:31")
bench_limit="${LIMIT_BENCH:-75}"
[ "$(left)" -lt "$bench_limit" ] && bench_limit="$(left)"
b0=$(date +%s); nfail=0; noom=0; nrun=0; nskip=0
note "bench (limit ${bench_limit}s, ${#calls[@]} calls)"
for c in "${calls[@]}"; do
  read -r dt imp s <<<"$c"
  remaining=$(( bench_limit - ($(date +%s) - b0) ))
  if [ "$remaining" -lt 5 ]; then nskip=$((nskip + 1)); echo "bench: no time left for $c" >>"$OUT/perf.log"; continue; fi
  args=(bench --device cuda --json --dtype "$dt" --impl "$imp" --reps 10)
  [ "$s" != - ] && args+=(--shape "${s%%:*}" --kernel "${s##*:}")
  echo "== lkconv ${args[*]}" >>"$OUT/perf.log"
  nrun=$((nrun + 1))
  if ! timeout -k 5 "$(( remaining < 40 ? remaining : 40 ))" "${LK[@]}" "$bin/lkconv" "${args[@]}" >>"$OUT/bench.jsonl" 2>"$work/bench.err"; then
    if grep -qiE 'out of memory|OUT_OF_MEMORY' "$work/bench.err"; then noom=$((noom + 1)); else nfail=$((nfail + 1)); fi
  fi
  cat "$work/bench.err" >>"$OUT/perf.log"
done
st=PASS; [ $nfail -gt 0 ] && st=FAIL; [ $nskip -gt 0 ] && [ $nfail -eq 0 ] && st=TIMEOUT
record "bench (lkconv --json)" "$st" "$(( $(date +%s) - b0 ))" \
  "$nrun calls, $nfail failed, $noom out of device memory, $nskip skipped (time)"

# ---- 4. PyTorch comparison (timings first, then the correctness check) -------------------------
torch_limit="${LIMIT_TORCH:-70}"
step "torch_compare (conv)" "$torch_limit" "$OUT/perf.log" \
  python3 "$here/torch_compare.py" --lkconv "$work/lkconv" --ours "$OUT/bench.jsonl" \
  --out "$OUT/torch.json" --deadline-s "$(( torch_limit - 5 ))" --skip-model \
  --impls "fast$([ "${HAS_TC:-0}" = 1 ] && echo ,tc)"

# ---- 4b. lkconv.torch on CUDA tensors: python/gpu_check.py from the bundled wheel ----------------
# Torch's own library path (no LK prefix: torch and lkconv share one process). Its two output
# files are appended to extra.log ($OUT keeps at most 8 files).
py_limit="${LIMIT_PYTHON:-45}"
[ "$(left)" -lt "$py_limit" ] && py_limit="$(left)"
py_step="python gpu_check (lkconv.torch)"
wheel="$(ls "$here"/python/lkconv-*.whl 2>/dev/null | head -n 1)"
if [ -z "$wheel" ] || [ ! -f "$here/python/gpu_check.py" ]; then
  skip "$py_step" "not bundled (python/bundle.sh failed or was not run: see BUILD-INFO.txt)"
elif ! python3 -m zipfile -e "$wheel" "$work/python-site" >>"$OUT/perf.log" 2>&1; then
  record "$py_step" FAIL 0 "the wheel $(basename "$wheel") did not unpack"
else
  mkdir -p "$work/python-out"
  step "$py_step" "$py_limit" "$OUT/perf.log" \
    env PYTHONPATH="$work/python-site" PYTHONUNBUFFERED=1 python3 "$here/python/gpu_check.py" \
    --out "$work/python-out" --quick --deadline-s "$(( py_limit > 20 ? py_limit - 15 : 5 ))"
  for f in python_gpu_check.log python_gpu_timing.json; do
    [ -f "$work/python-out/$f" ] && { printf '\n===== %s\n' "$f"; cat "$work/python-out/$f"; } >>"$OUT/extra.log"
  done
fi

# ---- 5. RepLKNet-31B, batch 64: lkconv, then PyTorch eager --------------------------------------
for dt in f32 bf16; do
  step "model 31b b64 $dt (lkconv)" "${LIMIT_MODEL:-25}" "$work/model-$dt.log" \
    "${LK[@]}" "$bin/lkconv" bench --model 31b --device cuda --batch 64 --dtype "$dt" --reps 10
  cat "$work/model-$dt.log" >>"$OUT/perf.log" 2>/dev/null
done
step "model 31b b64 (torch eager)" "${LIMIT_TORCH_MODEL:-30}" "$OUT/perf.log" \
  python3 "$here/torch_compare.py" --skip-checks --skip-timing --out "$OUT/torch-model.json" \
  --deadline-s "$(( ${LIMIT_TORCH_MODEL:-30} - 5 ))" --model-ours "$work/model-f32.log" "$work/model-bf16.log"

# ---- 6. criterion, quick ------------------------------------------------------------------------------
crit_limit="${LIMIT_CRITERION:-20}"
step "criterion gpu (quick)" "$crit_limit" "$OUT/extra.log" \
  "${LK[@]}" LKCONV_BENCH_QUICK=1 LKCONV_BENCH_BUDGET_S="$(( crit_limit - 8 ))" "$bin/bench-gpu" --bench

# ---- 7. compute-sanitizer on one small test, last ----------------------------------------------
sanitizer="$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n 1)"
if [ -n "$sanitizer" ]; then
  for tool in memcheck racecheck; do
    step "sanitizer $tool" "${LIMIT_SANITIZER:-20}" "$OUT/extra.log" \
      "${LK[@]}" LKCONV_REQUIRE_GPU=1 "$sanitizer" --tool "$tool" --error-exitcode 17 \
      "$bin/test-cuda" sanitizer_small --exact --test-threads 1
  done
else
  skip sanitizer "compute-sanitizer not found"
fi

# ---- 8. the standalone tuning harness, when time is left --------------------------------------
# Plans from the bundled lkconv (`lkconv plan --json`, the benchmark shapes) when it has the
# command, else the checked-in fixture.
if [ -f "$repo/kernels/bench/run.sh" ] && [ "$(left)" -ge 40 ]; then
  plans=()
  if "$bin/lkconv" plan --help >/dev/null 2>&1; then
    for dt in f32 bf16; do
      for imp in fast naive; do
        "$bin/lkconv" plan --json --dtype "$dt" --impl "$imp" >>"$work/plans.json" 2>>"$OUT/extra.log"
      done
    done
    [ -s "$work/plans.json" ] && plans=("$work/plans.json")
  fi
  step "harness (kernels/bench)" "$(( $(left) - 5 ))" "$OUT/extra.log" \
    bash "$repo/kernels/bench/run.sh" --quick "${plans[@]}"
else
  skip "harness (kernels/bench)" "no time left or not in the repository copy"
fi

write_summary
cat "$OUT/summary.txt"
for s in "${steps[@]}"; do
  case "$s" in *"|FAIL|"* | *"|TIMEOUT|"*) exit 1 ;; esac
done
exit 0
