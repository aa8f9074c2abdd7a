"""The `llmsys demo` row of the harness: the reference model's needle accuracy at 1K / 2K / 4K."""

from __future__ import annotations

import time

LENGTHS = (1024, 2048, 4096)
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


def demo_row(samples: int = 1) -> dict:
    """Needle accuracy of the reference model (4 needles, 5 depths x `samples` per length), ~10 s on CPU."""
    from llmsys.eval.runner import evaluate
    from llmsys.eval.tasks import NeedleTask
    from llmsys.testing.reference import ReferenceWeightsMissing, reference_model

    try:
        model = reference_model()
    except ReferenceWeightsMissing:
        return {
            "plugin": "eval",
            "method": "reference model",
            "result": "weights not installed: run `llmsys train-reference` (docs/reference-model.md)",
            "ok": None,
        }
    start = time.perf_counter()
    result = evaluate(
        model, NeedleTask(), lengths=LENGTHS, depths=DEPTHS, samples=samples, batch_size=len(DEPTHS) * samples,
        decode_tokens=1, progress=False, seed=123,
    )
    accs = [result["by_length"][str(L)]["accuracy"] for L in LENGTHS]
    text = "needle acc 1K/2K/4K = " + "/".join(f"{a:.2f}" for a in accs)
    text += f" ({len(DEPTHS) * samples} per length, 4 needles; {time.perf_counter() - start:.1f}s)"
    return {
        "plugin": "eval",
        "method": "reference model",
        "result": text,
        "ok": bool(min(accs) >= 0.8 and sum(accs) / len(accs) >= 0.9),
    }
