"""lkconv for PyTorch: ``torch.ops.lkconv.*`` operators, ``dwconv2d``, ``DepthwiseConv2d`` and
``convert``.

Operators (registered with ``torch.library``, with fake-tensor implementations so that
``torch.compile`` traces them, and autograd through ``register_autograd``):

- ``torch.ops.lkconv.dwconv2d(x, weight, bias, stride, padding, dilation)``
- ``torch.ops.lkconv.dwconv2d_data_grad(dy, weight, input_hw, stride, padding, dilation,
  channels_last)``
- ``torch.ops.lkconv.dwconv2d_weight_grad(x, dy, kernel, stride, padding, dilation)``

with ``stride``/``dilation`` (height, width) and ``padding`` (top, bottom, left, right).
CPU tensors run lkconv's fast CPU path (f16/bf16 computed in f32). CUDA tensors run lkconv's
kernels on PyTorch's current stream, with outputs and workspace from PyTorch's caching
allocator, and never synchronise. Any strides are accepted (the kernels get contiguous NCHW
copies where needed); results come in the memory format PyTorch's own convolution gives
(channels_last in, channels_last out).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _lkconv, _params
from ._params import PaddingArg

__all__ = ["dwconv2d", "DepthwiseConv2d", "convert", "cuda_usable", "DEFAULT_MIN_KERNEL"]

DEFAULT_MIN_KERNEL = 7
"""``convert`` replaces depthwise convolutions whose larger kernel extent is at least this.
Measured on the CPU (python/bench_cpu.py; BENCHMARKS.md, "PyTorch CPU"): for training (forward +
backward) lkconv is 8-46x faster than PyTorch from 5x5 up and slower at 3x3; for inference it is
on par (0.8-1.0x) from 5x5 to 13x13 and ~57x faster at 31x31. 7 leaves 3x3/5x5 to PyTorch."""

_DTYPES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


def cuda_usable() -> bool:
    """True when lkconv's CUDA kernels can run here (kernels compiled in, a driver, a GPU)."""
    return _lkconv.cuda_usable()


# ---------------------------------------------------------------------------------------------
# Layout and checks shared by the real and the fake implementations.


def _memory_format(x: Tensor) -> torch.memory_format:
    """The memory format PyTorch's convolution gives for input x: channels_last when x is
    channels_last (and not also plainly contiguous), else contiguous."""
    if x.is_contiguous():
        return torch.contiguous_format
    if x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def _check_tensors(what: str, *tensors: Optional[Tensor]) -> None:
    ts = [t for t in tensors if t is not None]
    dtypes = {t.dtype for t in ts}
    if len(dtypes) != 1:
        raise ValueError(f"lkconv.{what}: all tensors must share one dtype, got {dtypes}")
    dtype = dtypes.pop()
    if dtype not in _DTYPES:
        raise TypeError(f"lkconv.{what}: dtype {dtype} is not supported (float32/16, bfloat16)")
    devices = {t.device for t in ts}
    if len(devices) != 1:
        raise ValueError(f"lkconv.{what}: all tensors must be on one device, got {devices}")


def _empty(shape: Sequence, like: Tensor, fmt: torch.memory_format) -> Tensor:
    return torch.empty(tuple(shape), dtype=like.dtype, device=like.device, memory_format=fmt)


# ---------------------------------------------------------------------------------------------
# The two back-ends. Each takes the op, the contiguous-able inputs and the validated output
# shape, and returns a contiguous NCHW result of the inputs' dtype.


def _f32_array(t: Tensor):
    """A C-contiguous float32 NumPy view (a converted copy when t is not one already)."""
    return t.detach().to(torch.float32).contiguous().numpy()


