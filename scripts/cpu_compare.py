#!/usr/bin/env python3
"""lkconv's CPU engine beside ONNX Runtime (and PyTorch where installed), in one run.

Builds, with random weights and no checkpoint:
  - the four RepLKNet-31B large-kernel layers as single depthwise Conv nodes
    (C128 56x56 K31, C256 28x28 K29, C512 14x14 K27, C1024 7x7 K13; N=1, f32, padding K/2),
  - the two small-map layers again at batch 4,
  - RepLKNet-31B in deploy form (1x3x224x224, classification head) as an ONNX graph with the same
    structure lkconv runs (src/model/cpu.rs),
and times them beside `lkconv bench` (subprocesses of the given binary), interleaved in rounds so
that both see the same load. Prints one table: min and median wall time of each, the ratio
lkconv / ORT (below 1: lkconv is faster), and CPU time per run where measured (on a machine
shared with other work, wall times include waiting for a core; CPU time does not, but it also
counts threads spinning while they wait for work).

Installs nothing: uses onnxruntime + onnx (required; `pip install onnxruntime onnx`) and torch
(optional). Build lkconv first: `cargo build --release`.

Usage: python3 scripts/cpu_compare.py [--lkconv target/release/lkconv] [--threads 2]
                                      [--rounds 3] [--reps 20] [--model-reps 5] [--no-model]
                                      [--model-dtype f32,bf16]
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

try:
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
except ImportError:
    sys.exit("cpu_compare.py needs onnxruntime and onnx: pip install onnxruntime onnx")

try:
    import torch
except ImportError:
    torch = None

LAYERS = [(1, 128, 56, 31), (1, 256, 28, 29), (1, 512, 14, 27), (1, 1024, 7, 13)]
# The small-map layers again at batch 4 (both cores on small planes).
LAYERS += [(4, 512, 14, 27), (4, 1024, 7, 13)]
CFG_31B = dict(layers=[2, 2, 18, 2], channels=[128, 256, 512, 1024], kernels=[31, 29, 27, 13],
               ffn_ratio=4, stem_in=3, classes=1000)


class Graph:
    """A small ONNX graph builder with random (seeded) weights."""

    def __init__(self, seed=0):
        self.nodes, self.inits, self.rng, self.n = [], [], np.random.default_rng(seed), 0

    def name(self, p):
        self.n += 1
        return f"{p}{self.n}"

    def weight(self, shape, fan_in):
        w = (self.rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)
        n = self.name("w")
        self.inits.append(numpy_helper.from_array(w, n))
        return n

    def op(self, kind, inputs, **attrs):
        out = self.name(kind.lower())
        self.nodes.append(helper.make_node(kind, inputs, [out], **attrs))
        return out

    def conv(self, x, cin, cout, k, stride=1, groups=1, bias=True):
        w = self.weight([cout, cin // groups, k, k], cin // groups * k * k)
        ins = [x, w] + ([self.weight([cout], 1.0 * cout)] if bias else [])
        p = k // 2
        return self.op("Conv", ins, kernel_shape=[k, k], pads=[p, p, p, p], strides=[stride, stride],
                       group=groups)

    def relu(self, x):
        return self.op("Relu", [x])

    def model(self, x_name, x_shape, out):
        g = helper.make_graph(self.nodes, "g",
                              [helper.make_tensor_value_info(x_name, TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)],
                              self.inits)
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def layer_model(n, c, hw, k):
    g = Graph()
    y = g.conv("x", c, c, k, groups=c, bias=False)
    return g.model("x", [n, c, hw, hw], y)


def replknet_model(cfg):
    """RepLKNet deploy form: stem, stages of (RepLK block, ConvFFN) pairs, transitions, head."""
    g = Graph()
    c0 = cfg["channels"][0]
    x = g.relu(g.conv("x", cfg["stem_in"], c0, 3, stride=2))
    x = g.relu(g.conv(x, c0, c0, 3, groups=c0))
    x = g.relu(g.conv(x, c0, c0, 1))
    x = g.relu(g.conv(x, c0, c0, 3, stride=2, groups=c0))
    for s, (n, c, k) in enumerate(zip(cfg["layers"], cfg["channels"], cfg["kernels"])):
        for _ in range(n):
            y = g.relu(g.conv(x, c, c, 1))                     # pw1 (pre-BN folded)
            y = g.relu(g.conv(y, c, c, k, groups=c))           # large kernel (small one merged)
            x = g.op("Add", [x, g.conv(y, c, c, 1)])           # pw2 + residual
            f = cfg["ffn_ratio"] * c
            y = gelu(g, g.conv(x, c, f, 1))                    # ConvFFN pw1 + GELU
            x = g.op("Add", [x, g.conv(y, f, c, 1)])           # ConvFFN pw2 + residual
        if s + 1 < len(cfg["layers"]):
            c1 = cfg["channels"][s + 1]
            x = g.relu(g.conv(x, c, c1, 1))
            x = g.relu(g.conv(x, c1, c1, 3, stride=2, groups=c1))
    c = cfg["channels"][-1]
    x = g.op("Add", [g.op("Mul", [x, g.weight([1, c, 1, 1], 1.0)]), g.weight([1, c, 1, 1], 1.0)])
    x = g.op("Flatten", [g.op("GlobalAveragePool", [x])])
    x = g.op("Gemm", [x, g.weight([cfg["classes"], c], c), g.weight([cfg["classes"]], 1.0)],
             transB=1)
    return g.model("x", [1, cfg["stem_in"], 224, 224], x)


def gelu(g, x):
    """Exact GELU, 0.5 x (1 + erf(x / sqrt 2)), from opset-13 ops (ORT fuses it)."""
    c = lambda v: g.op("Constant", [], value=numpy_helper.from_array(np.array(v, np.float32)))
    e = g.op("Erf", [g.op("Mul", [x, c(1 / np.sqrt(2))])])
    return g.op("Mul", [g.op("Mul", [x, c(0.5)]), g.op("Add", [e, c(1.0)])])


def ort_session(model, threads):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def time_fn(fn, reps):
    fn()
    walls, c0 = [], time.process_time()
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        walls.append((time.perf_counter() - t) * 1e3)
    return walls, (time.process_time() - c0) * 1e3 / reps


def lkconv_json(exe, args, threads):
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    out = subprocess.run([exe, "bench", "--device", "cpu", "--json"] + args, env=env,
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


class Acc:
    """Wall times of every round, each round's best, and CPU time per run (averaged over rounds)."""

    def __init__(self):
        self.walls, self.cpus, self.round_mins = [], [], []

    def add(self, walls, cpu):
        self.walls += walls
        self.round_mins.append(min(walls))
        if cpu is not None:
            self.cpus.append(cpu)

    def min(self):
        return min(self.walls)

    def med(self):
        return float(np.median(self.walls))

    def cpu(self):
        return float(np.mean(self.cpus)) if self.cpus else float("nan")


