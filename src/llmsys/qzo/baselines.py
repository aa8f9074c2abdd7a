"""The baselines QZO is compared with, ready for `llmsys.qzo.train`: MeZO (in optimizer.py),
first-order full fine-tuning (SGD, AdamW) and LoRA through PEFT."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

__all__ = ["first_order", "lora"]


def first_order(
    model: nn.Module, method: Literal["sgd", "adamw"] = "adamw", lr: float = 1e-4, **kwargs
) -> torch.optim.Optimizer:
    """Full fine-tuning: every floating-point parameter gets ``requires_grad=True`` and the optimizer."""
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    params = [p for p in model.parameters() if p.is_floating_point()]
    if not params:
        raise ValueError("the model has no floating-point parameters to fine-tune (is it quantised? use QZO)")
    for p in params:
        p.requires_grad_(True)
    if method == "sgd":
        return torch.optim.SGD(params, lr=lr, **kwargs)
    if method == "adamw":
        return torch.optim.AdamW(params, lr=lr, **kwargs)
    raise ValueError(f"method must be 'sgd' or 'adamw', got {method!r}")


def lora(
    model: nn.Module,
    r: int = 8,
    alpha: int = 16,
    lr: float = 1e-4,
    target_modules: Sequence[str] | str = "all-linear",
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """LoRA adapters through PEFT on every linear layer (except the head); returns the wrapped model and
    an AdamW over the adapter weights only."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:
        raise ImportError("the LoRA baseline needs PEFT: `pip install peft`") from exc
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=target_modules, bias="none")
    wrapped = get_peft_model(model, config)
    params = [p for p in wrapped.parameters() if p.requires_grad]
    return wrapped, torch.optim.AdamW(params, lr=lr)
