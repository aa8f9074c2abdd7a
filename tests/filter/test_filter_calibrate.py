"""``layer="auto"``: the calibration prompts, the recall measurement, the rule, the per-model cache."""

from __future__ import annotations

import logging

import pytest
import torch

import llmsys.filter.calibrate as calibrate_module
from llmsys.eval.tasks import REFERENCE_VOCAB, NeedleTask
from llmsys.filter import GemFilter, calibrate_layer, choose_layer, needle_prompts
from llmsys.testing import tiny_model


def test_rule_takes_the_earliest_layer_close_to_the_best():
    assert choose_layer([0.1, 0.5, 0.95, 1.0, 0.7], chance=0.06) == (2, False)
    assert choose_layer([0.1, 0.5, 0.95, 1.0, 0.7], chance=0.06, tolerance=1.0) == (3, False)
    assert choose_layer([0.9, 0.2, 0.95], chance=0.06) == (0, False)


def test_rule_falls_back_to_the_paper_ratio_without_signal():
    # 32 layers, nothing clearly above chance: the paper's 13 of 32
    assert choose_layer([0.07] * 32, chance=0.0625) == (13, True)
    assert choose_layer([0.1] * 4, chance=0.0625) == (2, True)


def test_generic_prompts_hold_a_needle_and_end_with_its_cue():
    model = tiny_model("llama", num_hidden_layers=2)
    ids, targets = needle_prompts(model, 200, [0.0, 0.5, 1.0])
    assert ids.shape == (3, 200)
    assert bool((ids[:, 0] == model.config.bos_token_id).all())
    for row, wanted in enumerate(targets):
        assert len(wanted) == 8
        first = wanted[0]
        # the 8 tokens before the targets are the needle's head, which the prompt repeats at its end
        assert torch.equal(ids[row, first - 8 : first], ids[row, -8:])
    assert targets[0][0] - 8 == 1 and targets[2][-1] == 200 - 8 - 1  # depth 0 / depth 1


def test_task_prompts_target_the_asked_fact():
    model = tiny_model("llama", num_hidden_layers=2, vocab_size=REFERENCE_VOCAB.size)
    ids, targets = needle_prompts(model, 128, [0.25, 0.75], task=NeedleTask(needles=3))
    for row, wanted in enumerate(targets):
        fact = ids[row, wanted].tolist()
        assert fact[0] == REFERENCE_VOCAB.KV
        assert fact[1] == ids[row, -1].item()  # the question asks for this key


def test_recall_and_choice_on_a_scorer_that_finds_the_needle_at_layer_2(monkeypatch):
    model = tiny_model("llama", num_hidden_layers=5)
    prompts_seen = []

    def fake_layer_scores(model, ids, layers, **kwargs):
        prompts_seen.append(ids.shape)
        gen = torch.Generator().manual_seed(0)
        out = {}
        for layer in layers:
            scores = torch.rand(ids.shape, generator=gen)
            if layer >= 2:  # from layer 2 on, the continuation of the needle scores highest
                _, targets = needle_prompts(model, ids.shape[1], [0.1, 0.3, 0.5, 0.7, 0.9])
                for row, wanted in enumerate(targets):
                    scores[row, wanted] += 10.0
            out[layer] = scores
        return out

    monkeypatch.setattr(calibrate_module, "layer_scores", fake_layer_scores)
    result = calibrate_layer(model, lengths=(256,))
    assert result.layer == 2 and not result.fallback
    assert result.recall[2:] == (1.0, 1.0, 1.0)
    assert max(result.recall[:2]) < 0.5
    assert result.chance == pytest.approx(16 / 256)
    assert prompts_seen == [(5, 256)]
    assert "filter layer 2" in result.summary()


def test_auto_layer_is_calibrated_once_per_model(caplog):
    model = tiny_model("qwen2", num_hidden_layers=4)
    calls = []
    handle = model.model.layers[0].register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        with caplog.at_level(logging.WARNING, logger="llmsys.filter.calibrate"):
            first = calibrate_layer(model, lengths=(128,))
        assert len(calls) == 1  # one batched forward over the calibration prompts
        # random weights: no layer retrieves, so the documented fallback applies and says so
        assert first.fallback and first.layer == round(4 * 13 / 32)
        assert "paper's ratio" in caplog.text
        assert calibrate_layer(model, lengths=(128,)) is first
        assert len(calls) == 1  # cached
        gem = GemFilter(layer="auto", topk=8)
        assert gem.resolve_layer(model) == calibrate_layer(model).layer
        calls.clear()
        calibrate_layer(model, lengths=(128,), refresh=True)
        assert len(calls) == 1
        other = tiny_model("qwen2", num_hidden_layers=4, seed=1)
        calibrate_layer(other, lengths=(128,))
        assert len(calls) == 1  # another model object: its own calibration (hooks were on the first)
    finally:
        handle.remove()


def test_auto_layer_under_generate():
    model = tiny_model("llama", num_hidden_layers=3)
    ids = torch.randint(3, 500, (1, 30))
    with GemFilter(layer="auto", topk=8)(model) as gem:
        out = model.generate(ids, max_new_tokens=2, do_sample=False)
    assert gem.layer == calibrate_layer(model).layer
    assert out.shape == (1, 32) and gem.selection.kept.tolist() == [8]
