"""The dispatch rule and its errors (see llmsys.kernels._dispatch)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from llmsys.kernels import (
    KernelUnavailableError,
    _dispatch,
    gathered_decode_attention,
    interpreter_enabled,
    triton_available,
    use_triton,
)


def test_use_triton_rule(monkeypatch):
    if not triton_available():
        assert not use_triton("cpu") and not use_triton("cuda")
        return
    assert use_triton("cuda")  # compiled kernels on CUDA (whether or not a GPU is present here)
    assert use_triton("cpu") == interpreter_enabled()
    monkeypatch.setattr(_dispatch, "_INTERPRET_AT_IMPORT", False)
    assert not use_triton("cpu") and use_triton(torch.device("cuda", 0))
    monkeypatch.setattr(_dispatch, "_INTERPRET_AT_IMPORT", True)
    assert use_triton("cpu")


def test_reference_backend_never_needs_triton(monkeypatch):
    monkeypatch.setattr(_dispatch, "_TRITON_IMPORT_ERROR", "No module named 'triton'")
    assert not _dispatch.resolve_backend("reference", torch.device("cpu"), "op")
    assert not _dispatch.resolve_backend("auto", torch.device("cuda"), "op")


def test_missing_triton_error_names_the_fix(monkeypatch):
    monkeypatch.setattr(_dispatch, "_TRITON_IMPORT_ERROR", "No module named 'triton'")
    with pytest.raises(KernelUnavailableError, match="pip install triton"):
        _dispatch.resolve_backend("triton", torch.device("cuda"), "my_op")


def test_cpu_without_interpreter_error_names_the_fix(monkeypatch):
    if not triton_available():
        pytest.skip("triton is not installed")
    monkeypatch.setattr(_dispatch, "_INTERPRET_AT_IMPORT", False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(KernelUnavailableError, match="my_op.*CUDA.*TRITON_INTERPRET=1"):
        _dispatch.resolve_backend("triton", torch.device("cpu"), "my_op")
    # Set too late (after triton was imported): say so.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(KernelUnavailableError, match="before the first `import triton`"):
        _dispatch.resolve_backend("triton", torch.device("cpu"), "my_op")


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        _dispatch.resolve_backend("cuda", torch.device("cpu"), "op")


def test_next_pow2():
    assert [_dispatch.next_pow2(n) for n in (0, 1, 2, 3, 16, 17, 80)] == [1, 1, 2, 4, 16, 32, 128]


def test_import_without_triton():
    # A fresh interpreter in which `import triton` fails: the package imports, auto uses the
    # reference, and forcing triton raises KernelUnavailableError.
    code = textwrap.dedent(
        """
        import sys
        sys.modules["triton"] = None
        sys.modules["triton.language"] = None
        import torch
        import llmsys.kernels as K
        assert not K.triton_available() and not K.use_triton("cpu")
        q, k = torch.randn(1, 2, 8), torch.randn(1, 1, 3, 8)
        assert K.gathered_decode_attention(q, k, k).shape == (1, 2, 8)
        try:
            K.gathered_decode_attention(q, k, k, backend="triton")
        except K.KernelUnavailableError as e:
            assert "pip install triton" in str(e)
        else:
            raise AssertionError("expected KernelUnavailableError")
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_auto_matches_reference_on_cpu(rand):
    q, k, v = rand(2, 4, 32), rand(2, 2, 7, 32), rand(2, 2, 7, 32)
    torch.testing.assert_close(
        gathered_decode_attention(q, k, v), gathered_decode_attention(q, k, v, backend="reference"),
        atol=1e-4, rtol=1e-4,
    )
