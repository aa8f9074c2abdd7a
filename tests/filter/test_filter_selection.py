"""GemFilter's first pass: the selection, recomputed independently; the pass stops at the filter layer."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

from llmsys.filter import GemFilter, select_tokens, selected_text
from llmsys.testing import every_dense_family, tiny_model

LAYERS = 3
LENGTH = 40


def _prompts(batch: int = 2, length: int = LENGTH, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 500, (batch, length), generator=torch.Generator().manual_seed(seed))


def independent_selection(
    model, ids: torch.Tensor, layer: int, topk: int, kernel: int = 5, pooling: str = "avg"
) -> torch.Tensor:
    """GemFilter from the paper's description, on one unpadded row [1, n], without llmsys code:
    the input of decoder layer `layer` (transformers' hidden_states), its input norm, the family's own
    projections and rotary function, raw q_last . k summed over all heads, avg-pool, top-k, sorted."""
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True, use_cache=False).hidden_states[layer]
        decoder = model.model.layers[layer]
        attn = decoder.self_attn
        x = decoder.input_layernorm(hidden)
        cfg = model.config
        heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
        dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        if hasattr(attn, "qkv_proj"):  # Phi-3
            qkv = attn.qkv_proj(x)
            q, k = qkv[..., : heads * dim], qkv[..., heads * dim : (heads + kv) * dim]
        else:
            q, k = attn.q_proj(x), attn.k_proj(x)
        q = q.view(1, -1, heads, dim)
        k = k.view(1, -1, kv, dim)
        if hasattr(attn, "q_norm"):  # Qwen3: per-head RMSNorm before the rotation
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        position_ids = torch.arange(ids.shape[1])[None]
        cos, sin = model.model.rotary_emb(x, position_ids)
        rope = sys.modules[type(model).__module__].apply_rotary_pos_emb
        q, k = rope(q, k, cos, sin)
        k = k.repeat_interleave(heads // kv, dim=1)
        scores = torch.einsum("hd,htd->t", q[0, :, -1], k[0])
        if pooling == "max":  # the same zero-padded window as the average pool
            padded = F.pad(scores[None, None], (kernel // 2, kernel // 2))
            pooled = F.max_pool1d(padded, kernel, stride=1)[0, 0]
        else:
            pooled = F.avg_pool1d(scores[None, None], kernel, stride=1, padding=kernel // 2)[0, 0]
        return pooled.topk(min(topk, ids.shape[1])).indices.sort().values


@every_dense_family
def test_selection_equals_recomputation_from_hidden_states(family):
    model = tiny_model(family, num_hidden_layers=LAYERS)
    ids = _prompts()
    for layer in (0, 1, LAYERS - 1):
        got = select_tokens(model, ids, layer=layer, topk=12)
        assert got.shape == (2, 12)
        for row in range(2):
            want = independent_selection(model, ids[row : row + 1], layer, 12)
            assert torch.equal(got[row], want), (layer, row)


@every_dense_family
def test_left_padded_rows_select_as_if_alone(family):
    model = tiny_model(family, num_hidden_layers=LAYERS)
    ids = _prompts()
    mask = torch.ones_like(ids)
    pad = 9
    mask[1, :pad] = 0
    ids[1, :pad] = 0
    got = select_tokens(model, ids, layer=1, topk=12, attention_mask=mask)
    assert torch.equal(got[0], independent_selection(model, ids[:1], 1, 12))
    assert torch.equal(got[1] - pad, independent_selection(model, ids[1:, pad:], 1, 12))
    # a row shorter than topk keeps all its tokens and is left-filled with -1
    short = select_tokens(model, ids, layer=1, topk=35, attention_mask=mask)
    assert short.shape == (2, 35)
    assert torch.equal(short[1], torch.cat([torch.full((4,), -1), torch.arange(pad, LENGTH)]))


@every_dense_family
def test_first_pass_runs_nothing_after_the_filter_layer(family):
    model = tiny_model(family, num_hidden_layers=4)
    layer = 1
    calls: dict[str, int] = {}

    def count(name):
        def hook(*_):
            calls[name] = calls.get(name, 0) + 1

        return hook

    handles = []
    for i, decoder in enumerate(model.model.layers):
        handles.append(decoder.register_forward_pre_hook(count(f"layer{i}")))
        handles.append(decoder.self_attn.register_forward_hook(count(f"attn{i}")))
        handles.append(decoder.mlp.register_forward_pre_hook(count(f"mlp{i}")))
    handles.append(model.model.norm.register_forward_pre_hook(count("norm")))
    handles.append(model.lm_head.register_forward_pre_hook(count("lm_head")))
    try:
        select_tokens(model, _prompts(), layer=layer, topk=8)
    finally:
        for h in handles:
            h.remove()
    # layer 0 ran whole; layer 1 started (its input norm) but neither its attention nor its MLP finished
    assert calls == {"layer0": 1, "attn0": 1, "mlp0": 1, "layer1": 1}


def test_keep_first_and_last_are_always_kept():
    model = tiny_model("llama", num_hidden_layers=LAYERS)
    ids = _prompts()
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    got = select_tokens(model, ids, layer=1, topk=10, keep_first=3, keep_last=4, attention_mask=mask)
    for row, first in ((0, 0), (1, 5)):
        kept = set(got[row].tolist())
        assert {first, first + 1, first + 2} <= kept
        assert set(range(LENGTH - 4, LENGTH)) <= kept
    # and the remaining slots follow the scores
    free = select_tokens(model, ids[:1], layer=1, topk=3)
    forced = select_tokens(model, ids[:1], layer=1, topk=10, keep_first=3, keep_last=4)
    assert set(free[0].tolist()) <= set(forced[0].tolist()) | set(range(3)) | set(range(LENGTH - 4, LENGTH))


def test_select_method_and_scores():
    model = tiny_model("qwen2", num_hidden_layers=LAYERS)
    ids = _prompts(batch=1)
    selection = GemFilter(layer=2, topk=7).select(model, ids)
    assert selection.kept.tolist() == [7]
    assert selection.scores.shape == (1, LENGTH) and selection.scores.dtype == torch.float32
    best = selection.scores[0].topk(7).indices.sort().values
    assert torch.equal(selection.indices[0], best)
    assert torch.equal(selection.original_positions(), selection.indices)
    packed, packed_mask = selection.pack(ids)
    assert torch.equal(packed, ids[:, selection.indices[0]]) and bool(packed_mask.all())


class _WordTokenizer:
    def decode(self, ids):
        return " ".join(f"w{i}" for i in ids)


def test_selected_text_marks_the_gaps():
    ids = torch.arange(10)[None] + 100
    indices = torch.tensor([[-1, 0, 1, 4, 5, 6, 9]])
    assert selected_text(_WordTokenizer(), ids, indices) == ["w100 w101 [...] w104 w105 w106 [...] w109"]
    assert selected_text(_WordTokenizer(), ids[0], indices[0, 1:3], gap=" | ") == ["w100 w101"]


def test_selected_text_of_a_model():
    model = tiny_model("llama", num_hidden_layers=LAYERS)
    ids = _prompts(batch=1)
    method = GemFilter(layer=1, topk=6)
    text = method.selected_text(model, _WordTokenizer(), ids)[0]
    chosen = method.select(model, ids).indices[0].tolist()
    assert text.replace(" [...]", "").split() == [f"w{ids[0, i].item()}" for i in chosen]


@pytest.mark.parametrize("kernel", [1, 3])
def test_pool_kernel_is_applied(kernel):
    model = tiny_model("mistral", num_hidden_layers=LAYERS)
    ids = _prompts(batch=1)
    got = select_tokens(model, ids, layer=1, topk=9, pool_kernel=kernel)
    assert torch.equal(got[0], independent_selection(model, ids, 1, 9, kernel=kernel))


def test_max_pooling_is_applied():
    model = tiny_model("llama", num_hidden_layers=LAYERS)
    ids = _prompts(batch=1)
    method = GemFilter(layer=1, topk=9, pooling="max")
    got = method.select(model, ids).indices[0]
    assert torch.equal(got, independent_selection(model, ids, 1, 9, pooling="max"))
    assert not torch.equal(got, GemFilter(layer=1, topk=9).select(model, ids).indices[0])
    with pytest.raises(ValueError, match="pooling must be 'avg'"):
        GemFilter(layer=1, pooling="min")
