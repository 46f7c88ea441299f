#!/usr/bin/env python3
"""Two or more lkconv binaries side by side on the CPU passes, alternated in rounds.

Each round runs `BIN bench --device cpu --impl fast --shape N,C,H,W --kernel K --json` for every
binary in turn (the order reversed every other round, so that both see the same load), and the
table gives, per shape and pass, each binary's minimum over the rounds' minima, the median of
the rounds' medians, and the ratios to the first binary (below 1: faster than the first).

Usage: python3 scripts/cpu_ab.py OLD_BIN NEW_BIN [--shapes 'N,C,H,W:K;...'] [--rounds 5]
                                 [--reps 20] [--op all] [--env RAYON_NUM_THREADS=1,...]
Installs nothing; needs only Python 3. Build the binaries first (copy the old one away before
rebuilding, e.g. `cp target/release/lkconv /tmp/lkconv-old`).
"""
import argparse
import json
import os
import statistics
import subprocess

LAYERS = "1,128,56,56:31;1,256,28,28:29;1,512,14,14:27;1,1024,7,7:13"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bins", nargs="+", help="lkconv binaries; ratios are to the first")
    ap.add_argument("--shapes", default=LAYERS, help="N,C,H,W:K separated by ';' (default: RepLKNet-31B's)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--op", default="all")
    ap.add_argument("--env", default="", help="extra environment, NAME=VALUE separated by ','")
    a = ap.parse_args()
    env = dict(os.environ)
    for kv in filter(None, a.env.split(",")):
        k, v = kv.split("=", 1)
        env[k] = v
    res = {}
    for r in range(a.rounds):
        for b in a.bins if r % 2 == 0 else list(reversed(a.bins)):
            for sh in a.shapes.split(";"):
                shape, k = sh.split(":")
                out = subprocess.run(
                    [b, "bench", "--device", "cpu", "--impl", "fast", "--shape", shape, "--kernel", k,
                     "--reps", str(a.reps), "--op", a.op, "--json"],
                    capture_output=True, text=True, env=env, check=True).stdout
                for rec in json.loads(out):
                    res.setdefault((sh, rec["op"]), {}).setdefault(b, []).append((rec["min_ms"], rec["median_ms"]))
    print("| shape:K | op | " + " | ".join(f"bin {i} min / median ms" for i in range(len(a.bins)))
          + "".join(f" | bin {i}/bin 0 (min / median)" for i in range(1, len(a.bins))) + " |")
    print("|---|---|" + "---|" * (2 * len(a.bins) - 1))
    for (sh, op), d in res.items():
        mins = [min(m for m, _ in d[b]) for b in a.bins]
        meds = [statistics.median(md for _, md in d[b]) for b in a.bins]
        cells = [f"{mn:.4f} / {md:.4f}" for mn, md in zip(mins, meds)]
        ratios = [f"{mins[i] / mins[0]:.3f} / {meds[i] / meds[0]:.3f}" for i in range(1, len(a.bins))]
        print(f"| {sh} | {op} | " + " | ".join(cells + ratios) + " |")
    for i, b in enumerate(a.bins):
        print(f"bin {i}: {b}")


if __name__ == "__main__":
    main()
