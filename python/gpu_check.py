"""lkconv.torch on a GPU: the correctness checks of python/tests with CUDA tensors, then a timing
of lkconv.torch.dwconv2d (forward, and forward + backward) against F.conv2d (cuDNN).

Needs torch with CUDA and the lkconv wheel (on PYTHONPATH or installed); no pytest.
Exits 1 when any check fails or CUDA is unusable (so a GPU run never passes by skipping), 124
(as `timeout` does) when --deadline-s stopped it before every check and timing ran.

    python3 python/gpu_check.py [--out DIR] [--quick] [--deadline-s S]

Timing: CUDA events around 20 (5 with --quick) back-to-back calls after 3 warm-ups, median of
5 repeats, on PyTorch's current stream; NCHW and channels_last; f32, f16, bf16; RepLKNet-31B's
depthwise layers (batch 16 for f16/bf16, 8 for f32) and two small maps.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
# time.monotonic() after which no further check or timing starts (--deadline-s); what is left
# is counted in NOT_RUN.
DEADLINE = float("inf")
NOT_RUN = {"checks": 0, "timings": 0}


def out_of_time(what: str) -> bool:
    if time.monotonic() < DEADLINE:
        return False
    NOT_RUN[what] += 1
    return True
# python/ holds the package's sources without the native module: import the installed wheel
# (or the unpacked one on PYTHONPATH), and the shared checks from tests/.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != HERE]
sys.path.insert(0, os.path.join(HERE, "tests"))


def correctness(log) -> int:
    import checks
    import torch
    from run_seed import BANNER, SEED

    print(BANNER, file=log)
    failures = 0
    cases = [(c, d, l) for c in checks.CASES for d in checks.DTYPES for l in ["contiguous"]]
    cases += [(c, torch.float32, l) for c in checks.CASES[:6] for l in ["channels_last", "strided"]]
    rnd = checks.random_cases(24, seed=SEED)
    cases += [(c, checks.DTYPES[i % 3], checks.LAYOUTS[(i // 3) % 3]) for i, c in enumerate(rnd)]
    # Large shapes only a GPU runs quickly: RepLKNet's layers at batch 2.
    big = [checks.Case(2, 128, 56, 56, 31, 31), checks.Case(2, 512, 14, 14, 27, 27, bias=False),
           checks.Case(2, 64, 33, 47, 13, 13, stride=2, padding=6)]
    cases += [(c, d, "channels_last") for c in big for d in checks.DTYPES]
    for i, (case, dtype, layout) in enumerate(cases):
        if out_of_time("checks"):
            continue
        try:
            checks.check_case(case, dtype, "cuda", layout, seed=SEED + 1000 + i)
            status = "ok"
        except Exception as e:  # noqa: BLE001 - every failure is reported, then counted
            failures += 1
            status = f"FAIL {type(e).__name__}: {e}"
            traceback.print_exc(file=log)
        print(f"check {case} {dtype} {layout}: {status}", file=log, flush=True)
        if status != "ok":
            print(f"check {case} {dtype} {layout}: {status}")
    torch.cuda.synchronize()

    # The module, convert, compile and opcheck tests of the suite, on CUDA (they import pytest).
    try:
        import test_modules
        import test_torch_ops
    except ImportError as e:
        print(f"NOT RUN: the suite's module tests (opcheck, convert, compile) need pytest: {e}")
        print(f"correctness: {len(cases)} cases, {failures} failed")
        return failures

    for name, fn in [
        ("opcheck", lambda: test_torch_ops.test_opcheck("cuda")),
        ("empty batch/unbatched", lambda: test_torch_ops.test_empty_batch_and_unbatched("cuda")),
        ("drop-in", lambda: test_modules.test_depthwise_conv2d_is_a_drop_in("cuda")),
        ("convert", lambda: test_modules.test_convert_replknet_style_model("cuda")),
        ("torch.compile", lambda: test_modules.test_torch_compile_fullgraph("cuda")),
    ]:
        if out_of_time("checks"):
            continue
        try:
            fn()
            status = "ok"
        except Exception as e:  # noqa: BLE001
            failures += 1
            status = f"FAIL {type(e).__name__}: {e}"
            traceback.print_exc(file=log)
        print(f"test {name}: {status}", file=log, flush=True)
        print(f"test {name}: {status}")
    print(f"correctness: {len(cases)} cases + 5 tests, {failures} failed")
    return failures


def _time_ms(fn, iters: int) -> float:
    import torch

    for _ in range(3):
        fn()
    runs = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        runs.append(start.elapsed_time(end) / iters)
    return statistics.median(runs)


def timing(quick: bool) -> list:
    import torch
    import torch.nn.functional as F

    import lkconv.torch as lt

    torch.backends.cudnn.benchmark = True
    iters = 5 if quick else 20
    shapes = [(128, 56, 31), (256, 28, 29), (512, 14, 27), (1024, 7, 13), (64, 112, 13), (128, 56, 7)]
    rows = []
    for dtype in [torch.float32, torch.float16, torch.bfloat16]:
        n = 8 if dtype == torch.float32 else 16
        for c, hw, k in shapes:
            for fmt in [torch.contiguous_format, torch.channels_last]:
                if out_of_time("timings"):
                    continue
                x = torch.randn(n, c, hw, hw, device="cuda", dtype=dtype).to(memory_format=fmt)
                w = torch.randn(c, 1, k, k, device="cuda", dtype=dtype)
                x.requires_grad_()
                w.requires_grad_()
                row = {"dtype": str(dtype).split(".")[-1], "n": n, "c": c, "hw": hw, "k": k,
                       "layout": "nhwc" if fmt == torch.channels_last else "nchw"}
                impls = {
                    "lkconv": lambda: lt.dwconv2d(x, w, padding=k // 2),
                    "cudnn": lambda: F.conv2d(x, w, padding=k // 2, groups=c),
                }
                for name, f in impls.items():
                    with torch.no_grad():
                        row[f"{name}_fwd_ms"] = _time_ms(f, iters)
                    g = torch.randn_like(f())

                    def step(f=f, g=g):
                        y = f()
                        torch.autograd.grad(y, [x, w], g)

                    row[f"{name}_fwd_bwd_ms"] = _time_ms(step, max(1, iters // 2))
                row["speedup_fwd"] = row["cudnn_fwd_ms"] / row["lkconv_fwd_ms"]
                row["speedup_fwd_bwd"] = row["cudnn_fwd_bwd_ms"] / row["lkconv_fwd_bwd_ms"]
                rows.append(row)
                print(
                    f"{row['dtype']:>8} N{n} C{c} {hw}x{hw} K{k} {row['layout']}: fwd lkconv "
                    f"{row['lkconv_fwd_ms']:.3f} ms cudnn {row['cudnn_fwd_ms']:.3f} ms "
                    f"(x{row['speedup_fwd']:.2f}); fwd+bwd lkconv {row['lkconv_fwd_bwd_ms']:.3f} "
                    f"cudnn {row['cudnn_fwd_bwd_ms']:.3f} (x{row['speedup_fwd_bwd']:.2f})",
                    flush=True,
                )
                del x, w
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for the logs")
    ap.add_argument("--quick", action="store_true", help="fewer timing iterations")
    ap.add_argument("--no-timing", action="store_true")
    ap.add_argument("--deadline-s", type=float, default=None,
                    help="start no check or timing after this many seconds (exit 124 if any is left)")
    args = ap.parse_args()
    global DEADLINE
    if args.deadline_s is not None:
        DEADLINE = time.monotonic() + args.deadline_s
    os.makedirs(args.out, exist_ok=True)

    try:
        import torch

        import lkconv
        import lkconv.torch as lt
    except ImportError as e:
        print(f"gpu_check: cannot import torch/lkconv: {e}")
        return 1
    # f32 references in full f32: no TF32 in cuDNN or cuBLAS (the f64 oracle is unaffected).
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    if not torch.cuda.is_available() or not lt.cuda_usable():
        print(f"gpu_check: CUDA unusable: {lkconv._lkconv.cuda_unusable_reason() or 'torch sees no GPU'}")
        return 1
    info = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "python": platform.python_version(),
        "lkconv": lkconv.__version__,
    }
    print("gpu_check:", json.dumps(info))
    with open(os.path.join(args.out, "python_gpu_check.log"), "w") as log:
        failures = correctness(log)
    if not args.no_timing:
        rows = timing(args.quick)
        with open(os.path.join(args.out, "python_gpu_timing.json"), "w") as f:
            json.dump({"info": info, "rows": rows}, f, indent=1)
    left = ""
    if NOT_RUN["checks"] or NOT_RUN["timings"]:
        left = f"; NOT RUN (deadline): {NOT_RUN['checks']} checks, {NOT_RUN['timings']} timings"
    print(f"gpu_check: {'FAILED' if failures else 'passed'} ({failures} failures{left})")
    if failures:
        return 1
    return 124 if left else 0


if __name__ == "__main__":
    sys.exit(main())
