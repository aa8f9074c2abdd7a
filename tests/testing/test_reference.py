"""The reference model's recipe, data, loss targets, files, loader, CLI - and a short run that learns."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

import llmsys.testing.reference as ref
from llmsys.eval import REFERENCE_VOCAB as V
from llmsys.eval import NeedleTask
from llmsys.testing import analytic_retrieval_model
from llmsys.testing.reference import (
    DEFAULT_RECIPE,
    Recipe,
    ReferenceWeightsMissing,
    build_model_for_tests,
    load_model,
    reference_model,
    save_model,
    train_reference,
)
from llmsys.testing.reference.data import IGNORE, ROWS, Mixture, make_batch
from llmsys.testing.reference.train import _Taps, attention_match_loss, batch_for_step

# a recipe small enough to train for a few steps in a test
SMALL = dataclasses.replace(
    DEFAULT_RECIPE, hidden_size=64, intermediate_size=128, num_heads=2, num_kv_heads=2, lengths=(32,),
    n_keys=16, n_values=16, n_filler=16, tokens_per_step=1024, warmup_steps=20, lr=5e-3,
    mixture=Mixture(dense=0.7, needle=0.1, chain=0.0, skip=0.2, max_facts=6, needle_facts=(2, 4)),
)


def test_recipe_hash_and_round_trip():
    assert DEFAULT_RECIPE.hash() == Recipe().hash()
    assert dataclasses.replace(DEFAULT_RECIPE, seed=1).hash() != DEFAULT_RECIPE.hash()
    data = json.loads(json.dumps(SMALL.to_dict()))
    assert Recipe.from_dict(data) == SMALL and Recipe.from_dict(data).hash() == SMALL.hash()
    with pytest.raises(ValueError, match="unknown"):
        Recipe.from_dict({"learning_rate": 1})


@pytest.mark.parametrize("kind", list(ROWS))
@pytest.mark.parametrize("length", [48, 300])
def test_rows_supervise_only_retrievable_tokens(kind, length):
    rng = np.random.default_rng(0)
    for _ in range(5):
        tokens, labels = ROWS[kind](rng, V, length, Mixture())
        assert len(tokens) == len(labels) == length and tokens[0] == V.BOS
        where = np.flatnonzero(labels != IGNORE)
        assert len(where) > 0
        assert (labels[where] == tokens[where]).all()
        for p in where:
            if kind == "skip":
                assert tokens[p] == tokens[p - 2]
                continue
            # the answer follows the same token earlier in the document: it can be looked up
            prev = tokens[p - 1]
            earlier = [s for s in range(1, p - 1) if tokens[s - 1] == prev]
            assert earlier and all(tokens[s] == tokens[p] for s in earlier if tokens[s - 2] == V.KV)


def test_batches_are_deterministic():
    a = batch_for_step(SMALL, 7, 0)
    b = batch_for_step(SMALL, 7, 0)
    c = batch_for_step(SMALL, 8, 0)
    assert all(torch.equal(x, y) for x, y in zip(a[1:], b[1:]))
    assert not torch.equal(a[1], c[1])
    ids, labels, early = make_batch(np.random.default_rng(0), 64, 16, Mixture())
    assert ids.shape == labels.shape == early.shape == (16, 64)
    assert not ((labels != IGNORE) & (early != IGNORE)).any()  # a token is supervised by one loss


def test_attention_targets_are_what_the_analytic_model_attends_to():
    """The key-matching loss is ~0 for the hand-written induction head, large for a random model."""
    rng = np.random.default_rng(1)
    ids, labels, _ = make_batch(rng, 96, 6, Mixture(dense=1, needle=1, chain=0, skip=0))
    gen = torch.Generator().manual_seed(0)
    analytic = analytic_retrieval_model(attn_implementation="sdpa")
    taps = _Taps(analytic, 0, 1)
    with torch.no_grad():
        analytic(input_ids=ids)
    good = attention_match_loss(analytic, taps.attn_call, ids, labels, 1, 0, 32, gen)
    taps.remove()
    random = ref.train.build_model(DEFAULT_RECIPE)
    taps = _Taps(random, 0, 1)
    with torch.no_grad():
        random(input_ids=ids)
    bad = attention_match_loss(random, taps.attn_call, ids, labels, 1, 0, 32, gen)
    taps.remove()
    assert good.item() < 0.05 < 1.0 < bad.item()


def test_missing_weights_say_how_to_train(monkeypatch, tmp_path):
    monkeypatch.setattr(ref, "PACKAGE_DIR", tmp_path / "pkg")
    monkeypatch.setenv("LLMSYS_CACHE", str(tmp_path / "cache"))
    assert ref.weights_path() is None
    with pytest.raises(ReferenceWeightsMissing, match="train-reference"):
        reference_model()
    with pytest.raises(ReferenceWeightsMissing):
        ref.reference_info()


def test_train_if_missing_uses_the_cache_keyed_by_recipe(monkeypatch, tmp_path):
    monkeypatch.setattr(ref, "PACKAGE_DIR", tmp_path / "pkg")
    monkeypatch.setenv("LLMSYS_CACHE", str(tmp_path / "cache"))
    calls = []

    def fake_train(out, device, minutes, recipe):
        calls.append((out, recipe.hash()))
        save_model(build_model_for_tests(SMALL), out, recipe)

    monkeypatch.setattr(ref, "train_reference", fake_train)
    model = reference_model(train_if_missing=True)
    assert calls and calls[0][0] == tmp_path / "cache" / "reference" / DEFAULT_RECIPE.hash()
    assert model.config.hidden_size == SMALL.hidden_size
    reference_model()  # now found in the cache: no training
    assert len(calls) == 1


def test_save_and_load_round_trip(tmp_path):
    model = build_model_for_tests(SMALL).eval()
    save_model(model, tmp_path, SMALL, {"steps": 0})
    loaded = load_model(tmp_path)
    ids = NeedleTask(vocab=SMALL.vocab)(32, 0.5).prompt_tensor()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    info = ref.reference_info(tmp_path)
    assert info["recipe"]["hash"] == SMALL.hash()
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tmp_path)  # a standard HF folder too
    assert type(hf).__name__ == "LlamaForCausalLM"


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_cli_train_writes_the_files_and_is_deterministic(tmp_path):
    from llmsys.testing.reference.cli import main

    # 14 steps over two length stages (the second opens at step 1): batches made ahead by the
    # worker for the old stage must be remade
    args = ["train", "--steps", "14", "--set", "hidden_size=64", "--set", "intermediate_size=128",
            "--set", "num_heads=2", "--set", "num_kv_heads=2", "--set", "lengths=[32,40]", "--set", "n_keys=16",
            "--set", "n_values=16", "--set", "n_filler=16", "--set", "stage_accuracy=0", "--set", "stage_min_steps=1",
            "--set", "tokens_per_step=256", "--eval-lengths", "48", "--eval-samples", "1", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--out", str(tmp_path / "b"), "--workers", "1"]) == 0  # worker processes: same data
    for name in ("config.json", "model.safetensors", "recipe.json", "eval.json", "train_log.jsonl"):
        assert (tmp_path / "a" / name).is_file()
    recipe = json.loads((tmp_path / "a" / "recipe.json").read_text())
    assert recipe["steps"] == 14 and recipe["hash"] == Recipe.from_dict(recipe["recipe"]).hash()
    assert recipe["stages"][0]["step"] == 1 and recipe["final_length"] == 40
    table = json.loads((tmp_path / "a" / "eval.json").read_text())
    assert table["lengths"] == [48] and len(table["cells"]) == 5 and "extra" in table
    wa, wb = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    load_model(tmp_path / "a")


def test_a_short_run_learns(tmp_path):
    """Loss falls and answer accuracy rises far above chance (1/16) in 100 steps of a tiny model."""
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    logs = []
    summary = train_reference(
        tmp_path, steps=100, minutes=None, recipe=SMALL, eval_lengths=(32,), eval_samples=2,
        progress=False, callback=logs.append,
    )
    first = np.mean([r["loss"] for r in logs[:2]])
    last = np.mean([r["loss"] for r in logs[-3:]])
    assert last < first - 1.0, (first, last)
    assert np.mean([r["acc"] for r in logs[-3:]]) > 0.3
    assert np.mean([r["skip_loss"] for r in logs[-3:]]) < logs[0]["skip_loss"] - 0.2  # previous-token read-out
    assert summary["steps"] == 100


def test_installed_weights_meet_the_targets():
    """The committed reference weights (when present) load and retrieve at 1K tokens."""
    if ref.weights_path() is None:
        pytest.skip("reference weights not installed yet")
    model = reference_model()
    from llmsys.eval import evaluate

    res = evaluate(model, NeedleTask(), lengths=(1024,), depths=(0.0, 0.5, 1.0), samples=2, batch_size=6,
                   decode_tokens=1, progress=False)
    assert res["accuracy"] >= 5 / 6
