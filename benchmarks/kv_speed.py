"""LeoAM speed benchmark (issue #5): decode latency per token against context length, and disk bytes.

    python benchmarks/kv_speed.py [--quick] [--out benchmarks/results/kv_speed.json] [--contexts 4096,32768]

On a random-weight Llama (few layers, GQA; the model's weights do not matter for speed) whose KV
exceeds the device budget, each decode step (one token, batch 1) is timed for:

- ``full``: transformers' `DynamicCache`, everything in device memory (the bound without transfers;
  note it concatenates the whole KV at every step, as transformers does);
- ``offload``: `llmsys.kv.WholeKVOffloadCache` - the whole KV of each layer is copied host -> device
  at every step and attended with the same attention as ``full`` (FlexGen-style, no overlap);
- ``hf_offload``: transformers' `DynamicCache(offloading=True)` (layer-wise offload with prefetch of
  the next layer; CUDA only - recorded as skipped elsewhere);
- ``leoam``: `LeoAMCache` - device budget, host budget, the rest on disk (8-bit pages), speculative
  prefetch of the next layer on the background thread; ``leoam_no_prefetch`` the same cache with
  prefetch switched off (alternating with ``leoam`` on the same cache, so the two see the same state).

Each variant decodes from the same prompt; the median over the timed steps is reported. Results:
``decode_ms[variant][context]``, ``decode_speedup_vs_offload`` (offload / LeoAM at the longest
context, LeoAM as `LeoAMCache` defaults to: prefetch on a CUDA device, off on a CPU - named in
``leoam_default``; both variants' ratios in ``decode_speedup_vs_offload_by_variant``),
``disk_bytes_ratio`` (bytes a scorer without abstracts would read from disk per token - every
disk-resident chunk as stored - over the bytes LeoAM read from disk per token), bytes moved per token,
the abstracts' device bytes (``leoam_report.abstract_bytes``) and LeoAM's hit / prefetch statistics.
``run_speed(quick, out_dir)`` is what benchmarks/kv.py imports; ``--quick`` runs two short contexts
(well under 3 minutes on 2 cores). ``--prefill-only`` runs LeoAM with its prefill-only chunks
(``refine=False, rechunk=False``) instead of the adaptive default, to compare the two.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine_info, print_table, write_json  # noqa: E402

log = logging.getLogger("benchmarks.kv_speed")
ROOT = Path(__file__).resolve().parents[1]
PAGE = 64


def make_model(max_len: int):
    from llmsys.testing import tiny_model

    torch.manual_seed(0)
    # 2 layers, 4 query heads over 2 KV heads of 64 dims: 1 KiB of fp32 K+V per token and layer
    return tiny_model(
        "llama",
        num_hidden_layers=2,
        hidden_size=256,
        intermediate_size=512,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=max_len + 64,
    )


@torch.no_grad()
def _prefill_dense(model, ids: torch.Tensor, chunk: int = 1024):
    from transformers import DynamicCache

    from llmsys.models import forward

    cache = DynamicCache(config=model.config)
    for start in range(0, ids.shape[1] - 1, chunk):
        piece = ids[:, start : min(start + chunk, ids.shape[1] - 1)]
        forward(model, piece, cache=cache, position_ids=torch.arange(start, start + piece.shape[1])[None])
    return cache


class _Stream:
    """One variant's decode stream: its cache, its next token and position, its step times."""

    def __init__(self, name: str, model, cache, ids: torch.Tensor, setup=None):
        self.name, self.model, self.cache, self.setup = name, model, cache, setup
        self.token, self.pos, self.times = ids[:, -1:], ids.shape[1] - 1, []

    @torch.no_grad()
    def step(self, timed: bool) -> None:
        from llmsys.models import forward

        if self.setup is not None:
            self.setup()
        start = time.perf_counter()
        out = forward(self.model, self.token, cache=self.cache, position_ids=torch.tensor([[self.pos]]))
        self.token = out.logits[:, -1:].argmax(-1)
        if self.token.is_cuda:
            torch.cuda.synchronize()
        if timed:
            self.times.append((time.perf_counter() - start) * 1e3)
        self.pos += 1


def _fill(cache, dense) -> None:
    for i, layer in enumerate(dense.layers):
        cache.update(layer.keys, layer.values, i)


