"""The NumPy API against the float64 reference (a direct loop), poisoned outputs, bad input."""

import numpy as np
import pytest

import lkconv
from lkconv import _lkconv
from run_seed import SEED


def ref_forward(x, w, b, stride, pad, dil):
    """float64 depthwise cross-correlation, pad = (top, bottom, left, right)."""
    n, c, h, wd = x.shape
    kh, kw = w.shape[2:]
    xp = np.zeros((n, c, h + pad[0] + pad[1], wd + pad[2] + pad[3]))
    xp[:, :, pad[0] : pad[0] + h, pad[2] : pad[2] + wd] = x
    oh = (xp.shape[2] - dil[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (xp.shape[3] - dil[1] * (kw - 1) - 1) // stride[1] + 1
    y = np.zeros((n, c, oh, ow))
    for i in range(kh):
        for j in range(kw):
            r0, c0 = i * dil[0], j * dil[1]
            patch = xp[:, :, r0 : r0 + stride[0] * (oh - 1) + 1 : stride[0], c0 : c0 + stride[1] * (ow - 1) + 1 : stride[1]]
            y += patch * w[None, :, 0, i, j, None, None]
    if b is not None:
        y += b[None, :, None, None]
    return y


# (x shape, kernel, stride, padding given, padding per side, dilation)
CASES = [
    ((2, 3, 9, 11), (7, 7), (1, 1), None, (3, 3, 3, 3), (1, 1)),
    ((1, 1, 5, 6), (9, 8), (1, 1), "same", (4, 4, 3, 4), (1, 1)),
    ((3, 2, 12, 7), (5, 3), (2, 1), (2, 1), (2, 2, 1, 1), (1, 1)),
    ((1, 4, 13, 10), (3, 4), (1, 2), (1, 0, 2, 3), (1, 0, 2, 3), (2, 3)),
    ((2, 2, 6, 6), (31, 31), (1, 1), 15, (15, 15, 15, 15), (1, 1)),
]


@pytest.mark.parametrize("shape,k,s,padding,sides,d", CASES)
def test_numpy_three_passes(shape, k, s, padding, sides, d):
    rng = np.random.default_rng((SEED, *shape, *k))
    x = rng.uniform(-1, 1, shape).astype(np.float32)
    w = rng.uniform(-1, 1, (shape[1], 1) + k).astype(np.float32)
    b = rng.uniform(-1, 1, shape[1]).astype(np.float32)
    y = lkconv.conv2d_depthwise(x, w, b, stride=s, padding=padding, dilation=d)
    y_ref = ref_forward(x.astype(np.float64), w.astype(np.float64), b, s, sides, d)
    bound = ref_forward(np.abs(x), np.abs(w), np.abs(b), s, sides, d)
    assert y.dtype == np.float32 and y.shape == y_ref.shape
    assert np.all(np.abs(y - y_ref) <= 1e-5 * bound + 1e-30)

    # Gradients: <dy, conv(x, w)> is linear in x and in w, so the gradients are the
    # reference's adjoints; check them through the identity <dy, y(x)> = <dx, x>.
    dy = rng.uniform(-1, 1, y.shape).astype(np.float32)
    dx = lkconv.conv2d_depthwise_data_grad(dy, w, shape[2:], stride=s, padding=padding, dilation=d)
    dw = lkconv.conv2d_depthwise_weight_grad(x, dy, k, stride=s, padding=padding, dilation=d)
    assert dx.shape == x.shape and dw.shape == w.shape
    # Each element of dx / dw against the reference by finite differences of a linear map:
    # dx[e] = <dy, conv(onehot_e, w)>, dw[e] = <dy, conv(x, onehot_e)>, exact in float64.
    y_lin = lambda xx, ww: ref_forward(xx, ww, None, s, sides, d)
    x64, w64, dy64 = x.astype(np.float64), w.astype(np.float64), dy.astype(np.float64)
    for idx in list(np.ndindex(w.shape))[:: max(1, w.size // 40)]:
        e = np.zeros_like(w64)
        e[idx] = 1
        ref = np.sum(dy64 * y_lin(x64, e))
        bnd = np.sum(np.abs(dy64) * y_lin(np.abs(x64), e))
        assert abs(dw[idx] - ref) <= 1e-5 * bnd + 1e-30, (idx, dw[idx], ref)
    for idx in list(np.ndindex(x.shape))[:: max(1, x.size // 40)]:
        e = np.zeros_like(x64)
        e[idx] = 1
        ref = np.sum(dy64 * y_lin(e, w64))
        bnd = np.sum(np.abs(dy64) * y_lin(e, np.abs(w64)))
        assert abs(dx[idx] - ref) <= 1e-5 * bnd + 1e-30, (idx, dx[idx], ref)


def test_numpy_float16_keeps_dtype():
    rng = np.random.default_rng((SEED, 5))
    x = rng.uniform(-1, 1, (1, 2, 8, 8)).astype(np.float16)
    w = rng.uniform(-1, 1, (2, 1, 5, 5)).astype(np.float16)
    y = lkconv.conv2d_depthwise(x, w)
    assert y.dtype == np.float16
    ref = ref_forward(x.astype(np.float64), w.astype(np.float64), None, (1, 1), (2, 2, 2, 2), (1, 1))
    assert np.all(np.abs(y.astype(np.float64) - ref) <= 2**-11 * np.abs(ref) + 1e-4)


def test_native_writes_every_output_element():
    """Outputs poisoned with NaN before the native call: every element must be written."""
    rng = np.random.default_rng((SEED, 9))
    x = rng.uniform(-1, 1, (2, 3, 11, 9)).astype(np.float32)
    w = rng.uniform(-1, 1, (3, 1, 6, 5)).astype(np.float32)
    conv = ((2, 1), (2, 3, 1, 2), (1, 2))
    oshape = _lkconv.forward_shape(x.shape, w.shape, None, *conv)
    y = np.full(oshape, np.nan, dtype=np.float32)
    _lkconv.forward_f32(x, w, None, y, *conv)
    assert np.isfinite(y).all()
    dx = np.full(x.shape, np.nan, dtype=np.float32)
    _lkconv.data_grad_f32(y, w, dx, *conv)
    assert np.isfinite(dx).all()
    dw = np.full(w.shape, np.nan, dtype=np.float32)
    _lkconv.weight_grad_f32(x, y, dw, *conv)
    assert np.isfinite(dw).all()


@pytest.mark.parametrize(
    "call,error",
    [
        (lambda x, w: lkconv.conv2d_depthwise(x, w[:2]), ValueError),  # C of w != C of x
        (lambda x, w: lkconv.conv2d_depthwise(x[0], w), ValueError),  # 3-D input
        (lambda x, w: lkconv.conv2d_depthwise(x, w, padding="valid", dilation=9), ValueError),
        (lambda x, w: lkconv.conv2d_depthwise(x, w, stride=2), ValueError),  # "same" + stride
        (lambda x, w: lkconv.conv2d_depthwise(x, w, stride=0, padding=0), ValueError),
        (lambda x, w: lkconv.conv2d_depthwise(x.astype(np.float64), w), TypeError),
        (lambda x, w: lkconv.conv2d_depthwise(x, w.astype(np.float16)), TypeError),
        (lambda x, w: lkconv.conv2d_depthwise_data_grad(x, w, (2, 2), padding=0), ValueError),
        (lambda x, w: lkconv.conv2d_depthwise_weight_grad(x, x[:, :, :3], (3, 3)), ValueError),
        (lambda x, w: _lkconv.forward_f32(x, w, None, np.empty((1, 3, 7, 8), np.float32), (1, 1), (1, 1, 1, 1), (1, 1)), ValueError),  # wrong y
        (lambda x, w: _lkconv.forward_f32(x, w, None, np.empty((1, 3, 8, 16), np.float32)[..., ::2], (1, 1), (1, 1, 1, 1), (1, 1)), ValueError),
    ],
)
def test_numpy_bad_input_is_a_typed_error(call, error):
    x = np.ones((1, 3, 8, 8), np.float32)
    w = np.ones((3, 1, 3, 3), np.float32)
    with pytest.raises(error):
        call(x, w)
