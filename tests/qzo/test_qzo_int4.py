"""llmsys int4 layers: round-to-nearest quantisation, the GPTQ layout, and models built from them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from llmsys.qzo import Int4Linear, QuantizationError, load_gptq, quantize_int4
from llmsys.testing import every_dense_family, tiny_model


def batch(vocab=512, rows=2, length=12, seed=0):
    return torch.randint(3, vocab, (rows, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("group", [32, 64, 128])
def test_rtn_error_within_half_a_step(group):
    lin = nn.Linear(256, 24)
    q = Int4Linear.from_linear(lin, group, backend="reference")
    err = (q.dequantize() - lin.weight.detach()).abs().reshape(24, -1, group)
    step = q.scales.float()[..., None]
    assert torch.all(err <= step / 2 + 1e-6)
    assert q.zeros.max() <= 15
    x = torch.randn(3, 256)
    torch.testing.assert_close(q(x), x @ q.dequantize().T + lin.bias.detach())


def naive_gptq_dequant(qweight, qzeros, scales, group, offset=1):
    """W[k, n] = scales[g, n] * (q[k, n] - (z[g, n] + offset)) read word by word (GPTQ's layout)."""
    k, n = qweight.shape[0] * 8, qweight.shape[1]
    w = torch.empty(k, n)
    for kk in range(k):
        for nn_ in range(n):
            q = (int(qweight[kk // 8, nn_]) >> (4 * (kk % 8))) & 0xF
            z = ((int(qzeros[kk // group, nn_ // 8]) >> (4 * (nn_ % 8))) & 0xF) + offset
            w[kk, nn_] = float(scales[kk // group, nn_]) * (q - z)
    return w.T  # [N, K]


def test_gptq_layout_round_trip():
    lin = nn.Linear(64, 16, bias=False)
    q = Int4Linear.from_linear(lin, 32, backend="reference")
    if int(q.zeros.min()) == 0:  # the "gptq" format cannot store zero 0 with offset 1
        q.zeros.clamp_(min=1)
    g = q.to_gptq()
    assert g["qweight"].shape == (8, 16) and g["qzeros"].shape == (2, 2) and g["scales"].shape == (2, 16)
    torch.testing.assert_close(
        naive_gptq_dequant(g["qweight"], g["qzeros"], g["scales"].float(), 32), q.dequantize(), atol=1e-3, rtol=1e-3
    )
    back = Int4Linear.from_gptq(g["qweight"], g["qzeros"], g["scales"], g["g_idx"], dtype=torch.float32)
    assert torch.equal(back.codes, q.codes) and torch.equal(back.zeros, q.zeros)
    torch.testing.assert_close(back.scales, q.scales.half().float())


def test_gptq_refuses_act_order_and_bad_shapes():
    lin = nn.Linear(64, 16, bias=False)
    g = Int4Linear.from_linear(lin, 32).to_gptq(zero_offset=0)
    perm = g["g_idx"][torch.randperm(64, generator=torch.Generator().manual_seed(0))]
    with pytest.raises(QuantizationError, match="act-order"):
        Int4Linear.from_gptq(g["qweight"], g["qzeros"], g["scales"], perm, zero_offset=0)
    with pytest.raises(QuantizationError, match="inconsistent GPTQ shapes"):
        Int4Linear.from_gptq(g["qweight"], g["qzeros"][:1], g["scales"], zero_offset=0)
    with pytest.raises(QuantizationError, match="int32"):
        Int4Linear.from_gptq(g["qweight"].to(torch.int64), g["qzeros"], g["scales"])


def test_load_gptq_checkpoint_matches_quantised_model(tmp_path):
    from safetensors.torch import save_file

    ids = batch()
    source = tiny_model("llama")
    names = quantize_int4(source, 32, backend="reference")
    for name in names:
        source.get_submodule(name).zeros.clamp_(min=1)  # storable with the "gptq" +1 offset
    state = {}
    for name, module in source.named_modules():
        if isinstance(module, Int4Linear):
            state.update({f"{name}.{k}": v for k, v in module.to_gptq().items()})
            module.scales.copy_(module.scales.half().float())  # the checkpoint stores fp16 scales
    for name, p in source.named_parameters():
        if not any(name.startswith(n + ".") for n in names):
            state[name] = p.detach().clone()
    save_file(state, str(tmp_path / "model.safetensors"))

    target = tiny_model("llama", seed=1)  # other random weights: everything must come from the file
    loaded = load_gptq(target, tmp_path, backend="reference")
    assert sorted(loaded) == sorted(names)
    with torch.no_grad():
        torch.testing.assert_close(target(input_ids=ids).logits, source(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_load_gptq_without_quantised_tensors():
    with pytest.raises(QuantizationError, match="qweight"):
        load_gptq(tiny_model("llama"), {"model.norm.weight": torch.ones(64)})


def test_quantize_bad_group_names_the_fix():
    with pytest.raises(QuantizationError, match="group_size"):
        quantize_int4(tiny_model("llama"), 128)  # hidden 64 < group 128


@every_dense_family
def test_int4_model_close_to_full_precision(family):
    ids = batch()
    model = tiny_model(family)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        quantize_int4(model, 32, backend="reference")
        got = model(input_ids=ids).logits
    assert not any(type(m) is nn.Linear for n, m in model.named_modules() if n != "lm_head")
    rel = (got - ref).norm() / ref.norm()
    assert 0 < rel < 0.2  # quantised (not identical) but the same model


def test_triton_backend_in_a_model_matches_reference():
    from llmsys.kernels import use_triton

    if not use_triton("cpu"):
        pytest.skip("needs TRITON_INTERPRET=1 (set by `make test`) to run the kernel on CPU")
    ids = batch(rows=1, length=8)
    model = tiny_model("llama", num_hidden_layers=1)
    names = quantize_int4(model, 32, backend="reference")
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        for n in names:
            model.get_submodule(n).backend = "triton"
        torch.testing.assert_close(model(input_ids=ids).logits, ref, atol=1e-4, rtol=1e-4)
