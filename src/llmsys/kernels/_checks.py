"""Argument checks shared by the public ops: each raises a ValueError/TypeError naming the op and the
argument, so a wrong layout fails at the entry point rather than deep inside a kernel."""

from __future__ import annotations

import torch

_INT_DTYPES = (torch.int32, torch.int64)


def check_tensor(op: str, name: str, t: object, ndim: int, layout: str) -> torch.Tensor:
    """``t`` must be a tensor with ``ndim`` dims; ``layout`` (e.g. "[B, Hq, D]") goes in the message."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor {layout}, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{op}: {name} must be {ndim}-D {layout}, got shape {tuple(t.shape)}")
    return t


def check_float(op: str, name: str, t: torch.Tensor) -> None:
    if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"{op}: {name} must be float32/float16/bfloat16, got {t.dtype}")


def check_int(op: str, name: str, t: torch.Tensor) -> None:
    if t.dtype not in _INT_DTYPES:
        raise ValueError(f"{op}: {name} must be int32 or int64, got {t.dtype}")


def check_same_device(op: str, **tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"{op}: all tensors must be on one device, got {devices}")


def check_gqa(op: str, hq: int, hkv: int) -> int:
    """Returns the group size Hq // Hkv (query head h reads kv head h // group)."""
    if hkv <= 0 or hq % hkv != 0:
        raise ValueError(f"{op}: query heads Hq={hq} must be a multiple of kv heads Hkv={hkv} (GQA)")
    return hq // hkv


def check_dim(op: str, what: str, got: int, expected: int) -> None:
    if got != expected:
        raise ValueError(f"{op}: {what} must be {expected}, got {got}")
