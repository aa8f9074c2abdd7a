"""`llmsys demo` / `make demo`: one row per capability, each run on a tiny model in seconds.

The foundation row generates through the llmsys paged cache and reports its agreement with
transformers' DynamicCache. Each plug-in contributes its row through `llmsys.<plugin>.demo.demo_row`.
"""

from __future__ import annotations

import importlib
import json
import logging
import time
from collections.abc import Callable

import torch

from llmsys.registry import PLUGINS

log = logging.getLogger(__name__)


def cache_row(family: str = "llama", new_tokens: int = 32) -> dict:
    """Greedy decoding through PagedCache vs DynamicCache on a tiny model: same tokens, same logits."""
    from transformers import DynamicCache

    from llmsys.cache import PagedCache
    from llmsys.models import forward
    from llmsys.testing import tiny_model

    model = tiny_model(family)
    ids = torch.randint(3, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))

    def decode(cache):
        logits, tokens, step = [], [], ids
        with torch.no_grad():
            for _ in range(new_tokens):
                out = forward(model, step, cache=cache)
                logits.append(out.logits[:, -1])
                step = out.logits[:, -1:].argmax(-1)
                tokens.append(step)
        return torch.stack(logits), torch.cat(tokens, dim=1)

    ref_logits, ref_tokens = decode(DynamicCache(config=model.config))
    with PagedCache(model.config, page_size=8) as cache:
        logits, tokens = decode(cache)
        pages = cache.layers[0].num_pages
    diff = (logits - ref_logits).abs().max().item()
    same = bool(torch.equal(tokens, ref_tokens))
    return {
        "plugin": "cache",
        "method": f"PagedCache ({family})",
        "result": f"{new_tokens} greedy tokens x2 rows: identical={same}, "
        f"max |dlogit|={diff:.1e}, pages/layer={pages}",
        "ok": same and diff <= 1e-5,
    }


def _plugin_row(name: str) -> dict:
    paper = PLUGINS[name][0]
    try:
        module = importlib.import_module(f"llmsys.{name}.demo")
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith(f"llmsys.{name}"):
            return {"plugin": name, "method": paper, "result": "not yet implemented", "ok": None}
        raise
    return module.demo_row()


def reference_row() -> dict:
    """The trained reference model's needle accuracy (the quality yardstick of the plug-ins)."""
    from llmsys.eval.demo import demo_row

    return demo_row()


def rows() -> list[Callable[[], dict]]:
    return [cache_row, reference_row, *[(lambda n=n: _plugin_row(n)) for n in PLUGINS]]


def run_demo(as_json: bool = False) -> int:
    # Every row uses tiny models: intra-op threads only add overhead (several times slower on 2 cores).
    torch.set_num_threads(1)
    results = []
    for row in rows():
        start = time.perf_counter()
        try:
            result = row()
        except Exception as exc:  # a broken row is reported, and fails the demo, but the table prints
            log.exception("demo row failed")
            result = {"plugin": getattr(row, "__name__", "?"), "method": "?", "result": repr(exc), "ok": False}
        result["seconds"] = round(time.perf_counter() - start, 2)
        results.append(result)
        if not as_json:
            mark = {True: "ok", False: "FAIL", None: "-"}[result["ok"]]
            line = f"{result['plugin']:8s} {result['method']:26s} {mark:4s} {result['seconds']:6.2f}s"
            print(f"{line}  {result['result']}")
    if as_json:
        print(json.dumps(results, indent=2))
    return 0 if all(r["ok"] is not False for r in results) else 1
