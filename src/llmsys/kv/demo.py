"""The LeoAM row of `llmsys demo`: needle retrieval on the reference model with 1/8 of the KV attended."""

from __future__ import annotations

import time

LENGTH = 1024
FRACTION = 8
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


def demo_row(seeds: int = 2) -> dict:
    """Needle accuracy at 1K tokens (5 depths x `seeds`) for Full, LeoAM and StreamingLLM at 1/8 of the KV.

    The context is prefilled into each policy's `PagedCache`, then the question is asked through it
    (`llmsys.kv.protocol`), so the budget matters. `ok`: Full finds >= 90% of the needles and LeoAM
    at most one needle in ten fewer than Full; StreamingLLM, which keeps only the ends of the
    context, is shown for contrast. A few seconds on a CPU.
    """
    from llmsys.cache import PagedCache
    from llmsys.eval import NeedleTask, evaluate, generate_method
    from llmsys.kv import Full, LeoAM, StreamingLLM
    from llmsys.kv.protocol import context_then_question
    from llmsys.testing.reference import ReferenceWeightsMissing, reference_model

    try:
        model = reference_model()
    except ReferenceWeightsMissing:
        missing = "reference weights not installed: run `llmsys train-reference` (docs/reference-model.md)"
        return {"plugin": "kv", "method": "LeoAM", "result": missing, "ok": None}
    budget = LENGTH // FRACTION
    start = time.perf_counter()
    acc = {}
    policies = {"Full": Full(), "LeoAM": LeoAM(budget=budget), "StreamingLLM": StreamingLLM(budget=budget)}
    for name, policy in policies.items():
        method = generate_method(context_then_question(lambda m, p=policy: PagedCache.from_model(m, policy=p)))
        result = evaluate(model, NeedleTask(), method, [LENGTH], DEPTHS, seeds, batch_size=len(DEPTHS) * seeds,
                          decode_tokens=1, progress=False, seed=321)  # fmt: skip
        acc[name] = result["accuracy"]
    n = len(DEPTHS) * seeds
    text = f"reference model, needle at 1K, {budget} of {LENGTH} tokens attended: "
    text += ", ".join(f"{k} {v:.2f}" for k, v in acc.items())
    text += f" ({n} samples; {time.perf_counter() - start:.1f}s)"
    ok = acc["Full"] >= 0.9 and acc["LeoAM"] >= acc["Full"] - 0.1 - 1e-9
    return {"plugin": "kv", "method": "LeoAM (1/8 KV)", "result": text, "ok": bool(ok)}