def _run_cpu(op: str, a: Tensor, b: Tensor, bias: Optional[Tensor], out_shape, conv) -> Tensor:
    out = torch.empty(tuple(out_shape), dtype=torch.float32)
    stride, padding, dilation = conv
    if op == "forward":
        bias_arr = None if bias is None else _f32_array(bias)
        _lkconv.forward_f32(_f32_array(a), _f32_array(b), bias_arr, out.numpy(), *conv)
    elif op == "data_grad":
        _lkconv.data_grad_f32(_f32_array(a), _f32_array(b), out.numpy(), *conv)
    else:
        _lkconv.weight_grad_f32(_f32_array(a), _f32_array(b), out.numpy(), *conv)
    return out.to(a.dtype)


def _run_cuda(
    op: str,
    a: Tensor,
    b: Tensor,
    bias: Optional[Tensor],
    out_shape,
    conv,
    input_shape,
    kernel,
) -> Tensor:
    device = a.device
    dtype = _DTYPES[a.dtype]
    a, b = a.contiguous(), b.contiguous()
    bias = None if bias is None else bias.contiguous()
    out = torch.empty(tuple(out_shape), dtype=a.dtype, device=device)
    ws_bytes = _lkconv.cuda_workspace_bytes(op, dtype, tuple(input_shape), kernel, *conv)
    # Workspace from PyTorch's caching allocator, on the current stream: freed when this
    # returns, it is reused only by work queued after ours on the same stream.
    ws = torch.empty(ws_bytes, dtype=torch.uint8, device=device) if ws_bytes else None
    stream = torch.cuda.current_stream(device).cuda_stream
    ptrs = (a.data_ptr(), b.data_ptr(), 0 if bias is None else bias.data_ptr(), out.data_ptr())
    workspace = (0, 0) if ws is None else (ws.data_ptr(), ws_bytes)
    _lkconv.cuda_launch(
        op, dtype, device.index, stream, tuple(input_shape), kernel, *conv, ptrs, workspace
    )
    return out


def _run(op: str, a: Tensor, b: Tensor, bias, out_shape, conv, input_shape, kernel) -> Tensor:
    if any(int(v) == 0 for v in out_shape) or any(int(v) == 0 for v in input_shape):
        # An empty batch (or no channel): nothing to compute, as in PyTorch.
        return torch.zeros(tuple(out_shape), dtype=a.dtype, device=a.device)
    if a.device.type == "cpu":
        return _run_cpu(op, a, b, bias, out_shape, conv)
    if a.device.type == "cuda":
        return _run_cuda(op, a, b, bias, out_shape, conv, input_shape, kernel)
    raise NotImplementedError(f"lkconv runs on cpu and cuda tensors, not {a.device.type}")


def _conv_args(stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int]):
    return (tuple(stride), tuple(padding), tuple(dilation))


def _nonempty(shape: Sequence[int]) -> List[int]:
    """The core validates non-empty problems; an empty batch is validated as a batch of 1."""
    return [max(int(v), 1) if i == 0 else int(v) for i, v in enumerate(shape)]


# ---------------------------------------------------------------------------------------------
# The operators.


