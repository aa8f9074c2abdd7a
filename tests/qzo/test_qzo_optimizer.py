"""The QZO / MeZO step: what moves, by how much, from which random numbers; errors and edge cases."""

from __future__ import annotations

import math

import pytest
import torch

from llmsys.qzo import QZO, Int4Linear, MeZO, NoTrainableTensorsError, quantize_int4, quantized_scales
from llmsys.registry import get_method
from llmsys.testing import every_dense_family, tiny_model


def ids(rows=4, length=12, seed=0):
    return torch.randint(3, 512, (rows, length), generator=torch.Generator().manual_seed(seed))


def int4_model(family="llama", **kw):
    model = tiny_model(family, **kw)
    quantize_int4(model, 32, backend="reference")
    return model


def lm_loss(model, x):
    return lambda: model(input_ids=x, labels=x).loss


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_registered():
    assert get_method("qzo") is QZO and get_method("mezo") is MeZO


@pytest.mark.parametrize("perturb", ["forward", "in_place"])
def test_step_matches_the_formula_and_moves_only_scales(perturb):
    model, x = int4_model(), ids()
    opt = QZO(model, lr=1e-2, eps=1e-3, clip=100.0, seed=3, perturb=perturb)
    before = snapshot(model)
    scales = [t.detach().clone() for _, t in quantized_scales(model)]
    seed = opt.step_seed(0)

    # independent recomputation: each tensor's z from a fresh generator seeded with its own seed
    zs = [torch.randn(s.shape, generator=torch.Generator().manual_seed(opt.tensor_seed(seed, i)))
          for i, s in enumerate(scales)]
    losses = []
    with torch.no_grad():
        for sign in (1, -1):
            for (_, t), s, z in zip(quantized_scales(model), scales, zs):
                t.copy_(s + sign * 1e-3 * z)
            losses.append(float(lm_loss(model, x)()))
        for (_, t), s in zip(quantized_scales(model), scales):
            t.copy_(s)
    d = (losses[0] - losses[1]) / 2e-3

    opt.step(lm_loss(model, x))
    assert opt.last.projected_grad == pytest.approx(d, rel=1e-5, abs=1e-6)
    for (_, t), s, z in zip(quantized_scales(model), scales, zs):
        torch.testing.assert_close(t, (s - 1e-2 * opt.last.projected_grad * z).clamp(min=1e-7))
    after = snapshot(model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith(".scales") for k in changed)
    assert all(p.grad is None for p in model.parameters())
    assert opt.state_dict()["steps"] == 1 and len(opt.state) == 0  # no per-tensor optimizer state


@pytest.mark.parametrize("backend", ["int4", "nf4"])
def test_forward_and_in_place_perturbation_take_identical_steps(backend):
    runs = []
    for perturb in ("forward", "in_place"):
        model = tiny_model("llama")
        if backend == "int4":
            quantize_int4(model, 32, backend="reference")
        else:
            pytest.importorskip("bitsandbytes")
            from llmsys.qzo import quantize_bnb

            quantize_bnb(model, "nf4")
        opt = QZO(model, lr=1e-2, eps=1e-3, seed=5, perturb=perturb, train_unquantized=lambda n, p: "norm" in n)
        losses = [float(opt.step(lm_loss(model, ids(seed=k)))) for k in range(3)]
        runs.append((losses, [t.detach().clone() for t in opt.named_tensors().values()]))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))


def test_global_rng_untouched():
    model, x = int4_model(), ids()
    opt = QZO(model, lr=1e-3)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    opt.step(lm_loss(model, x))
    assert torch.equal(torch.rand(3), expected)


def _scales_seen_by_the_layers(model):
    """Record each Int4Linear's scales as its forward sees them (the forward mode shifts them only there)."""
    seen = {}

    def spy(module, args, output):  # registered first, so it runs before the optimizer's restoring hook
        seen[module] = module.scales.detach().clone()

    return seen, [m.register_forward_hook(spy) for m in model.modules() if isinstance(m, Int4Linear)]


