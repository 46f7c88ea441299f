"""torch.ops.lkconv.*: opcheck, forward and both gradients against F.conv2d(groups=C) in
float64 on many shapes, dtypes and layouts (CPU; CUDA where present), bad input."""

import pytest

torch = pytest.importorskip("torch")

import checks  # noqa: E402
from run_seed import SEED  # noqa: E402
import lkconv.torch as lt  # noqa: E402
from torch.library import opcheck  # noqa: E402


@pytest.mark.parametrize("case", checks.CASES, ids=str)
@pytest.mark.parametrize("dtype", checks.DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_cases(case, dtype, device):
    checks.check_case(case, dtype, device, "contiguous", seed=SEED + 1)


@pytest.mark.parametrize("layout", ["channels_last", "strided"])
@pytest.mark.parametrize("case", checks.CASES[:6], ids=str)
def test_layouts(case, layout, device):
    checks.check_case(case, torch.float32, device, layout, seed=SEED + 2)


# ids r0..r23 whatever the seed (a failing id replays with the LKCONV_SEED printed after the run)
@pytest.mark.parametrize("i,case", list(enumerate(checks.random_cases(24, seed=SEED))), ids=[f"r{i}" for i in range(24)])
def test_random_cases(i, case, device):
    dtype = checks.DTYPES[i % 3]
    layout = checks.LAYOUTS[(i // 3) % 3]
    checks.check_case(case, dtype, device, layout, seed=SEED + 100 + i)


def _samples(device):
    g = torch.Generator().manual_seed(SEED + 3)

    def r(*s, grad=False):
        return (torch.rand(*s, generator=g) * 2 - 1).to(device).requires_grad_(grad)

    fwd = [
        (r(2, 3, 9, 10, grad=True), r(3, 1, 7, 7, grad=True), r(3, grad=True), [1, 1], [3, 3, 3, 3], [1, 1]),
        (r(1, 2, 11, 8), r(2, 1, 4, 5, grad=True), None, [2, 1], [1, 2, 0, 3], [1, 2]),
        (r(2, 4, 6, 6, grad=True).to(memory_format=torch.channels_last), r(4, 1, 9, 9), None, [1, 1], [4, 4, 4, 4], [1, 1]),
    ]
    dgrad = [
        (r(2, 3, 9, 10), r(3, 1, 7, 7), [9, 10], [1, 1], [3, 3, 3, 3], [1, 1], False),
        (r(1, 2, 6, 3), r(2, 1, 4, 5), [11, 8], [2, 1], [1, 2, 0, 3], [1, 2], True),
    ]
    wgrad = [
        (r(2, 3, 9, 10), r(2, 3, 9, 10), [7, 7], [1, 1], [3, 3, 3, 3], [1, 1]),
        (r(1, 2, 11, 8), r(1, 2, 6, 3), [4, 5], [2, 1], [1, 2, 0, 3], [1, 2]),
    ]
    return fwd, dgrad, wgrad


def test_opcheck(device):
    fwd, dgrad, wgrad = _samples(device)
    for args in fwd:
        opcheck(torch.ops.lkconv.dwconv2d.default, args)
    for args in dgrad:
        opcheck(torch.ops.lkconv.dwconv2d_data_grad.default, args)
    for args in wgrad:
        opcheck(torch.ops.lkconv.dwconv2d_weight_grad.default, args)


def test_empty_batch_and_unbatched(device):
    w = torch.randn(3, 1, 5, 5, device=device, requires_grad=True)
    x = torch.randn(0, 3, 8, 8, device=device, requires_grad=True)
    y = lt.dwconv2d(x, w)
    assert y.shape == (0, 3, 8, 8)
    y.sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w))
    x3 = torch.randn(3, 8, 7, device=device)
    ref = torch.nn.functional.conv2d(x3, w.detach(), padding="same", groups=3)
    assert torch.allclose(lt.dwconv2d(x3, w.detach()), ref, atol=1e-5)


@pytest.mark.parametrize(
    "call,error",
    [
        (lambda x, w: lt.dwconv2d(x, w[:2]), ValueError),
        (lambda x, w: lt.dwconv2d(x, w.double()), ValueError),  # mismatched dtypes
        (lambda x, w: lt.dwconv2d(x.double(), w.double()), TypeError),
        (lambda x, w: lt.dwconv2d(x, w.half()), ValueError),
        (lambda x, w: lt.dwconv2d(x, w, stride=2), ValueError),
        (lambda x, w: lt.dwconv2d(x, w, padding=0, dilation=5), ValueError),
        (lambda x, w: lt.dwconv2d(x, w, padding=-1), ValueError),
        (lambda x, w: lt.dwconv2d(x, w.transpose(0, 1)), ValueError),  # [1, C, K, K]
        (lambda x, w: lt.dwconv2d(x, w[None]), ValueError),
        (lambda x, w: lt.dwconv2d(x, w, torch.zeros(4, device=x.device)), ValueError),
        (lambda x, w: lt.DepthwiseConv2d(3, 6, 3), ValueError),
        (lambda x, w: lt.DepthwiseConv2d(4, 4, 3, groups=2), ValueError),
    ],
)
def test_bad_input_is_a_typed_error(call, error, device):
    x = torch.randn(1, 3, 8, 8, device=device)
    w = torch.randn(3, 1, 3, 3, device=device)
    with pytest.raises(error):
        call(x, w)


def test_native_cuda_entry_points_check_their_arguments():
    """The native CUDA entry points that lkconv.torch calls: the workspace query is pure
    planning (runs anywhere), bad problems and null pointers are ValueErrors before any device
    is touched, and without CUDA a launch is a RuntimeError naming why, never a crash."""
    from lkconv import _lkconv as native

    conv = ([1, 1], [15, 15, 15, 15], [1, 1])
    # The planner's figures (`lkconv plan --json`): the K31 weight gradient sums per-block
    # partial results in a workspace; the strided forward needs none.
    assert native.cuda_workspace_bytes("weight_grad", "bf16", (2, 3, 40, 40), (31, 31), *conv) == 138384
    assert native.cuda_workspace_bytes("forward", "f16", [2, 3, 40, 40], [7, 7], [2, 2], [3] * 4, [1, 1]) == 0
    for bad in [("fwd", "f32"), ("forward", "f64")]:
        with pytest.raises(ValueError):
            native.cuda_workspace_bytes(*bad, (1, 2, 8, 8), (3, 3), *conv)
    with pytest.raises(ValueError):  # the kernel leaves no output
        native.cuda_workspace_bytes("forward", "f32", (1, 2, 8, 8), (31, 31), [1, 1], [0] * 4, [1, 1])
    launch = ("forward", "f32", 0, 0, (1, 2, 8, 8), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1))
    with pytest.raises(ValueError):  # null input pointer
        native.cuda_launch(*launch, (0, 512, 0, 1024), (0, 0))
    if not native.cuda_usable():
        with pytest.raises(RuntimeError, match="CUDA"):
            native.cuda_launch(*launch, (256, 512, 0, 1024), (0, 0))
