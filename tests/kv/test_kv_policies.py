"""SnapKV and H2O as PagedCache policies: lossless within budget, selections recomputed independently."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from llmsys.cache import PagedCache
from llmsys.kv import H2O, SnapKV
from llmsys.models import forward, generate
from llmsys.registry import get_method
from llmsys.testing import every_dense_family, tiny_model

LENGTH = 48


def _ids(batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 500, (batch, LENGTH), generator=torch.Generator().manual_seed(seed))


@every_dense_family
@pytest.mark.parametrize("policy", [SnapKV(budget=LENGTH), H2O(budget=LENGTH + 8)])
def test_within_budget_is_the_plain_model(family, policy):
    model = tiny_model(family)
    ids = _ids(batch=2)
    plain = generate(model, ids, cache=DynamicCache(config=model.config), max_new_tokens=8, do_sample=False)
    with PagedCache.from_model(model, policy=policy, page_size=8) as cache:
        out = generate(model, ids, cache=cache, max_new_tokens=8, do_sample=False)
    assert torch.equal(out, plain)


def _prefill_attentions(model, ids):
    """The model's own attention probabilities [B, H, T, T] per layer (eager attention)."""
    with torch.no_grad():
        return model(ids, output_attentions=True, use_cache=False).attentions


def _kept(cache) -> list[list[int]]:
    return [layer.token_index[0].tolist() for layer in cache.layers]


@pytest.mark.parametrize("family", ["llama", "qwen3", "phi3"])
def test_snapkv_keeps_what_the_window_attends_to(family):
    model = tiny_model(family, num_hidden_layers=3)
    ids = _ids()
    budget, window, kernel = 20, 6, 5
    with PagedCache.from_model(model, policy=SnapKV(budget=budget, window=window, kernel=kernel)) as cache:
        with torch.no_grad():
            forward(model, ids, cache=cache)
        kept = _kept(cache)
    groups = model.config.num_attention_heads // model.config.num_key_value_heads
    for layer, probs in enumerate(_prefill_attentions(model, ids)):
        # kvpress's SnapKVPress.score from the real attention matrix: window rows, prefix columns,
        # mean over the window, pooled per head, mean per KV group - then (llmsys) mean over KV heads
        scores = probs[0, :, -window:, :-window].mean(dim=1)  # [H, T - w]
        scores = F.avg_pool1d(scores, kernel, padding=kernel // 2, stride=1)
        scores = scores.view(-1, groups, LENGTH - window).mean(dim=1).mean(dim=0)
        top = scores.topk(budget - window).indices.tolist()
        assert kept[layer] == sorted(top) + list(range(LENGTH - window, LENGTH)), layer


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_h2o_keeps_heavy_hitters_and_recent_tokens(family):
    model = tiny_model(family, num_hidden_layers=2)
    ids = _ids()
    budget, recent = 16, 6
    with PagedCache.from_model(model, policy=H2O(budget=budget, recent=recent, chunk=7)) as cache:
        with torch.no_grad():
            forward(model, ids, cache=cache)
        kept = _kept(cache)
        accumulated = [layer.token_field(H2O.FIELD)[0] for layer in cache.layers]
    for layer, probs in enumerate(_prefill_attentions(model, ids)):
        received = probs[0].sum(dim=(0, 1))  # attention each token received, over heads and queries
        heavy = received[: LENGTH - recent].topk(budget - recent).indices.tolist()
        assert kept[layer] == sorted(heavy) + list(range(LENGTH - recent, LENGTH)), layer
        torch.testing.assert_close(accumulated[layer], received[kept[layer]], rtol=1e-4, atol=1e-5)


def test_h2o_accumulates_while_decoding_and_stays_within_budget():
    model = tiny_model("llama", num_hidden_layers=2)
    ids = _ids(batch=2)
    with PagedCache.from_model(model, policy=H2O(budget=12), page_size=4) as cache:
        out = generate(model, ids, cache=cache, max_new_tokens=5, do_sample=False)
        cache.check()
        assert [cache.stored_length(i) for i in range(2)] == [12, 12]
        assert cache.get_seq_length() == LENGTH + 4
        index = cache.layers[0].token_index
        assert bool((index[:, -6:] == torch.arange(LENGTH - 2, LENGTH + 4)).all())  # the recent half
        assert bool((cache.layers[0].token_field(H2O.FIELD) > 0).all())
    assert out.shape == (2, LENGTH + 5)


def test_snapkv_compresses_the_prompt_once():
    model = tiny_model("mistral", num_hidden_layers=2)
    with PagedCache.from_model(model, policy=SnapKV(budget=10, window=4)) as cache:
        generate(model, _ids(), cache=cache, max_new_tokens=6, do_sample=False)
        assert cache.stored_length(0) == 10 + 5  # decoding appends, nothing more is evicted


def test_registered_and_validated():
    assert get_method("snapkv") is SnapKV and get_method("h2o") is H2O
    for bad in (dict(budget=0), dict(budget=2.0), dict(budget=True)):
        with pytest.raises(ValueError, match="budget must be an int >= 1"):
            SnapKV(**bad)
    with pytest.raises(ValueError, match="window and kernel"):
        SnapKV(window=0)
    with pytest.raises(ValueError, match="recent must be in"):
        H2O(budget=8, recent=9)
    assert H2O(budget=9).recent_tokens == 4
