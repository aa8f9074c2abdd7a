"""The runner with each kind of method, its measurements, tables, plots and the CLI."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
from transformers import DynamicCache

from llmsys.eval import (
    NeedleTask,
    VariableTrackingTask,
    accuracy_grid,
    as_method,
    cache_method,
    context_method,
    evaluate,
    format_table,
    generate_method,
    kv_bytes,
    plot_budget,
    plot_heatmap,
)
from llmsys.testing import analytic_retrieval_model, tiny_model

LENGTHS = (64, 128)
DEPTHS = (0.0, 1.0)


@pytest.fixture(scope="module")
def analytic():
    return analytic_retrieval_model()


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("llama")


def _generate(model, ids, n):
    return model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0)


@contextlib.contextmanager
def _scramble_logits(model):
    """A method that breaks the model: proves the context manager is really applied."""
    handle = model.lm_head.register_forward_hook(lambda m, a, out: out.flip(-1))
    try:
        yield
    finally:
        handle.remove()


METHODS = {
    "none": None,
    "full": "full",
    "context": lambda model: contextlib.nullcontext(),
    "cache": lambda model: DynamicCache(config=model.config),
    "cache0": lambda: DynamicCache(),
    "generate": _generate,
}


@pytest.mark.parametrize("kind", list(METHODS))
def test_each_method_kind_on_the_analytic_model(analytic, kind):
    result = evaluate(analytic, NeedleTask(), method=METHODS[kind], lengths=LENGTHS, depths=DEPTHS, samples=2,
                      progress=False)
    expected = {"none": "full", "full": "full", "context": "context", "cache": "cache", "cache0": "cache",
                "generate": "generate"}[kind]
    assert result["method_kind"] == expected
    assert result["accuracy"] == 1.0
    assert accuracy_grid(result) == [[1.0, 1.0], [1.0, 1.0]]
    json.dumps(result)  # JSON-able
    cell = result["cells"][0]
    assert cell["n"] == 2 and cell["correct"] == 2
    if expected != "generate":
        assert cell["prefill_s"] > 0 and cell["decode_s_per_token"] > 0
        assert cell["kv_bytes"] > 0
    else:
        assert cell["total_s"] > 0
    assert cell["peak_memory_bytes"] is None or cell["peak_memory_bytes"] > 0


def test_kv_bytes_match_the_cache(analytic):
    result = evaluate(analytic, NeedleTask(), lengths=(128,), depths=(0.5,), samples=1, decode_tokens=3,
                      progress=False)
    cfg = analytic.config
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 4  # K and V, fp32
    assert result["cells"][0]["kv_bytes"] == per_token * (128 + 2)  # the prompt + 2 decoded tokens cached


def test_context_manager_is_applied(analytic):
    broken = evaluate(analytic, NeedleTask(), method=context_method(_scramble_logits, name="scramble"),
                      lengths=(64,), depths=DEPTHS, samples=2, progress=False)
    assert broken["method"] == "scramble" and broken["accuracy"] == 0.0


def test_multi_token_answers_and_batches(analytic):
    result = evaluate(analytic, VariableTrackingTask(hops=2), lengths=(128,), depths=DEPTHS, samples=3,
                      batch_size=3, progress=False)
    assert result["accuracy"] == 1.0
    assert all(len(p) == 3 for c in result["cells"] for p in c["predictions"])


def test_tiny_random_model_runs_and_fails(tiny):
    result = evaluate(tiny, "needle", lengths=(64,), depths=(0.5,), samples=3, progress=False)
    assert result["accuracy"] <= 1 / 3 + 1e-9  # random weights do not retrieve
    assert result["model"]["model_type"] == "llama"


def test_explicit_wrappers_and_guessing(tiny):
    assert as_method(None).kind == "full"
    assert as_method(cache_method(lambda m: DynamicCache())).kind == "cache"
    assert as_method(lambda m: DynamicCache(), tiny).kind == "cache"
    assert as_method(lambda m: contextlib.nullcontext(), tiny).kind == "context"
    assert as_method(generate_method(_generate, name="hf")).name == "hf"
    assert as_method(_generate).kind == "generate"
    with pytest.raises(TypeError, match="factory"):
        as_method(DynamicCache())
    with pytest.raises(TypeError, match="neither"):
        as_method(lambda m: 3, tiny)
    with pytest.raises(TypeError):
        as_method(42)


def test_paged_cache_as_a_method(analytic):
    cache_mod = pytest.importorskip("llmsys.cache")
    try:
        factory = cache_mod.PagedCache.from_model
        factory(analytic).close()
    except Exception as exc:  # the cache package is developed alongside; report, don't fail here
        pytest.skip(f"PagedCache.from_model unavailable: {exc!r}")
    result = evaluate(analytic, NeedleTask(), method=cache_method(factory, name="paged"), lengths=(128,),
                      depths=DEPTHS, samples=1, progress=False)
    assert result["accuracy"] == 1.0
    assert result["cells"][0]["kv_bytes"] > 0


def test_table_and_plots(analytic, tmp_path):
    result = evaluate(analytic, NeedleTask(), lengths=LENGTHS, depths=DEPTHS, samples=1, progress=False)
    text = format_table(result)
    assert "128" in text and "overall accuracy 1.000" in text
    heat = plot_heatmap(result, tmp_path / "heat.png")
    budget = plot_budget({"full": [(0.5, result), (1.0, result)]}, tmp_path / "budget.png", baseline=result)
    for path in (heat, budget):
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_cli_eval(tmp_path, capsys):
    from llmsys.eval.cli import main

    code = main(["eval", "--model", "analytic", "--task", "mqar", "--lengths", "96", "--depths", "0,1",
                 "--samples", "1", "--out", str(tmp_path), "--quiet"])
    assert code == 0
    out = capsys.readouterr().out
    assert "mqar / full" in out
    data = json.loads((tmp_path / "mqar_full_analytic.json").read_text())
    assert data["accuracy"] == 1.0
    assert (tmp_path / "mqar_full_analytic.png").is_file()


def test_cli_subcommand_adders():
    import argparse

    from llmsys.eval.cli import add_parser

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))  # adds eval and train-reference
    args = parser.parse_args(["eval", "--lengths", "1024,2048", "--method", "full"])
    assert args.lengths == (1024, 2048) and callable(args.handler)
    args = parser.parse_args(["train-reference", "--device", "cuda", "--minutes", "5", "--out", "x"])
    assert args.minutes == 5 and callable(args.handler)


def test_demo_row_without_weights(monkeypatch):
    import llmsys.testing.reference as ref
    from llmsys.eval.demo import demo_row

    monkeypatch.setattr(ref, "weights_path", lambda *a, **k: None)
    row = demo_row()
    assert row["plugin"] == "eval" and row["ok"] is None and "train-reference" in row["result"]


def test_bad_arguments(tiny):
    with pytest.raises(ValueError):
        evaluate(tiny, "needle", samples=0, progress=False)
    with pytest.raises(ValueError, match="unknown task"):
        evaluate(tiny, "nope", progress=False)


def test_kv_bytes_helper():
    assert kv_bytes(None) is None
    cache = DynamicCache()
    k = torch.zeros(1, 2, 5, 4)
    cache.update(k, k, 0)
    assert kv_bytes(cache) == 2 * k.numel() * 4
