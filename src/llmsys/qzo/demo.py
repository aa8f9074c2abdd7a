"""The QZO row of `llmsys demo`: int4-quantise a tiny Llama and fine-tune its scales with QZO (a few seconds)."""

from __future__ import annotations

import time


def demo_row() -> dict:
    """Quantise a tiny Llama to int4 (group 32), run 40 QZO steps on one fixed batch and report the loss
    before / after, what was trained and the checkpoint size; ``ok`` = the loss went down and nothing
    but the scales changed."""
    import torch

    from llmsys.qzo import QZO, quantize_int4, train
    from llmsys.testing import tiny_model

    start = time.perf_counter()
    model = tiny_model("llama")
    ids = torch.randint(3, model.config.vocab_size, (8, 16), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids}
    quantize_int4(model, group_size=32, backend="reference")
    frozen = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith(".scales")}
    opt = QZO(model, lr=2e-3, eps=1e-3)
    with torch.no_grad():
        before = float(model(**batch).loss)
    result = train(model, opt, lambda step: batch, 40, progress=False)
    with torch.no_grad():
        after = float(model(**batch).loss)
    untouched = all(torch.equal(v, model.state_dict()[k]) for k, v in frozen.items())
    ok = after < before and untouched and result.skipped_steps == 0
    text = (
        f"tiny Llama int4 g32: {opt.num_trained()} scales trained ({4 * opt.num_trained() / 1024:.0f} kB "
        f"checkpoint), loss {before:.4f} -> {after:.4f} in 40 steps, codes/norms untouched={untouched} "
        f"({time.perf_counter() - start:.1f}s)"
    )
    return {"plugin": "qzo", "method": "QZO", "result": text, "ok": bool(ok)}
