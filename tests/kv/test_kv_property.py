"""Property: whenever the budget covers the whole context, every KV policy gives Full's logits exactly.

Random prompt lengths, decode lengths, page sizes, budgets (>= every token the cache will hold) and
policy hyper-parameters; every policy registered by the kv plug-in takes part (LeoAM included once
it is registered), so a new policy that loses anything within budget fails here.
"""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmsys.cache import CachePolicy, PagedCache
from llmsys.kv import Full
from llmsys.models import forward
from llmsys.registry import get_method, list_methods
from llmsys.testing import greedy_logits, tiny_model

MODEL = tiny_model("qwen2")  # GQA, biases: built once (hypothesis runs the body many times)


def _kv_policies() -> list[str]:
    return sorted(e.name for e in list_methods() if e.plugin == "kv" and e.name != "full")


def _build(name: str, budget: int, data: st.DataObject) -> CachePolicy:
    if name == "streamingllm":
        return get_method(name)(budget=budget, sinks=data.draw(st.integers(0, min(6, budget - 1)), label="sinks"))
    if name == "snapkv":
        return get_method(name)(budget=budget, window=data.draw(st.integers(1, 8), label="window"))
    if name == "h2o":
        return get_method(name)(budget=budget, recent=data.draw(st.integers(0, budget), label="recent"))
    return get_method(name)(budget=budget)


def _logits(policy: CachePolicy, ids: torch.Tensor, new: int, page_size: int) -> torch.Tensor:
    """Prefill logits of the last token, then `new` greedy decode steps: [new + 1, B, vocab]."""
    with PagedCache.from_model(MODEL, policy=policy, page_size=page_size) as cache, torch.no_grad():
        return greedy_logits(MODEL, forward(MODEL, ids, cache=cache), cache, new)


def test_every_kv_policy_is_checked():
    assert {"streamingllm", "quest", "snapkv", "h2o"} <= set(_kv_policies())


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    length=st.integers(2, 48),
    new=st.integers(1, 4),
    page_size=st.integers(1, 16),
    slack=st.integers(0, 24),
    batch=st.integers(1, 2),
    data=st.data(),
)
def test_a_covering_budget_gives_full_logits(length, new, page_size, slack, batch, data):
    ids = torch.randint(3, MODEL.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(length))
    budget = max(length + new, page_size) + slack  # covers every token (Quest needs at least a page)
    full = _logits(Full(), ids, new, page_size)
    for name in _kv_policies():
        policy = _build(name, budget, data)
        assert torch.equal(_logits(policy, ids, new, page_size), full), policy
