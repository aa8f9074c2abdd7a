"""Full, StreamingLLM and Quest: lossless within budget on every family, selections recomputed independently."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from llmsys.cache import KeepAll, PagedCache
from llmsys.eval import REFERENCE_VOCAB, NeedleTask
from llmsys.kv import H2O, Full, Quest, SnapKV, StreamingLLM
from llmsys.kv.protocol import context_then_question
from llmsys.models import forward, generate
from llmsys.registry import get_method
from llmsys.testing import analytic_retrieval_model, every_dense_family, tiny_model

LENGTH = 40
NEW = 6


def _ids(batch: int = 2, length: int = LENGTH, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 500, (batch, length), generator=torch.Generator().manual_seed(seed))


@every_dense_family
def test_every_baseline_runs_and_is_full_within_budget(family):
    model = tiny_model(family)
    ids = _ids()
    plain = generate(model, ids, cache=DynamicCache(config=model.config), max_new_tokens=NEW, do_sample=False)
    covering = LENGTH + NEW  # every token the cache will ever hold
    for policy in (Full(), StreamingLLM(budget=covering), Quest(budget=covering), SnapKV(budget=covering),
                   H2O(budget=covering)):  # fmt: skip
        with PagedCache.from_model(model, policy=policy, page_size=8) as cache:
            out = generate(model, ids, cache=cache, max_new_tokens=NEW, do_sample=False)
        assert torch.equal(out, plain), policy
    # compressed: generate runs, and each policy stores what it promises
    with PagedCache.from_model(model, policy=StreamingLLM(budget=12, sinks=2), page_size=8) as cache:
        generate(model, ids, cache=cache, max_new_tokens=NEW, do_sample=False)
        assert [cache.stored_length(i) for i in range(len(cache.layers))] == [12] * len(cache.layers)
    with PagedCache.from_model(model, policy=Quest(budget=16), page_size=8) as cache:
        out = generate(model, ids, cache=cache, max_new_tokens=NEW, do_sample=False)
        assert cache.stored_length(0) == LENGTH + NEW - 1  # Quest evicts nothing
    assert out.shape == (2, LENGTH + NEW)


def test_streamingllm_keeps_sinks_and_the_recent_window_at_every_step():
    model = tiny_model("llama")
    sinks, window = 3, 9
    policy = StreamingLLM(budget=14, sinks=sinks, window=window)  # keeps 12 < budget: window is explicit
    ids = _ids(batch=1)
    with PagedCache.from_model(model, policy=policy, page_size=4) as cache, torch.no_grad():
        out = forward(model, ids, cache=cache)
        for seen in range(LENGTH, LENGTH + 5):
            for layer in cache.layers:
                expected = list(range(sinks)) + list(range(seen - window, seen))
                assert layer.token_index[0].tolist() == expected
            out = forward(model, out.logits[:, -1:].argmax(-1), cache=cache)
        cache.check()
    assert StreamingLLM(budget=10).recent_tokens == 6


class _RecordingQuest(Quest):
    """Quest that remembers, per layer, the query, the dense keys and the tokens it chose."""

    def attend(self, layer, step):  # noqa: ANN001
        chosen = super().attend(layer, step)
        if chosen is not None:
            layer.policy_state["record"] = (step.queries[:, :, -1].clone(), layer.to_dense()[0].clone(), chosen)
        return chosen


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("page_size", [4, 5])
def test_quest_attends_the_pages_with_the_highest_bound(family, page_size):
    model = tiny_model(family)
    budget = 3 * page_size + 2  # rounds down to 3 pages
    policy = _RecordingQuest(budget=budget)
    ids = _ids(length=LENGTH + 1)  # not a multiple of the page size: the last page is partial
    groups = model.config.num_attention_heads // model.config.num_key_value_heads
    with PagedCache.from_model(model, policy=policy, page_size=page_size) as cache, torch.no_grad():
        forward(model, ids[:, :-1], cache=cache)
        forward(model, ids[:, -1:], cache=cache)
        for layer in cache.layers:
            query, keys, chosen = layer.policy_state["record"]
            n = keys.shape[2]
            pages = -(-n // page_size)
            # independent recomputation: pad the keys to whole pages, per-page min/max, Quest's bound
            pad = pages * page_size - n
            k = keys.float()
            lo = torch.cat([k, k[:, :, -1:].expand(-1, -1, pad, -1)], 2).unflatten(2, (pages, page_size)).amin(3)
            hi = torch.cat([k, k[:, :, -1:].expand(-1, -1, pad, -1)], 2).unflatten(2, (pages, page_size)).amax(3)
            lo, hi = lo.repeat_interleave(groups, 1), hi.repeat_interleave(groups, 1)  # [B, Hq, pages, D]
            q = query.float()[:, :, None]
            bound = torch.maximum(q * lo, q * hi).sum(-1) / keys.shape[-1] ** 0.5
            score = bound.softmax(-1).amax(1)
            score[:, -1] = float("inf")
            for row in range(ids.shape[0]):
                top = sorted(score[row].topk(3).indices.tolist())
                expected = [p * page_size + o for p in top for o in range(page_size) if p * page_size + o < n]
                assert chosen[row].tolist() == expected, (layer.layer_idx, row)
            assert cache.stored_length(layer.layer_idx) == LENGTH + 1  # nothing evicted
            last_page = (LENGTH + 1) - (-(-(LENGTH + 1) // page_size) - 1) * page_size
            assert policy.attend_length(layer, 1) == 2 * page_size + last_page
            assert policy.attend_length(layer, 7) is None  # a prefill chunk attends to everything


def test_quest_finds_the_needle_that_streamingllm_evicts():
    """On the hand-written retrieval model, with the question asked after the context was cached
    (`context_then_question`), Quest at 1/8 of a 512-token context answers at every depth, because
    the question's query picks the needle's page; StreamingLLM at the same budget keeps only the ends
    of the context and misses the needles in the middle; Full answers everything."""
    model = analytic_retrieval_model(max_length=1024)
    task = NeedleTask()
    depths = (0.0, 0.25, 0.5, 0.75, 1.0)
    samples = [task(512, depth, seed) for depth in depths for seed in range(2)]
    ids = torch.tensor([s.prompt for s in samples])
    answers = torch.tensor([s.answer for s in samples])

    def correct(policy) -> list[bool]:  # noqa: ANN001
        run = context_then_question(lambda m: PagedCache.from_model(m, policy=policy))
        tokens, info = run(model, ids, 1)
        assert info["kv_bytes"] > 0
        return (tokens == answers).flatten().tolist()

    assert all(correct(Full())) and all(correct(Quest(budget=64)))
    streaming = correct(StreamingLLM(budget=64))
    assert streaming[4:6] == [False, False]  # depth 0.5: evicted


def test_context_then_question_checks_its_input():
    model = tiny_model("llama")
    run = context_then_question(lambda m: PagedCache.from_model(m))
    ids = _ids(length=12)
    ids[ids == REFERENCE_VOCAB.Q] = 7
    with pytest.raises(ValueError, match="no question token"):
        run(model, ids, 1)
    ids[0, 5], ids[1, 8] = REFERENCE_VOCAB.Q, REFERENCE_VOCAB.Q
    with pytest.raises(ValueError, match="different offsets \\[5, 8\\]"):
        run(model, ids, 1)
    ids[1, 5] = REFERENCE_VOCAB.Q
    tokens, _ = run(model, ids, 3)
    assert tokens.shape == (2, 3)


def test_registered_and_validated():
    assert get_method("full") is Full is KeepAll
    assert get_method("streamingllm") is StreamingLLM and get_method("quest") is Quest
    with pytest.raises(ValueError, match="budget=10 < sinks \\+ window = 4 \\+ 7"):
        StreamingLLM(budget=10, window=7)
    with pytest.raises(ValueError, match="no room for a recent window"):
        StreamingLLM(budget=4, sinks=4)
    for bad in (dict(sinks=-1), dict(sinks=1.5), dict(window=0), dict(window=True)):
        with pytest.raises(ValueError, match="sinks must be|window must be"):
            StreamingLLM(budget=16, **bad)
    with pytest.raises(ValueError, match="budget must be an int >= 1"):
        Quest(budget=0)
    model = tiny_model("llama")
    with PagedCache.from_model(model, policy=Quest(budget=8), page_size=16) as cache, torch.no_grad():
        with pytest.raises(ValueError, match="less than one page.*page_size <= budget"):
            forward(model, _ids(batch=1), cache=cache)
