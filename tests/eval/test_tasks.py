"""The task generators put the asked fact where they claim, with distinct keys; scoring is exact."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmsys.eval import (
    REFERENCE_VOCAB,
    MQARTask,
    NeedleTask,
    SyntheticVocab,
    VariableTrackingTask,
    exact_match,
    get_task,
    make_samples,
    synthetic_tokenizer,
)

V = REFERENCE_VOCAB


def _facts(prompt: list[int]) -> dict[int, int]:
    """key -> value of every `<kv> k v` in a prompt."""
    return {prompt[i + 1]: prompt[i + 2] for i in range(len(prompt) - 2) if prompt[i] == V.KV}


def _target_position(length: int, depth: float, suffix: int) -> int:
    body = length - 1 - suffix
    return 1 + round(depth * (body - 3))


@pytest.mark.parametrize("length", [32, 100, 1024, 4096])
@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_needle_is_at_its_depth(length, depth):
    s = NeedleTask(needles=4)(length, depth, seed=3)
    p = s.prompt
    assert len(p) == length and p[0] == V.BOS
    pos = s.positions[0]
    assert pos == _target_position(length, depth, suffix=2)
    assert p[pos : pos + 3] == [V.KV, s.keys[0], s.values[0]]
    assert p[-2:] == [V.Q, s.keys[0]]
    assert s.answer == [s.values[0]]
    # several needles, distinct keys and values, each where it says
    assert len(set(s.keys)) == 4 and len(set(s.values)) == 4
    for at, k, v in zip(s.positions, s.keys, s.values):
        assert p[at : at + 3] == [V.KV, k, v]
    assert p.count(V.KV) == 4 and p.count(V.Q) == 1
    assert _facts(p)[s.keys[0]] == s.answer[0]
    # everything else is filler
    covered = {i for at in s.positions for i in range(at, at + 3)} | {0, length - 2, length - 1}
    assert all(int(t) in set(V.filler_ids.tolist()) for i, t in enumerate(p) if i not in covered)


def test_depth_extremes():
    first = NeedleTask()(256, 0.0)
    assert first.positions[0] == 1
    last = NeedleTask()(256, 1.0)
    assert last.positions[0] == 256 - 5  # the fact ends right before "<q> k"


@settings(max_examples=60, deadline=None)
@given(
    length=st.integers(25, 600),
    depth=st.floats(0, 1),
    seed=st.integers(0, 10_000),
    needles=st.integers(1, 6),
)
def test_needle_property(length, depth, seed, needles):
    length = max(length, 3 * needles + 7)  # the shortest context the task accepts
    s = NeedleTask(needles=needles)(length, depth, seed)
    assert len(s.prompt) == length
    facts = _facts(s.prompt)
    assert len(facts) == needles  # no fact overwritten by another
    assert facts[s.prompt[-1]] == s.answer[0]
    assert abs(s.positions[0] - _target_position(length, depth, 2)) == 0


def test_samples_are_deterministic_and_vary_with_seed():
    task = NeedleTask()
    assert task(512, 0.5, 7) == task(512, 0.5, 7)
    assert task(512, 0.5, 7).prompt != task(512, 0.5, 8).prompt
    cell = make_samples(task, 256, 0.25, samples=4, seed=10)
    assert [c.seed for c in cell] == [10, 11, 12, 13]
    assert len({tuple(c.prompt) for c in cell}) == 4


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_mqar(depth):
    task = MQARTask(queries=4)
    s = task(512, depth, seed=1)
    p = s.prompt
    assert len(p) == 512
    facts = _facts(p)
    assert len(facts) == len(s.keys) >= 4 and len(set(s.keys)) == len(s.keys)
    assert p[s.positions[0] : s.positions[0] + 3] == [V.KV, s.keys[0], s.values[0]]
    assert s.positions[0] == _target_position(512, depth, suffix=3 * 3 + 2)
    # the answered questions in the suffix agree with the facts; the last one is scored
    suffix = p[-(3 * 3 + 2) :]
    for i in range(0, 9, 3):
        assert suffix[i] == V.Q and facts[suffix[i + 1]] == suffix[i + 2]
    assert suffix[-2:] == [V.Q, s.keys[0]] and s.answer == [facts[s.keys[0]]]


@pytest.mark.parametrize("hops", [1, 2, 3])
def test_variable_tracking_chain(hops):
    s = VariableTrackingTask(hops=hops, distractors=2)(400, 0.5, seed=2)
    p = s.prompt
    facts = _facts(p)
    assert len(facts) == 3 * (hops + 1)
    chain, node = [], p[-1]
    for _ in range(hops + 1):  # follow the aliases from the asked variable
        node = facts[node]
        chain.append(node)
    assert chain == s.answer and len(s.answer) == hops + 1
    assert s.answer[-1] in set(V.value_ids.tolist())
    # the fact holding the value (x0 -> v) is the one at the asked depth
    assert p[s.positions[0] : s.positions[0] + 3] == [V.KV, s.answer[-2], s.answer[-1]]


def test_scoring_is_exact_match():
    assert exact_match([5, 6, 7], [5, 6])
    assert not exact_match([5, 7], [5, 6])
    assert not exact_match([5], [5, 6])
    import torch

    assert exact_match(torch.tensor([9, 1]), [9])


def test_errors():
    with pytest.raises(ValueError, match="depth"):
        NeedleTask()(128, 1.5)
    with pytest.raises(ValueError, match="too short"):
        NeedleTask(needles=8)(20, 0.5)
    with pytest.raises(ValueError, match="unknown task"):
        get_task("haystack")
    with pytest.raises(ValueError, match="distinct"):
        NeedleTask(needles=65)(4096, 0.5)


def test_vocab_and_tokenizer():
    v = SyntheticVocab()
    assert v.size == 8 + 64 * 3
    text = "<s> f3 <kv> k5 v9 f0 <q> k5"
    ids = v.encode(text)
    assert v.decode(ids) == text
    tok = synthetic_tokenizer()
    assert tok(text, add_special_tokens=False)["input_ids"] == ids
    assert tok.decode(ids) == text
    with pytest.raises(ValueError):
        v.encode("k999")
