"""Times lkconv.torch.dwconv2d against F.conv2d(groups=C) on CPU tensors, forward and
forward + backward, over kernel sizes: the measurement behind ``convert``'s default
``min_kernel`` (see BENCHMARKS.md, "PyTorch CPU").

    python3 python/bench_cpu.py [--n 2] [--c 64] [--hw 56] [--kernels 3,5,7,9,13,31] [--repeat 7]

Both run in one process, best of --repeat calls; ratio > 1: lkconv is faster. On a shared
machine set OMP_NUM_THREADS and RAYON_NUM_THREADS alike (PyTorch's OpenMP threads stall badly
under other load).
"""

import argparse
import os
import statistics
import sys
import time

# python/ holds the package's sources without the native module: import the installed wheel.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import torch
import torch.nn.functional as F

import lkconv
import lkconv.torch as lt


def best_ms(fn, repeat):
    """Best of `repeat` timed calls after one warm-up (the least disturbed by other load)."""
    fn()
    runs = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t)
    return 1e3 * min(runs)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2)
    ap.add_argument("--c", type=int, default=64)
    ap.add_argument("--hw", type=int, default=56)
    ap.add_argument("--kernels", default="3,5,7,9,13,31")
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    n, c, hw = args.n, args.c, args.hw
    print(
        f"N{n} C{c} {hw}x{hw}, stride 1, same padding; torch {torch.__version__} with "
        f"{torch.get_num_threads()} threads; lkconv {lkconv.cpu_simd()}; best of {args.repeat}"
    )
    print("| K | torch fwd ms | lkconv fwd ms | fwd ratio | torch fwd+bwd ms | lkconv fwd+bwd ms | fwd+bwd ratio |")
    print("|---|---|---|---|---|---|---|")
    for k in [int(v) for v in args.kernels.split(",")]:
        x = torch.randn(n, c, hw, hw, requires_grad=True)
        w = torch.randn(c, 1, k, k, requires_grad=True)
        impls = {
            "torch": lambda: F.conv2d(x, w, padding="same", groups=c),
            "lkconv": lambda: lt.dwconv2d(x, w, padding="same"),
        }
        dy = torch.randn(n, c, hw, hw)
        res = {}
        for name, f in impls.items():
            with torch.no_grad():
                res[name, "fwd"] = best_ms(f, args.repeat)
            res[name, "both"] = best_ms(lambda f=f: torch.autograd.grad(f(), [x, w], dy), args.repeat)
        print(
            f"| {k} | {res['torch', 'fwd']:.2f} | {res['lkconv', 'fwd']:.2f} | "
            f"{res['torch', 'fwd'] / res['lkconv', 'fwd']:.2f} | {res['torch', 'both']:.2f} | "
            f"{res['lkconv', 'both']:.2f} | {res['torch', 'both'] / res['lkconv', 'both']:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
