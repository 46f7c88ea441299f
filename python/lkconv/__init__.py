"""lkconv: very large depthwise convolutions for NumPy (this module) and PyTorch (``lkconv.torch``).

The NumPy functions run lkconv's fast CPU path. They take float32 or float16 arrays, compute
in float32 and return the input's dtype; other dtypes are refused (cast explicitly).
Shapes: x [N, C, H, W], w [C, 1, KH, KW], bias [C], y [N, C, OH, OW].
Bad input raises ``ValueError`` with the core's message.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import numpy as np

from . import _lkconv, _params
from ._params import PaddingArg

__version__ = _lkconv.__version__

__all__ = [
    "conv2d_depthwise",
    "conv2d_depthwise_data_grad",
    "conv2d_depthwise_weight_grad",
    "cpu_simd",
]

IntOrPair = Union[int, Sequence[int]]


def cpu_simd() -> str:
    """The instruction set lkconv's CPU path uses on this machine."""
    return _lkconv.cpu_simd()


def _f32(name: str, a, ndim: int) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype not in (np.float32, np.float16):
        raise TypeError(f"{name} must be float32 or float16, got {a.dtype}")
    if a.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {a.shape}")
    return np.ascontiguousarray(a, dtype=np.float32)


def _same_dtype(*arrays) -> np.dtype:
    dtypes = {np.asarray(a).dtype for a in arrays if a is not None}
    if len(dtypes) != 1:
        raise TypeError(f"all arrays must share one dtype, got {sorted(map(str, dtypes))}")
    return dtypes.pop()


def _conv(kernel: Tuple[int, int], stride: IntOrPair, padding: PaddingArg, dilation: IntOrPair):
    s = _params.pair("stride", stride)
    d = _params.pair("dilation", dilation)
    return s, _params.sides(padding, kernel, s, d), d


def conv2d_depthwise(
    x,
    w,
    bias=None,
    stride: IntOrPair = 1,
    padding: PaddingArg = None,
    dilation: IntOrPair = 1,
) -> np.ndarray:
    """y = depthwise conv(x, w) + bias (PyTorch's cross-correlation, groups = C).

    padding: None or "same" (stride 1 only), "valid", an int, (ph, pw) or (top, bottom, left,
    right).
    """
    dtype = _same_dtype(x, w, bias)
    xf, wf = _f32("x", x, 4), _f32("w", w, 4)
    bf = None if bias is None else _f32("bias", bias, 1)
    s, p, d = _conv((wf.shape[2], wf.shape[3]), stride, padding, dilation)
    shape = _lkconv.forward_shape(xf.shape, wf.shape, None if bf is None else bf.shape, s, p, d)
    y = np.empty(shape, dtype=np.float32)
    _lkconv.forward_f32(xf, wf, bf, y, s, p, d)
    return y.astype(dtype, copy=False)


def conv2d_depthwise_data_grad(
    dy,
    w,
    input_hw: Sequence[int],
    stride: IntOrPair = 1,
    padding: PaddingArg = None,
    dilation: IntOrPair = 1,
) -> np.ndarray:
    """dx [N, C, H, W]: the gradient of ``conv2d_depthwise`` with respect to x, for an input of
    ``input_hw`` = (H, W) (several input sizes give the same output size when stride > 1)."""
    dtype = _same_dtype(dy, w)
    dyf, wf = _f32("dy", dy, 4), _f32("w", w, 4)
    s, p, d = _conv((wf.shape[2], wf.shape[3]), stride, padding, dilation)
    hw = _params.pair("input_hw", input_hw)
    shape = _lkconv.data_grad_shape(dyf.shape, wf.shape, hw, s, p, d)
    dx = np.empty(shape, dtype=np.float32)
    _lkconv.data_grad_f32(dyf, wf, dx, s, p, d)
    return dx.astype(dtype, copy=False)


def conv2d_depthwise_weight_grad(
    x,
    dy,
    kernel: IntOrPair,
    stride: IntOrPair = 1,
    padding: PaddingArg = None,
    dilation: IntOrPair = 1,
) -> np.ndarray:
    """dw [C, 1, KH, KW]: the gradient of ``conv2d_depthwise`` with respect to w, summed over
    the batch in a fixed order (bit-identical run after run)."""
    dtype = _same_dtype(x, dy)
    xf, dyf = _f32("x", x, 4), _f32("dy", dy, 4)
    k = _params.pair("kernel", kernel)
    s, p, d = _conv(k, stride, padding, dilation)
    shape = _lkconv.weight_grad_shape(xf.shape, dyf.shape, k, s, p, d)
    dw = np.empty(shape, dtype=np.float32)
    _lkconv.weight_grad_f32(xf, dyf, dw, s, p, d)
    return dw.astype(dtype, copy=False)
