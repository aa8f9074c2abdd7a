"""Positions after compaction, the policy interface end to end, attach() (queries, masks), TIM re-rotation."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import pytest
import torch
from transformers import DynamicCache

from llmsys.cache import CachePolicy, MaskMismatchError, PagedCache, PolicyError, StepInfo
from llmsys.models import apply_rope, forward, generate, rope_inv_freq
from llmsys.testing import every_dense_family, every_family, tiny_model

TOL = 1e-5


@dataclass
class SinkWindow(CachePolicy):
    """Example policy: keep `sink` first stored tokens and the `window` most recent ones."""

    sink: int = 4
    window: int = 8

    def compact(self, layer, step: StepInfo) -> None:
        if layer.length > self.sink + self.window:
            n = layer.length
            layer.keep(torch.cat([torch.arange(self.sink), torch.arange(n - self.window, n)]))


@dataclass
class EveryOther(CachePolicy):
    """Attend to the even stored past tokens only (no eviction), announcing the count for the mask."""

    def attend_length(self, layer, query_length):
        return (layer.length + 1) // 2

    def attend(self, layer, step):
        return torch.arange(0, layer.length, 2)


@dataclass
class QueryTopK(CachePolicy):
    """Needs queries: attend to the k past tokens with the largest q.k (summed over heads), per row."""

    k: int = 5
    chosen: list = field(default_factory=list)  # (layer, step seen, stream indices [B, k])
    needs_queries = True

    def attend_length(self, layer, query_length):
        return self.k

    def attend(self, layer, step):
        assert step.queries is not None and step.queries.shape[2] == step.query_length
        if layer.length <= self.k:
            return None
        keys, _ = layer.to_dense()  # [B, Hkv, N, D]
        q = step.queries[:, :, -1]  # [B, Hq, D]
        group = q.shape[1] // keys.shape[1]
        scores = torch.einsum("bhd,bhnd->bn", q, keys.repeat_interleave(group, dim=1))
        idx = scores.topk(self.k, dim=1).indices
        self.chosen.append((layer.layer_idx, step.seen, layer.token_index.gather(1, idx)))
        return idx


def _prompt(batch=1, length=20, seed=0):
    return torch.randint(3, 500, (batch, length), generator=torch.Generator().manual_seed(seed))


def _masked_reference(model, ids, visible_at, steps, pad=None):
    """DynamicCache run where decode step t sees only the stream indices `visible_at(t, seen)` (2-D mask).

    Returns the logits of every step and the fed tokens (argmax of the reference).
    """
    cache = DynamicCache(config=model.config)
    batch, length = ids.shape
    base = torch.ones(batch, length, dtype=torch.long) if pad is None else pad
    logits, fed = [], []
    with torch.no_grad():
        out = forward(model, ids, cache=cache, attention_mask=base)
        for t in range(steps):
            logits.append(out.logits[:, -1])
            nxt = out.logits[:, -1:].argmax(-1)
            fed.append(nxt)
            seen = length + t
            base = torch.cat([base, torch.ones(batch, 1, dtype=torch.long)], dim=1)
            mask = torch.zeros_like(base)
            mask[:, visible_at(t, seen)] = 1
            out = forward(model, nxt, cache=cache, attention_mask=mask * base)
        logits.append(out.logits[:, -1])
    return logits, fed


def _paged_run(model, cache, ids, fed, pad=None):
    logits = []
    mask = pad
    with torch.no_grad():
        out = forward(model, ids, cache=cache, attention_mask=mask)
        for nxt in fed:
            logits.append(out.logits[:, -1])
            if mask is not None:
                mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
            out = forward(model, nxt, cache=cache, attention_mask=mask)
        logits.append(out.logits[:, -1])
    return logits


def _assert_close(ref, got):
    for step, (a, b) in enumerate(zip(ref, got)):
        diff = (a - b).abs().max().item()
        assert diff <= TOL, f"step {step}: max |diff| = {diff}"


def _sink_window_visible(sink, window):
    # after the previous step's compaction: sinks + the `window` latest past tokens, plus the new one
    def visible(t, seen):
        return list(range(sink)) + list(range(max(sink, seen - window), seen + 1))

    return visible


@every_family
def test_eviction_keeps_positions_and_matches_masked_reference(family):
    """Sink+window eviction == full cache whose 2-D mask hides the evicted tokens (positions intact)."""
    model = tiny_model(family)
    ids = _prompt()
    ref, fed = _masked_reference(model, ids, _sink_window_visible(4, 8), steps=12)
    cache = PagedCache(config=model.config, page_size=3, policy=SinkWindow(4, 8))
    _assert_close(ref, _paged_run(model, cache, ids, fed))
    cache.check()
    assert cache.get_seq_length() == 20 + 12  # positions: tokens seen
    assert cache.stored_length() == 12  # tokens kept
    assert cache.layers[0].token_index[0].tolist() == [0, 1, 2, 3, *range(24, 32)]


@every_dense_family
def test_decode_after_keep_uses_original_position(family):
    """keep() then decode == DynamicCache holding the same kept K/V, fed explicit position_ids."""
    model = tiny_model(family)
    ids = _prompt(batch=2, length=20)
    kept = torch.tensor([0, 1, 2, 5, 6, 11, 12, 13, 17, 18, 19])
    paged = PagedCache(config=model.config, page_size=4)
    ref = DynamicCache(config=model.config)
    with torch.no_grad():
        out_p = forward(model, ids, cache=paged)
        out_r = forward(model, ids, cache=ref)
        paged.keep(kept)
        for layer in ref.layers:
            layer.keys, layer.values = layer.keys[:, :, kept], layer.values[:, :, kept]
        for step in range(6):
            nxt = out_r.logits[:, -1:].argmax(-1)
            out_p = forward(model, nxt, cache=paged)  # no position_ids: the cache says 20 + step
            out_r = forward(model, nxt, cache=ref, position_ids=torch.tensor([[20 + step]]))
            diff = (out_p.logits - out_r.logits).abs().max().item()
            assert diff <= TOL, f"step {step}: {diff}"
    assert paged.get_seq_length() == 26
    assert paged.stored_length() == len(kept) + 6
    assert paged.layers[1].positions[0, -6:].tolist() == list(range(20, 26))


def test_eviction_with_left_padding_needs_attach(caplog):
    """Rows with left padding + eviction: attach() rebuilds the mask at the tokens' real coordinates."""
    model = tiny_model("llama")
    ids = _prompt(batch=2, length=20)
    pad = torch.ones_like(ids)
    pad[0, :7] = 0
    ids[0, :7] = 0
    ref, fed = _masked_reference(model, ids, _sink_window_visible(4, 8), steps=10, pad=pad)
    cache = PagedCache(config=model.config, page_size=5, policy=SinkWindow(4, 8))
    with cache.attach(model):
        got = _paged_run(model, cache, ids, fed, pad=pad)
    _assert_close(ref, got)
    # without attach the padding mask is read at the wrong columns: the padded row differs
    with caplog.at_level(logging.WARNING, logger="llmsys.cache"):
        plain = _paged_run(model, PagedCache(config=model.config, page_size=5, policy=SinkWindow(4, 8)), ids, fed, pad)
    assert max((a[0] - b[0]).abs().max().item() for a, b in zip(ref, plain)) > 1e-3
    assert "no model is attached" in caplog.text  # ... and the user is told so, once


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_attend_subset_matches_masked_reference(implementation):
    model = tiny_model("qwen2", attn_implementation=implementation)
    ids = _prompt(batch=2, length=13)

    def visible(t, seen):  # even past positions + the new token
        return list(range(0, seen, 2)) + [seen]

    ref, fed = _masked_reference(model, ids, visible, steps=8)
    cache = PagedCache(config=model.config, page_size=4, policy=EveryOther())
    _assert_close(ref, _paged_run(model, cache, ids, fed))
    assert cache.stored_length() == 13 + 8  # attending to a subset evicts nothing


