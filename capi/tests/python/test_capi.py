"""The C ABI from Python ctypes: all three passes in f32, f16 and bf16 on CPU and SIM against a
float64 NumPy reference written here (independent of lkconv's Rust reference), and every
status code. Run by capi/tests/python.rs with LKCONV_LIB=path/to/liblkconv.so."""

import ctypes
import os
import sys
import time
import unittest

import numpy as np

LIB = ctypes.CDLL(os.environ["LKCONV_LIB"])
# Fresh data each run; LKCONV_SEED replays one.
SEED = int(os.environ.get("LKCONV_SEED", time.time_ns() % 2**31))
print(f"seed {SEED} (replay with LKCONV_SEED={SEED})", file=sys.stderr)

OK, INVALID, UNSUPPORTED, CUDA_UNAVAILABLE, CUDA_ERROR, OOM, INTERNAL = range(7)
STATUS_NAMES = [
    "LK_STATUS_OK",
    "LK_STATUS_INVALID_ARGUMENT",
    "LK_STATUS_UNSUPPORTED",
    "LK_STATUS_CUDA_UNAVAILABLE",
    "LK_STATUS_CUDA_ERROR",
    "LK_STATUS_OUT_OF_MEMORY",
    "LK_STATUS_INTERNAL",
]
CPU, CUDA, SIM = 0, 1, 2
F32, F16, BF16 = 0, 1, 2
FORWARD, DATA_GRAD, WEIGHT_GRAD = 0, 1, 2


class Desc(ctypes.Structure):
    _fields_ = [(f, ctypes.c_int64) for f in ("n", "c", "h", "w")] + [
        (f, ctypes.c_int32)
        for f in (
            "kh", "kw", "pad_top", "pad_bottom", "pad_left", "pad_right",
            "stride_h", "stride_w", "dilation_h", "dilation_w", "dtype",
        )
    ]


P = ctypes.c_void_p
H = ctypes.POINTER(ctypes.c_void_p)
for name, args in {
    "lk_create": [H, ctypes.c_int32, ctypes.c_int],
    "lk_destroy": [P],
    "lk_set_stream": [P, P],
    "lk_output_size": [ctypes.POINTER(Desc), ctypes.POINTER(ctypes.c_int64), ctypes.POINTER(ctypes.c_int64)],
    "lk_workspace_size": [P, ctypes.POINTER(Desc), ctypes.c_int32, ctypes.POINTER(ctypes.c_size_t)],
    "lk_dwconv2d_forward": [P, ctypes.POINTER(Desc), P, P, P, P, P, ctypes.c_size_t],
    "lk_dwconv2d_data_grad": [P, ctypes.POINTER(Desc), P, P, P, P, ctypes.c_size_t],
    "lk_dwconv2d_weight_grad": [P, ctypes.POINTER(Desc), P, P, P, P, ctypes.c_size_t],
    "lk_test_internal_error": [],
}.items():
    fn = getattr(LIB, name)
    fn.argtypes, fn.restype = args, ctypes.c_int32
for name, args in {"lk_status_string": [ctypes.c_int32], "lk_last_error": [], "lk_version": []}.items():
    fn = getattr(LIB, name)
    fn.argtypes, fn.restype = args, ctypes.c_char_p


def last_error():
    return LIB.lk_last_error().decode()


# ---- 16-bit storage: f16 is NumPy's float16; bf16 is the upper half of an f32 (uint16 bits).

