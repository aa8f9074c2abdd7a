"""The TIMRUN row of `llmsys demo`: a scripted tree with tool calls on a tiny model (~2 s on a CPU)."""

from __future__ import annotations

import time


def demo_row() -> dict:
    """Force a 3-level reasoning tree (2 calculator calls) through a tiny float64 Llama with pruning
    buffer 1 and check, at every step, the logits against a from-scratch forward over the working
    memory; ``ok`` = answered, pruned, tools called, and every step within 1e-12."""
    import torch

    from llmsys.models import forward
    from llmsys.testing import local_tokenizer, tiny_model
    from llmsys.threads import ScriptedPolicy, ThreadRunner
    from llmsys.threads.synthetic import calculator, synthetic_tree

    start = time.perf_counter()
    tokenizer = local_tokenizer()
    model = tiny_model("llama", dtype=torch.float64, attn_implementation="sdpa")
    tree = synthetic_tree(depth=3, branching=2, top_tasks=1, thought_words=1, conclusion_words=1, tool_every=3)
    worst = [0.0]

    def oracle(view) -> None:
        wm = view.thread.working_memory_ids()
        with torch.no_grad():
            ref = forward(model, torch.tensor([wm]), position_ids=torch.arange(len(wm))[None], logits_to_keep=1)
        worst[0] = max(worst[0], (view.logits - ref.logits[0, -1]).abs().max().item())

    runner = ThreadRunner(model, tokenizer, tools={"calc": calculator}, pruning_buffer=1, system="")
    result = runner.run("Add the numbers.", policy=ScriptedPolicy.from_tree(tokenizer, tree), observer=oracle)
    s = result.stats
    ok = result.ok and s.prunes > 0 and len(result.tool_calls) == 2 and worst[0] <= 1e-12
    text = (
        f"scripted 3-level tree, {s.tokens_generated} tokens, {len(result.tool_calls)} tool calls: "
        f"{s.prunes} prunes, KV pruned {s.pruned_share:.0%}, max position {s.max_position}/{s.total_tokens}, "
        f"max |dlogit| vs fresh forward {worst[0]:.1e} ({time.perf_counter() - start:.1f}s)"
    )
    return {"plugin": "threads", "method": "TIMRUN", "result": text, "ok": bool(ok)}
