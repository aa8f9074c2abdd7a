"""The MoETuner row of `llmsys demo`: record a tiny Mixtral, place with MoETuner, compare (< 5 s)."""

from __future__ import annotations

import time


def demo_row() -> dict:
    """Record routing of a tiny Mixtral (8 experts, 4 layers), place it on 4 GPUs with the EPLB-style
    greedy and with MoETuner, and report balance and MoETuner-model pair traffic of both; `ok` checks
    that MoETuner's placement is deployable (SGLang format) and as balanced as the greedy (+0.05)."""
    import torch

    from llmsys.models import forward
    from llmsys.moe import EPLBGreedy, MoETuner, RoutingRecorder, evaluate, to_sglang
    from llmsys.testing import tiny_model

    start = time.perf_counter()
    model = tiny_model("mixtral", num_local_experts=8, num_hidden_layers=4)
    ids = torch.randint(3, model.config.vocab_size, (4, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), RoutingRecorder(model) as rec:
        forward(model, ids)
    trace = rec.trace()
    greedy = evaluate(EPLBGreedy(4)(trace), trace, ep_homes=False)
    placement = MoETuner(4, time_limit=3.0)(trace)
    tuned = evaluate(placement, trace, ep_homes=False)
    to_sglang(placement)  # raises if not deployable
    ok = tuned.max_mean_load <= greedy.max_mean_load + 0.05
    result = (
        f"tiny Mixtral 8x4 on 4 GPUs: max/mean load {greedy.max_mean_load:.2f} -> {tuned.max_mean_load:.2f}, "
        f"max pair traffic {greedy.max_pair_traffic:.0f} -> {tuned.max_pair_traffic:.0f} tokens "
        "vs EPLB greedy "
        f"({placement.meta['method']}, {time.perf_counter() - start:.1f}s)"
    )
    return {"plugin": "moe", "method": "MoETuner", "result": result, "ok": bool(ok)}
