#!/usr/bin/env bash
# On a GPU machine: builds lkbench with nvcc (build.sh cuda, seconds) and runs it on plan files:
#   bash kernels/bench/run.sh [--quick] [PLAN.json...] [-- LKBENCH-OPTIONS...]
# Default plans: fixtures/benchmark.json (the benchmark shapes, fast and naive, f32 and bf16).
# Fresh plans from the planner (the benchmark shapes; the naive plans are the check's reference):
#   for i in fast naive; do lkconv plan --json --dtype f32 --impl $i; done > my.json
# --quick: 3 timing groups instead of 5. The build goes to $LKBENCH_OUT (default a temp dir).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
quick=0
plans=()
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) quick=1 ;;
    --) shift; extra+=("$@"); break ;;
    *) plans+=("$1") ;;
  esac
  shift
done
[ ${#plans[@]} -gt 0 ] || plans=("$here/fixtures/benchmark.json")
out="${LKBENCH_OUT:-$(mktemp -d)}"
t0=$(date +%s)
bash "$here/build.sh" cuda "$out" >&2
echo "lkbench built in $(( $(date +%s) - t0 ))s" >&2
opts=(--module "$out/lkbench_kernels.cubin")
[ "$quick" = 1 ] && opts+=(--groups 3)
"$out/lkbench" "${opts[@]}" "${extra[@]}" "${plans[@]}"
