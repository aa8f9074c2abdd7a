"""llmsys.models over every family: the recomputed q/k/v are what attention really used."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from llmsys import models
from llmsys.testing import every_family, every_moe_family, tiny_model


def _capture_attention(model, ids):
    """Run the model, recording each attention module's call and output."""
    calls, outputs = {}, {}
    handles = []
    for i, attn in enumerate(models.attention_modules(model)):
        handles.append(
            attn.register_forward_pre_hook(
                lambda m, a, k, i=i: calls.__setitem__(i, models.read_attention_call(a, k)), with_kwargs=True
            )
        )
        handles.append(attn.register_forward_hook(lambda m, a, o, i=i: outputs.__setitem__(i, o[0])))
    try:
        with torch.no_grad():
            models.forward(model, ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return calls, outputs


@every_family
def test_query_key_value_states_reproduce_attention_output(family):
    model = tiny_model(family)
    ids = torch.randint(3, 500, (2, 11), generator=torch.Generator().manual_seed(0))
    calls, outputs = _capture_attention(model, ids)
    heads, kv, head_dim = models.kv_heads(model)
    for i, attn in enumerate(models.attention_modules(model)):
        call = calls[i]
        assert call.position_embeddings is not None and call.hidden_states.shape[:2] == ids.shape
        q, k, v = models.query_key_value_states(attn, call.hidden_states, call.position_embeddings)
        assert q.shape == (2, heads, 11, head_dim) and k.shape == (2, kv, 11, head_dim) == v.shape
        # Independent attention: causal softmax(q k^T / sqrt(d)) v with repeated kv heads, then o_proj.
        group = heads // kv
        k_rep, v_rep = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        scores = q @ k_rep.transpose(-1, -2) * head_dim**-0.5
        causal = torch.ones(11, 11, dtype=torch.bool).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        out = (scores.softmax(-1) @ v_rep).transpose(1, 2).reshape(2, 11, -1)
        torch.testing.assert_close(attn.o_proj(out), outputs[i], atol=1e-5, rtol=1e-5)


@every_family
def test_position_embeddings_and_rope(family):
    model = tiny_model(family)
    hidden = torch.randn(1, 5, model.config.hidden_size)
    pos = torch.arange(5)[None] + 7
    cos, sin = models.position_embeddings(model, hidden, pos)
    inv_freq, scaling = models.rope_inv_freq(model)
    freqs = pos[..., None].float() * inv_freq
    torch.testing.assert_close(cos, torch.cat([freqs, freqs], -1).cos() * scaling)
    # Rotation is norm-preserving and position-relative: <R(a)q, R(b)k> depends on b - a only.
    q, k = torch.randn(2, 1, 1, cos.shape[-1])
    def rot(x, p):
        c, s = models.position_embeddings(model, hidden[:, :1], torch.tensor([[p]]))
        return models.apply_rope(x, c, s)
    torch.testing.assert_close((rot(q, 3) * rot(k, 10)).sum(), (rot(q, 13) * rot(k, 20)).sum(), atol=1e-4, rtol=1e-4)


@every_moe_family
def test_moe_blocks_router_and_experts(family):
    model = tiny_model(family)
    blocks = models.moe_blocks(model)
    assert [b.layer_idx for b in blocks] == list(range(model.config.num_hidden_layers))
    hidden = torch.randn(7, model.config.hidden_size)
    for b in blocks:
        logits, scores, indices = b.router(hidden)
        assert logits.shape == (7, b.num_experts) and indices.shape == (7, b.top_k) == scores.shape
        assert b.experts.gate_up_proj.shape[0] == b.num_experts
        # the block is router + experts (+ gated shared expert): recomposing it matches
        expected = b.block(hidden[None])[0]
        out = b.experts(hidden, indices, scores)
        if b.shared_expert is not None:
            out = out + torch.sigmoid(b.shared_expert_gate(hidden)) * b.shared_expert(hidden)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_unsupported_model_names_the_supported_families():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(models.UnsupportedModelError, match="Llama.*Mistral.*Qwen2.*Qwen3.*Phi-3.*Mixtral"):
        models.attention_modules(gpt2)
    with pytest.raises(models.UnsupportedModelError, match="MoE families"):
        models.moe_blocks(tiny_model("llama"))
    with pytest.raises(models.UnsupportedModelError):
        models.family_of(nn.Linear(2, 2))


def test_cache_kwarg_round_trip():
    model = tiny_model("llama")
    ids = torch.randint(3, 500, (1, 6), generator=torch.Generator().manual_seed(0))
    out = models.forward(model, ids[:, :5], use_cache=True)
    cache = models.output_cache(out)
    assert cache is not None and cache.get_seq_length() == 5
    step = models.forward(model, ids[:, 5:], cache=cache)
    full = models.forward(model, ids)
    torch.testing.assert_close(step.logits[:, -1], full.logits[:, -1], atol=1e-5, rtol=1e-5)
    # min_new_tokens: the random tiny model may emit its EOS id, which would end generation early
    gen = models.generate(model, ids, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert gen.shape == (1, 9)