@torch.library.custom_op("lkconv::dwconv2d", mutates_args=())
def _dwconv2d_op(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> Tensor:
    _check_tensors("dwconv2d", x, weight, bias)
    conv = _conv_args(stride, padding, dilation)
    bias_shape = None if bias is None else tuple(bias.shape)
    dims = _lkconv.forward_shape(
        _nonempty(x.shape), tuple(weight.shape), bias_shape, *conv
    )
    out_shape = [x.shape[0]] + list(dims[1:])
    kernel = (weight.shape[2], weight.shape[3])
    y = _run("forward", x, weight, bias, out_shape, conv, x.shape, kernel)
    return y.contiguous(memory_format=_memory_format(x))


@_dwconv2d_op.register_fake
def _(x, weight, bias, stride, padding, dilation):
    _check_tensors("dwconv2d", x, weight, bias)
    torch._check(x.dim() == 4 and weight.dim() == 4, lambda: "x and weight must be 4-D")
    n, c, h, w = x.shape
    kh, kw = weight.shape[2], weight.shape[3]
    oh = _params.out_extent(h, kh, padding[0] + padding[1], stride[0], dilation[0])
    ow = _params.out_extent(w, kw, padding[2] + padding[3], stride[1], dilation[1])
    return _empty((n, c, oh, ow), x, _memory_format(x))


@torch.library.custom_op("lkconv::dwconv2d_data_grad", mutates_args=())
def _data_grad_op(
    dy: Tensor,
    weight: Tensor,
    input_hw: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    channels_last: bool,
) -> Tensor:
    _check_tensors("dwconv2d_data_grad", dy, weight)
    conv = _conv_args(stride, padding, dilation)
    hw = (int(input_hw[0]), int(input_hw[1]))
    dims = _lkconv.data_grad_shape(_nonempty(dy.shape), tuple(weight.shape), hw, *conv)
    out_shape = [dy.shape[0]] + list(dims[1:])
    kernel = (weight.shape[2], weight.shape[3])
    dx = _run("data_grad", dy, weight, None, out_shape, conv, out_shape, kernel)
    return dx.contiguous(memory_format=_format(channels_last))


@_data_grad_op.register_fake
def _(dy, weight, input_hw, stride, padding, dilation, channels_last):
    _check_tensors("dwconv2d_data_grad", dy, weight)
    n, c = dy.shape[0], dy.shape[1]
    return _empty((n, c, input_hw[0], input_hw[1]), dy, _format(channels_last))


@torch.library.custom_op("lkconv::dwconv2d_weight_grad", mutates_args=())
def _weight_grad_op(
    x: Tensor,
    dy: Tensor,
    kernel: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> Tensor:
    _check_tensors("dwconv2d_weight_grad", x, dy)
    conv = _conv_args(stride, padding, dilation)
    k = (int(kernel[0]), int(kernel[1]))
    dims = _lkconv.weight_grad_shape(_nonempty(x.shape), _nonempty(dy.shape), k, *conv)
    return _run("weight_grad", x, dy, None, dims, conv, x.shape, k)


@_weight_grad_op.register_fake
def _(x, dy, kernel, stride, padding, dilation):
    _check_tensors("dwconv2d_weight_grad", x, dy)
    return _empty((x.shape[1], 1, kernel[0], kernel[1]), x, torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    x, weight, bias, stride, padding, dilation = inputs
    ctx.conv = (list(stride), list(padding), list(dilation))
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight)


def _backward(ctx, dy):
    x, weight = ctx.saved_tensors
    stride, padding, dilation = ctx.conv
    dx = dw = db = None
    if ctx.needs_input_grad[0]:
        hw = [x.shape[2], x.shape[3]]
        channels_last = _memory_format(x) == torch.channels_last
        dx = torch.ops.lkconv.dwconv2d_data_grad(
            dy, weight, hw, stride, padding, dilation, channels_last
        )
    if ctx.needs_input_grad[1]:
        kernel = [weight.shape[2], weight.shape[3]]
        dw = torch.ops.lkconv.dwconv2d_weight_grad(x, dy, kernel, stride, padding, dilation)
        dw = dw.to(memory_format=_memory_format(weight))
    if ctx.has_bias and ctx.needs_input_grad[2]:
        db = dy.sum(dim=(0, 2, 3))
    return dx, dw, db, None, None, None


torch.library.register_autograd("lkconv::dwconv2d", _backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# The functional API and the module.


def dwconv2d(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    stride: Union[int, Sequence[int]] = 1,
    padding: PaddingArg = "same",
    dilation: Union[int, Sequence[int]] = 1,
) -> Tensor:
    """Depthwise convolution, as ``F.conv2d(x, weight, bias, stride, padding, dilation,
    groups=C)`` with weight [C, 1, KH, KW]; x [N, C, H, W] or unbatched [C, H, W].

    padding: "same" (stride 1 only, odd remainder bottom/right as in PyTorch), "valid", an int,
    (ph, pw), or (top, bottom, left, right).
    """
    if weight.dim() != 4:
        raise ValueError(f"weight must be [C, 1, KH, KW], got shape {tuple(weight.shape)}")
    unbatched = x.dim() == 3
    if unbatched:
        x = x.unsqueeze(0)
    s = _params.pair("stride", stride)
    d = _params.pair("dilation", dilation)
    p = _params.sides(padding, (weight.shape[2], weight.shape[3]), s, d)
    y = torch.ops.lkconv.dwconv2d(x, weight, bias, list(s), list(p), list(d))
    return y.squeeze(0) if unbatched else y


def _depthwise(conv: nn.Conv2d) -> bool:
    return conv.groups == conv.in_channels == conv.out_channels and not conv.transposed


class DepthwiseConv2d(nn.Conv2d):
    """A drop-in for ``nn.Conv2d(C, C, k, groups=C)`` that runs lkconv.

    Same constructor, attributes (``kernel_size``, ``padding``, ``stride``, ...) and
    ``state_dict`` keys (``weight``, ``bias``) as ``nn.Conv2d``; ``groups`` defaults to
    ``in_channels`` and must equal it, and ``out_channels`` must equal ``in_channels``.
    Every ``padding_mode`` works (non-zero modes pad with ``F.pad`` first, as nn.Conv2d does).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: Optional[int] = None,
        kernel_size: Union[int, Sequence[int]] = 3,
        stride: Union[int, Sequence[int]] = 1,
        padding: Union[str, int, Sequence[int]] = 0,
        dilation: Union[int, Sequence[int]] = 1,
        groups: Optional[int] = None,
        bias: bool = True,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
    ) -> None:
        out_channels = in_channels if out_channels is None else out_channels
        groups = in_channels if groups is None else groups
        if not (groups == in_channels == out_channels):
            raise ValueError(
                "DepthwiseConv2d needs in_channels == out_channels == groups, got "
                f"{in_channels}, {out_channels}, {groups}"
            )
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=bias,
            padding_mode=padding_mode,
            device=device,
            dtype=dtype,
        )

    @classmethod
    def from_conv2d(cls, conv: nn.Conv2d) -> "DepthwiseConv2d":
        """A DepthwiseConv2d sharing conv's parameters (the same ``Parameter`` objects, so an
        optimizer built before keeps working) and its training mode."""
        if not _depthwise(conv):
            raise ValueError(f"{conv} is not a depthwise convolution")
        new = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
            device="meta",
        )
        new.weight = conv.weight
        new.bias = conv.bias
        new.train(conv.training)
        return new

    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        if self.padding_mode != "zeros":
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return dwconv2d(input, weight, bias, self.stride, 0, self.dilation)
        return dwconv2d(input, weight, bias, self.stride, self.padding, self.dilation)


def convert(module: nn.Module, min_kernel: int = DEFAULT_MIN_KERNEL) -> int:
    """Replaces, in place, every ``nn.Conv2d`` of ``module`` that lkconv runs (depthwise:
    in = out = groups, and a kernel extent of at least ``min_kernel``) by a
    ``DepthwiseConv2d`` that shares its parameters; returns how many it replaced. A module
    reachable under several names is replaced once, by one new module. ``module`` itself is
    not replaced (convert its parent, or use ``DepthwiseConv2d.from_conv2d``)."""
    replaced = {}
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if id(child) in replaced:
                setattr(parent, name, replaced[id(child)])
                continue
            if (
                type(child) is nn.Conv2d
                and _depthwise(child)
                and max(child.kernel_size) >= min_kernel
            ):
                new = DepthwiseConv2d.from_conv2d(child)
                replaced[id(child)] = new
                setattr(parent, name, new)
    return len(replaced)