def bf16_bits(v):
    """Rounds float values to bfloat16 (nearest even), as uint16 bits."""
    u = np.asarray(v, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def bf16_values(bits):
    return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def to_storage(v, dtype):
    """(buffer handed to lkconv, the float64 values it holds)."""
    if dtype == F32:
        b = np.ascontiguousarray(v, dtype=np.float32)
        return b, b.astype(np.float64)
    if dtype == F16:
        b = np.ascontiguousarray(v, dtype=np.float16)
        return b, b.astype(np.float64)
    b = np.ascontiguousarray(bf16_bits(v))
    return b, bf16_values(b)


def from_storage(b, dtype):
    return bf16_values(b) if dtype == BF16 else b.astype(np.float64)


def poisoned(shape, dtype):
    """An output buffer full of NaN, so that an element the library never writes shows."""
    if dtype == BF16:
        return np.full(shape, 0x7FC0, dtype=np.uint16)
    return np.full(shape, np.nan, dtype=np.float32 if dtype == F32 else np.float16)


# ---- float64 reference: padded input, one shifted slice per filter tap.

def out_size(d):
    def one(size, k, pad, stride, dil):
        return (size + pad - (k - 1) * dil - 1) // stride + 1
    return (one(d.h, d.kh, d.pad_top + d.pad_bottom, d.stride_h, d.dilation_h),
            one(d.w, d.kw, d.pad_left + d.pad_right, d.stride_w, d.dilation_w))


def taps(d, oh, ow):
    """(ky, kx, rows, cols) of every tap: the slices of the padded input it reads."""
    for ky in range(d.kh):
        for kx in range(d.kw):
            r0, c0 = ky * d.dilation_h, kx * d.dilation_w
            yield (ky, kx, slice(r0, r0 + d.stride_h * (oh - 1) + 1, d.stride_h),
                   slice(c0, c0 + d.stride_w * (ow - 1) + 1, d.stride_w))


def padded(d, x):
    return np.pad(x, ((0, 0), (0, 0), (d.pad_top, d.pad_bottom), (d.pad_left, d.pad_right)))


def ref_forward(d, x, w, bias):
    oh, ow = out_size(d)
    xp = padded(d, x)
    y = np.zeros((d.n, d.c, oh, ow))
    for ky, kx, rows, cols in taps(d, oh, ow):
        y += xp[:, :, rows, cols] * w[None, :, 0, ky, kx, None, None]
    return y if bias is None else y + bias[None, :, None, None]


def ref_data_grad(d, dy, w):
    oh, ow = out_size(d)
    dxp = np.zeros((d.n, d.c, d.h + d.pad_top + d.pad_bottom, d.w + d.pad_left + d.pad_right))
    for ky, kx, rows, cols in taps(d, oh, ow):
        dxp[:, :, rows, cols] += dy * w[None, :, 0, ky, kx, None, None]
    return dxp[:, :, d.pad_top:d.pad_top + d.h, d.pad_left:d.pad_left + d.w]


def ref_weight_grad(d, x, dy):
    oh, ow = out_size(d)
    xp = padded(d, x)
    dw = np.zeros((d.c, 1, d.kh, d.kw))
    for ky, kx, rows, cols in taps(d, oh, ow):
        dw[:, 0, ky, kx] = (xp[:, :, rows, cols] * dy).sum(axis=(0, 2, 3))
    return dw


def desc(n, c, h, w, kh, kw, pad=(0, 0, 0, 0), stride=(1, 1), dilation=(1, 1), dtype=F32):
    return Desc(n, c, h, w, kh, kw, *pad, *stride, *dilation, dtype)


# Odd and even kernels, kernels larger than the image, batch 1, one channel, non-square
# images, asymmetric padding, stride and dilation.
SHAPES = [
    desc(2, 3, 13, 11, 7, 7, (3, 3, 3, 3)),
    desc(1, 1, 9, 17, 4, 6, (2, 1, 3, 2)),
    desc(1, 2, 5, 6, 9, 8, (4, 4, 4, 3)),
    desc(3, 4, 16, 12, 31, 31, (15, 15, 15, 15)),
    desc(1, 3, 12, 15, 5, 3, (2, 1, 0, 1), (2, 3), (2, 1)),
    desc(2, 2, 10, 10, 3, 3, (2, 2, 2, 2), (1, 1), (3, 2)),
]

# Storage rounding of the output (half an ulp relative) plus f32 accumulation over the terms.
OUT_EPS = {F32: 2.0 ** -24, F16: 2.0 ** -11, BF16: 2.0 ** -8}
SUBNORMAL_MIN = {F32: 2.0 ** -149, F16: 2.0 ** -24, BF16: 2.0 ** -133}


class Handle:
    def __init__(self, device):
        self.ptr = ctypes.c_void_p()
        status = LIB.lk_create(ctypes.byref(self.ptr), device, 0)
        assert status == OK, (STATUS_NAMES[status], last_error())

    def __enter__(self):
        return self.ptr

    def __exit__(self, *exc):
        assert LIB.lk_destroy(self.ptr) == OK


def ptr(a):
    return None if a is None else a.ctypes.data


class Passes(unittest.TestCase):
    def check(self, got, want, abs_ref, terms, dtype, what):
        self.assertFalse(np.isnan(got).any(), f"{what}: NaN (unwritten or poisoned) output")
        # (+ the smallest subnormal: the output's rounding step below its normal range)
        tol = abs_ref * (2 * OUT_EPS[dtype] + terms * 2.0 ** -23) + SUBNORMAL_MIN[dtype] + 1e-30
        err = np.abs(got - want)
        worst = np.unravel_index(np.argmax(err - tol), err.shape)
        self.assertTrue((err <= tol).all(),
                        f"{what}: error {err[worst]:.3g} > {tol[worst]:.3g} at {worst}")

    def run_all(self, device, dtype, d, rng):
        d = Desc.from_buffer_copy(d)
        d.dtype = dtype
        oh, ow = ctypes.c_int64(), ctypes.c_int64()
        self.assertEqual(LIB.lk_output_size(ctypes.byref(d), ctypes.byref(oh), ctypes.byref(ow)), OK)
        self.assertEqual((oh.value, ow.value), out_size(d))
        xs, ys, ws = (d.n, d.c, d.h, d.w), (d.n, d.c, oh.value, ow.value), (d.c, 1, d.kh, d.kw)
        x, x64 = to_storage(rng.uniform(-1, 1, xs), dtype)
        w, w64 = to_storage(rng.uniform(-1, 1, ws), dtype)
        b, b64 = to_storage(rng.uniform(-1, 1, d.c), dtype)
        dy, dy64 = to_storage(rng.uniform(-1, 1, ys), dtype)
        what = f"device {device} dtype {dtype} desc {[getattr(d, f) for f, _ in Desc._fields_]}"
        with Handle(device) as h:
            size = ctypes.c_size_t(123)
            for op in (FORWARD, DATA_GRAD, WEIGHT_GRAD):
                self.assertEqual(LIB.lk_workspace_size(h, ctypes.byref(d), op, ctypes.byref(size)), OK)
                self.assertEqual(size.value, 0)
            y, dx, dw = poisoned(ys, dtype), poisoned(xs, dtype), poisoned(ws, dtype)
            for bias, bias64 in ((None, None), (b, b64)):
                y = poisoned(ys, dtype)  # fresh poison: the bias pass must write every element
                st = LIB.lk_dwconv2d_forward(h, ctypes.byref(d), ptr(x), ptr(w), ptr(bias), ptr(y), None, 0)
                self.assertEqual(st, OK, last_error())
                abs_ref = ref_forward(d, np.abs(x64), np.abs(w64), None if bias is None else np.abs(bias64))
                self.check(from_storage(y, dtype), ref_forward(d, x64, w64, bias64), abs_ref,
                           d.kh * d.kw + 1, dtype, "forward " + what)
            st = LIB.lk_dwconv2d_data_grad(h, ctypes.byref(d), ptr(dy), ptr(w), ptr(dx), None, 0)
            self.assertEqual(st, OK, last_error())
            self.check(from_storage(dx, dtype), ref_data_grad(d, dy64, w64),
                       ref_data_grad(d, np.abs(dy64), np.abs(w64)), d.kh * d.kw, dtype, "data grad " + what)
            st = LIB.lk_dwconv2d_weight_grad(h, ctypes.byref(d), ptr(x), ptr(dy), ptr(dw), None, 0)
            self.assertEqual(st, OK, last_error())
            self.check(from_storage(dw, dtype), ref_weight_grad(d, x64, dy64),
                       ref_weight_grad(d, np.abs(x64), np.abs(dy64)), d.n * oh.value * ow.value,
                       dtype, "weight grad " + what)

    def test_cpu_all_dtypes(self):
        rng = np.random.default_rng((SEED, 0))
        for dtype in (F32, F16, BF16):
            for d in SHAPES:
                self.run_all(CPU, dtype, d, rng)

    def test_sim_all_dtypes(self):
        rng = np.random.default_rng((SEED, 1))
        for dtype in (F32, F16, BF16):
            for d in SHAPES[:3] + SHAPES[4:]:  # the 31x31 case is slow in the simulator
                self.run_all(SIM, dtype, d, rng)

    def test_reference_catches_a_wrong_answer(self):
        d = SHAPES[0]
        rng = np.random.default_rng((SEED, 2))
        x, w = rng.uniform(-1, 1, (d.n, d.c, d.h, d.w)), rng.uniform(-1, 1, (d.c, 1, d.kh, d.kw))
        y = ref_forward(d, x, w, None)
        wrong = y.copy()
        wrong[0, 1, 2, 3] += 1e-3
        with self.assertRaises(AssertionError):
            self.check(wrong, y, ref_forward(d, np.abs(x), np.abs(w), None), 49, F32, "planted")


class Statuses(unittest.TestCase):
    """Every status code, and a message with every failure."""

    def expect(self, status, want, words):
        self.assertEqual(STATUS_NAMES[status], STATUS_NAMES[want], last_error())
        self.assertIn(words, last_error())

    def test_names_and_version(self):
        for i, name in enumerate(STATUS_NAMES):
            self.assertEqual(LIB.lk_status_string(i).decode(), name)
        self.assertEqual(LIB.lk_status_string(99).decode(), "unknown status")
        self.assertRegex(LIB.lk_version().decode(), r"^\d+\.\d+\.\d+$")

    def test_invalid_arguments(self):
        d = desc(1, 2, 8, 8, 3, 3, (1, 1, 1, 1))
        oh, ow = ctypes.c_int64(), ctypes.c_int64()
        a = np.ones(1024, dtype=np.float32)
        self.expect(LIB.lk_create(None, CPU, 0), INVALID, "NULL")
        h = ctypes.c_void_p(1)
        self.expect(LIB.lk_create(ctypes.byref(h), 5, 0), INVALID, "unknown device")
        self.assertIsNone(h.value)
        self.expect(LIB.lk_output_size(None, ctypes.byref(oh), ctypes.byref(ow)), INVALID, "descriptor is NULL")
        for field, value, words in [("h", -3, "negative"), ("c", 0, "at least 1"), ("kh", 20, "empty output"),
                                    ("stride_w", 0, "at least 1"), ("dtype", 3, "unknown dtype"),
                                    ("n", 1 << 62, "overflow")]:
            bad = Desc.from_buffer_copy(d)
            setattr(bad, field, value)
            self.expect(LIB.lk_output_size(ctypes.byref(bad), ctypes.byref(oh), ctypes.byref(ow)), INVALID, words)
        with Handle(CPU) as h:
            size = ctypes.c_size_t()
            self.expect(LIB.lk_workspace_size(h, ctypes.byref(d), 7, ctypes.byref(size)), INVALID, "unknown op")
            self.expect(LIB.lk_workspace_size(h, ctypes.byref(d), 0, None), INVALID, "bytes is NULL")
            fwd = LIB.lk_dwconv2d_forward
            self.expect(fwd(None, ctypes.byref(d), ptr(a), ptr(a), None, ptr(a), None, 0), INVALID, "handle is NULL")
            self.expect(fwd(h, ctypes.byref(d), ptr(a), None, None, ptr(a), None, 0), INVALID, "w is NULL")
            self.expect(fwd(h, ctypes.byref(d), ptr(a) + 2, ptr(a), None, ptr(a), None, 0), INVALID, "not aligned")
            self.expect(LIB.lk_dwconv2d_data_grad(h, ctypes.byref(d), ptr(a), ptr(a), None, None, 0),
                        INVALID, "dx is NULL")
            self.expect(LIB.lk_dwconv2d_weight_grad(h, ctypes.byref(d), ptr(a), None, ptr(a), None, 0),
                        INVALID, "dy is NULL")

    def test_unsupported(self):
        with Handle(SIM) as h:
            self.assertEqual(LIB.lk_set_stream(h, None), OK)
            self.expect(LIB.lk_set_stream(h, 0x1234), UNSUPPORTED, "CUDA stream")

    def test_cuda_unavailable_or_cuda_works(self):
        h = ctypes.c_void_p()
        status = LIB.lk_create(ctypes.byref(h), CUDA, 0)
        if status == OK:  # a GPU machine: the handle works with the default stream
            self.assertEqual(LIB.lk_set_stream(h, None), OK)
            self.assertEqual(LIB.lk_destroy(h), OK)
            print("CUDA present: lk_create(LK_DEVICE_CUDA) succeeded")
        else:
            self.expect(status, CUDA_UNAVAILABLE, "CUDA")
        self.expect(LIB.lk_create(ctypes.byref(h), CUDA, -1), INVALID, "ordinal is negative")
        self.expect(LIB.lk_create(ctypes.byref(h), CUDA, 1000), CUDA_UNAVAILABLE, "CUDA")

    def test_out_of_memory(self):
        # 2^40 f32 elements (4 TiB, lkconv's largest tensor): the host copy cannot be allocated
        # and the library says so before it reads the (small) buffer.
        d = desc(1, 1 << 20, 1 << 10, 1 << 10, 1, 1)
        a = np.ones(16, dtype=np.float32)
        with Handle(CPU) as h:
            self.expect(LIB.lk_dwconv2d_forward(h, ctypes.byref(d), ptr(a), ptr(a), None, ptr(a), None, 0),
                        OOM, "cannot allocate")

    def test_internal(self):
        self.expect(LIB.lk_test_internal_error(), INTERNAL, "panic")

    def test_last_error_is_per_thread(self):
        import threading
        self.expect(LIB.lk_create(None, CPU, 0), INVALID, "NULL")
        seen = []
        t = threading.Thread(target=lambda: seen.append(last_error()))
        t.start()
        t.join()
        self.assertEqual(seen, [""])
        self.assertIn("NULL", last_error())


if __name__ == "__main__":
    unittest.main()
