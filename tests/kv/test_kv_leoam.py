"""LeoAM: chunking, abstracts, selection (recomputed independently), exactness within budget."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from transformers import DynamicCache

from llmsys.cache import PagedCache
from llmsys.kernels import chunk_minmax
from llmsys.kv import LeoAM, LeoAMCache
from llmsys.kv.chunking import profile_chunks
from llmsys.models import forward, generate
from llmsys.registry import get_method
from llmsys.testing import every_dense_family, greedy_logits, tiny_model

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
    with pytest.raises(ValueError, match="refine_rounds"):
        LeoAM(budget=64, refine_rounds=0)
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
    # the prefill-only rule: whole chunks in order of importance
    policy = LeoAM(budget=40, sink=3, window=6, min_chunk=8, max_chunk=24, refine=False, rechunk=False)
    model, cache = _run(policy, new=2)
    with cache:
        for layer in cache.layers:
            torch.manual_seed(layer.layer_idx)
            query = torch.randn(2, model.config.num_attention_heads, layer.pool.head_dim)
            chosen = policy.select(layer, query)
            assert chosen.shape == (2, 40)
            assert chosen.tolist() == _naive_selection(policy, layer, query)


def _bound_importance(
    keys: torch.Tensor,
    query: torch.Tensor,
    units: list[tuple[int, int]],
    runs: Callable[[int, int], list] | None = None,
) -> list[float]:
    """Quest-style importance of token ranges for one row: min/max bound from the raw keys
    ``[Hkv, n, D]``, scaled, softmax over the units per query head ``query [Hq, D]``, max over heads.
    `runs(a, e)`: the sub-ranges a unit is bounded by (its best bound counts; default: the unit)."""
    group = query.shape[0] // keys.shape[0]
    scores = []
    for a, e in units:
        per_head = []
        for h in range(query.shape[0]):
            qd = query[h].double()
            bounds = []
            for r0, r1 in runs(a, e) if runs is not None else [(a, e)]:
                k = keys[h // group, r0:r1].double()
                bounds.append(torch.maximum(qd * k.min(0).values, qd * k.max(0).values).sum())
            per_head.append(max(bounds))
        scores.append(torch.stack(per_head))
    score = torch.stack(scores, dim=1) * query.shape[-1] ** -0.5  # [Hq, U]
    return torch.softmax(score, dim=1).max(dim=0).values.tolist()


def _naive_refined_selection(policy: LeoAM, layer, query: torch.Tensor) -> list[list[int]]:
    """Independent re-computation of the adaptive rule: rank the units, split every merged chunk the
    budget reaches into its pages, re-rank, until only pages are taken (or `refine_rounds` rounds).
    A unit within one page is bounded by the best of its runs of `abstract_tokens` tokens."""
    keys, _ = layer.to_dense()
    n, ps = layer.length, layer.page_size
    fine = policy.abstract_tokens or ps

    def runs(a: int, e: int) -> list[tuple[int, int]]:
        return [(r, min(r + fine, e)) for r in range(a, e, fine)] if a // ps == (e - 1) // ps else [(a, e)]

    st_ = layer.policy_state["leoam"]
    bounds = list(st_.bounds) + ([n] if n > st_.bounds[-1] else [])
    protected = set(range(policy.sink)) | set(range(n - policy.window, n))
    rows = []
    for b in range(query.shape[0]):
        units = list(zip(bounds[:-1], bounds[1:]))
        rounds = 0
        while True:
            imp = _bound_importance(keys[b], query[b], units, runs)
            room, chosen, split = policy.budget - len(protected), set(protected), []
            for u in sorted(range(len(units)), key=lambda u: (-imp[u], u)):
                a, e = units[u]
                free = [t for t in range(a, e) if t not in protected]
                if room <= 0 or not free:
                    continue
                if (e - 1) // ps > a // ps:
                    split.append(u)
                for t in free[:room]:
                    chosen.add(t)
                room -= min(room, len(free))
            if not split or (policy.refine_rounds is not None and rounds == policy.refine_rounds):
                break
            rounds += 1
            pages = [(max(p * ps, units[u][0]), min((p + 1) * ps, units[u][1]))
                     for u in split for p in range(units[u][0] // ps, (units[u][1] - 1) // ps + 1)]  # fmt: skip
            units = [x for i, x in enumerate(units) if i not in split] + pages
        rows.append(sorted(chosen))
    return rows


@pytest.mark.parametrize(("fine", "batch"), [(4, 2), (4, 1), (None, 2)])  # one row: the pool scored in place
@pytest.mark.parametrize("rounds", [None, 1, 2])
@pytest.mark.parametrize("budget", [24, 40, 64])
def test_refined_selection_matches_an_independent_recomputation(budget, rounds, fine, batch):
    policy = LeoAM(
        budget=budget,
        sink=3,
        window=6,
        min_chunk=8,
        max_chunk=64,
        rechunk=False,
        refine_rounds=rounds,
        abstract_tokens=fine,
    )
    model, cache = _run(policy, new=2)
    with cache:
        if batch == 1:  # keep the second row: its page ids are not its page columns
            cache.batch_select_indices(torch.tensor([1]))
        for layer in cache.layers:
            assert max(layer.policy_state["leoam"].chunk_sizes()) > layer.page_size  # merged chunks exist
            for seed in range(3):
                torch.manual_seed(seed)
                query = torch.randn(batch, model.config.num_attention_heads, layer.pool.head_dim)
                chosen = policy.select(layer, query)
                assert chosen.shape == (batch, budget)
                assert chosen.tolist() == _naive_refined_selection(policy, layer, query)


def test_refinement_picks_the_highest_bound_page_inside_a_merged_chunk():
    # one merged chunk over every closed page, room for one page: the adaptive rule takes the page of
    # that chunk with the highest bound (importance), the prefill-only rule the chunk's first tokens
    ps = 8
    kw = dict(budget=3 + ps, sink=0, window=3, min_chunk=ps, max_chunk=256, abstract_tokens=None)  # page bounds
    refined, whole = LeoAM(**kw, rechunk=False), LeoAM(**kw, refine=False, rechunk=False)
    model, cache = _run(refined, page_size=ps, batch=1, new=3)
    with cache:
        layer = cache.layers[1]
        n = layer.length
        closed = (n // ps) * ps
        layer.policy_state["leoam"].bounds = [0, closed]
        keys, _ = layer.to_dense()
        pages = [(p * ps, (p + 1) * ps) for p in range(closed // ps)]
        found = 0
        for seed in range(20):
            torch.manual_seed(seed)
            query = torch.randn(1, model.config.num_attention_heads, layer.pool.head_dim)
            imp = _bound_importance(keys[0], query[0], [*pages, (closed, n)])[: len(pages)]
            best = max(range(len(pages)), key=lambda p: imp[p])
            picked = refined.select(layer, query)[0, :ps].tolist()  # sink=0: the room comes first
            assert picked == list(range(*pages[best]))
            assert whole.select(layer, query)[0, :ps].tolist() == list(range(ps))  # the chunk's first page
            found += best != 0
        assert found > 0  # the two rules did differ


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    page_size=st.sampled_from([4, 8]),
    room=st.integers(0, 60),
    sink=st.integers(0, 6),
    window=st.integers(0, 12),
    max_chunk=st.sampled_from([16, 32, 128]),
    batch=st.integers(1, 3),
)
@example(page_size=4, room=0, sink=2, window=3, max_chunk=16, batch=2)  # sinks and window fill the budget
def test_refinement_never_exceeds_the_budget(page_size, room, sink, window, max_chunk, batch):
    budget = sink + window + room
    assume(budget >= 1)
    seen = []

    class Spy(LeoAM):
        def attend(self, layer, step):
            out = super().attend(layer, step)
            if out is not None:
                seen.append((out, layer.length, layer.page_size))
            return out

    spy = Spy(budget=budget, sink=sink, window=window, min_chunk=page_size, max_chunk=max_chunk)
    model = tiny_model("llama")
    with PagedCache.from_model(model, policy=spy, page_size=page_size) as cache, torch.no_grad():
        out = forward(model, _ids(batch, length=100), cache=cache)
        for _ in range(3):
            out = forward(model, out.logits[:, -1:].argmax(-1), cache=cache)
    assert len(seen) == 3 * model.config.num_hidden_layers
    for chosen, n, ps in seen:
        assert chosen.shape == (batch, budget)
        for row in chosen.tolist():
            assert row == sorted(set(row)) and row[-1] < n  # unique past tokens
            assert set(range(sink)) | set(range(n - window, n)) <= set(row)
            middle = [t for t in row if sink <= t < n - window]
            assert len(middle) == room
            # pages, not chunks: whole pages, the pages cut by the sinks' and the window's edges, and the
            # last one taken (cut to fit) - LeoAMCache's device slack counts on this
            assert len({t // ps for t in middle}) <= (-(-room // ps) + 2 if room else 0)


def test_rechunk_splits_the_pages_the_decode_attended_to():
    ps, records = 8, []

    class Spy(LeoAM):
        def compact(self, layer, step):
            if not step.is_prefill and layer.layer_idx == 1:
                st_ = self.state(layer)
                st_.bounds = [0, (layer.length // ps) * ps]  # one merged chunk before the step
                records.append((step.attend.clone(), step.queries[:, :, -1].clone(), list(st_.bounds)))
            super().compact(layer, step)
            if not step.is_prefill and layer.layer_idx == 1:
                records[-1] += (list(self.state(layer).bounds),)

    policy = Spy(budget=40, sink=2, window=6, min_chunk=ps, max_chunk=256)
    model, cache = _run(policy, page_size=ps, batch=2, new=1)
    with cache:
        layer = cache.layers[1]
        keys, _ = layer.to_dense()
        chosen, query, before, after = records[-1]
        closed = before[-1]
        group = query.shape[1] // keys.shape[1]
        hot = set()
        for b in range(2):
            k = keys[b, :, chosen[b]].repeat_interleave(group, dim=0)  # [Hq, A, D]
            probs = torch.softmax((k @ query[b][:, :, None])[..., 0] * query.shape[-1] ** -0.5, dim=-1).mean(0)
            mass = {}
            for t, w in zip(chosen[b].tolist(), probs.tolist()):
                mass[t // ps] = mass.get(t // ps, 0.0) + w
            hot |= {p for p, w in mass.items() if w * len(mass) > 1 and (p + 1) * ps <= closed}
        assert hot  # some page drew more than a uniform share
        cuts = {c for p in hot for c in (p * ps, (p + 1) * ps) if 0 < c < closed}
        assert [x for x in after if x <= closed] == sorted({0, closed} | cuts)
        sizes = dict(zip(after[:-1], [e - a for a, e in zip(after[:-1], after[1:])]))
        assert all(sizes[p * ps] == ps for p in hot)  # every hot page is a chunk of its own


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
    with torch.no_grad():
        return greedy_logits(MODEL, forward(MODEL, ids, cache=cache), cache, new)


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


def test_selection_cost_is_counted_only_when_asked():
    from llmsys.kv.leoam import chunk_stats

    kw = dict(budget=40, sink=3, window=6, min_chunk=8, max_chunk=64)
    _, counted = _run(LeoAM(**kw, count_cost=True), new=3)
    _, silent = _run(LeoAM(**kw), new=3)
    with counted, silent:
        stats = chunk_stats(counted)
        assert stats["steps"] > 0 and stats["abstracts_per_step"] > 0 and stats["pages_per_step"] > 0
        # every row's selection scores at least all of its pages' fine abstracts (2 runs of 4 per page)
        prompt_pages = counted.layers[0].num_pages - 1  # 3 decoded tokens open at most one more page
        assert stats["abstracts_per_step"] >= prompt_pages * 2
        assert chunk_stats(silent)["steps"] == 0
