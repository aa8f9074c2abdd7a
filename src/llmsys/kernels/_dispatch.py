"""Backend selection shared by every kernel in :mod:`llmsys.kernels`.

The rule (also in docs/kernels.md):

* ``backend="auto"``: the Triton kernel when triton imports **and** either the tensors live on CUDA or
  ``TRITON_INTERPRET=1`` was set before triton was imported (the interpreter runs kernels on CPU);
  the PyTorch reference otherwise.
* ``backend="triton"``: the Triton kernel, or :class:`KernelUnavailableError` saying how to get it.
* ``backend="reference"``: always the PyTorch reference (the spec).

This module also hides a missing triton: ``triton`` / ``tl`` below are the real modules when installed and
small stand-ins otherwise, so the op modules can keep their ``@triton.jit`` kernels at top level and
``import llmsys.kernels`` never fails. A stand-in kernel is never launched because dispatch refuses first.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Literal

import torch

__all__ = [
    "Backend",
    "KernelUnavailableError",
    "dot_dtype",
    "interpreter_enabled",
    "next_pow2",
    "num_sms",
    "resolve_backend",
    "tl",
    "triton",
    "triton_available",
    "use_triton",
]

logger = logging.getLogger(__name__)

Backend = Literal["auto", "triton", "reference"]
_BACKENDS = ("auto", "triton", "reference")


class KernelUnavailableError(RuntimeError):
    """A Triton kernel was requested where it cannot run (no triton, or CPU tensors without the
    interpreter)."""


# Triton decides at ``@triton.jit`` time (i.e. when the op modules are imported) whether a kernel is
# compiled or interpreted, so what counts is the environment at import, not at call time.
_INTERPRET_AT_IMPORT = os.environ.get("TRITON_INTERPRET", "0") == "1"

try:
    import triton
    import triton.language as tl

    _TRITON_IMPORT_ERROR: str | None = None
except Exception as exc:  # keep llmsys.kernels importable without (or with a broken) triton
    _TRITON_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

    class _MissingTritonLanguage:
        """Just enough of ``triton.language`` for kernel *definitions* (annotations) to evaluate."""

        class constexpr:  # noqa: N801 - mirrors tl.constexpr
            pass

        def __getattr__(self, name: str):
            raise KernelUnavailableError(f"triton is not installed (triton.language.{name} used)")

    class _MissingTriton:
        @staticmethod
        def jit(fn=None, **_kwargs):
            # Return the Python function unchanged: it is never launched (dispatch refuses first).
            if fn is None:
                return lambda f: f
            return fn

        @staticmethod
        def cdiv(a: int, b: int) -> int:
            return -(-a // b)

        def __getattr__(self, name: str):
            raise KernelUnavailableError(f"triton is not installed (triton.{name} used)")

    triton = _MissingTriton()  # type: ignore[assignment]
    tl = _MissingTritonLanguage()  # type: ignore[assignment]


def _fix_interpreter_loop_bounds() -> None:
    """Let the Triton <= 3.6 interpreter run loops whose bounds are runtime values.

    The interpreter stores every scalar as a 1-element array and turned it into a loop bound with
    ``int(array)``, which numpy >= 2.5 rejects ("only 0-dimensional arrays can be converted to Python
    scalars"), so ``for i in range(start, end)`` failed in every such kernel. Triton 3.9 converts with
    ``int(array.squeeze())``; this applies the same one-line change to older versions. It only touches
    the interpreter (never compiled kernels) and is a no-op where triton already does this.
    """
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_llmsys_scalar_index", False):
        return

    def patch_lang_tensor(tensor, scope, *args, **kwargs):
        original(tensor, scope, *args, **kwargs)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patch_lang_tensor._llmsys_scalar_index = True  # type: ignore[attr-defined]
    interpreter._patch_lang_tensor = patch_lang_tensor
    logger.debug("llmsys.kernels: patched the Triton interpreter's scalar __index__ (numpy >= 2.5)")


if _TRITON_IMPORT_ERROR is None and _INTERPRET_AT_IMPORT:
    _fix_interpreter_loop_bounds()


def triton_available() -> bool:
    """True when the ``triton`` package imported."""
    return _TRITON_IMPORT_ERROR is None


def interpreter_enabled() -> bool:
    """True when Triton kernels run through the CPU interpreter (``TRITON_INTERPRET=1`` at import)."""
    return triton_available() and _INTERPRET_AT_IMPORT


def use_triton(device: torch.device | str) -> bool:
    """Whether ``backend="auto"`` picks the Triton kernel for tensors on ``device``."""
    if not triton_available():
        return False
    return torch.device(device).type == "cuda" or _INTERPRET_AT_IMPORT


def _unavailable_reason(device: torch.device) -> str:
    if not triton_available():
        return (
            f"triton is not installed ({_TRITON_IMPORT_ERROR}). Fix: `pip install triton` "
            "(or `pip install llmsys[triton]`), or use backend='reference'."
        )
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return (
            f"tensors are on {device.type} and TRITON_INTERPRET=1 was set only after triton was imported. "
            "Fix: set TRITON_INTERPRET=1 before the first `import triton` / `import llmsys.kernels`, "
            "move the tensors to CUDA, or use backend='reference'."
        )
    return (
        f"tensors are on {device.type}; Triton kernels need CUDA tensors. Fix: move the tensors to CUDA, "
        "set TRITON_INTERPRET=1 before importing triton to run kernels on CPU (slow), "
        "or use backend='reference'."
    )


def resolve_backend(backend: str, device: torch.device, op: str) -> bool:
    """Apply the dispatch rule; returns True for the Triton kernel, False for the reference."""
    if backend not in _BACKENDS:
        raise ValueError(f"{op}: backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "reference":
        return False
    if use_triton(device):
        return True
    if backend == "triton":
        raise KernelUnavailableError(f"{op}: Triton backend unavailable: {_unavailable_reason(device)}")
    return False


@functools.cache
def num_sms(device_index: int) -> int:
    """Streaming multiprocessor count of a CUDA device (cached: the query is not free)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def dot_dtype(dtype: torch.dtype):
    """Operand dtype for ``tl.dot``: the input's own 16-bit type on a GPU (tensor cores, fp32 accumulate),
    fp32 otherwise. The CPU interpreter's tl.dot mishandles bfloat16 (numpy has no bf16), so it always
    gets fp32 operands."""
    if dtype == torch.float32 or interpreter_enabled():
        return tl.float32
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype]


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (Triton block shapes must be powers of two)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()