@pytest.mark.parametrize("perturb", ["forward", "in_place"])
def test_exact_restore_between_and_after_passes(perturb):
    model, x = int4_model(), ids()
    opt = QZO(model, lr=1e-3, eps=1e-2, perturb=perturb)
    layers = [m for m in model.modules() if isinstance(m, Int4Linear)]
    start = [m.scales.detach().clone() for m in layers]
    seen, handles = _scales_seen_by_the_layers(model)
    passes, outside = [], []

    def closure():
        model(input_ids=x)
        passes.append([seen[m] for m in layers])
        outside.append([m.scales.detach().clone() for m in layers])
        return torch.tensor(float("nan")) if len(passes) == 2 else torch.tensor(1.0)

    opt.step(closure)
    for h in handles:
        h.remove()
    plus, minus = passes
    for s, p, m in zip(start, plus, minus):
        torch.testing.assert_close((p - s), -(m - s))  # +eps z and -eps z around the same point
        assert not torch.equal(p, s)
    if perturb == "forward":  # outside the layers' forward the scales are never shifted
        assert all(torch.equal(o, s) for seen_then in outside for o, s in zip(seen_then, start))
    for s, m in zip(start, layers):
        assert torch.equal(m.scales, s)  # skipped (NaN) step: bit-exact restore
    assert opt.skipped_steps == 1 and opt.last.applied is False


