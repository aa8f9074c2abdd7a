"""Page-size ablation of the KV quality benchmark: Quest and LeoAM at 1/8 of the KV, pages of 16 / 8 / 4 tokens.

    python benchmarks/kv_pages.py [--quick] [--out benchmarks/results/kv_pages.json]

Same model, tasks, protocol and grid as `benchmarks/kv.py --parts quality` (the reference model,
needle and MQAR, context then question; 1K/2K/4K x 5 depths x 4 samples), only the cache's page size
changes. Quest attends whole pages and LeoAM's chunks are runs of whole pages (`min_chunk` = one
page here), so the page is the finest unit either can select: this measures what that granularity
costs, and whether LeoAM's gap to Full at 1/8 (docs/kv.md) is a granularity effect.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kv  # noqa: E402  (benchmarks/kv.py: its quality() and cache factories)
from _common import machine_info, print_table, write_json  # noqa: E402

PAGE_SIZES = (16, 8, 4)


def leoam_factory(budget: int, adaptive: bool = True):
    """LeoAM with its smallest chunk = one page of the current page size (kv.py's default: 16 tokens);
    `adaptive=False`: the prefill-only chunks (``refine=False, rechunk=False``)."""
    from llmsys.cache import PagedCache
    from llmsys.kv import LeoAM

    page = kv.PAGE_SIZE
    kw = {} if adaptive else {"refine": False, "rechunk": False}
    return lambda model: PagedCache.from_model(
        model, policy=LeoAM(budget=budget, min_chunk=page, **kw), page_size=page
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1K and 2K prompts, 2 samples per depth")
    parser.add_argument("--out", default="benchmarks/results/kv_pages.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from llmsys.testing import reference_model

    model = reference_model().eval()
    lengths, samples = ([1024, 2048], 2) if args.quick else ([1024, 2048, 4096], 4)
    depths = [0.0, 0.25, 0.5, 0.75, 1.0]
    kv.FRACTIONS = {"1/8": 8}  # quality() reads the module's fractions, page size and factories
    kv.leoam_factory = leoam_factory
    start, results, rows = time.perf_counter(), {}, []
    for page in PAGE_SIZES:
        kv.PAGE_SIZE = page
        q = kv.quality(model, lengths, depths, samples, ["quest", "leoam"])
        results[str(page)] = {"accuracy": q["accuracy"], "accuracy_by_task": q["accuracy_by_task"]}
        for policy in ("full", "quest", "leoam"):
            by_task = q["accuracy_by_task"]
            rows.append({"page_size": page, "policy": policy, "needle": by_task["needle"][policy]["1/8"],
                         "mqar": by_task["mqar"][policy]["1/8"], "mean": q["accuracy"][policy]["1/8"]})  # fmt: skip
    print_table(rows, ["page_size", "policy", "needle", "mqar", "mean"])
    payload = {"benchmark": "kv_pages", "machine": machine_info(), "quick": args.quick, "lengths": lengths,
               "depths": depths, "samples_per_cell": samples, "fraction": "1/8", "rows": rows, "results": results,
               "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip
    print(f"wrote {write_json(args.out, payload)} in {payload['seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
