"""Differences between transformers 5.x minor versions, resolved once.

Up to about 5.20 the cache travels as `past_key_values`; later 5.x call it `cache` (the old name is
deprecated, removal announced for 5.40). Plug-ins never spell either name: they call `forward`,
`generate`, `cache_kwargs` and `output_cache` from here.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import transformers
from transformers.models.llama import modeling_llama

TRANSFORMERS_VERSION: str = transformers.__version__


def _cache_kwarg() -> str:
    params = inspect.signature(modeling_llama.LlamaAttention.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


#: the keyword under which a model (and each attention module) receives its KV cache
CACHE_KWARG: str = _cache_kwarg()


def cache_kwargs(cache: Any) -> dict[str, Any]:
    """`{"cache": c}` or `{"past_key_values": c}` for the installed transformers."""
    return {CACHE_KWARG: cache}


def output_cache(output: Any) -> Any:
    """The cache a model forward returned (`out.cache` or `out.past_key_values`)."""
    if CACHE_KWARG == "cache" and getattr(output, "cache", None) is not None:
        return output.cache
    return getattr(output, "past_key_values", None)


def forward(model: torch.nn.Module, input_ids: torch.Tensor, cache: Any = None, **kwargs: Any) -> Any:
    """`model(input_ids, cache=cache, use_cache=..., **kwargs)` under either kwarg name."""
    if cache is not None:
        kwargs.update(cache_kwargs(cache))
        kwargs.setdefault("use_cache", True)
    return model(input_ids=input_ids, **kwargs)


def generate(model: Any, input_ids: torch.Tensor, cache: Any = None, **kwargs: Any) -> torch.Tensor:
    """`model.generate(input_ids, cache=cache, **kwargs)` under either kwarg name."""
    if cache is not None:
        kwargs.update(cache_kwargs(cache))
    return model.generate(input_ids, **kwargs)


def uses_standard_causal_lm_loss(model: torch.nn.Module) -> bool:
    """Whether `model(..., labels=...)` computes transformers' standard causal-LM loss
    (``ForCausalLMLoss``: labels shifted, mean float32 cross-entropy, -100 ignored), so that a caller
    may compute the same number from the logits itself."""
    try:
        from transformers.loss.loss_utils import ForCausalLMLoss
    except ImportError:
        return False
    return getattr(model, "loss_function", None) is ForCausalLMLoss
