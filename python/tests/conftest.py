"""Devices for the torch tests: the CPU always; CUDA when lkconv's kernels can run here (else
those tests skip and say why; LKCONV_REQUIRE_CUDA=1 makes that a failure instead)."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # `import checks`, `import run_seed`

import run_seed  # noqa: E402


def _cuda_reason():
    try:
        import torch

        import lkconv._lkconv as native
    except ImportError as e:  # torch absent: the torch tests skip at import anyway
        return f"torch not importable: {e}"
    if not torch.cuda.is_available():
        return "no CUDA device visible to PyTorch"
    return native.cuda_unusable_reason()


CUDA_REASON = _cuda_reason()
if not CUDA_REASON:
    import torch

    # f32 comparisons against cuDNN/cuBLAS in full f32 (no TF32).
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
REQUIRE_CUDA = os.environ.get("LKCONV_REQUIRE_CUDA") == "1"


def _device_params():
    cuda = pytest.param("cuda", id="cuda")
    if CUDA_REASON:
        cuda = pytest.param(
            "cuda", id="cuda", marks=pytest.mark.skip(reason=f"skipped: no GPU ({CUDA_REASON})")
        )
    return [pytest.param("cpu", id="cpu"), cuda]


def pytest_generate_tests(metafunc):
    if "device" in metafunc.fixturenames:
        metafunc.parametrize("device", _device_params())


def pytest_terminal_summary(terminalreporter):
    # (printed after the results, where -q still shows it)
    terminalreporter.write_line(run_seed.BANNER)


def pytest_sessionstart(session):
    if REQUIRE_CUDA and CUDA_REASON:
        raise pytest.UsageError(f"LKCONV_REQUIRE_CUDA=1 but CUDA is unusable: {CUDA_REASON}")
