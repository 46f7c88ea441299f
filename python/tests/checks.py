"""Checks shared by the pytest suite (CPU, and CUDA where present) and python/gpu_check.py.

The oracle is ``torch.nn.functional.conv2d(groups=C)`` in float64 on the CPU, on the same
inputs (rounded to the tested dtype first). An element passes when
``|got - ref| <= u * |ref| + s + 1e-5 * bound`` (u: the unit roundoff of the output dtype, s: its
smallest subnormal, the rounding step below the normal range): its rounding plus f32 accumulation
error, where ``bound`` is the same pass on |inputs| (the sum of absolute products, the scale of
any accumulation error). NaN fails.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import List, Tuple, Union

import torch
import torch.nn.functional as F

import lkconv.torch as lt

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = ["contiguous", "channels_last", "strided"]
# Unit roundoff of each dtype's output rounding.
EPS = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


@dataclass(frozen=True)
class Case:
    n: int
    c: int
    h: int
    w: int
    kh: int
    kw: int
    stride: Union[int, Tuple[int, int]] = 1
    padding: Union[str, int, Tuple[int, ...]] = "same"
    dilation: Union[int, Tuple[int, int]] = 1
    bias: bool = True

    def __str__(self) -> str:
        return (
            f"{self.n}x{self.c}x{self.h}x{self.w}-k{self.kh}x{self.kw}"
            f"-s{self.stride}-p{self.padding}-d{self.dilation}{'-b' if self.bias else ''}"
        ).replace(" ", "")


# Hand-picked: odd/even, rectangular, K larger than the image, stride/dilation, asymmetric
# padding, batch 1, one channel, RepLKNet's 31x31 on a small map.
CASES: List[Case] = [
    Case(2, 3, 9, 11, 7, 7),
    Case(1, 1, 5, 6, 9, 9),
    Case(2, 4, 8, 8, 4, 6),
    Case(3, 2, 12, 7, 5, 3, stride=2, padding=(2, 1)),
    Case(1, 5, 13, 13, 3, 3, padding=2, dilation=2),
    Case(2, 3, 16, 9, 7, 5, stride=(2, 3), padding=(3, 1, 2, 0), dilation=(1, 2)),
    Case(1, 8, 14, 14, 13, 13, bias=False),
    Case(2, 2, 7, 7, 31, 31),
    Case(1, 3, 20, 17, 2, 2, stride=3, padding="valid"),
    Case(1, 1, 1, 1, 1, 1, padding=0),
]


def random_cases(count: int, seed: int) -> List[Case]:
    """Fresh random problems (any stride/dilation/padding that leaves an output)."""
    rng = random.Random(seed)
    out: List[Case] = []
    while len(out) < count:
        kh, kw = rng.randint(1, 17), rng.randint(1, 17)
        s = (rng.choice([1, 1, 2, 3]), rng.choice([1, 1, 2]))
        d = (rng.choice([1, 1, 2]), rng.choice([1, 1, 3]))
        h, w = rng.randint(1, 24), rng.randint(1, 24)
        if s == (1, 1) and rng.random() < 0.5:
            pad: Union[str, Tuple[int, ...]] = "same"
        else:
            pad = tuple(rng.randint(0, 8) for _ in range(4))
            ph = pad[0] + pad[1]
            pw = pad[2] + pad[3]
            if h + ph < d[0] * (kh - 1) + 1 or w + pw < d[1] * (kw - 1) + 1:
                continue
        out.append(Case(rng.randint(1, 3), rng.randint(1, 6), h, w, kh, kw, s, pad, d, rng.random() < 0.5))
    return out


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "strided":
        # A view with a gap between columns: neither contiguous nor channels_last.
        wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
        wide[..., ::2] = t
        return wide[..., ::2]
    return t.contiguous()


def _assert_close(what: str, got: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor, eps: float):
    got64 = got.detach().to("cpu", torch.float64)
    assert got64.shape == ref.shape, f"{what}: shape {tuple(got64.shape)} != {tuple(ref.shape)}"
    err = (got64 - ref).abs()
    # Below the normal range the output's rounding step is the smallest subnormal, not u * |ref|
    # (f16: 6e-8 near 2e-5 met a half-step error that u * |ref| = 1e-8 refused).
    info = torch.finfo(got.dtype)
    tol = eps * 1.01 * ref.abs() + info.tiny * info.eps + 1e-5 * bound + 1e-30
    bad = ~(err <= tol)  # NaN fails
    if bad.any():
        i = bad.nonzero()[0].tolist()
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {err.numel()} elements off, first at {i}: "
            f"got {got64[tuple(i)].item()} ref {ref[tuple(i)].item()} tol {tol[tuple(i)].item()}"
        )


def _torch_padding(x: torch.Tensor, case: Case):
    """(x padded explicitly, padding for F.conv2d): F.conv2d takes only symmetric padding."""
    p = case.padding
    if isinstance(p, tuple) and len(p) == 4:
        top, bottom, left, right = p
        return F.pad(x, (left, right, top, bottom)), 0
    return x, p


def _reference(case: Case, x, w, b, dy, device="cpu"):
    """Forward output and the three gradients in float64 by F.conv2d (+ autograd) on `device`,
    returned on the CPU."""
    x = x.detach().to(device, torch.float64).requires_grad_()
    w = w.detach().to(device, torch.float64).requires_grad_()
    b = None if b is None else b.detach().to(device, torch.float64).requires_grad_()
    xp, pad = _torch_padding(x, case)
    y = F.conv2d(xp, w, b, case.stride, pad, case.dilation, groups=case.c)
    if dy is None:
        return y.detach().cpu(), None
    ins = [x, w] + ([b] if b is not None else [])
    grads = torch.autograd.grad(y, ins, dy.detach().to(device, torch.float64))
    return y.detach().cpu(), [t.cpu() for t in grads]


def check_case(case: Case, dtype: torch.dtype, device: str, layout: str = "contiguous", seed: int = 0):
    """Forward, data gradient, weight gradient and bias gradient of lkconv.torch.dwconv2d on
    `device` against the float64 oracle; also checks the output's memory format."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return (torch.rand(*shape, generator=g, dtype=torch.float64) * 2 - 1).to(dtype)

    x0 = rand(case.n, case.c, case.h, case.w)
    w0 = rand(case.c, 1, case.kh, case.kw)
    b0 = rand(case.c) if case.bias else None
    x = _layout(x0.to(device), layout).requires_grad_()
    w = w0.to(device).requires_grad_()
    b = None if b0 is None else b0.to(device).requires_grad_()

    y = lt.dwconv2d(x, w, b, case.stride, case.padding, case.dilation)
    dy0 = rand(*y.shape)
    y_ref, grads = _reference(case, x0, w0, b0, dy0, device)
    eps = EPS[dtype]
    y_bound, _ = _reference(case, x0.abs(), w0.abs(), None if b0 is None else b0.abs(), None, device)
    _assert_close(f"{case} {dtype} {layout} forward", y, y_ref, y_bound, eps)
    assert y.dtype == dtype and y.device.type == torch.device(device).type

    # The memory format PyTorch's own convolution gives for this input.
    expect_cl = layout == "channels_last" and not x.is_contiguous()
    got_cl = y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    if y.shape[1] > 1 and y.shape[2] * y.shape[3] > 1:
        assert got_cl == expect_cl, f"{case} {layout}: output memory format"

    dy = _layout(dy0.to(device), layout)
    ins = [x, w] + ([b] if b is not None else [])
    got = torch.autograd.grad(y, ins, dy)
    # Bounds: the same linear maps applied to absolute values.
    _, gb = _reference(case, x0.abs(), w0.abs(), None if b0 is None else b0.abs(), dy0.abs(), device)
    names = ["data grad", "weight grad", "bias grad"]
    for name, got_t, ref_t, bound_t in zip(names, got, grads, gb):
        # Gradients are rounded to the dtype once more in the backward (bias: a dtype sum).
        _assert_close(f"{case} {dtype} {layout} {name}", got_t, ref_t, bound_t, 2 * eps)
    assert got[0].shape == x.shape and got[1].shape == w.shape
