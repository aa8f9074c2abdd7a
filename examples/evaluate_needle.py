"""Needle-in-a-haystack with the reference model: a heat map, and accuracy against a KV budget.

    python examples/evaluate_needle.py [--out results/example] [--samples 4]

The "budget" method here is the simplest possible one, keeping only the first token and the last
`budget` fraction of the prompt. It shows how to plug a generate function into the runner and how
`plot_budget` draws accuracy and latency against a budget. Plug-ins compare their methods the same
way.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from llmsys.eval import (
    NeedleTask,
    evaluate,
    format_table,
    generate_method,
    greedy_decode,
    plot_budget,
    plot_heatmap,
)
from llmsys.testing import ReferenceWeightsMissing, analytic_retrieval_model, reference_model


def keep_recent(budget: float):
    """A generate function that sees only <s> + the last `budget` fraction of the prompt."""

    def run(model, ids: torch.Tensor, new_tokens: int):
        keep = max(2, int(budget * ids.shape[1]))
        short = torch.cat([ids[:, :1], ids[:, -keep:]], dim=1)
        res = greedy_decode(model, short, new_tokens)
        return res["tokens"], {"kv_bytes": None}

    return generate_method(run, name=f"recent {budget:g}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="results/example")
    parser.add_argument("--samples", type=int, default=4)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        model = reference_model()
    except ReferenceWeightsMissing as exc:
        print(f"{exc}\nusing the hand-written analytic model instead")
        model = analytic_retrieval_model(attn_implementation="sdpa")

    task = NeedleTask(needles=4)
    full = evaluate(model, task, lengths=(1024, 2048, 4096), samples=args.samples, batch_size=args.samples)
    print(format_table(full))
    plot_heatmap(full, out / "needle_heatmap.png")

    curve = []
    for budget in (0.125, 0.25, 0.5, 1.0):
        res = evaluate(model, task, method=keep_recent(budget), lengths=(2048,), samples=args.samples,
                       batch_size=args.samples, progress=False)
        curve.append((budget, res))
        print(f"keep {budget:>5g} of the prompt: accuracy {res['accuracy']:.2f}")
    plot_budget({"keep recent": curve}, out / "needle_budget.png", latency="total_s",
                xlabel="fraction of the prompt kept", baseline=full)
    print(f"wrote {out / 'needle_heatmap.png'} and {out / 'needle_budget.png'}")


if __name__ == "__main__":
    main()
