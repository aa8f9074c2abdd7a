"""The hand-written retrieval model solves the synthetic tasks exactly, by the circuit it claims."""

from __future__ import annotations

import pytest
import torch

from llmsys.eval import MQARTask, NeedleTask, VariableTrackingTask, evaluate
from llmsys.testing import analytic_retrieval_model


@pytest.fixture(scope="module")
def model():
    return analytic_retrieval_model(attn_implementation="sdpa")


@pytest.mark.parametrize("length", [32, 256, 1024, 4096])
def test_needle_exact_at_every_depth(model, length):
    depths = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)
    res = evaluate(model, NeedleTask(needles=4), lengths=(length,), depths=depths, samples=2 if length < 4096 else 1,
                   batch_size=2, decode_tokens=1, progress=False)
    assert res["accuracy"] == 1.0


def test_many_needles_and_mqar(model):
    assert evaluate(model, NeedleTask(needles=32), lengths=(512,), depths=(0.0, 0.5, 1.0), samples=2,
                    decode_tokens=1, progress=False)["accuracy"] == 1.0
    assert evaluate(model, MQARTask(queries=6), lengths=(300,), depths=(0.0, 0.5, 1.0), samples=2,
                    decode_tokens=1, progress=False)["accuracy"] == 1.0


@pytest.mark.parametrize("hops", [1, 3])
def test_variable_tracking(model, hops):
    res = evaluate(model, VariableTrackingTask(hops=hops), lengths=(256,), depths=(0.0, 0.5, 1.0), samples=2,
                   progress=False)
    assert res["accuracy"] == 1.0


def test_the_circuit():
    """Layer 0 head 0 attends to the previous token; layer 1 head 0 from a question to the value."""
    eager = analytic_retrieval_model(attn_implementation="eager")
    s = NeedleTask(needles=3)(96, 0.3, seed=1)
    ids = s.prompt_tensor()
    with torch.no_grad():
        out = eager(input_ids=ids, output_attentions=True)
    prev = out.attentions[0][0, 0]  # [T, T]
    t = torch.arange(1, ids.shape[1])
    assert torch.equal(prev[1:].argmax(-1), t - 1)
    assert prev[t, t - 1].min() > 0.99
    match = out.attentions[1][0, 0, -1]  # the question's attention
    value_pos = s.positions[0] + 2
    assert match.argmax().item() == value_pos and match[value_pos] > 0.99


def test_sdpa_and_eager_agree(model):
    eager = analytic_retrieval_model(attn_implementation="eager")
    ids = NeedleTask()(128, 0.5).prompt_tensor()
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, eager(input_ids=ids).logits
    torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-4)


def test_generate_and_limits(model):
    s = NeedleTask()(200, 0.5, seed=4)
    out = model.generate(s.prompt_tensor(), max_new_tokens=1, do_sample=False)
    assert out[0, -1].item() == s.answer[0]
    from llmsys.eval import SyntheticVocab

    with pytest.raises(ValueError, match="at most"):
        analytic_retrieval_model(SyntheticVocab(n_keys=100))
