"""Where things are inside a supported model, and how to recompute what attention sees."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from llmsys.models.compat import CACHE_KWARG
from llmsys.models.families import family_of


def base_model(model: nn.Module) -> nn.Module:
    """The decoder stack (`model.model` of a *ForCausalLM, or the model itself)."""
    family_of(model)
    inner = getattr(model, "model", None)
    return inner if inner is not None and hasattr(inner, "layers") else model


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return base_model(model).layers


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention module of every decoder layer, in layer order."""
    return [layer.self_attn for layer in decoder_layers(model)]


def embed_tokens(model: nn.Module) -> nn.Embedding:
    return base_model(model).embed_tokens


def final_norm(model: nn.Module) -> nn.Module:
    return base_model(model).norm


def lm_head(model: nn.Module) -> nn.Module:
    family_of(model)
    return model.lm_head


def rotary_embedding(model: nn.Module) -> nn.Module:
    return base_model(model).rotary_emb


def position_embeddings(
    model: nn.Module, hidden_states: torch.Tensor, position_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) for `position_ids` [B, T], as the decoder layers receive them."""
    return rotary_embedding(model)(hidden_states, position_ids=position_ids)


def rope_inv_freq(model: nn.Module) -> tuple[torch.Tensor, float]:
    """(inv_freq [rotary_dim/2] float32, attention_scaling) of the model's rotary embedding.

    Re-rotating cached keys by a position shift needs the pure rotation: inv_freq only; the
    attention_scaling factor (non-1 for some RoPE variants) multiplies cos and sin once, at the
    original rotation, and must not be applied again.
    """
    rotary = rotary_embedding(model)
    return rotary.inv_freq.float(), float(getattr(rotary, "attention_scaling", 1.0))


def kv_heads(model: nn.Module) -> tuple[int, int, int]:
    """(num_attention_heads, num_key_value_heads, head_dim) of a supported model."""
    config = model.config
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, kv, head_dim


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, H, T, D] by (cos, sin) [B, T, R] in the rotate-half layout.

    R < D is partial rotary (Phi-3 style): the first R dims rotate, the rest pass through.
    """
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    rot = cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    out = x_rot * cos + _rotate_half(x_rot) * sin
    return torch.cat((out, x_pass), dim=-1) if x_pass.numel() else out


def _projections(attn: nn.Module, hidden_states: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Pre-reshape q, k, v projections [B, T, H*D] (after OLMoE's full-width norm and clip)."""
    if hasattr(attn, "qkv_proj"):  # Phi-3: one fused projection
        qkv = attn.qkv_proj(hidden_states)
        q_size = attn.config.num_attention_heads * attn.head_dim
        kv_size = attn.num_key_value_heads * attn.head_dim
        return qkv[..., :q_size], qkv[..., q_size : q_size + kv_size], qkv[..., q_size + kv_size :]
    q, k, v = attn.q_proj(hidden_states), attn.k_proj(hidden_states), attn.v_proj(hidden_states)
    q_norm = getattr(attn, "q_norm", None)
    if q_norm is not None and q_norm.weight.shape[-1] != attn.head_dim:  # OLMoE: norm over all heads
        q, k = q_norm(q), attn.k_norm(k)
    clip = getattr(attn.config, "clip_qkv", None)
    if clip is not None:
        q, k, v = (t.clamp(min=-clip, max=clip) for t in (q, k, v))
    return q, k, v


def query_key_value_states(
    attn: nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Post-RoPE queries [B, Hq, T, D], keys [B, Hkv, T, D] and values [B, Hkv, T, D].

    Recomputes exactly what the attention module computes before it calls the cache (GQA, Qwen3's
    per-head q/k norm, OLMoE's full-width q/k norm and clipping, Phi-3's fused qkv, partial rotary).
    """
    q, k, v = _projections(attn, hidden_states)
    shape = (*hidden_states.shape[:-1], -1, attn.head_dim)
    q, k, v = q.view(shape), k.view(shape), v.view(shape)
    q_norm = getattr(attn, "q_norm", None)
    if q_norm is not None and q_norm.weight.shape[-1] == attn.head_dim:  # Qwen3: per-head norm
        q, k = q_norm(q), attn.k_norm(k)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    cos, sin = position_embeddings
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def query_key_states(
    attn: nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Post-RoPE queries [B, Hq, T, D] and keys [B, Hkv, T, D] (see query_key_value_states)."""
    q, k, _ = query_key_value_states(attn, hidden_states, position_embeddings)
    return q, k


@dataclass
class AttentionCall:
    """What an attention module was called with, whatever the transformers version names it."""

    hidden_states: torch.Tensor
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None
    attention_mask: torch.Tensor | None
    cache: Any
    position_ids: torch.Tensor | None
    extra: dict[str, Any]


def read_attention_call(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> AttentionCall:
    """Read the arguments of an attention forward (for hooks registered with `with_kwargs=True`)."""
    kwargs = dict(kwargs)
    names = ("hidden_states", "position_embeddings", "attention_mask")
    for name, value in zip(names, args):  # positional use, as some families call it
        kwargs.setdefault(name, value)
    cache = kwargs.pop(CACHE_KWARG, None)
    if cache is None:
        cache = kwargs.pop("past_key_values", None) or kwargs.pop("cache", None)
    hidden = kwargs.pop("hidden_states")
    return AttentionCall(
        hidden_states=hidden,
        position_embeddings=kwargs.pop("position_embeddings", None),
        attention_mask=kwargs.pop("attention_mask", None),
        cache=cache,
        position_ids=kwargs.pop("position_ids", None),
        extra=kwargs,
    )


@dataclass
class MoEBlock:
    """One sparse MoE block: its router (a module returning logits, scores, indices) and experts.

    `experts.gate_up_proj` is [E, 2I, H] and `experts.down_proj` is [E, H, I]; `shared_expert`
    (Qwen2-MoE) is added on top of the routed output, gated by `shared_expert_gate`.
    """

    layer_idx: int
    block: nn.Module
    router: nn.Module
    experts: nn.Module
    num_experts: int
    top_k: int
    shared_expert: nn.Module | None = None
    shared_expert_gate: nn.Module | None = None


def moe_blocks(model: nn.Module) -> list[MoEBlock]:
    """The sparse MoE blocks of a supported MoE model, in layer order (dense layers skipped)."""
    family_of(model, moe=True)
    blocks = []
    for idx, layer in enumerate(decoder_layers(model)):
        block = layer.mlp if hasattr(layer, "mlp") else getattr(layer, "block_sparse_moe", None)
        router = getattr(block, "gate", None)
        experts = getattr(block, "experts", None)
        if router is None or experts is None or not hasattr(router, "top_k"):
            continue  # a dense MLP layer (Qwen-MoE's mlp_only_layers / decoder_sparse_step)
        blocks.append(
            MoEBlock(
                layer_idx=idx,
                block=block,
                router=router,
                experts=experts,
                num_experts=router.num_experts,
                top_k=router.top_k,
                shared_expert=getattr(block, "shared_expert", None),
                shared_expert_gate=getattr(block, "shared_expert_gate", None),
            )
        )
    return blocks
