"""Kernel tests run the Triton kernels on CPU through the Triton interpreter.

TRITON_INTERPRET must be in the environment before triton is first imported (triton decides at
``@triton.jit`` time whether to compile or interpret), so it is set here, at conftest import, before any
test module imports llmsys.kernels (``import torch`` does not import triton).

It is only set when the caller left it unset *and* there is no CUDA device: on a GPU machine the
``gpu``-marked tests need compiled kernels, and the variable is process-wide, so interpreting there would
also change other suites' GPU tests. An explicit ``TRITON_INTERPRET=1`` / ``=0`` is always respected
(``TRITON_INTERPRET=1 pytest`` on a GPU machine runs the interpreter comparisons and skips the GPU ones).
"""

from __future__ import annotations

import os

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

from llmsys.kernels import interpreter_enabled, triton_available  # noqa: E402


def _triton_cpu_skip_reason() -> str | None:
    if not triton_available():
        return "triton is not installed"
    if not interpreter_enabled():
        return (
            "Triton interpreter is off (it must be on before triton is imported: run "
            "`TRITON_INTERPRET=1 pytest`; on a CUDA machine it is off unless asked for)"
        )
    return None


@pytest.fixture
def triton_cpu() -> None:
    """Skip unless the Triton kernels can run on CPU tensors (interpreter)."""
    reason = _triton_cpu_skip_reason()
    if reason:
        pytest.skip(reason)


@pytest.fixture
def cuda_triton() -> torch.device:
    """Skip unless compiled Triton kernels can run on a CUDA device; returns that device."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if not triton_available():
        pytest.skip("triton is not installed")
    if interpreter_enabled():
        pytest.skip("gpu tests need compiled kernels: unset TRITON_INTERPRET (or set it to 0)")
    return torch.device("cuda")


@pytest.fixture
def gen() -> torch.Generator:
    """A seeded CPU generator: every test draws fresh, reproducible, non-zero inputs from it."""
    return torch.Generator().manual_seed(1234)


def randn(gen: torch.Generator, *shape: int, dtype: torch.dtype = torch.float32, device="cpu"):
    """torch.randn on CPU with ``gen`` (reproducible on every device), then moved/cast."""
    return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)


@pytest.fixture
def rand(gen: torch.Generator):
    """``rand(*shape, dtype=..., device=...)``: seeded standard-normal tensors."""

    def make(*shape: int, dtype: torch.dtype = torch.float32, device="cpu") -> torch.Tensor:
        return randn(gen, *shape, dtype=dtype, device=device)

    return make
