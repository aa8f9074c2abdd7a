"""The exactness oracle: at every step, the logits with pruning equal a from-scratch forward over the
working-memory tokens at contiguous positions.

float64 runs on sdpa: transformers' eager attention computes its softmax in float32 even for float64
models, so there even a plain KV-cached decode differs from a full forward by ~1e-7.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from llmsys.models import forward
from llmsys.testing import local_tokenizer, tiny_model
from llmsys.threads import Outcome, ScriptedPolicy, ThreadRunner
from llmsys.threads.synthetic import calculator, synthetic_tree

# a deep tree: 7 tasks over 3 levels, 3 subtask lists (2 nested in the third), 3 tool calls
TREE = synthetic_tree(depth=3, branching=2, top_tasks=1, thought_words=2, conclusion_words=1, tool_every=2, seed=1)
OTHER = synthetic_tree(depth=3, branching=2, top_tasks=1, thought_words=1, conclusion_words=1, tool_every=4, seed=2)
CASES = [  # (family, buffer): every buffer size over the four families
    ("llama", 0),
    ("mistral", 1),
    ("qwen2", 2),
    ("qwen3", 0),
]


@pytest.fixture(scope="module")
def tok():
    return local_tokenizer()


class Oracle:
    """Observer comparing every step's logits with a fresh forward over the working memory."""

    def __init__(self, model):
        self.model = model
        self.diffs: list[float] = []
        self.lengths: list[int] = []

    def __call__(self, view) -> None:
        wm = view.thread.working_memory_ids()
        ids = torch.tensor([wm])
        with torch.no_grad():
            ref = forward(self.model, ids, position_ids=torch.arange(len(wm))[None], logits_to_keep=1).logits[0, -1]
        self.diffs.append((view.logits - ref).abs().max().item())
        self.lengths.append(len(wm))


def run_oracle(family, buffer, dtype, tok, tree=TREE):
    impl = "sdpa" if dtype == torch.float64 else "eager"
    model = tiny_model(family, dtype=dtype, attn_implementation=impl)
    oracle = Oracle(model)
    runner = ThreadRunner(model, tok, tools={"calc": calculator}, pruning_buffer=buffer, system="", page_size=8)
    result = runner.run("Add the numbers.", policy=ScriptedPolicy.from_tree(tok, tree), observer=oracle)
    return result, oracle


@pytest.mark.parametrize("family,buffer", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_pruned_logits_equal_a_fresh_forward(family, buffer, dtype, tok):
    result, oracle = run_oracle(family, buffer, dtype, tok)
    assert result.outcome is Outcome.ANSWERED, result.message
    # the whole tree comes back, pruned subtasks and tool results included
    tree = json.loads(result.text)
    assert tree == result.tree and len(tree["reasoning"][0]["subtasks"][1]["subtasks"]) == 2
    assert len(result.tool_calls) == 3
    assert [c.result for c in result.tool_calls] == [calculator(**c.parameters) for c in result.tool_calls]
    stats = result.stats
    assert len(oracle.diffs) == stats.tokens_generated  # one forward per chosen token (the last needs none)
    assert stats.prunes == 3 - buffer and stats.tokens_pruned > 0
    # buffer 0 prunes a list as soon as it closes (nothing after it to re-encode); larger buffers do
    assert (stats.tokens_reencoded > 0) == (buffer > 0)
    assert 0 < stats.pruned_share < 1
    assert stats.max_position == max(oracle.lengths) - 1 < stats.total_tokens - 1
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert max(oracle.diffs) <= tol, f"worst step {oracle.diffs.index(max(oracle.diffs))}: {max(oracle.diffs):.2e}"
    if buffer == 0:  # every list was pruned: only the top task's own fields stay in working memory
        assert stats.working_memory[-1][1] < stats.total_tokens / 3
        assert result.pruned_tasks() == {(0, 0), (0, 1), (0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1)}


def test_threads_in_one_batch_match_their_own_fresh_forwards(tok):
    model = tiny_model("llama", dtype=torch.float64, attn_implementation="sdpa")
    oracles: dict[int, Oracle] = {}

    def observe(view):
        oracles.setdefault(view.thread.index, Oracle(model))(view)

    trees = [TREE, OTHER]
    runner = ThreadRunner(model, tok, tools={"calc": calculator}, pruning_buffer=1, system="", page_size=4)
    policies = [ScriptedPolicy.from_tree(tok, t) for t in trees]
    questions = ["Add the numbers.", "A longer question, so that the prompts differ in length."]
    results = runner.run_batch(questions, policies, observer=observe)
    assert [r.outcome for r in results] == [Outcome.ANSWERED] * 2
    singles = []
    for i, r in enumerate(results):
        assert r.stats.prunes == 2 and max(oracles[i].diffs) <= 1e-12, (i, max(oracles[i].diffs))
        singles.append(runner.run(questions[i], ScriptedPolicy.from_tree(tok, trees[i])))
        assert singles[-1].text == r.text and singles[-1].stats.tokens_pruned == r.stats.tokens_pruned
    # the shared cache holds the rows' working memories plus masked holes, compacted as they build up
    assert results[0].stats.kv_peak_bytes <= 2 * sum(s.stats.kv_peak_bytes for s in singles)


def test_pages_are_reused_and_positions_stay_bounded(tok):
    tree = synthetic_tree(depth=4, branching=2, top_tasks=2, thought_words=2, conclusion_words=1, tool_every=3)
    model = tiny_model("llama")
    runner = ThreadRunner(model, tok, tools={"calc": calculator}, pruning_buffer=0, system="", page_size=8)
    reserved = []
    result = runner.run(
        "q", ScriptedPolicy.from_tree(tok, tree), observer=lambda v: reserved.append(v.kv.reserved_bytes())
    )
    assert result.ok
    stats = result.stats
    page_bytes = stats.kv_peak_bytes / math.ceil(stats.peak_working_memory / 8)
    # the pool never holds more than its growth factor (1.5x) over the peak working memory...
    assert max(reserved) <= 1.5 * stats.kv_peak_bytes + 4 * page_bytes
    # ... which is far below the transcript, so the same pages served many tokens
    assert stats.kv_peak_bytes < stats.kv_unpruned_bytes / 3
    assert stats.max_position < stats.total_tokens / 3
    assert stats.prunes >= 10
