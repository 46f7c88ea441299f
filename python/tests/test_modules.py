"""DepthwiseConv2d as a drop-in for nn.Conv2d, convert() on a RepLKNet-style model,
torch.compile(fullgraph=True), and data-parallel training with DistributedDataParallel."""

import copy
import os
import socket
import sys
import tempfile

import pytest

torch = pytest.importorskip("torch")

import lkconv.torch as lt  # noqa: E402
from run_seed import SEED  # noqa: E402
from torch import nn  # noqa: E402


def _close(a, b, what, tol=2e-5):
    err = (a.detach().double() - b.detach().double()).abs().max().item()
    scale = b.detach().double().abs().max().item()
    assert err <= tol * max(1.0, scale), f"{what}: max error {err} (scale {scale})"


class RepLKBlock(nn.Module):
    """RepLKNet's block: 1x1 -> large depthwise (with a parallel small kernel, as before
    re-parameterisation) -> 1x1, BN, residual."""

    def __init__(self, c, big, small):
        super().__init__()
        self.pre_bn = nn.BatchNorm2d(c)
        self.pw1 = nn.Conv2d(c, c, 1)
        self.large = nn.Conv2d(c, c, big, padding=big // 2, groups=c, bias=False)
        self.large_bn = nn.BatchNorm2d(c)
        self.small = nn.Conv2d(c, c, small, padding=small // 2, groups=c, bias=False)
        self.small_bn = nn.BatchNorm2d(c)
        self.act = nn.ReLU()
        self.pw2 = nn.Conv2d(c, c, 1)

    def forward(self, x):
        h = self.pw1(self.pre_bn(x))
        h = self.large_bn(self.large(h)) + self.small_bn(self.small(h))
        return x + self.pw2(self.act(h))


def replk_model(c=8):
    torch.manual_seed(SEED)
    return nn.Sequential(
        nn.Conv2d(3, c, 3, stride=2, padding=1),  # dense stem: not depthwise, kept
        nn.Conv2d(c, c, 3, padding=1, groups=c),  # depthwise 3x3: below min_kernel, kept
        RepLKBlock(c, 13, 5),
        RepLKBlock(c, 31, 5),
        nn.Conv2d(c, c, 7, stride=2, padding=3, groups=c, padding_mode="reflect"),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(c, 4),
    )


def test_depthwise_conv2d_is_a_drop_in(device):
    ref = nn.Conv2d(6, 6, (7, 5), stride=(1, 2), padding=(3, 1), dilation=(1, 2), groups=6).to(device)
    ours = lt.DepthwiseConv2d(6, 6, (7, 5), stride=(1, 2), padding=(3, 1), dilation=(1, 2), groups=6).to(device)
    assert isinstance(ours, nn.Conv2d)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    ours.load_state_dict(ref.state_dict())
    for attr in ["in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode"]:
        assert getattr(ours, attr) == getattr(ref, attr), attr
    x = torch.randn(2, 6, 15, 12, device=device, requires_grad=True)
    y_ref, y = ref(x), ours(x)
    _close(y, y_ref, "forward")
    g = torch.randn_like(y)
    for a, b, n in zip(torch.autograd.grad(y, [x, ours.weight, ours.bias], g), torch.autograd.grad(y_ref, [x, ref.weight, ref.bias], g), "xwb"):
        _close(a, b, f"grad {n}")
    # padding="same", another padding_mode and the defaults (out_channels, groups).
    for kw in [dict(padding="same"), dict(padding=2, padding_mode="circular")]:
        ref = nn.Conv2d(6, 6, 5, groups=6, **kw).to(device)
        ours = lt.DepthwiseConv2d(6, kernel_size=5, **kw).to(device)
        ours.load_state_dict(ref.state_dict())
        _close(ours(x), ref(x), f"forward {kw}")


def test_convert_replknet_style_model(device):
    ref = replk_model().to(device)
    model = copy.deepcopy(ref)
    params_before = [id(p) for p in model.parameters()]
    n = lt.convert(model)
    assert n == 3  # 13x13, 31x31 and the reflect-padded 7x7; not the stem, 3x3 or 5x5
    assert [id(p) for p in model.parameters()] == params_before  # same Parameter objects
    kinds = [type(m).__name__ for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert kinds.count("DepthwiseConv2d") == 3
    assert model.state_dict().keys() == ref.state_dict().keys()
    assert lt.convert(model) == 0  # idempotent
    x = torch.randn(2, 3, 40, 36, device=device)
    for train in [True, False]:
        ref.train(train)
        model.train(train)
        xr = x.clone().requires_grad_()
        xm = x.clone().requires_grad_()
        y_ref, y = ref(xr), model(xm)
        _close(y, y_ref, f"output (train={train})")
        g = torch.randn_like(y)
        gr = torch.autograd.grad(y_ref, [xr] + list(ref.parameters()), g)
        gm = torch.autograd.grad(y, [xm] + list(model.parameters()), g)
        for (name, _), a, b in zip([("x", None)] + list(ref.named_parameters()), gm, gr):
            _close(a, b, f"grad {name} (train={train})", tol=1e-4)


def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()
    torch.manual_seed(SEED + 1)
    model = nn.Sequential(
        lt.DepthwiseConv2d(8, 8, 13, padding=6),
        nn.GELU(),
        nn.Conv2d(8, 8, 1),
        lt.DepthwiseConv2d(8, 8, (7, 4), stride=2, padding="valid"),
    ).to(device)
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(2, 8, 20, 17, device=device, requires_grad=True)
    y_eager = model(x)
    y = compiled(x)
    _close(y, y_eager, "compiled forward")
    g = torch.randn_like(y)
    ge = torch.autograd.grad(y_eager, [x] + list(model.parameters()), g)
    gc = torch.autograd.grad(y, [x] + list(model.parameters()), g)
    for a, b in zip(gc, ge):
        _close(a, b, "compiled grad", tol=1e-4)


# ------------------------------------------------------------------ data parallel (gloo)

STEPS, LR, WORLD = 3, 0.1, 2


def small_model(conv):
    torch.manual_seed(SEED + 7)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        conv(6, 6, 9, padding=4, groups=6),
        nn.ReLU(),
        conv(6, 6, 7, stride=2, padding=3, groups=6),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 2),
    )


def _data():
    g = torch.Generator().manual_seed(SEED + 11)
    return torch.randn(STEPS, 4, 3, 16, 16, generator=g), torch.randn(STEPS, 4, 2, generator=g)


def _ddp_worker(rank, port, out_path):
    """One rank. Ends its process with os._exit(0) after destroy_process_group(): with DDP,
    torch keeps the gloo backend alive past that call (its two worker threads, its TCP loop
    thread and, on rank 0, the TCPStore server thread still run, connected to the other rank),
    so a normal exit would tear them down in interpreter finalization and C++ static
    destruction while the other rank exits at its own time. That teardown is the likely origin
    of a CI failure where a worker aborted with "terminate called without an active exception"
    (a joinable std::thread destroyed); os._exit runs no destructors. Nothing is lost: rank 0's
    file is written before the barrier, and an error still raises so that spawn reports it."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        model = DDP(small_model(lt.DepthwiseConv2d))
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        xs, ts = _data()
        per = xs.shape[1] // WORLD
        for step in range(STEPS):
            x = xs[step, rank * per : (rank + 1) * per]
            t = ts[step, rank * per : (rank + 1) * per]
            opt.zero_grad()
            nn.functional.mse_loss(model(x), t).backward()
            opt.step()
        if rank == 0:
            torch.save(model.module.state_dict(), out_path)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_distributed_data_parallel_matches_single_process():
    import torch.multiprocessing as mp

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rank0.pt")
        mp.spawn(_ddp_worker, args=(_free_port(), out), nprocs=WORLD, join=True)
        ddp_state = torch.load(out)

    ref = small_model(nn.Conv2d)
    opt = torch.optim.SGD(ref.parameters(), lr=LR)
    xs, ts = _data()
    for step in range(STEPS):
        opt.zero_grad()
        nn.functional.mse_loss(ref(xs[step]), ts[step]).backward()
        opt.step()
    init = small_model(nn.Conv2d).state_dict()
    assert ddp_state.keys() == ref.state_dict().keys()
    for name, p in ref.state_dict().items():
        assert not torch.equal(p, init[name]), f"{name} did not train"
        _close(ddp_state[name], p, f"parameter {name} after {STEPS} DDP steps", tol=1e-5)
