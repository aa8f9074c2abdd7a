"""LeoAM: chunking, abstracts, selection (recomputed independently), exactness within budget."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import DynamicCache

from llmsys.cache import PagedCache
from llmsys.kernels import chunk_minmax
from llmsys.kv import LeoAM, LeoAMCache
from llmsys.kv.chunking import profile_chunks
from llmsys.models import forward, generate
from llmsys.registry import get_method
from llmsys.testing import every_dense_family, tiny_model

LENGTH = 120


def _ids(batch: int = 1, length: int = LENGTH, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 500, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_registered():
    assert get_method("leoam") is LeoAM


def test_bad_hyper_parameters_name_the_fix():
    with pytest.raises(ValueError, match="smaller than sink \\+ window"):
        LeoAM(budget=20, sink=4, window=32)
    with pytest.raises(ValueError, match="min_chunk"):
        LeoAM(budget=64, min_chunk=64, max_chunk=16)
    with pytest.raises(ValueError, match="budget must be an int"):
        LeoAM(budget=0)
    assert LeoAM(budget=2).sink + LeoAM(budget=2).window <= 2  # defaults shrink with a small budget


# --------------------------------------------------------------------------------------------------
# chunking


@settings(max_examples=30, deadline=None)
@given(
    mass=st.lists(st.floats(0, 10, allow_nan=False), min_size=1, max_size=60),
    lo=st.integers(1, 4),
    extra=st.integers(0, 8),
)
def test_chunks_cover_the_pages_within_their_size_bounds(mass, lo, extra):
    hi = lo + extra
    bounds = profile_chunks(torch.tensor(mass), lo, hi)
    sizes = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    assert bounds[0] == 0 and bounds[-1] == len(mass) and all(s >= 1 for s in sizes)
    assert all(lo <= s <= hi for s in sizes[:-1]) and sizes[-1] <= hi


def test_chunks_follow_the_attention_profile():
    # a hot region (pages 20-23) in a desert: fine chunks there, maximal chunks elsewhere
    mass = torch.full((64,), 0.01)
    mass[20:24] = 5.0
    bounds = profile_chunks(mass, 1, 8)
    sizes = dict(zip(bounds[:-1], [b - a for a, b in zip(bounds[:-1], bounds[1:])]))
    assert all(sizes[p] == 1 for p in range(20, 24))
    assert max(sizes.values()) == 8 and sum(1 for s in sizes.values() if s == 8) >= 4


# --------------------------------------------------------------------------------------------------
# abstracts and selection on a real cache


def _run(policy: LeoAM, page_size: int = 8, batch: int = 2, new: int = 3, family: str = "llama"):
    model = tiny_model(family)
    ids = _ids(batch)
    cache = PagedCache.from_model(model, policy=policy, page_size=page_size)
    with torch.no_grad():
        out = forward(model, ids, cache=cache)
        for _ in range(new):
            out = forward(model, out.logits[:, -1:].argmax(-1), cache=cache)
    return model, cache


def test_chunk_abstracts_are_the_min_max_of_their_keys():
    policy = LeoAM(budget=48, window=8, min_chunk=8, max_chunk=40, max_chunk_share=1.0)
    _, cache = _run(policy)
    with cache:
        for layer in cache.layers:
            st_ = layer.policy_state["leoam"]
            sizes = st_.chunk_sizes()
            assert all(s % layer.page_size == 0 for s in sizes)
            assert all(8 <= s <= 40 for s in sizes[:-1])
            keys, _ = layer.to_dense()
            bounds = st_.bounds + [layer.length]  # the closed chunks and the open tail
            kmin, kmax = chunk_minmax(keys, torch.tensor(bounds), backend="reference")
            ours = policy._abstracts(layer, bounds)
            assert torch.equal(ours[0], kmin) and torch.equal(ours[1], kmax)


def _naive_selection(policy: LeoAM, layer, query: torch.Tensor) -> list[list[int]]:
    """Independent re-computation: score each chunk from its raw keys, fill the budget greedily."""
    keys, _ = layer.to_dense()
    n = layer.length
    st_ = layer.policy_state["leoam"]
    bounds = list(st_.bounds) + ([n] if n > st_.bounds[-1] else [])
    protected = set(range(policy.sink)) | set(range(n - policy.window, n))
    group = query.shape[1] // keys.shape[1]
    rows = []
    for b in range(query.shape[0]):
        imps = []
        for a, e in zip(bounds[:-1], bounds[1:]):
            per_head = []
            for h in range(query.shape[1]):
                k = keys[b, h // group, a:e].double()
                qd = query[b, h].double()
                per_head.append(torch.maximum(qd * k.min(0).values, qd * k.max(0).values).sum())
            imps.append(torch.stack(per_head))
        score = torch.stack(imps, dim=1) * query.shape[-1] ** -0.5  # [Hq, C]
        importance = torch.softmax(score, dim=1).max(dim=0).values
        room = policy.budget - len(protected)
        chosen = set(protected)
        for c in sorted(range(len(importance)), key=lambda c: (-float(importance[c]), c)):
            for t in range(bounds[c], bounds[c + 1]):
                if room > 0 and t not in protected:
                    chosen.add(t)
                    room -= 1
        rows.append(sorted(chosen))
    return rows


def test_selection_matches_an_independent_recomputation():
    policy = LeoAM(budget=40, sink=3, window=6, min_chunk=8, max_chunk=24)
    model, cache = _run(policy, new=2)
    with cache:
        for layer in cache.layers:
            torch.manual_seed(layer.layer_idx)
            query = torch.randn(2, model.config.num_attention_heads, layer.pool.head_dim)
            chosen = policy.select(layer, query)
            assert chosen.shape == (2, 40)
            assert chosen.tolist() == _naive_selection(policy, layer, query)


def test_decode_attends_exactly_the_budget():
    policy = LeoAM(budget=32, window=8, min_chunk=8, max_chunk=32)
    seen = []

    class Spy(LeoAM):
        def attend(self, layer, step):
            out = super().attend(layer, step)
            if out is not None:
                seen.append((out.shape, layer.length))
            return out

    spy = Spy(**{f: getattr(policy, f) for f in ("budget", "sink", "window", "min_chunk", "max_chunk")})
    _, cache = _run(spy, new=3)
    cache.close()
    assert len(seen) == 3 * 2 and all(shape == (2, 32) for shape, _ in seen)


# --------------------------------------------------------------------------------------------------
# exactness within budget


@every_dense_family
def test_covering_budget_is_the_plain_model(family):
    model = tiny_model(family)
    ids = _ids(batch=2, length=40)
    plain = generate(model, ids, cache=DynamicCache(config=model.config), max_new_tokens=6, do_sample=False)
    with PagedCache.from_model(model, policy=LeoAM(budget=46, min_chunk=8), page_size=8) as cache:
        out = generate(model, ids, cache=cache, max_new_tokens=6, do_sample=False)
    assert torch.equal(out, plain)


MODEL = tiny_model("qwen2")


def _logits(cache, ids: torch.Tensor, new: int) -> torch.Tensor:
    steps = []
    with torch.no_grad():
        out = forward(MODEL, ids, cache=cache)
        steps.append(out.logits[:, -1])
        for _ in range(new):
            out = forward(MODEL, out.logits[:, -1:].argmax(-1), cache=cache)
            steps.append(out.logits[:, -1])
    return torch.stack(steps)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    length=st.integers(2, 40),
    new=st.integers(1, 3),
    page_size=st.sampled_from([1, 4, 8, 16]),
    slack=st.integers(0, 30),
    batch=st.integers(1, 2),
)
def test_property_covering_budgets_give_full_logits(length, new, page_size, slack, batch):
    ids = torch.randint(3, 500, (batch, length), generator=torch.Generator().manual_seed(length))
    full = _logits(DynamicCache(config=MODEL.config), ids, new)
    budget = length + new + slack
    with PagedCache.from_model(MODEL, policy=LeoAM(budget=budget, min_chunk=4), page_size=page_size) as cache:
        assert torch.equal(_logits(cache, ids, new), full)
    # the tiered cache with a device budget covering the context never leaves the device
    budget = max(budget, 6)
    device_budget = budget + length + 8 * page_size  # the prompt goes in one forward
    with LeoAMCache.from_model(
        MODEL, device_budget=device_budget, budget=budget, sink=2, window=4, page_size=page_size
    ) as cache:
        assert torch.equal(_logits(cache, ids, new), full)
        assert cache.bytes_by_tier()["host"] == cache.bytes_by_tier()["disk"] == 0


def test_beam_search_reorders_rows_under_selection():
    model = tiny_model("llama")
    ids = _ids(batch=1, length=60)
    kw = dict(max_new_tokens=5, num_beams=2, do_sample=False)
    plain = generate(model, ids, cache=DynamicCache(config=model.config), **kw)
    with PagedCache.from_model(model, policy=LeoAM(budget=80, min_chunk=8), page_size=8) as cache:
        assert torch.equal(generate(model, ids, cache=cache, **kw), plain)  # covering budget: exact
    with PagedCache.from_model(model, policy=LeoAM(budget=24, min_chunk=8), page_size=8) as cache:
        out = generate(model, ids, cache=cache, **kw)  # selection after every reorder
        assert out.shape == plain.shape
        cache.check()