def test_query_policy_gets_queries_through_attach():
    """A query-scoring policy on a 1-layer model: its per-step selection is reproduced by a 2-D mask."""
    model = tiny_model("llama", num_hidden_layers=1)
    ids = _prompt(batch=2, length=16)
    policy = QueryTopK(k=5)
    steps = 6
    # paged run first (it decides the selection), then the reference with the recorded masks
    cache = PagedCache.from_model(model, policy=policy, page_size=4)
    with torch.no_grad():
        out = forward(model, ids, cache=cache)
        logits, fed = [], []
        for _ in range(steps):
            logits.append(out.logits[:, -1])
            nxt = out.logits[:, -1:].argmax(-1)
            fed.append(nxt)
            out = forward(model, nxt, cache=cache)
    assert len(policy.chosen) == steps
    ref = DynamicCache(config=model.config)
    with torch.no_grad():
        out = forward(model, ids, cache=ref)
        for t, nxt in enumerate(fed):
            assert (logits[t] - out.logits[:, -1]).abs().max().item() <= TOL
            _, seen, chosen = policy.chosen[t]
            mask = torch.zeros(2, seen + 1, dtype=torch.long)
            mask.scatter_(1, chosen, 1)
            mask[:, seen] = 1
            out = forward(model, nxt, cache=ref, attention_mask=mask)
    cache.close()
    assert not model.model.layers[0].self_attn._forward_pre_hooks  # hooks removed on close


