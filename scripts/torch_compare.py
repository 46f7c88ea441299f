#!/usr/bin/env python3
"""Compare lkconv's CUDA depthwise convolution with PyTorch's (cuDNN / PyTorch eager).

1. Timing, on the benchmark shapes: PyTorch forward, data gradient and weight gradient (the
   aten `convolution_backward` that autograd calls, one gradient at a time), NCHW and
   channels_last, fp32/bf16/fp16 (in that order, most valuable shapes first), timed like
   lkconv's own timer (src/cuda/timing.rs): after a warm-up, groups of M back-to-back calls
   between two CUDA events (M <= 1000 chosen so that a group lasts >= 1 ms), the median per-call
   time of the groups; both
   sides synchronise before reading the events. Our times are read from `lkconv bench --json`
   output (`--ours`, JSON arrays one per line) and put side by side.
2. Correctness, on small shapes: for fp32, fp16 and bf16, forward (with bias), data gradient
   and weight gradient from `torch.nn.functional.conv2d(x, w, bias, padding=K//2, groups=C)`
   and autograd (NCHW and channels_last), against `lkconv conv --device cuda` run on the same
   values (exchanged as safetensors files, written and read by this script). Both are measured
   against a float64 PyTorch result on the same (storage-rounded) inputs.
3. The whole model: a PyTorch eager RepLKNet-31B in merged form (defined compactly below: stem,
   RepLKBlocks with the large kernel as one depthwise conv with bias, ConvFFNs, transitions,
   head; random weights) timed at batch 64, 224x224, fp32 (TF32 off, like our SGEMM) and bf16
   autocast, images/s, next to `lkconv bench --model 31b --device cuda` (`--model-ours`: the
   text output of those runs).

`--deadline-s` bounds the whole run (the JSON is rewritten after every phase, so a run cut
short keeps what it measured). `--summary DIR` needs no torch: it prints the tables of a GPU
run's `DIR/bench.jsonl`, `DIR/torch.json` and `DIR/torch-model.json` (scripts/gpu-run.sh).

Never crashes because our binary fails: such a failure is recorded and reported. Exit status:
0 when every correctness check that ran passed, 1 otherwise, 2 when torch or CUDA is missing.
"""

import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
import traceback

BENCH_SHAPES = [
    # (N, C, H, W, K): the four RepLKNet-31B layers at N=64 and N=1 (most valuable first), the
    # paper's Table 1 setting, and the wide case.
    (64, 128, 56, 56, 31),
    (1, 128, 56, 56, 31),
    (64, 1024, 7, 7, 13),
    (64, 256, 28, 28, 29),
    (64, 512, 14, 14, 27),
    (1, 256, 28, 28, 29),
    (1, 512, 14, 14, 27),
    (1, 1024, 7, 7, 13),
    (64, 384, 32, 32, 31),
    (8, 128, 256, 200, 31),
]

CHECK_SHAPES = [
    (2, 8, 24, 24, 13),
    (1, 4, 20, 20, 31),  # filter larger than the image
    (2, 16, 14, 14, 27),
]

DTYPES = ["f32", "f16", "bf16"]
TIMING_DTYPES = ["f32", "bf16", "f16"]
PASSES = ["fwd", "dgrad", "wgrad"]


class Deadline:
    """The wall-clock end of this run (None: unbounded)."""

    def __init__(self, seconds):
        self.end = None if seconds is None else time.time() + seconds

    def left(self):
        return float("inf") if self.end is None else self.end - time.time()

    def passed(self, reserve=0.0):
        return self.left() <= reserve

# --------------------------------------------------------------------------------------------
# A tiny safetensors reader/writer (f32 only is all lkconv's CLI needs; it reads f16/bf16 too).
# --------------------------------------------------------------------------------------------