def bench_context(model, context: int, steps: int, warmup: int, disk_root: Path) -> dict[str, Any]:
    """Prefill `context` tokens into every variant, then decode them round-robin (one step each in
    turn, so that load from other processes hits every variant alike)."""
    from transformers import DynamicCache

    from llmsys.kv import LeoAMCache, WholeKVOffloadCache

    g = torch.Generator().manual_seed(context)
    ids = torch.randint(3, model.config.vocab_size, (1, context), generator=g)
    row: dict[str, Any] = {"context": context}
    t0 = time.perf_counter()
    dense = _prefill_dense(model, ids)
    row["prefill_s_full"] = time.perf_counter() - t0
    row["kv_bytes"] = sum(2 * layer.keys.numel() * layer.keys.element_size() for layer in dense.layers)

    offload = WholeKVOffloadCache(model.config)
    _fill(offload, dense)
    streams = [_Stream("offload", model, offload, ids)]
    skipped: dict[str, str] = {}
    if torch.cuda.is_available():  # pragma: no cover - CPU machines record the skip
        hf = DynamicCache(config=model.config, offloading=True)
        _fill(hf, dense)
        streams.append(_Stream("hf_offload", model, hf, ids))
    else:
        skipped["hf_offload"] = "skipped: needs CUDA"
    streams.insert(0, _Stream("full", model, dense, ids))

    # LeoAM: 1/32 of the context attended (at least 256 tokens), the device holds twice that, the
    # host a quarter of the context, the rest goes to disk
    budget = max(256, context // 32)
    device_budget = 2 * budget + 8 * PAGE
    host_budget = context // 4
    cache = LeoAMCache.from_model(
        model, device_budget=device_budget, host_budget=host_budget, budget=budget, disk_dir=disk_root,
        page_size=PAGE, sink=4, window=64, min_chunk=64, max_chunk=1024, prefetch=True, **LEOAM_OPTIONS,
    )  # fmt: skip
    try:
        t0 = time.perf_counter()
        cache.prefill(model, ids)
        row["prefill_s_leoam"] = time.perf_counter() - t0
        row["leoam_setup"] = {"budget": budget, "device_budget": device_budget, "host_budget": host_budget,
                              "page_size": PAGE, "prefill_chunk": cache.max_prefill_chunk}  # fmt: skip

        def prefetch(on: bool):
            def setup() -> None:
                cache.policy.prefetch = on

            return setup

        # the two LeoAM variants share the cache (and its state) and alternate
        leo = _Stream("leoam", model, cache, ids, prefetch(True))
        leo_np = _Stream("leoam_no_prefetch", model, cache, ids, prefetch(False))
        streams += [leo, leo_np]
        naive_disk, disk_read = [], 0
        for i in range(warmup + steps):
            timed = i >= warmup
            if i == warmup:
                cache.mark_decode_start()
            for s in streams:
                if s is leo_np:
                    s.token, s.pos = leo.token, leo.pos  # continue LeoAM's own stream
                elif s is leo and i > 0:
                    s.token, s.pos = leo_np.token, leo_np.pos
                if s.cache is cache and timed:
                    # what a scorer without abstracts would read: every page file on disk, as stored
                    naive_disk.append(cache.disk_store.stored_bytes())
                    read0 = cache.disk_store.bytes_read
                s.step(timed)
                if s.cache is cache and timed:
                    disk_read += cache.disk_store.bytes_read - read0
        cache.policy.prefetch = True
        report = cache.report()
        row["leoam_report"] = report
        leo_disk = disk_read / (2 * steps)
        naive = statistics.mean(naive_disk)
        row["naive_disk_bytes_per_token"] = naive
        row["leoam_disk_bytes_per_token"] = leo_disk
        row["disk_bytes_ratio"] = naive / leo_disk if leo_disk > 0 else None
        row["leoam_bytes_moved_per_token"] = report["bytes_moved_per_token"]
    finally:
        cache.close()
    row["offload_bytes_moved_per_token"] = row["kv_bytes"]
    row["decode_ms"] = {s.name: statistics.median(s.times) for s in streams} | skipped
    row["decode_ms_min"] = {s.name: min(s.times) for s in streams}
    return row


def plot(path: Path, rows: list[dict[str, Any]], title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    contexts = [r["context"] for r in rows]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in ("full", "offload", "hf_offload", "leoam", "leoam_no_prefetch"):
        ys = [r["decode_ms"].get(name) for r in rows]
        if all(isinstance(y, (int, float)) for y in ys):
            ax.plot(contexts, ys, marker="o", label=name)
    bx.plot(contexts, [r["offload_bytes_moved_per_token"] for r in rows], marker="o", label="offload: moved")
    bx.plot(contexts, [r["leoam_bytes_moved_per_token"] or 0 for r in rows], marker="o", label="leoam: moved")
    bx.plot(
        contexts,
        [r["naive_disk_bytes_per_token"] for r in rows],
        marker="s",
        ls="--",
        label="score by loading: disk read",
    )
    bx.plot(
        contexts, [max(r["leoam_disk_bytes_per_token"], 1) for r in rows], marker="s", ls="--", label="leoam: disk read"
    )
    for axis, ylabel, panel in ((ax, "decode ms / token (median)", "decode latency"),
                                (bx, "bytes per decoded token", "bytes per token")):  # fmt: skip
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("context (tokens)")
        axis.set_ylabel(ylabel)
        axis.set_title(panel, fontsize=10)
        axis.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


LEOAM_OPTIONS: dict[str, Any] = {}  # extra LeoAMCache arguments (--prefill-only: refine/rechunk off)


def run_speed(
    quick: bool, out_dir: Path, contexts: list[int] | None = None, name: str | None = None
) -> dict[str, Any]:
    """Run the speed benchmark; write `name`.json and `name`.png (default kv_speed[_quick]) into
    `out_dir`; return the result."""
    out_dir = Path(out_dir)
    if contexts is None:
        contexts = [2048, 8192] if quick else [2048, 4096, 8192, 16384, 32768]
    steps, warmup = (6, 2) if quick else (12, 3)
    model = make_model(max(contexts) + 2 * (steps + warmup) + 8)
    info = machine_info()
    rows = []
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kv-speed-") as disk_root:
        for context in contexts:
            log.info("context %d", context)
            rows.append(bench_context(model, context, steps, warmup, Path(disk_root)))
            print(f"context {context}: {rows[-1]['decode_ms']}", flush=True)
    longest = rows[-1]
    # the headline is LeoAMCache's default: prefetch on a CUDA device only (on a CPU the thread competes
    # with the decode for the same cores and memory); both variants are in every row
    default = "leoam" if torch.cuda.is_available() else "leoam_no_prefetch"
    leo = longest["decode_ms"][default]
    result: dict[str, Any] = {
        "machine": info,
        "quick": quick,
        "model": {
            "layers": 2,
            "hidden": 256,
            "heads": 4,
            "kv_heads": 2,
            "head_dim": 64,
            "dtype": "float32",
            "weights": "random",
        },  # fmt: skip
        "steps": steps,
        "warmup": warmup,
        "rows": rows,
        "decode_ms": {name: {r["context"]: r["decode_ms"][name] for r in rows} for name in rows[0]["decode_ms"]},
        "leoam_default": default,
        "decode_speedup_vs_offload": longest["decode_ms"]["offload"] / leo,
        "decode_speedup_vs_offload_by_variant": {
            v: longest["decode_ms"]["offload"] / longest["decode_ms"][v] for v in ("leoam", "leoam_no_prefetch")
        },
        "decode_speedup_vs_full": longest["decode_ms"]["full"] / leo,
        "prefetch_speedup": longest["decode_ms"]["leoam_no_prefetch"] / longest["decode_ms"]["leoam"],
        "disk_bytes_ratio": longest["disk_bytes_ratio"],
        "longest_context": longest["context"],
        "runtime_s": time.perf_counter() - t_start,
        "leoam_options": dict(LEOAM_OPTIONS),
    }
    result["goals"] = {
        "speedup_vs_offload_>=3x_at_32K": None
        if longest["context"] < 32768
        else result["decode_speedup_vs_offload"] >= 3,
        "disk_bytes_ratio_>=10x": None if result["disk_bytes_ratio"] is None else result["disk_bytes_ratio"] >= 10,
    }
    table = [
        {"context": r["context"], **{k: v for k, v in r["decode_ms"].items() if isinstance(v, float)},
         "x_vs_offload": r["decode_ms"]["offload"] / r["decode_ms"][default],
         "disk_ratio": r["disk_bytes_ratio"], "hit_rate": r["leoam_report"]["hit_rate"],
         "prefetch_hit": r["leoam_report"]["prefetch_hit_rate"]}
        for r in rows
    ]  # fmt: skip
    result["table"] = print_table(table, list(table[0].keys()))
    name = name or ("kv_speed_quick" if quick else "kv_speed")
    write_json(out_dir / f"{name}.json", result)
    title = f"LeoAM decode vs context ({info['cpu']}, {torch.get_num_threads()} threads{', quick' if quick else ''})"
    plot(out_dir / f"{name}.png", rows, title)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default benchmarks/results/kv_speed[_quick].json); the PNG goes next to it")
    parser.add_argument("--contexts", type=str, default=None, help="comma-separated context lengths")
    parser.add_argument(
        "--prefill-only", action="store_true", help="LeoAM's prefill-only chunks (refine=False, rechunk=False)"
    )
    args = parser.parse_args(argv)
    if args.prefill_only:
        LEOAM_OPTIONS.update(refine=False, rechunk=False)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    contexts = [int(c) for c in args.contexts.split(",")] if args.contexts else None
    out_dir = ROOT / "benchmarks" / "results" if args.out is None else args.out.parent
    result = run_speed(args.quick, out_dir, contexts, None if args.out is None else args.out.stem)
    print(
        f"\ndecode_speedup_vs_offload={result['decode_speedup_vs_offload']:.2f} "
        f"disk_bytes_ratio={result['disk_bytes_ratio']} (context {result['longest_context']}, "
        f"{result['runtime_s']:.0f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
