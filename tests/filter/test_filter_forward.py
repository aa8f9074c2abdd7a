"""GemFilter on plain forwards (hand-written decoding loops, `llmsys.eval`), and on a model that retrieves."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from llmsys.cache import PagedCache
from llmsys.filter import GemFilter, calibrate_layer
from llmsys.models import forward, generate, output_cache
from llmsys.testing import tiny_model

LENGTH = 40
NEW = 5


def _loop(model, ids, cache, steps=NEW):
    """Greedy decoding with plain forwards and no positions or mask: what a notebook loop does."""
    tokens = []
    with torch.no_grad():
        out = forward(model, ids, cache=cache)
        first_logits = out.logits
        for _ in range(steps):
            cache = output_cache(out)
            token = out.logits[:, -1:].argmax(-1)
            tokens.append(token)
            out = forward(model, token, cache=cache)
    return first_logits, torch.cat(tokens, dim=1)


@pytest.mark.parametrize("positions", ["contiguous", "original"])
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_a_decoding_loop_matches_generate(family, positions):
    model = tiny_model(family, num_hidden_layers=3)
    ids = torch.randint(3, 500, (2, LENGTH), generator=torch.Generator().manual_seed(0))
    method = GemFilter(layer=1, topk=12, positions=positions)
    with method(model) as gem:
        expected = generate(model, ids, max_new_tokens=NEW, do_sample=False)[:, LENGTH:]
        kept = gem.selection.indices.clone()
        logits, tokens = _loop(model, ids, DynamicCache(config=model.config))
        assert torch.equal(gem.selection.indices, kept)
        _, paged = _loop(model, ids, PagedCache(model.config, page_size=4))
        if positions == "original":
            _, own_cache = _loop(model, ids, None)  # the context supplies (and follows) the cache
            assert torch.equal(own_cache, expected)
    assert logits.shape[:2] == (2, 12)  # the prefill forward saw the kept tokens only
    assert torch.equal(tokens, expected)
    assert torch.equal(paged, expected)
    assert not model._forward_pre_hooks  # removed on exit


def test_short_prompts_and_training_forwards_pass_through():
    model = tiny_model("llama", num_hidden_layers=2)
    ids = torch.randint(3, 500, (1, LENGTH), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = model(ids).logits
        with GemFilter(layer=1, topk=LENGTH)(model) as gem:
            assert torch.equal(model(ids).logits, plain)
            assert gem.selection is None
        with GemFilter(layer=1, topk=8)(model) as gem:
            assert model(ids, labels=ids).logits.shape[1] == LENGTH  # a loss needs every position
            assert model(input_ids=ids).logits.shape[1] == 8
            assert gem.selection.kept.tolist() == [8]


def _needle_model():
    analytic = pytest.importorskip("llmsys.testing.analytic")
    return analytic.analytic_retrieval_model()


def test_needle_retrieval_depends_on_the_filter_layer():
    """On the hand-written retrieval model, layer 1 (the key-matching head) finds the needle, layer 0 does not."""
    from llmsys.eval.tasks import NeedleTask, exact_match

    model = _needle_model()
    task = NeedleTask()
    samples = [task(512, depth, seed=0) for depth in (0.0, 0.25, 0.5, 0.75, 1.0)]
    ids = torch.tensor([s.prompt for s in samples])
    hits = {}
    for layer in (0, 1):
        with GemFilter(layer=layer, topk=16)(model) as gem:
            out = generate(model, ids, max_new_tokens=1, do_sample=False)[:, 512:]
        hits[layer] = sum(exact_match(row, s.answer) for row, s in zip(out, samples))
        if layer == 1:  # the kept tokens include the asked fact
            for row, s in zip(gem.selection.indices, samples):
                assert {s.positions[0], s.positions[0] + 1, s.positions[0] + 2} <= set(row.tolist())
    assert hits == {0: hits[0], 1: 5} and hits[0] < 5


def test_calibration_finds_the_retrieval_layer():
    from llmsys.eval.tasks import NeedleTask

    result = calibrate_layer(_needle_model(), task=NeedleTask(), lengths=(256,))
    assert result.layer == 1 and not result.fallback and result.recall[1] == 1.0


def test_eval_runner_takes_gemfilter_as_a_method():
    runner = pytest.importorskip("llmsys.eval.runner")
    from llmsys.eval.tasks import NeedleTask

    model = _needle_model()
    kwargs = dict(lengths=[256], depths=[0.0, 0.5, 1.0], samples=2, progress=False)
    good = runner.evaluate(model, NeedleTask(), method=GemFilter(layer=1, topk=16), **kwargs)
    bad = runner.evaluate(model, NeedleTask(), method=GemFilter(layer=0, topk=16), **kwargs)
    assert good["accuracy"] == 1.0 and bad["accuracy"] < 1.0