def st_write(path, tensors):
    """tensors: dict name -> torch tensor (written as contiguous little-endian f32)."""
    import torch

    header = {}
    blobs = []
    offset = 0
    for name, t in tensors.items():
        data = t.detach().to("cpu", torch.float32).contiguous()
        raw = data.view(torch.uint8).numpy().tobytes() if _has_numpy() else _tensor_bytes(data)
        header[name] = {
            "dtype": "F32",
            "shape": list(data.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        blobs.append(raw)
        offset += len(raw)
    hjson = json.dumps(header, separators=(",", ":")).encode()
    hjson += b" " * ((8 - len(hjson) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hjson)))
        f.write(hjson)
        for b in blobs:
            f.write(b)


def st_read(path):
    """Returns dict name -> float32 torch tensor."""
    import torch

    with open(path, "rb") as f:
        buf = f.read()
    (hlen,) = struct.unpack("<Q", buf[:8])
    header = json.loads(buf[8 : 8 + hlen])
    base = 8 + hlen
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        b, e = meta["data_offsets"]
        raw = bytearray(buf[base + b : base + e])
        kind = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[meta["dtype"]]
        t = torch.frombuffer(raw, dtype=kind) if raw else torch.empty(0, dtype=kind)
        out[name] = t.reshape(meta["shape"]).to(torch.float32)
    return out


def _has_numpy():
    try:
        import numpy  # noqa: F401

        return True
    except Exception:
        return False


def _tensor_bytes(t):
    return struct.pack("<%df" % t.numel(), *t.flatten().tolist())


# --------------------------------------------------------------------------------------------


def torch_dtype(name):
    import torch

    return {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[name]


def conv_backward(dy, x, w, pad, groups, mask):
    import torch

    return torch.ops.aten.convolution_backward(
        dy, x, w, None, [1, 1], [pad, pad], [1, 1], False, [0, 0], groups, mask
    )


def run_ours(lkconv, args, timeout):
    """Runs our CLI; returns (ok, message)."""
    try:
        p = subprocess.run(
            [lkconv] + args, capture_output=True, text=True, timeout=timeout
        )
    except Exception as e:  # missing binary, timeout, ...
        return False, "%s: %s" % (type(e).__name__, e)
    if p.returncode != 0:
        return False, "exit %d: %s" % (p.returncode, (p.stderr or p.stdout).strip()[-400:])
    return True, ""


def rel_err(a, ref):
    scale = ref.abs().max().item() or 1.0
    return (a.double() - ref.double()).abs().max().item() / scale


def check_correctness(lkconv, workdir, dev, records, failures, impls, deadline):
    import torch
    import torch.nn.functional as F

    tol = {"f32": 1e-5, "f16": 4e-3, "bf16": 3e-2}
    for (n, c, h, w, k) in CHECK_SHAPES:
        if deadline.passed(5):
            records.append({"shape": [n, c, h, w, k], "skipped": "time budget", "pass_ok": True})
            continue
        pad = k // 2
        g = torch.Generator().manual_seed(n * 1000 + c * 10 + k)
        x0 = torch.rand(n, c, h, w, generator=g) * 2 - 1
        w0 = torch.rand(c, 1, k, k, generator=g) * 2 - 1
        b0 = torch.rand(c, generator=g) * 2 - 1
        dy0 = torch.rand(n, c, h, w, generator=g) * 2 - 1
        for dt in DTYPES:
            tdt = torch_dtype(dt)
            # storage-rounded values: what both sides compute on
            x, wt, b, dy = (t.to(tdt).float() for t in (x0, w0, b0, dy0))
            # float64 reference
            xd = x.double().to(dev).requires_grad_(True)
            wd = wt.double().to(dev).requires_grad_(True)
            yd = F.conv2d(xd, wd, b.double().to(dev), padding=pad, groups=c)
            yd.backward(dy.double().to(dev))
            ref = {"fwd": yd.detach(), "dgrad": xd.grad.detach(), "wgrad": wd.grad.detach()}
            # torch in the storage type, both layouts, autograd
            tres = {}
            for layout in ["nchw", "channels_last"]:
                try:
                    mf = torch.channels_last if layout == "channels_last" else torch.contiguous_format
                    xt = x.to(dev, tdt).to(memory_format=mf).requires_grad_(True)
                    wtt = wt.to(dev, tdt).to(memory_format=mf).requires_grad_(True)
                    yt = F.conv2d(xt, wtt, b.to(dev, tdt), padding=pad, groups=c)
                    yt.backward(dy.to(dev, tdt).to(memory_format=mf))
                    tres[layout] = {"fwd": yt.detach(), "dgrad": xt.grad, "wgrad": wtt.grad}
                except Exception as e:
                    tres[layout] = {"error": "%s: %s" % (type(e).__name__, e)}
            # ours, through the CLI
            fin = os.path.join(workdir, "in.safetensors")
            st_write(fin, {"x": x, "w": wt, "bias": b, "dy": dy})
            for ps, imp in [(ps, imp) for ps in PASSES for imp in impls]:
                if imp == "tc" and dt == "f32":
                    continue
                fout = os.path.join(workdir, "out_%s.safetensors" % ps)
                if os.path.exists(fout):
                    os.remove(fout)
                cli = ["conv", "--op", ps, "--device", "cuda", "--dtype", dt, "--impl", imp,
                       "--input", fin, "--output", fout]
                if ps == "wgrad":
                    cli += ["--kernel", "%d,%d" % (k, k)]
                ok, msg = run_ours(lkconv, cli, max(5.0, min(60.0, deadline.left())))
                rec = {"shape": [n, c, h, w, k], "dtype": dt, "pass": ps, "impl": imp}
                ours_err = None
                if ok:
                    try:
                        got = st_read(fout)[{"fwd": "y", "dgrad": "dx", "wgrad": "dw"}[ps]]
                        ours_err = rel_err(got.to(dev), ref[ps])
                    except Exception as e:
                        ok, msg = False, "reading our output: %s" % e
                rec["ours_rel_err"] = ours_err
                rec["ours_error"] = None if ok else msg
                terrs = []
                for layout, r in tres.items():
                    if "error" in r:
                        rec["torch_%s_error" % layout] = r["error"]
                    else:
                        e = rel_err(r[ps].float(), ref[ps])
                        rec["torch_%s_rel_err" % layout] = e
                        terrs.append(e)
                limit = max(tol[dt], 4 * max(terrs) if terrs else tol[dt])
                rec["limit"] = limit
                rec["pass_ok"] = bool(ok and ours_err is not None and ours_err <= limit)
                if not rec["pass_ok"]:
                    failures.append(rec)
                records.append(rec)


GROUP_MS = 1.0
GROUPS = 5


def time_ms(fn, budget_s, max_groups=GROUPS):
    """Per-call ms of fn(), timed like lkconv's timer: one warm-up call, then up to max_groups
    groups of M back-to-back calls between two CUDA events (M sized from a timed call so that a
    group lasts >= GROUP_MS), synchronised; the median per-call time of the groups.
    Returns (ms, calls timed, M)."""
    import torch

    fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    fn()
    e.record()
    e.synchronize()
    first = max(s.elapsed_time(e), 1e-3)
    m = int(max(1, min(1000, -(-GROUP_MS // first))))
    groups = int(max(1, min(max_groups, (budget_s * 1e3) / (first * m))))
    times = []
    for _ in range(groups):
        s.record()
        for _ in range(m):
            fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / m)
    times.sort()
    return times[len(times) // 2], groups * m, m


def time_torch(records, deadline, per_case_s):
    import torch
    import torch.nn.functional as F

    for dt in TIMING_DTYPES:
        tdt = torch_dtype(dt)
        for (n, c, h, w, k) in BENCH_SHAPES:
            pad = k // 2
            for layout in ["nchw", "channels_last"]:
                mf = torch.channels_last if layout == "channels_last" else torch.contiguous_format
                base = {"shape": [n, c, h, w, k], "dtype": dt, "layout": layout}
                if deadline.passed():
                    for ps in PASSES:
                        records.append(dict(base, **{"pass": ps, "skipped": "time budget"}))
                    continue
                try:
                    x = torch.randn(n, c, h, w, device="cuda", dtype=tdt).to(memory_format=mf)
                    wt = torch.randn(c, 1, k, k, device="cuda", dtype=tdt).to(memory_format=mf)
                    dy = torch.randn(n, c, h, w, device="cuda", dtype=tdt).to(memory_format=mf)
                except Exception as e:
                    for ps in PASSES:
                        records.append(dict(base, **{"pass": ps, "error": str(e)}))
                    continue
                fns = {
                    "fwd": lambda: F.conv2d(x, wt, None, padding=pad, groups=c),
                    "dgrad": lambda: conv_backward(dy, x, wt, pad, c, [True, False, False]),
                    "wgrad": lambda: conv_backward(dy, x, wt, pad, c, [False, True, False]),
                }
                flops = 2.0 * n * c * h * w * k * k
                for ps in PASSES:
                    rec = dict(base, **{"pass": ps})
                    if deadline.passed():
                        rec["skipped"] = "time budget"
                    else:
                        try:
                            ms, iters, m = time_ms(fns[ps], min(per_case_s, deadline.left()))
                            rec.update(ms=ms, iters=iters, back_to_back=m, gflops=flops / (ms * 1e6))
                        except Exception as e:
                            rec["error"] = "%s: %s" % (type(e).__name__, str(e)[:300])
                    records.append(rec)
                del x, wt, dy
                torch.cuda.empty_cache()


def load_ours(path):
    """Our CLI bench records (`lkconv bench --json`: one JSON array per line) keyed by
    (n, c, h, w, k, dtype, pass, impl); the last record of a key wins."""
    out = {}
    if not path or not os.path.exists(path):
        return out
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line.startswith("["):
                continue
            try:
                for r in json.loads(line):
                    key = (r["n"], r["c"], r["h"], r["w"], r["kh"], r["dtype"], r["op"], r["impl"])
                    out[key] = r
            except Exception:
                continue
    return out


def build_replknet31b(torch, classes=1000):
    """RepLKNet-31B in merged (deploy) form as the public code runs it after structural
    re-parameterisation of the large kernels: the pre-BNs stay BatchNorm layers and every
    conv_bn is a conv with bias (BN folded), so PyTorch does the pre-BN work that our deploy
    form folds into the 1x1 convs (a few percent of the element-wise traffic, no FLOPs that
    matter)."""
    nn = torch.nn

    def conv(cin, cout, k, stride=1, groups=1):
        return nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=True)

    class RepLKBlock(nn.Module):
        def __init__(self, c, k):
            super().__init__()
            self.prelkb_bn = nn.BatchNorm2d(c)
            self.pw1 = conv(c, c, 1)
            self.lk = conv(c, c, k, groups=c)
            self.pw2 = conv(c, c, 1)

        def forward(self, x):
            y = torch.relu(self.pw1(self.prelkb_bn(x)))
            y = torch.relu(self.lk(y))
            return x + self.pw2(y)

    class ConvFFN(nn.Module):
        def __init__(self, c, r=4):
            super().__init__()
            self.preffn_bn = nn.BatchNorm2d(c)
            self.pw1 = conv(c, c * r, 1)
            self.pw2 = conv(c * r, c, 1)

        def forward(self, x):
            return x + self.pw2(torch.nn.functional.gelu(self.pw1(self.preffn_bn(x))))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            ch, layers, ks = [128, 256, 512, 1024], [2, 2, 18, 2], [31, 29, 27, 13]
            c = ch[0]
            self.stem = nn.Sequential(
                conv(3, c, 3, 2), nn.ReLU(), conv(c, c, 3, 1, c), nn.ReLU(),
                conv(c, c, 1), nn.ReLU(), conv(c, c, 3, 2, c), nn.ReLU())
            self.stages = nn.ModuleList()
            self.transitions = nn.ModuleList()
            for s in range(4):
                blocks = []
                for _ in range(layers[s]):
                    blocks += [RepLKBlock(ch[s], ks[s]), ConvFFN(ch[s])]
                self.stages.append(nn.Sequential(*blocks))
                if s < 3:
                    self.transitions.append(nn.Sequential(
                        conv(ch[s], ch[s + 1], 1), nn.ReLU(),
                        conv(ch[s + 1], ch[s + 1], 3, 2, ch[s + 1]), nn.ReLU()))
            self.norm = nn.BatchNorm2d(ch[3])
            self.head = nn.Linear(ch[3], classes)

        def forward(self, x):
            x = self.stem(x)
            for s in range(4):
                x = self.stages[s](x)
                if s < 3:
                    x = self.transitions[s](x)
            x = torch.flatten(torch.nn.functional.adaptive_avg_pool2d(self.norm(x), 1), 1)
            return self.head(x)

    return Net()


def parse_model_ours(paths):
    """{dtype: (images/s, line)} from `lkconv bench --model` outputs ('... f32: median ...,
    X images/s, ...'); a file without such a line gives its last line as the reason."""
    import re

    out = {}
    for path in paths or []:
        dt = "bf16" if "bf16" in os.path.basename(path) else "f32"
        try:
            with open(path) as f:
                lines = [l.strip() for l in f if l.strip()]
        except Exception as e:
            out[dt] = (None, "no output (%s)" % e)
            continue
        hit = [l for l in lines if "images/s" in l and "RepLKNet" in l]
        if hit:
            m = re.search(r"([0-9.]+) images/s", hit[-1])
            out[dt] = (float(m.group(1)) if m else None, hit[-1])
        else:
            err = [l for l in lines if "error" in l]
            out[dt] = (None, (err or lines or ["no output"])[-1][:200])
    return out


def time_model(result, batch, budget_s, deadline):
    """Times the eager RepLKNet-31B forward at `batch` x 3 x 224 x 224: fp32 (TF32 off) and
    bf16 autocast, NCHW. Records images/s (or the error) in result["model"]."""
    import torch

    recs = result.setdefault("model", [])
    try:
        torch.manual_seed(0)
        net = build_replknet31b(torch).cuda().eval()
        params = sum(p.numel() for p in net.parameters())
        x = torch.randn(batch, 3, 224, 224, device="cuda")
    except Exception as e:
        recs.append({"error": "building the model: %s" % e})
        return
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    for name in ["fp32", "bf16 autocast"]:
        rec = {"variant": name, "batch": batch, "params": params}
        if deadline.passed(3):
            recs.append(dict(rec, skipped="time budget"))
            continue
        try:
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False

            def fn():
                with torch.inference_mode():
                    if name.startswith("bf16"):
                        with torch.autocast("cuda", dtype=torch.bfloat16):
                            net(x)
                    else:
                        net(x)

            ms, iters, _ = time_ms(fn, min(budget_s / 2, deadline.left() / 2), max_groups=3)
            rec.update(ms=ms, iters=iters, images_per_s=batch / (ms / 1e3))
        except Exception as e:
            rec["error"] = str(e)[:300]
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
            torch.cuda.empty_cache()
        recs.append(rec)
    del net, x
    torch.cuda.empty_cache()


def print_model(result, ours, batch):
    """The images/s of torch (result["model"]) and ours ({dtype: (images/s, line)})."""
    print("\n== RepLKNet-31B forward, batch %d, 224x224, images/s (median, CUDA events) ==" % batch)
    for r in result.get("model", []):
        if "error" in r or "skipped" in r:
            print("torch %-14s %s" % (r.get("variant", ""), r.get("error") or "skipped: " + r["skipped"]))
        else:
            print("torch %-14s %9.1f images/s  (%.1f ms, %d runs, %d params)" % (
                r["variant"], r["images_per_s"], r["ms"], r["iters"], r["params"]))
    for dt in ["f32", "bf16"]:
        if dt in ours:
            ips, line = ours[dt]
            if ips is not None:
                print("lkconv %-13s %9.1f images/s  (%s)" % (dt, ips, line[:160]))
            else:
                print("lkconv %-13s %9s  (%s)" % (dt, "-", line[:160]))
    print("")


def fmt_ms(t):
    return "%.3f" % t if t is not None else "-"


def print_timings(timings, ours):
    """The side-by-side table: torch NCHW / channels_last against our fast (and tc) kernels."""
    print("== timings, ms per call (median; torch: back-to-back calls between CUDA events; ours: "
          "lkconv bench --json); speed-up = best torch / best ours ==")
    print("%-20s %-5s %-6s %10s %10s %10s %10s %10s %8s" % (
        "N,C,H,W,K", "dtype", "pass", "torch NCHW", "torch CL", "ours fast", "ours tc", "ours naive", "speed-up"))
    rows = {}
    for r in timings:
        key = (tuple(r["shape"]), r["dtype"], r["pass"])
        rows.setdefault(key, {})[r["layout"]] = r.get("ms")
    for (shape, dt, ps), v in rows.items():
        n, c, h, w, k = shape
        mine = {imp: (ours.get((n, c, h, w, k, dt, ps, imp)) or {}).get("median_ms")
                for imp in ("fast", "tc", "naive")}
        best = min([t for t in v.values() if t is not None], default=None)
        best_ours = min([t for i, t in mine.items() if i != "naive" and t], default=None)
        sp = "%.1fx" % (best / best_ours) if (best is not None and best_ours) else "-"
        print("%-20s %-5s %-6s %10s %10s %10s %10s %10s %8s" % (
            ",".join(map(str, shape)), dt, ps, fmt_ms(v.get("nchw")), fmt_ms(v.get("channels_last")),
            fmt_ms(mine["fast"]), fmt_ms(mine["tc"]), fmt_ms(mine["naive"]), sp))


def print_checks(checks):
    print("== correctness (max |err| / max |ref|, vs float64 torch) ==")
    print("%-18s %-5s %-6s %-5s %10s %10s %10s  %s" % (
        "N,C,H,W,K", "dtype", "pass", "impl", "ours", "torch NCHW", "torch CL", "status"))
    fmt = lambda v: "%.2e" % v if isinstance(v, float) else "-"
    for r in checks:
        if "skipped" in r:
            print("%-18s skipped: %s" % (",".join(map(str, r["shape"])), r["skipped"]))
            continue
        status = "ok" if r["pass_ok"] else ("FAIL " + (r.get("ours_error") or "above limit %.1e" % r["limit"]))[:90]
        print("%-18s %-5s %-6s %-5s %10s %10s %10s  %s" % (
            ",".join(map(str, r["shape"])), r["dtype"], r["pass"], r.get("impl", "fast"),
            fmt(r.get("ours_rel_err")), fmt(r.get("torch_nchw_rel_err")),
            fmt(r.get("torch_channels_last_rel_err")), status))


def summary(out_dir):
    """Prints a GPU run's tables (scripts/gpu-run.sh's $OUT): ours per shape/dtype/impl/pass,
    ours vs torch, correctness, and the model's images/s. Needs no torch."""
    ours = load_ours(os.path.join(out_dir, "bench.jsonl"))

    def load(name):
        try:
            with open(os.path.join(out_dir, name)) as f:
                return json.load(f)
        except Exception:
            return {}

    conv, model = load("torch.json"), load("torch-model.json")
    peak = None  # TFLOP/s, from `lkconv info` in env.log ("FP32 peak 66.9 TFLOP/s")
    try:
        import re

        with open(os.path.join(out_dir, "env.log")) as f:
            m = re.search(r"FP32 peak ([0-9.]+) TFLOP/s", f.read())
        peak = float(m.group(1)) if m else None
    except Exception:
        pass
    if ours:
        print("== lkconv bench --device cuda: ms per call, nominal GFLOP/s, %% of the FP32 peak (%s) ==" % (
            "%.1f TFLOP/s" % peak if peak else "unknown"))
        print("%-18s %-5s %-6s %23s %23s %23s" % ("N,C,H,W,K", "dtype", "impl", "fwd", "dgrad", "wgrad"))
        seen = []
        for (n, c, h, w, k, dt, _, imp) in ours:
            if (n, c, h, w, k, dt, imp) not in seen:
                seen.append((n, c, h, w, k, dt, imp))
        for (n, c, h, w, k, dt, imp) in seen:
            cells = []
            for ps in PASSES:
                r = ours.get((n, c, h, w, k, dt, ps, imp)) or {}
                if r.get("median_ms") is None:
                    cells.append("-")
                    continue
                g = r.get("gflops") or 0.0
                pct = " %4.1f%%" % (100.0 * g / (peak * 1e3)) if peak else ""
                cells.append("%8.3f %7.0f%s" % (r["median_ms"], g, pct))
            print("%-18s %-5s %-6s %23s %23s %23s" % ("%d,%d,%d,%d,%d" % (n, c, h, w, k), dt, imp, *cells))
        print("")
    if conv.get("timings"):
        print_timings(conv["timings"], ours)
        print("")
    if conv.get("checks"):
        bad = [r for r in conv["checks"] if not r.get("pass_ok")]
        print("torch correctness check: %d records, %d failed" % (len(conv["checks"]), len(bad)))
        if bad:
            print_checks(bad)
        print("")
    if model.get("model") or model.get("model_ours"):
        ours_model = {k: (v.get("images_per_s"), v.get("line", "")) for k, v in model.get("model_ours", {}).items()}
        print_model(model, ours_model, (model.get("model") or [{}])[0].get("batch", 64))
    for note in conv.get("notes", []) + model.get("notes", []):
        print("note: " + note[:300])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lkconv", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "lkconv"))
    ap.add_argument("--ours", help="lkconv bench --json output (JSON arrays, one per line)")
    ap.add_argument("--out", default="torch_compare.json")
    ap.add_argument("--deadline-s", type=float, default=None,
                    help="wall-clock limit of the whole run (timings get 70%% of it, checks the rest)")
    ap.add_argument("--per-case-s", type=float, default=0.25, help="measuring time per case")
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--skip-checks", action="store_true")
    ap.add_argument("--impls", default="fast", help="our implementations to check, comma separated (fast,tc)")
    ap.add_argument("--model-ours", nargs="*", default=[],
                    help="outputs of lkconv bench --model 31b --device cuda (file names with bf16 for bf16)")
    ap.add_argument("--model-batch", type=int, default=64)
    ap.add_argument("--model-budget-s", type=float, default=30.0)
    ap.add_argument("--skip-model", action="store_true")
    ap.add_argument("--summary", metavar="DIR", help="print the tables of a GPU run's output folder and exit")
    args = ap.parse_args()
    if args.summary:
        summary(args.summary)
        return 0

    deadline = Deadline(args.deadline_s)
    result = {"torch": None, "device": None, "checks": [], "timings": [], "notes": []}

    def save():
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)

    try:
        import torch
    except Exception as e:
        print("torch_compare: PyTorch unavailable: %s" % e)
        result["notes"].append("torch unavailable: %s" % e)
        save()
        return 2
    result["torch"] = torch.__version__
    if not torch.cuda.is_available():
        print("torch_compare: torch %s sees no CUDA device" % torch.__version__)
        result["notes"].append("torch sees no CUDA device")
        save()
        return 2
    dev = torch.device("cuda")
    result["device"] = torch.cuda.get_device_name(0)
    result["notes"].append(
        "torch timings: F.conv2d (fwd) and aten.convolution_backward with one output mask "
        "(dgrad, wgrad); median per-call time of groups of back-to-back calls between two CUDA "
        "events (>= %.0f ms a group); cudnn.benchmark=%s" % (GROUP_MS, torch.backends.cudnn.benchmark))
    print("torch %s on %s; ours: %s" % (torch.__version__, result["device"], args.lkconv))
    ours = load_ours(args.ours)
    failures = []

    if not args.skip_timing:
        # the timings get 70% of the run when the checks follow
        timing_deadline = deadline
        if deadline.end is not None and not args.skip_checks:
            timing_deadline = Deadline(0.7 * deadline.left())
        try:
            time_torch(result["timings"], timing_deadline, args.per_case_s)
        except Exception:
            msg = traceback.format_exc()
            print("timing crashed:\n" + msg)
            result["notes"].append("timing crashed: " + msg[-600:])
        for rec in result["timings"]:
            n, c, h, w, k = rec["shape"]
            for imp in ("fast", "tc", "naive"):
                r = ours.get((n, c, h, w, k, rec["dtype"], rec["pass"], imp))
                if r:
                    rec["ours_%s_ms" % imp] = r.get("median_ms")
        save()
        print_timings(result["timings"], ours)

    if not args.skip_checks:
        impls = [i for i in args.impls.split(",") if i]
        with tempfile.TemporaryDirectory() as tmp:
            try:
                check_correctness(args.lkconv, tmp, dev, result["checks"], failures, impls, deadline)
            except Exception:
                msg = traceback.format_exc()
                print("correctness checks crashed:\n" + msg)
                result["notes"].append("correctness checks crashed: " + msg[-600:])
                failures.append({"crash": msg[-600:]})
        result["correctness_failures"] = len(failures)
        save()
        print("")
        print_checks(result["checks"])

    if not args.skip_model:
        try:
            time_model(result, args.model_batch, args.model_budget_s, deadline)
        except Exception:
            msg = traceback.format_exc()
            print("model timing crashed:\n" + msg)
            result["notes"].append("model timing crashed: " + msg[-600:])
        ours_model = parse_model_ours(args.model_ours)
        result["model_ours"] = {k: {"images_per_s": v[0], "line": v[1]} for k, v in ours_model.items()}
        save()
        print_model(result, ours_model, args.model_batch)

    save()
    print("\nwrote %s; correctness: %d checks, %d failed" % (args.out, len(result["checks"]), len(failures)))
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
