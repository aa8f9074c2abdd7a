"""`train`: scale-only checkpoints, exact resume, eval, skipped steps, and the first-order baselines."""

from __future__ import annotations

import pytest
import torch

from llmsys.qzo import (
    QZO,
    CheckpointError,
    first_order,
    load_checkpoint,
    lora,
    quantize_int4,
    quantized_scales,
    train,
)
from llmsys.testing import tiny_model


def data(step: int) -> dict[str, torch.Tensor]:
    x = torch.randint(3, 512, (4, 12), generator=torch.Generator().manual_seed(1000 + step))
    return {"input_ids": x, "labels": x}


def int4_model():
    model = tiny_model("llama")
    quantize_int4(model, 32, backend="reference")
    return model


def scales_of(model):
    return [t.detach().clone() for _, t in quantized_scales(model)]


def test_resume_is_exact_and_checkpoints_hold_only_scales(tmp_path):
    straight = int4_model()
    train(straight, QZO(straight, lr=1e-3, seed=5), data, 6, progress=False)

    first = int4_model()
    r1 = train(first, QZO(first, lr=1e-3, seed=5), data, 3, checkpoint_dir=tmp_path, progress=False)
    ckpt = tmp_path / "step_0000003"
    from safetensors.torch import load_file

    saved = load_file(str(ckpt / "tensors.safetensors"))
    assert set(saved) == {n for n, _ in quantized_scales(first)}
    n_model = sum(t.numel() for t in first.state_dict().values())
    assert sum(t.numel() for t in saved.values()) < n_model / 10

    resumed = int4_model()  # a fresh process would start like this
    r2 = train(resumed, QZO(resumed, lr=1e-3, seed=99), data, 6, checkpoint_dir=tmp_path, progress=False)
    assert r2.resumed_from == 3 and [h["step"] for h in r2.history] == [1, 2, 3, 4, 5, 6]
    assert r2.losses[:3] == r1.losses
    for a, b in zip(scales_of(straight), scales_of(resumed)):
        assert torch.equal(a, b)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_0000003", "step_0000006"]


def test_checkpoint_of_another_model_is_refused(tmp_path):
    model = int4_model()
    train(model, QZO(model, lr=1e-3), data, 1, checkpoint_dir=tmp_path, progress=False)
    other = int4_model()
    opt = QZO(other, lr=1e-3, train_unquantized=lambda n, p: "norm" in n)
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "step_0000001", opt)


def test_eval_and_non_finite_steps_are_counted():
    model = int4_model()
    evals = []

    def loss_fn(m, batch):
        loss = m(**batch).loss
        return loss * float("nan") if evals else loss  # NaN once the first eval (step 2) has run

    def eval_fn(m):
        evals.append(1)
        return {"acc": 0.5}

    before = scales_of(model)
    result = train(model, QZO(model, lr=1e-3), data, 4, loss_fn=loss_fn, eval_fn=eval_fn, eval_every=2, progress=False)
    assert [e["step"] for e in result.evals] == [2, 4]
    assert result.skipped_steps == 2  # steps 3 and 4 saw NaN after the first eval
    assert any(not torch.equal(a, b) for a, b in zip(before, scales_of(model)))


@pytest.mark.parametrize("method", ["sgd", "adamw"])
def test_first_order_baselines_learn(method):
    model = tiny_model("llama")
    opt = first_order(model, method, lr=0.5 if method == "sgd" else 1e-2)
    fixed = data(0)
    result = train(model, opt, lambda s: fixed, 5, progress=False)
    assert result.losses[-1] < result.losses[0]
    with pytest.raises(ValueError, match="zeroth-order"):
        train(model, opt, data, 1, checkpoint_dir="unused", progress=False)


def test_lora_baseline_trains_adapters_only():
    pytest.importorskip("peft")
    model = tiny_model("llama")
    base = [(p, p.detach().clone()) for p in model.parameters()]
    wrapped, opt = lora(model, r=4, lr=1e-2)
    fixed = data(0)
    result = train(wrapped, opt, lambda s: fixed, 5, progress=False)
    assert result.losses[-1] < result.losses[0]
    trained = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    assert all(torch.equal(p, copy) for p, copy in base)  # PEFT keeps the original tensors as base layers


def test_micro_batches_must_divide_the_batch():
    model = int4_model()
    with pytest.raises(ValueError, match="not divisible"):
        train(model, QZO(model, lr=1e-3), data, 1, micro_batches=3, progress=False)


# -- the default loss: no KV cache, no float32 copies of the logits, the same numbers --------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_default_loss_is_the_models_own_loss_bit_for_bit(dtype):
    import importlib

    train_mod = importlib.import_module("llmsys.qzo.train")
    model = tiny_model("llama", dtype=dtype)
    x = torch.randint(3, 512, (3, 17), generator=torch.Generator().manual_seed(4))
    labels = x.clone()
    labels[0, :5] = -100  # ignored positions
    batch = {"input_ids": x, "labels": labels}
    with torch.no_grad():
        own = model(**batch).loss
        for chunk in (4, 4 * 512 * 5, train_mod.LOSS_CHUNK_BYTES):  # 1 row, 5 rows, the default
            train_mod.LOSS_CHUNK_BYTES, saved = chunk, train_mod.LOSS_CHUNK_BYTES
            try:
                assert torch.equal(train_mod.causal_lm_loss(model, batch), own)
            finally:
                train_mod.LOSS_CHUNK_BYTES = saved
    with torch.enable_grad():  # with autograd: the model's own path (and its graph)
        loss = train_mod.causal_lm_loss(model, batch)
        assert loss.requires_grad and torch.equal(loss.detach(), own)


def test_default_loss_builds_no_kv_cache_and_no_float_logits():
    from llmsys.qzo import causal_lm_loss

    model = tiny_model("llama", dtype=torch.bfloat16)
    x = torch.randint(3, 512, (2, 64), generator=torch.Generator().manual_seed(4))
    batch = {"input_ids": x, "labels": x}
    seen = []

    def spy(module, args, kwargs, output):
        seen.append((kwargs.get("use_cache"), output))

    handle = model.register_forward_hook(spy, with_kwargs=True)
    with torch.no_grad():
        causal_lm_loss(model, batch)
    handle.remove()
    use_cache, output = seen[0]
    assert use_cache is False and getattr(output, "cache", None) is None
    assert output.loss is None and output.logits.dtype == torch.bfloat16  # the loss never made fp32 logits


def test_qzo_with_the_lean_loss_takes_the_same_steps_as_with_the_models_loss():
    runs = []
    for loss_fn in (None, lambda m, b: m(**b).loss):
        model = int4_model()
        model.to(torch.bfloat16)
        opt = QZO(model, lr=1e-3, seed=3)
        kwargs = {} if loss_fn is None else {"loss_fn": loss_fn}
        r = train(model, opt, data, 3, progress=False, **kwargs)
        runs.append((r.losses, scales_of(model)))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))
