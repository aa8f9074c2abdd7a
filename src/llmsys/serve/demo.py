"""The `llmsys demo` row of the serve plug-in: the engine equals `generate`, and one simulator line."""

from __future__ import annotations

import torch


def demo_row() -> dict:
    """Six concurrent requests of mixed lengths through the Nexus engine vs `model.generate` on a tiny
    Llama, and P99 TBT of Nexus vs chunked prefill on two simulated loads (default profile)."""
    from llmsys.models import generate
    from llmsys.serve.engine import Engine
    from llmsys.serve.request import SamplingParams
    from llmsys.serve.schedulers import ChunkedPrefill, Nexus
    from llmsys.serve.simulator import simulate
    from llmsys.serve.workload import synthetic_workload
    from llmsys.testing import tiny_model

    model = tiny_model("llama")
    gen = torch.Generator().manual_seed(0)
    lengths, news = [3, 40, 11, 90, 25, 60], [12, 6, 16, 9, 14, 8]
    prompts = [torch.randint(3, model.config.vocab_size, (n,), generator=gen) for n in lengths]
    with torch.no_grad():
        refs = [generate(model, p[None], max_new_tokens=n, do_sample=False)[0, p.numel() :].tolist()
                for p, n in zip(prompts, news)]  # fmt: skip
    with Engine(model, "nexus", page_size=8, num_pages=128) as engine:
        outs = engine.generate(prompts, [SamplingParams(max_new_tokens=n) for n in news])
        engine.check()
    same = sum(o.tokens == r for o, r in zip(outs, refs))

    # the simulator on the default profile (8B-shaped on an H100: assumptions, not a measurement),
    # one decode-heavy and one prefill-heavy load: P99 TBT of Nexus / chunked prefill
    tbt = {}
    for name, rate, n, slo in (("sharegpt", 30.0, 200, 1.0), ("arxiv", 2.0, 60, 5.0)):
        workload = synthetic_workload(name, rate=rate, num_requests=n, seed=0)
        tbt[name] = [
            simulate(s, workload, ttft_slo=slo).metrics.tbt.p99 * 1e3 for s in (Nexus(ttft_slo=slo), ChunkedPrefill())
        ]
    return {
        "plugin": "serve",
        "method": "Nexus",
        "result": (
            f"engine == generate for {same}/{len(refs)} concurrent requests; simulated P99 TBT Nexus/chunked "
            f"(default 8B/H100-shaped profile, not measured): ShareGPT-like 30 req/s {tbt['sharegpt'][0]:.0f}/"
            f"{tbt['sharegpt'][1]:.0f} ms, arXiv-like 2 req/s {tbt['arxiv'][0]:.0f}/{tbt['arxiv'][1]:.0f} ms"
        ),
        "ok": same == len(refs),
    }
