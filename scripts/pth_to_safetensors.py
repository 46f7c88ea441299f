#!/usr/bin/env python3
"""Convert a public RepLKNet PyTorch checkpoint (.pth) to a float32 safetensors file for lkconv.

    python3 scripts/pth_to_safetensors.py RepLKNet-31B_ImageNet-1K_224.pth replknet_31b.safetensors

The state dict may be the file itself or nested under 'model', 'state_dict' or 'module'
(mmpretrain checkpoints keep it under 'state_dict' with 'backbone.' / 'head.fc.' names; lkconv
accepts those names as they are). 'num_batches_tracked' and non-tensor entries are dropped;
every floating tensor is written as float32 (f16/bf16/f64 are converted). Needs torch and
safetensors (pip install torch safetensors).
"""

import argparse
import json
import sys


def find_state_dict(obj):
    """The tensor dict inside a checkpoint object."""
    import torch

    for key in ("model", "state_dict", "module", "model_ema"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            inner = obj[key]
            if any(isinstance(v, torch.Tensor) for v in inner.values()):
                return inner
            return find_state_dict(inner)
    if isinstance(obj, dict):
        return obj
    if hasattr(obj, "state_dict"):
        return obj.state_dict()
    raise SystemExit("no state dict found in the checkpoint")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("input", help=".pth checkpoint")
    ap.add_argument("output", help=".safetensors file to write")
    ap.add_argument("--strip-prefix", default="", help="also strip this name prefix (e.g. 'module.')")
    args = ap.parse_args()

    import torch
    from safetensors.torch import save_file

    try:
        obj = torch.load(args.input, map_location="cpu", weights_only=True)
    except Exception:  # older checkpoints with pickled extras
        obj = torch.load(args.input, map_location="cpu", weights_only=False)
    sd = find_state_dict(obj)

    out = {}
    dropped = []
    for name, t in sd.items():
        if not isinstance(t, torch.Tensor) or name.endswith("num_batches_tracked"):
            dropped.append(name)
            continue
        if not t.is_floating_point():
            dropped.append(name)
            continue
        if args.strip_prefix and name.startswith(args.strip_prefix):
            name = name[len(args.strip_prefix):]
        out[name] = t.detach().to(torch.float32).contiguous().clone()

    if not out:
        raise SystemExit("the checkpoint holds no floating-point tensors")
    meta = {"source": args.input, "converted_by": "lkconv scripts/pth_to_safetensors.py"}
    save_file(out, args.output, metadata=meta)
    params = sum(t.numel() for n, t in out.items() if "running_" not in n)
    print(json.dumps({"tensors": len(out), "dropped": len(dropped), "parameters": params, "output": args.output}))


if __name__ == "__main__":
    sys.exit(main())