@pytest.mark.parametrize("perturb", ["forward", "in_place"])
def test_a_closure_that_raises_leaves_the_scales_as_they_were(perturb):
    model, x = int4_model(), ids()
    opt = QZO(model, lr=1e-3, eps=1e-2, perturb=perturb, train_unquantized=lambda n, p: "norm" in n)
    start = {n: t.detach().clone() for n, t in opt.named_tensors().items()}
    layer = [m for m in model.modules() if isinstance(m, Int4Linear)][-1]
    handle = layer.register_forward_hook(lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        opt.step(lm_loss(model, x))
    handle.remove()
    assert all(torch.equal(t, start[n]) for n, t in opt.named_tensors().items())
    assert opt.steps == 0


def test_non_finite_loss_is_skipped_and_counted():
    model, x = int4_model(), ids()
    opt = QZO(model, lr=1e-3)
    before = snapshot(model)
    opt.step(lambda: torch.tensor(float("inf")))
    assert opt.skipped_steps == 1
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    opt.step(lm_loss(model, x))  # the next finite step is applied
    assert opt.skipped_steps == 1 and opt.steps == 2 and opt.last.applied


def test_clipping_bounds_the_update_and_scales_stay_positive():
    model = int4_model()
    start = [t.detach().clone() for _, t in quantized_scales(model)]
    calls = iter([1e6, -1e6])  # d = 1e12 / eps: far past the clip
    opt = QZO(model, lr=1e-4, eps=1e-3, clip=5.0)
    opt.step(lambda: torch.tensor(next(calls)))
    assert opt.clipped_steps == 1 and opt.last.clipped
    for i, (s, (_, t)) in enumerate(zip(start, quantized_scales(model))):
        z = torch.randn(s.shape, generator=torch.Generator().manual_seed(opt.tensor_seed(opt.step_seed(0), i)))
        torch.testing.assert_close(t, (s - 1e-4 * 5.0 * z).clamp(min=1e-7))

    huge = QZO(model, lr=10.0, clip=None, min_scale=1e-5)
    calls = iter([1.0, 0.0])
    huge.step(lambda: torch.tensor(next(calls)))
    assert huge.clipped_steps == 0
    floor = torch.tensor(1e-5).item()  # 1e-5 in fp32
    assert min(float(t.min()) for _, t in quantized_scales(model)) == floor  # d=1000, lr=10: many hit the clamp


def test_loss_decreases_on_a_fixed_batch():
    model, x = int4_model(), ids()
    opt = QZO(model, lr=2e-3, eps=1e-3)
    with torch.no_grad():
        first = float(lm_loss(model, x)())
    for _ in range(25):
        opt.step(lm_loss(model, x))
    with torch.no_grad():
        assert float(lm_loss(model, x)()) < first - 1e-3


def test_train_unquantized_moves_norms_too():
    model, x = int4_model(), ids()
    opt = QZO(model, lr=1e-3, train_unquantized=lambda name, p: "norm" in name, unquantized_lr=1e-4)
    before = snapshot(model)
    opt.step(lm_loss(model, x))
    after = snapshot(model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any("norm" in k for k in changed) and any(k.endswith(".scales") for k in changed)
    assert all(k.endswith(".scales") or "norm" in k for k in changed)
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 1e-4]


def test_unquantized_only_model_when_asked():
    model, x = tiny_model("llama"), ids()
    opt = QZO(model, lr=1e-4, train_unquantized=True)
    opt.step(lm_loss(model, x))
    assert len(opt.param_groups) == 1 and opt.num_trained() == sum(p.numel() for p in model.parameters())


BAD = [
    (dict(lr=0.0), "lr must be > 0"),
    (dict(lr=-1e-3), "lr must be > 0"),
    (dict(lr=1e-3, eps=0.0), "eps must be > 0"),
    (dict(lr=1e-3, eps=-1.0), "eps must be > 0"),
    (dict(lr=1e-3, clip=0.0), "clip must be > 0"),
]


@pytest.mark.parametrize("kwargs, match", BAD)
def test_bad_hyper_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QZO(int4_model(), **kwargs)


def test_no_quantised_layers_names_the_fix():
    with pytest.raises(NoTrainableTensorsError, match="quantize_int4.*train_unquantized=True"):
        QZO(tiny_model("llama"), lr=1e-3)


def test_step_needs_a_closure():
    with pytest.raises(ValueError, match="closure"):
        QZO(int4_model(), lr=1e-3).step()


def test_mezo_walk_and_exact_restore_variants():
    x = ids()
    for exact in (False, True):
        model = tiny_model("llama")
        opt = MeZO(model, lr=1e-5, eps=1e-3, exact_restore=exact)
        before = snapshot(model)
        opt.step(lambda: torch.tensor(1.0))  # d = 0: the step must bring the weights back to where they were
        for k, v in before.items():
            if exact:
                assert torch.equal(model.state_dict()[k], v)
            else:  # +eps, -2eps, +eps in fp32: back within rounding
                torch.testing.assert_close(model.state_dict()[k], v, atol=1e-6, rtol=0)
        opt.step(lm_loss(model, x))
        assert math.isfinite(opt.last.projected_grad)


@every_dense_family
def test_every_family_two_steps(family):
    model, x = int4_model(family), ids(rows=2, length=8)
    opt = QZO(model, lr=1e-3)
    start = [t.detach().clone() for _, t in quantized_scales(model)]
    for _ in range(2):
        loss = opt.step(lm_loss(model, x))
    assert math.isfinite(float(loss)) and opt.steps == 2
    assert any(not torch.equal(s, t) for s, (_, t) in zip(start, quantized_scales(model)))
    linears = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear]
    assert linears == ["lm_head"] and any(isinstance(m, Int4Linear) for m in model.modules())


@pytest.mark.gpu
def test_gpu_qzo_step_triton_matches_reference():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from llmsys.kernels import interpreter_enabled, triton_available

    if not triton_available() or interpreter_enabled():
        pytest.skip("needs compiled Triton kernels (triton installed, TRITON_INTERPRET unset)")
    x = ids().cuda()
    results = []
    for backend in ("triton", "reference"):
        model = tiny_model("llama").cuda()
        quantize_int4(model, 32, backend=backend)
        opt = QZO(model, lr=1e-3)
        for _ in range(3):
            opt.step(lm_loss(model, x))
        results.append([t.detach().cpu() for _, t in quantized_scales(model)])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