def test_query_policy_without_attach_says_how_to_fix():
    model = tiny_model("llama")
    cache = PagedCache(config=model.config, policy=QueryTopK())
    with pytest.raises(PolicyError, match="attach"):
        forward(model, _prompt(), cache=cache)


def test_unannounced_subset_raises_mask_mismatch_unless_attached():
    @dataclass
    class Unannounced(CachePolicy):
        def attend(self, layer, step):
            return torch.arange(0, layer.length, 2)

    model = tiny_model("llama")
    ids = _prompt(length=10)
    cache = PagedCache(config=model.config, policy=Unannounced())
    with torch.no_grad():
        forward(model, ids, cache=cache)
        with pytest.raises(MaskMismatchError, match="attend_length"):
            forward(model, ids[:, :1], cache=cache)
    cache = PagedCache(config=model.config, policy=Unannounced())
    with cache.attach(model), torch.no_grad():
        forward(model, ids, cache=cache)
        forward(model, ids[:, :1], cache=cache)  # the hook sizes the mask to what update returns
    assert not model.model.layers[0].self_attn._forward_pre_hooks


@every_family
def test_generate_with_eviction_policy(family):
    model = tiny_model(family)
    ids = _prompt(length=24)
    cache = PagedCache(config=model.config, page_size=4, policy=SinkWindow(2, 6))
    out = generate(model, ids, cache=cache, max_new_tokens=10, do_sample=False)
    assert out.shape == (1, 34)
    assert cache.get_seq_length() == 33 and cache.stored_length() == 8
    cache.check()


def _rerotate(inv_freq):
    def fn(keys, old, new):  # rotate post-RoPE keys from positions `old` to `new`
        angles = (new - old).to(torch.float32)[..., None] * inv_freq  # [B, N, D/2]
        emb = torch.cat([angles, angles], dim=-1)
        return apply_rope(keys, emb.cos().to(keys.dtype), emb.sin().to(keys.dtype))

    return fn


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_drop_span_and_rerotate_matches_fresh_prefill(family):
    """TIM: drop a finished span, re-rotate the kept keys to contiguous positions. Layer 0's keys depend
    only on (token, position), so they must equal those of a fresh prefill of the shortened prompt."""
    model = tiny_model(family)
    ids = _prompt(batch=2, length=23)
    start, end = 6, 15
    cache = PagedCache(config=model.config, page_size=4)
    with torch.no_grad():
        forward(model, ids, cache=cache)
    freed = cache.drop_span(start, end)
    assert all(len(pages) >= 1 for pages in freed.values())
    layer = cache.layers[0]
    n = layer.length
    inv_freq, _ = rope_inv_freq(model)
    layer.rewrite_keys(_rerotate(inv_freq), new_positions=torch.arange(n))
    short = torch.cat([ids[:, :start], ids[:, end:]], dim=1)
    fresh = DynamicCache(config=model.config)
    with torch.no_grad():
        forward(model, short, cache=fresh)
    keys, values = layer.to_dense()
    assert (keys - fresh.layers[0].keys).abs().max().item() <= 1e-5
    assert torch.equal(values, fresh.layers[0].values)
    assert layer.positions[0].tolist() == list(range(n))
    assert layer.token_index[0].tolist() == [*range(start), *range(end, 23)]
    kmin, kmax = layer.page_abstracts()  # recomputed after the rewrite
    assert torch.equal(kmin[:, :, 0], keys[:, :, :4].amin(dim=2))
    assert torch.equal(kmax[:, :, -1], keys[:, :, 12:].amax(dim=2))
    layer.check()
