"""Convolution parameters as PyTorch spells them, turned into lkconv's (one place for both APIs).

Padding is (top, bottom, left, right): "same" pads d*(k-1) in all, the odd one on the bottom /
right as ``torch.nn.functional.conv2d(padding="same")`` does; "valid" is no padding; an int or
a pair is symmetric; four ints are per side.
"""

from __future__ import annotations

from typing import Sequence, Tuple, Union

Pair = Tuple[int, int]
Sides = Tuple[int, int, int, int]
PaddingArg = Union[str, int, Sequence[int], None]


def pair(name: str, value: Union[int, Sequence[int]]) -> Pair:
    """An int or a pair of positive ints as (height, width)."""
    if isinstance(value, int) and not isinstance(value, bool):
        out = (value, value)
    else:
        try:
            out = tuple(int(v) for v in value)  # type: ignore[union-attr]
        except TypeError:
            raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}") from None
        if len(out) != 2:
            raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(out) < 1:
        raise ValueError(f"{name} must be at least 1, got {value!r}")
    return out  # type: ignore[return-value]


def sides(padding: PaddingArg, kernel: Pair, stride: Pair, dilation: Pair) -> Sides:
    """Padding per side (top, bottom, left, right); None means "same"."""
    if padding is None or padding == "same":
        if stride != (1, 1):
            raise ValueError(
                'padding="same" needs stride 1 (as in torch.nn.functional.conv2d); '
                "give the padding explicitly"
            )
        th, tw = dilation[0] * (kernel[0] - 1), dilation[1] * (kernel[1] - 1)
        return (th // 2, th - th // 2, tw // 2, tw - tw // 2)
    if padding == "valid":
        return (0, 0, 0, 0)
    if isinstance(padding, str):
        raise ValueError(f'padding must be "same", "valid", an int or ints, got {padding!r}')
    if isinstance(padding, int) and not isinstance(padding, bool):
        p = (padding,) * 4
    else:
        v = tuple(int(x) for x in padding)
        if len(v) == 2:
            p = (v[0], v[0], v[1], v[1])
        elif len(v) == 4:
            p = v
        else:
            raise ValueError(f"padding must have 1, 2 or 4 values, got {padding!r}")
    if min(p) < 0:
        raise ValueError(f"padding must be non-negative, got {padding!r}")
    return p  # type: ignore[return-value]


def out_extent(size, k: int, pad_sum: int, stride: int, dilation: int):
    """Output extent along one axis (works on PyTorch's symbolic ints too)."""
    return (size + pad_sum - dilation * (k - 1) - 1) // stride + 1
