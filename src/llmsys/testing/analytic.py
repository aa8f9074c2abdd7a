"""A retrieval transformer whose weights are written by hand: exact needle retrieval, no training.

`analytic_retrieval_model()` returns a 2-layer `LlamaForCausalLM` over the synthetic task vocabulary
(`llmsys.eval.SyntheticVocab`) that implements the textbook induction circuit:

- residual stream: a one-hot of the current token (block T), a constant 1 (dim C), a one-hot of the
  previous token when it is a key (block P) and a one-hot of the retrieved key/value (block O);
- layer 0, head 0, a *previous-token head*: its query and key read only the constant dim, placed in
  the high-frequency RoPE pairs so that the score sum_i cos(w_i (t - s - 1)) peaks at s = t - 1; its
  value copies the key one-hot into block P;
- layer 1, head 0, a *key-matching (induction) head*: its query is the current key one-hot, its key
  is block P, both in the RoPE pairs whose frequency is so low (rope_theta = 1e12) that the score
  does not depend on distance; so a question ``<q> k`` attends to the token right after
  ``<kv> k``, i.e. the value, and its value/output copy that token into block O;
- the LM head reads block O. MLPs are zero.

It answers `NeedleTask`, `MQARTask` (any depth) and `VariableTrackingTask` (one retrieval per
generated token) exactly, up to `max_length` tokens (attention scores are scaled so the right
position wins by a margin of ~ln(max_length) + 10). It complements the trained reference model:
tests that need a model that *certainly* retrieves use this one, in milliseconds.
"""

from __future__ import annotations

import math

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from llmsys.eval.tasks import REFERENCE_VOCAB, SyntheticVocab

HEAD_DIM = 128
ROPE_THETA = 1e12


def _layout(vocab: SyntheticVocab) -> dict[str, int]:
    t0 = 0
    c = vocab.size
    p0 = c + 1
    o0 = p0 + vocab.n_keys
    end = o0 + vocab.n_keys + vocab.n_values
    hidden = 8 * math.ceil(end / 8)
    return {"T": t0, "C": c, "P": p0, "O": o0, "hidden": hidden}


def analytic_config(vocab: SyntheticVocab = REFERENCE_VOCAB, max_length: int = 8192) -> LlamaConfig:
    lay = _layout(vocab)
    return LlamaConfig(
        vocab_size=vocab.size,
        hidden_size=lay["hidden"],
        intermediate_size=8,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=HEAD_DIM,
        max_position_embeddings=max(max_length, 8192),
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
        tie_word_embeddings=False,
        bos_token_id=vocab.BOS,
        eos_token_id=vocab.EOS,
        pad_token_id=vocab.PAD,
        attention_bias=False,
        mlp_bias=False,
    )


@torch.no_grad()
def analytic_retrieval_model(
    vocab: SyntheticVocab = REFERENCE_VOCAB,
    max_length: int = 8192,
    attn_implementation: str = "eager",
    dtype: torch.dtype = torch.float32,
) -> LlamaForCausalLM:
    """The hand-written 2-layer retrieval model (eval mode). See the module docstring."""
    if vocab.n_keys > HEAD_DIM // 2 or vocab.n_keys + vocab.n_values > HEAD_DIM:
        raise ValueError(f"the analytic model supports at most {HEAD_DIM // 2} keys and {HEAD_DIM} keys+values")
    config = analytic_config(vocab, max_length)
    config._attn_implementation = attn_implementation
    model = LlamaForCausalLM(config)
    for p in model.parameters():
        p.zero_()
    lay = _layout(vocab)
    hidden, T, C, P, O = lay["hidden"], lay["T"], lay["C"], lay["P"], lay["O"]
    half = HEAD_DIM // 2
    keys = torch.as_tensor(vocab.key_ids)
    kv_ids = torch.cat([torch.as_tensor(vocab.key_ids), torch.as_tensor(vocab.value_ids)])
    margin = math.log(max_length) + 10.0  # logit margin of the right position over any other
    inv_freq = 1.0 / (ROPE_THETA ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float64) / HEAD_DIM))

    # embeddings: one-hot of the token (block T) plus the constant dim C
    emb = model.model.embed_tokens.weight
    emb[torch.arange(vocab.size), T + torch.arange(vocab.size)] = 1.0
    emb[:, C] = 1.0
    layers = model.model.layers
    for layer in layers:
        layer.input_layernorm.weight.fill_(1.0)
        layer.post_attention_layernorm.weight.fill_(1.0)
    model.model.norm.weight.fill_(1.0)

    # --- layer 0, head 0: previous-token head on the high-frequency half of the RoPE pairs
    s0 = math.sqrt(hidden / 2.0)  # RMSNorm gain at layer 0: x has two entries equal to 1
    high = torch.arange(0, half // 2)  # pairs 0..31: w from 1 down to ~2e-6
    w = inv_freq[high]
    # score(d) = g * sum_i cos(w_i (d - 1)), d = t - s; the worst competitor is d = 0 or 2
    gap = float((1 - torch.cos(w)).sum())
    g = margin / gap
    attn0 = layers[0].self_attn
    scale = math.sqrt(HEAD_DIM)  # eager/sdpa multiply scores by head_dim ** -0.5
    qk = math.sqrt(g * scale) / s0
    attn0.q_proj.weight[high, C] = qk
    attn0.k_proj.weight[high, C] = qk * torch.cos(w).float()
    attn0.k_proj.weight[high + half, C] = qk * torch.sin(w).float()
    # value: the one-hot of the token if it is a key -> head dims 0..n_keys-1 -> block P
    attn0.v_proj.weight[torch.arange(len(keys)), T + keys] = 1.0 / s0
    attn0.o_proj.weight[P + torch.arange(len(keys)), torch.arange(len(keys))] = 1.0

    # --- layer 1, head 0: key matching on the low-frequency pairs (distance-independent)
    # x has entries T=1, C=1 and, after a key, P=1: the RMSNorm gain is between these two
    s1_lo, s1_hi = math.sqrt(hidden / 3.0), math.sqrt(hidden / 2.0)
    low_pairs = torch.arange(half // 2, half)  # pairs 32..63
    dims = torch.cat([low_pairs, low_pairs + half])[: len(keys)]  # one head dim per key
    qk1 = math.sqrt(margin * scale) / s1_lo
    attn1 = layers[1].self_attn
    attn1.q_proj.weight[dims, T + keys] = qk1
    attn1.k_proj.weight[dims, P + torch.arange(len(keys))] = qk1
    # value: one-hot of the attended token if it is a key or value -> block O
    attn1.v_proj.weight[torch.arange(len(kv_ids)), T + kv_ids] = 1.0 / s1_hi
    attn1.o_proj.weight[O + torch.arange(len(kv_ids)), torch.arange(len(kv_ids))] = 1.0

    # LM head reads block O
    lm = model.lm_head.weight
    lm[kv_ids, O + torch.arange(len(kv_ids))] = 10.0 * math.sqrt(hidden / 4.0)
    model.generation_config.pad_token_id = vocab.PAD
    return model.to(dtype).eval()


__all__ = ["analytic_config", "analytic_retrieval_model"]
