"""Why GemFilter loses needle accuracy on the 2-layer reference model: selection misses or second-pass errors?

    python benchmarks/filter_diagnose.py [--topk 256] [--out benchmarks/results/filter_diagnose_k256.json]

On `llmsys.testing.reference_model()` with the filter at layer 1 (what `calibrate_layer` picks), for
the needle grid of benchmarks/filter.py (lengths 1K/2K/4K/8K x depths 0/.25/.5/.75/1 x 2 seeds):

1. selection: is the asked fact (``<kv> k v``) wholly among the kept tokens? Accuracy split by that.
2. pooling of the first-pass scores: the paper's average pool (kernel 5), none (also with the two
   question tokens forced in), max pool (kernel 5). Pools pad with zeros at the ends, as the library
   does; raw scores are mostly strongly negative, so that padding lifts the first and last two tokens
   (the question) into the selection.
3. oracle: GemFilter's selection with the asked fact forced in - the accuracy the second pass reaches
   when the selection is right, i.e. how much of the loss the selection explains.
4. ``positions="original"`` against contiguous positions: how far the answer logits move and whether
   the argmax changes (benchmarks/filter.py found identical accuracy in every cell).

Every variant runs the same two passes: score tokens at layer 1, keep the top `topk`, run the model
on the kept ids only (prefill logits of the last token = the answer).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, write_json  # noqa: E402
from llmsys.eval.tasks import NeedleTask  # noqa: E402
from llmsys.filter import GemFilter  # noqa: E402
from llmsys.filter.selection import check_prompt, filter_scores, select_from_scores  # noqa: E402
from llmsys.models import forward  # noqa: E402
from llmsys.testing import reference_model  # noqa: E402

LENGTHS = (1024, 2048, 4096, 8192)
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
SEEDS = (0, 1)
LAYER = 1
VARIANTS = ("avg5", "original", "none", "none_keep_question", "max5", "oracle")


def asked_fact(ids: torch.Tensor, key: int, marker: int) -> list[int]:
    """Positions of the asked fact's three tokens ``<kv> k v`` in the prompt."""
    row = ids[0].tolist()
    for i in range(len(row) - 2):
        if row[i] == marker and row[i + 1] == key:
            return [i, i + 1, i + 2]
    raise ValueError("asked fact not found in the prompt")


@torch.no_grad()
def answer_logits(model, ids: torch.Tensor, kept: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
    """Last-token logits of the model run on the kept ids only (optionally at given positions)."""
    extra = {} if positions is None else {"position_ids": positions}
    return forward(model, ids[:, kept], logits_to_keep=1, **extra).logits[0, -1].float()


def select(raw: torch.Tensor, ids: torch.Tensor, topk: int, pooling: str, force: list[int] | None = None):
    """Indices kept from raw layer-1 scores ``[1, n]`` under a pooling rule (optionally forcing tokens)."""
    if pooling == "avg5":
        # zero padding at the ends, as the library (and F.avg_pool1d's default) does
        scores = F.avg_pool1d(raw[:, None], 5, stride=1, padding=2)[:, 0]
    elif pooling == "max5":
        scores = F.max_pool1d(F.pad(raw[:, None], (2, 2), value=0.0), 5, stride=1)[:, 0]  # same zero padding
    else:
        scores = raw.clone()
    if force:
        scores[0, force] = float("inf")
    return select_from_scores(scores, check_prompt(ids, None), topk).indices[0]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topk", type=int, default=256)
    parser.add_argument("--out", default=None, help="default: benchmarks/results/filter_diagnose_k<topk>.json")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = reference_model().eval()
    task = NeedleTask()
    marker = task.vocab.KV
    start = time.perf_counter()

    rows = []
    for length in LENGTHS:
        for depth in DEPTHS:
            for seed in SEEDS:
                sample = task(length, depth, seed)
                ids = torch.as_tensor(sample.prompt)[None]
                answer = sample.answer[0]
                fact = asked_fact(ids, sample.keys[0], marker)
                raw = filter_scores(model, ids, layer=LAYER, pool_kernel=1)
                row = {"length": length, "depth": depth, "seed": seed}
                for pooling in ("avg5", "none", "none_keep_question", "max5"):
                    question = list(range(ids.shape[1] - 2, ids.shape[1])) if pooling.endswith("question") else None
                    kept = select(raw, ids, args.topk, pooling.removesuffix("_keep_question"), force=question)
                    row[f"correct_{pooling}"] = bool(answer_logits(model, ids, kept).argmax() == answer)
                    if pooling == "avg5":
                        row["fact_kept"] = set(fact) <= set(kept.tolist())
                        row["fact_tokens_kept"] = len(set(fact) & set(kept.tolist()))
                        # positions="original": the kept tokens keep their prompt positions
                        contiguous = answer_logits(model, ids, kept)
                        original = answer_logits(model, ids, kept, positions=kept[None])
                        row["original_max_logit_diff"] = float((contiguous - original).abs().max())
                        row["original_same_argmax"] = bool(contiguous.argmax() == original.argmax())
                        row["correct_original"] = bool(original.argmax() == answer)
                kept = select(raw, ids, args.topk, "avg5", force=fact)
                row["correct_oracle"] = bool(answer_logits(model, ids, kept).argmax() == answer)
                # the library's own GemFilter (pooling "avg" / "max") must select what the rows above did
                for pooling in ("avg", "max"):
                    library = GemFilter(layer=LAYER, topk=args.topk, pooling=pooling).select(model, ids).indices[0]
                    ours = select(raw, ids, args.topk, f"{pooling}5")
                    row[f"library_matches_{pooling}5"] = bool(torch.equal(library, ours))
                rows.append(row)
                print(row, flush=True)

    def acc(key: str, where=lambda r: True) -> float | None:
        chosen = [r for r in rows if where(r)]
        return sum(r[key] for r in chosen) / len(chosen) if chosen else None

    summary = {
        "accuracy": {p: acc(f"correct_{p}") for p in VARIANTS},
        "accuracy_by_length": {
            p: {n: acc(f"correct_{p}", lambda r, n=n: r["length"] == n) for n in LENGTHS}
            for p in VARIANTS
        },
        "fact_kept_rate": acc("fact_kept"),
        "accuracy_when_fact_kept": acc("correct_avg5", lambda r: r["fact_kept"]),
        "accuracy_when_fact_missed": acc("correct_avg5", lambda r: not r["fact_kept"]),
        "misses_by_depth": {d: sum(not r["fact_kept"] for r in rows if r["depth"] == d) for d in DEPTHS},
        "original_same_argmax_rate": acc("original_same_argmax"),
        "original_max_logit_diff": [min(r["original_max_logit_diff"] for r in rows),
                                    max(r["original_max_logit_diff"] for r in rows)],
        "library_matches": all(r["library_matches_avg5"] and r["library_matches_max5"] for r in rows),
    }
    payload = {"machine": machine_info(), "topk": args.topk, "layer": LAYER, "summary": summary, "rows": rows,
               "seconds": time.perf_counter() - start}
    path = write_json(args.out or f"benchmarks/results/filter_diagnose_k{args.topk}.json", payload)
    print(summary)
    print(f"wrote {path} in {payload['seconds']:.0f} s")
    return payload


if __name__ == "__main__":
    main()
