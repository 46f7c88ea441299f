"""Times lkconv.torch.dwconv2d against F.conv2d(groups=C) on CPU tensors, forward and
forward + backward, over kernel sizes: the measurement behind ``convert``'s default
``min_kernel`` (see BENCHMARKS.md, "PyTorch CPU").

    python3 python/bench_cpu.py [--n 2] [--c 64] [--hw 56] [--kernels 3,5,7,9,13,31] [--repeat 5]

Both run in one process, interleaved, median of --repeat runs; ratio > 1: lkconv is faster.
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import lkconv
import lkconv.torch as lt


def median_s(fn, repeat):
    fn()
    runs = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t)
    return statistics.median(runs)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2)
    ap.add_argument("--c", type=int, default=64)
    ap.add_argument("--hw", type=int, default=56)
    ap.add_argument("--kernels", default="3,5,7,9,13,31")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; lkconv {lkconv.cpu_simd()}")
    print("K   | fwd torch ms | fwd lkconv ms | ratio | fwd+bwd torch ms | fwd+bwd lkconv ms | ratio")
    for k in [int(v) for v in args.kernels.split(",")]:
        x = torch.randn(args.n, args.c, args.hw, args.hw, requires_grad=True)
        w = torch.randn(args.c, 1, k, k, requires_grad=True)
        fwd = {
            "torch": lambda: F.conv2d(x, w, padding="same", groups=args.c),
            "lkconv": lambda: lt.dwconv2d(x, w, padding="same"),
        }
        res = {}
        for name, f in fwd.items():
            with torch.no_grad():
                res[name, "fwd"] = median_s(f, args.repeat)

            def step(f=f):
                f().sum().backward()

            res[name, "both"] = median_s(step, args.repeat)
        print(
            f"{k:<3} | {1e3 * res['torch', 'fwd']:12.2f} | {1e3 * res['lkconv', 'fwd']:13.2f} | "
            f"{res['torch', 'fwd'] / res['lkconv', 'fwd']:5.2f} | {1e3 * res['torch', 'both']:16.2f} | "
            f"{1e3 * res['lkconv', 'both']:17.2f} | {res['torch', 'both'] / res['lkconv', 'both']:5.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
