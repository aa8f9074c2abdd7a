"""bitsandbytes 4-bit (NF4 / FP4) layers: where their trainable scales live, and quantising a model.

A ``bnb.nn.Linear4bit`` stores 4-bit codes in ``weight`` (uint8) and, in ``weight.quant_state``, one
float32 ``absmax`` per block of 64 weights, which its forward reads every call: that is QZO's Delta.
With double quantisation ``absmax`` itself is uint8 codes (plus ``state2``); QZO either refuses
(`DoubleQuantizationError`) or, with ``double_quant="dequantize"``, turns it into float scales once.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch
from torch import nn

from llmsys.qzo.errors import BitsAndBytesUnavailableError, DoubleQuantizationError, QuantizationError

__all__ = ["bnb_available", "bnb_scales", "is_bnb_4bit", "quantize_bnb"]

DoubleQuant = Literal["error", "dequantize"]


def _bnb():
    try:
        import bitsandbytes as bnb
    except Exception as exc:  # ImportError, or a broken native library
        raise BitsAndBytesUnavailableError(
            f"bitsandbytes cannot be imported ({type(exc).__name__}: {exc}). Fix: `pip install bitsandbytes` "
            "(or `pip install llmsys[quant]`), or use llmsys's own int4 layers (llmsys.qzo.quantize_int4)"
        ) from exc
    return bnb


def bnb_available() -> bool:
    try:
        _bnb()
    except BitsAndBytesUnavailableError:
        return False
    return True


def is_bnb_4bit(module: nn.Module) -> bool:
    """True for a bitsandbytes ``Linear4bit`` (checked by class name: importing bitsandbytes is slow)."""
    return any(c.__name__ == "Linear4bit" and c.__module__.startswith("bitsandbytes") for c in type(module).__mro__)


def _to_float_absmax(name: str, state, mode: DoubleQuant) -> torch.Tensor:
    if not getattr(state, "nested", False):
        return state.absmax
    if mode != "dequantize":
        raise DoubleQuantizationError(
            f"{name}: bitsandbytes double quantisation (bnb_4bit_use_double_quant=True) stores the scales as "
            "uint8 codes, which cannot be perturbed continuously. Fix: load without double quantisation, or "
            "pass double_quant='dequantize' to turn them into float32 scales once (+0.5 byte per 64 weights)"
        )
    from bitsandbytes.functional import dequantize_blockwise

    absmax = dequantize_blockwise(state.absmax, state.state2) + state.offset
    state.absmax = absmax.float().contiguous()
    state.nested, state.state2, state.offset = False, None, None
    return state.absmax


def bnb_scales(model: nn.Module, double_quant: DoubleQuant = "error") -> list[tuple[str, torch.Tensor]]:
    """``(name, absmax)`` of every bitsandbytes 4-bit layer (the tensors the forward reads live)."""
    return [(name, absmax) for name, absmax, _ in bnb_scale_owners(model, double_quant)]


def bnb_scale_owners(
    model: nn.Module, double_quant: DoubleQuant = "error"
) -> list[tuple[str, torch.Tensor, nn.Module]]:
    """``(name, absmax, layer)``: `bnb_scales` with the ``Linear4bit`` whose forward reads each."""
    found = []
    for name, module in model.named_modules():
        if not is_bnb_4bit(module):
            continue
        state = getattr(module.weight, "quant_state", None)
        if state is None:
            raise QuantizationError(
                f"{name}: Linear4bit weight is not quantised yet (no quant_state); move the model to its device "
                "(model.to('cpu') or .cuda()) or run one forward before creating the optimizer"
            )
        found.append((f"{name}.weight.absmax", _to_float_absmax(name, state, double_quant), module))
    return found


def quantize_bnb(
    model: nn.Module,
    quant_type: Literal["nf4", "fp4"] = "nf4",
    *,
    double_quant: bool = False,
    compute_dtype: torch.dtype | None = None,
    blocksize: int = 64,
    skip: Iterable[str] = (),
) -> list[str]:
    """Replace the model's linear layers (not the head) by bitsandbytes ``Linear4bit`` in place, one at a
    time (peak memory: the model plus one layer). The usual path for real checkpoints is
    ``from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_4bit=True))``; this one is
    for random-weight and already-loaded models. Returns the replaced names."""
    from llmsys.qzo.int4 import _replace, quantizable_linears

    bnb = _bnb()
    names = []
    for name, linear in quantizable_linears(model, skip):
        device = linear.weight.device
        layer = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            compute_dtype=compute_dtype or linear.weight.dtype,
            compress_statistics=double_quant,
            quant_type=quant_type,
            device="meta",
        )
        layer.weight = bnb.nn.Params4bit(
            linear.weight.data, requires_grad=False, quant_type=quant_type,
            compress_statistics=double_quant, blocksize=blocksize,
        )
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.data, requires_grad=False)
        _replace(model, name, layer.to(device))  # .to() quantises the weight
        names.append(name)
    return names