def paired(ours, theirs):
    """lkconv/ORT of each round's best times (the two ran back to back, so a slow phase of a
    shared host weighs on both): median and range over the rounds."""
    r = [o / t for o, t in zip(ours.round_mins, theirs.round_mins)]
    return f"{np.median(r):.2f} ({min(r):.2f}-{max(r):.2f})"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lkconv", default="target/release/lkconv")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--model-reps", type=int, default=5)
    ap.add_argument("--no-model", action="store_true")
    ap.add_argument("--model-dtype", default="f32",
                    help="lkconv's model dtypes, comma-separated (f32, bf16); ORT runs f32")
    a = ap.parse_args()
    if not os.path.exists(a.lkconv):
        sys.exit(f"{a.lkconv} not found: cargo build --release first (or pass --lkconv)")
    if torch is not None:
        torch.set_num_threads(a.threads)

    cases = [((f"N{n} " if n > 1 else "") + f"C{c} {hw}x{hw} K{k}", layer_model(n, c, hw, k), (n, c, hw, k), "f32")
             for n, c, hw, k in LAYERS]
    if not a.no_model:
        for dt in a.model_dtype.split(","):
            label = "RepLKNet-31B 1x3x224x224" + ("" if dt == "f32" else f" (lkconv {dt})")
            cases.append((label, replknet_model(CFG_31B), None, dt))
    rows = []
    for label, model, layer, dtype in cases:
        sess = ort_session(model, a.threads)
        inp = sess.get_inputs()[0]
        x = np.random.default_rng(1).standard_normal(inp.shape).astype(np.float32)
        ours, theirs, tor = Acc(), Acc(), Acc()
        reps = a.reps if layer else a.model_reps
        if layer and torch is not None:
            n, c, hw, k = layer
            xt = torch.from_numpy(x)
            wt = torch.randn(c, 1, k, k)
        peak = None
        for _ in range(a.rounds):
            walls, cpu = time_fn(lambda: sess.run(None, {inp.name: x}), reps)
            theirs.add(walls, cpu)
            if layer:
                n, c, hw, k = layer
                r = lkconv_json(a.lkconv, ["--op", "fwd", "--impl", "fast", "--shape",
                                           f"{n},{c},{hw},{hw}", "--kernel", str(k),
                                           "--reps", str(reps)], a.threads)[0]
                ours.add([r["min_ms"]] * 1 + [r["median_ms"]] * 1, r.get("cpu_ms"))
                if torch is not None:
                    with torch.no_grad():
                        walls, cpu = time_fn(lambda: torch.nn.functional.conv2d(
                            xt, wt, padding=k // 2, groups=c), reps)
                    tor.add(walls, cpu)
            else:
                r = lkconv_json(a.lkconv, ["--model", "31b", "--dtype", dtype, "--reps", str(reps)],
                                a.threads)
                ours.add([r["min_ms"], r["median_ms"]], r.get("cpu_ms_per_run"))
                peak = r.get("peak_rss_mib")
        rows.append((label, ours, theirs, tor if tor.walls else None, peak))

    cpu_name = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu_name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {cpu_name}, {os.cpu_count()} CPUs, "
          f"{a.threads} threads each; onnxruntime {ort.__version__}"
          + (f", torch {torch.__version__}" if torch is not None else ", torch not installed")
          + f"; python {platform.python_version()}; {a.rounds} rounds interleaved")
    print("# lkconv: min of the rounds' min and median; ORT/torch: min and median of every run. "
          "ratio < 1: lkconv faster. per round: lkconv/ORT of each round's best, median (range).")
    print()
    print("| case | lkconv min / median ms | ORT min / median ms | lkconv/ORT (min) | lkconv/ORT (median) "
          "| lkconv/ORT per round | CPU ms/run lkconv / ORT | torch min ms |")
    print("|---|---|---|---|---|---|---|---|")
    for label, ours, theirs, tor, peak in rows:
        # lkconv adds (min, median) pairs per round: min over mins, median over medians
        mins, meds = ours.walls[0::2], ours.walls[1::2]
        o_min, o_med = min(mins), float(np.median(meds))
        extra = f" (peak RSS {peak:.0f} MiB)" if peak else ""
        print(f"| {label}{extra} | {o_min:.3f} / {o_med:.3f} | {theirs.min():.3f} / {theirs.med():.3f} "
              f"| {o_min / theirs.min():.2f} | {o_med / theirs.med():.2f} | {paired(ours, theirs)} "
              f"| {ours.cpu():.2f} / {theirs.cpu():.2f} | {tor.min():.3f} |" if tor else
              f"| {label}{extra} | {o_min:.3f} / {o_med:.3f} | {theirs.min():.3f} / {theirs.med():.3f} "
              f"| {o_min / theirs.min():.2f} | {o_med / theirs.med():.2f} | {paired(ours, theirs)} "
              f"| {ours.cpu():.2f} / {theirs.cpu():.2f} | - |")


if __name__ == "__main__":
    main()
