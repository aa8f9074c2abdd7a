"""The bitsandbytes 4-bit backend on CPU: absmax is the live scale; double quantisation refused or converted."""

from __future__ import annotations

import pytest
import torch

from llmsys.qzo import QZO, DoubleQuantizationError, bnb_available, bnb_scales, quantize_bnb, quantized_scales
from llmsys.testing import tiny_model

pytestmark = pytest.mark.skipif(not bnb_available(), reason="bitsandbytes is not installed")

X = torch.randint(3, 512, (4, 12), generator=torch.Generator().manual_seed(0))


def loss(model):
    return lambda: model(input_ids=X, labels=X).loss


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_absmax_is_read_live_and_trained(quant_type):
    model = tiny_model("llama")
    names = quantize_bnb(model, quant_type)
    assert len(names) == 14
    scales = bnb_scales(model)
    assert all(t.dtype == torch.float32 for _, t in scales)
    with torch.no_grad():
        before = model(input_ids=X).logits
        scales[-1][1].mul_(2.0)  # the last MLP projection's scales: its output doubles
        assert not torch.allclose(model(input_ids=X).logits, before)
        scales[-1][1].div_(2.0)
        torch.testing.assert_close(model(input_ids=X).logits, before)

    opt = QZO(model, lr=1e-3)
    start = [t.clone() for _, t in scales]
    weights = [model.get_submodule(n).weight.detach().clone() for n in names]
    for _ in range(2):
        opt.step(loss(model))
    assert any(not torch.equal(s, t) for s, (_, t) in zip(start, scales))
    assert all(torch.equal(w, model.get_submodule(n).weight) for w, n in zip(weights, names))  # codes frozen


def test_double_quant_refused_or_converted_once():
    model = tiny_model("llama")
    quantize_bnb(model, "nf4", double_quant=True)
    with pytest.raises(DoubleQuantizationError, match="double_quant='dequantize'"):
        QZO(model, lr=1e-3)
    with torch.no_grad():
        before = model(input_ids=X).logits
    opt = QZO(model, lr=1e-3, double_quant="dequantize")
    assert all(t.dtype == torch.float32 for _, t in quantized_scales(model))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=X).logits, before, atol=1e-5, rtol=1e-5)
    opt.step(loss(model))
    assert opt.steps == 1 and opt.last.applied


def test_from_pretrained_with_bitsandbytes_config_on_cpu():
    """The usual path for real checkpoints: transformers + BitsAndBytesConfig (the committed reference
    model's folder, no download)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from llmsys.testing.reference import PACKAGE_DIR, has_weights

    if not has_weights(PACKAGE_DIR):
        pytest.skip("reference weights are not installed")
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(PACKAGE_DIR, quantization_config=config, device_map="cpu").eval()
    ids = torch.randint(8, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    opt = QZO(model, lr=1e-5)
    assert len(quantized_scales(model)) == 14
    start = [t.clone() for _, t in quantized_scales(model)]
    opt.step(lambda: model(input_ids=ids, labels=ids).loss)
    assert opt.last.applied and any(not torch.equal(s, t) for s, (_, t) in zip(start, quantized_scales(model)))
