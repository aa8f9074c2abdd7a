"""Tiny random-weight models of every supported family, built from configs in milliseconds."""

from __future__ import annotations

from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    PreTrainedModel,
)

from llmsys.models.families import DENSE_FAMILIES, MOE_FAMILIES, SUPPORTED_FAMILIES, UnsupportedModelError

TINY_VOCAB = 512

# Shared by every family: small, GQA (4 query heads over 2 KV heads), no sliding window, so that a
# cache test exercises grouped heads and long-ish contexts without a special case.
_COMMON: dict[str, Any] = dict(
    vocab_size=TINY_VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=8192,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

_FAMILY: dict[str, dict[str, Any]] = {
    "llama": {},
    "mistral": dict(sliding_window=None),
    "qwen2": dict(use_sliding_window=False),
    "qwen3": dict(head_dim=16, use_sliding_window=False),
    "phi3": dict(sliding_window=None, original_max_position_embeddings=8192),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=None),
    "qwen2_moe": dict(
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=64,
        shared_expert_intermediate_size=64,
        use_sliding_window=False,
    ),
    "qwen3_moe": dict(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, head_dim=16, use_sliding_window=False
    ),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2),
}


def tiny_config(family: str, **overrides: Any):
    """The config `tiny_model` builds from (overrides win)."""
    if family not in SUPPORTED_FAMILIES:
        raise UnsupportedModelError(
            f"no tiny model for family {family!r}; choose one of {sorted(SUPPORTED_FAMILIES)}"
        )
    kwargs = {**_COMMON, **_FAMILY[family], **overrides}
    return AutoConfig.for_model(family, **kwargs)


def tiny_model(
    family: str,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "eager",
    **config_overrides: Any,
) -> PreTrainedModel:
    """A random-weight *ForCausalLM of `family` ("llama", "mixtral", ...), in eval mode.

    The same (family, seed, overrides) gives the same weights. Any config field can be overridden,
    e.g. `tiny_model("llama", num_hidden_layers=4, hidden_size=128)`.
    """
    config = tiny_config(family, **config_overrides)
    config._attn_implementation = attn_implementation
    with torch.random.fork_rng(devices=[]):  # seeded weights without disturbing the caller's RNG
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    return model.eval()


__all__ = ["DENSE_FAMILIES", "MOE_FAMILIES", "TINY_VOCAB", "tiny_config", "tiny_model"]
