"""With the default policy a PagedCache is a drop-in DynamicCache: same logits, same generated tokens."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from llmsys.cache import PagedCache
from llmsys.models import forward, generate
from llmsys.testing import every_family, tiny_model

PROMPT = 21  # not a multiple of 5 or 16
DECODE_STEPS = 32
TOL = 1e-5


def _prompt(batch: int, padded: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    ids = torch.randint(3, 500, (batch, PROMPT), generator=torch.Generator().manual_seed(batch))
    if not padded:
        return ids, None
    mask = torch.ones_like(ids)
    mask[0, :6] = 0  # row 0 is left-padded
    ids[0, :6] = 0
    return ids, mask


def _run(model, cache, ids, mask, feed):
    """Prefill + decode steps; the token fed at step i is feed[i] (or the argmax of this run if None)."""
    logits, tokens = [], []
    with torch.no_grad():
        out = forward(model, ids, cache=cache, attention_mask=mask)
        for step in range(DECODE_STEPS):
            logits.append(out.logits[:, -1])
            nxt = out.logits[:, -1:].argmax(-1) if feed is None else feed[step]
            tokens.append(nxt)
            if mask is not None:
                mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
            out = forward(model, nxt, cache=cache, attention_mask=mask)
        logits.append(out.logits[:, -1])
    return logits, tokens


@every_family
@pytest.mark.parametrize("batch,padded", [(1, False), (2, True)], ids=["b1", "b2-leftpad"])
def test_logits_match_dynamic_cache(family, batch, padded):
    model = tiny_model(family)
    ids, mask = _prompt(batch, padded)
    ref_logits, tokens = _run(model, DynamicCache(config=model.config), ids, mask, None)
    for page_size in (1, 5, 16):
        cache = PagedCache(config=model.config, page_size=page_size)
        logits, _ = _run(model, cache, ids, mask, tokens)
        for step, (a, b) in enumerate(zip(ref_logits, logits)):
            diff = (a - b).abs().max().item()
            assert diff <= TOL, f"page_size={page_size} step={step}: max |diff| = {diff}"
        cache.check()
        assert cache.get_seq_length() == PROMPT + DECODE_STEPS
        assert cache.stored_length() == PROMPT + DECODE_STEPS


@every_family
def test_generate_matches_default_cache(family):
    model = tiny_model(family)
    ids, mask = _prompt(2, padded=True)
    kwargs = dict(attention_mask=mask, max_new_tokens=16, do_sample=False)
    expected = generate(model, ids, **kwargs)
    # a fresh cache handed to generate
    fresh = PagedCache(config=model.config, page_size=5)
    assert torch.equal(generate(model, ids, cache=fresh, **kwargs), expected)
    # prefill all but the last prompt token, then let generate continue from the cache
    warm = PagedCache(config=model.config, page_size=16)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # what generate uses with left padding
    with torch.no_grad():
        forward(model, ids[:, :-1], cache=warm, attention_mask=mask[:, :-1], position_ids=positions[:, :-1])
    assert torch.equal(generate(model, ids, cache=warm, **kwargs), expected)
    assert warm.get_seq_length() == expected.shape[1] - 1


@pytest.mark.parametrize("family", ["llama", "qwen2_moe"])
def test_beam_search_matches_default_cache(family):
    # exercises batch_repeat_interleave and reorder_cache (rows that share a prefix get page copies)
    model = tiny_model(family)
    ids, _ = _prompt(1, padded=False)
    kwargs = dict(max_new_tokens=8, do_sample=False, num_beams=3, num_return_sequences=2)
    cache = PagedCache(config=model.config, page_size=4)
    assert torch.equal(generate(model, ids, cache=cache, **kwargs), generate(model, ids, **kwargs))
    cache.check()


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_sliding_window_model_matches(implementation):
    # the layers store everything; the sliding-window mask still applies at the right coordinates
    model = tiny_model("mistral", attn_implementation=implementation, sliding_window=8)
    ids, mask = _prompt(2, padded=True)
    kwargs = dict(attention_mask=mask, max_new_tokens=12, do_sample=False)
    cache = PagedCache(config=model.config, page_size=3)
    assert torch.equal(generate(model, ids, cache=cache, **kwargs), generate(model, ids, **kwargs))


def test_bfloat16_and_sdpa_match():
    model = tiny_model("qwen3", dtype=torch.bfloat16, attn_implementation="sdpa")
    ids, mask = _prompt(2, padded=True)
    ref, tokens = _run(model, DynamicCache(config=model.config), ids, mask, None)
    got, _ = _run(model, PagedCache(config=model.config, page_size=5), ids, mask, tokens)
    for a, b in zip(ref, got):
        assert torch.equal(a, b)
