"""GemFilter benchmark: needle quality, time to first token and peak memory, agreement with kvpress.

    python benchmarks/filter.py [--quick] [--out benchmarks/results/filter.json] [--parts quality,speed,kvpress]

1. quality: needle accuracy (exact match of the answer token) over context length x depth on the
   reference model (`llmsys.testing.reference_model`, falling back to the hand-written
   `analytic_retrieval_model` when the trained weights are not available, and saying so) for full
   attention, GemFilter at several top-k (filter layer from `calibrate_layer` on the needle task;
   also the ``positions="original"`` ablation), and SnapKV and H2O (`llmsys.kv`) at the same budgets.
2. speed: time to first token (`generate(max_new_tokens=1)`) and peak memory against context length
   on a random-weight Llama (57M parameters on a CPU, 0.9B in bf16 on a GPU): full prefill
   (DynamicCache), GemFilter (layer round(L * 13/32), top-1024) and SnapKV (budget 1024, window 32,
   in a PagedCache). Peak memory: CUDA's max_memory_allocated, or on a CPU the peak resident set size
   above the level before the call, sampled every 0.5 ms (malloc is told to return large blocks to
   the system, so the resident size follows the live tensors).
3. kvpress: the speed model and prompts through kvpress's SnapKVPress in its own environment
   (`--kvpress-python`, default .venv-kvpress/bin/python; kvpress pins transformers < 5.3, llmsys
   needs >= 5.17): per layer, does our SnapKV keep the tokens kvpress's scores (averaged over KV
   heads) rank first, and how much of each head's own kvpress selection does it keep?

Writes the JSON (--out) with `ttft_speedup_vs_full`, `ttft_speedup_vs_snapkv`,
`peak_mem_ratio_vs_snapkv` (per length, and at the longest under `goal`), `needle_accuracy` (per
method and budget) and `kvpress`, plus PNG plots next to it (<stem>_ttft.png, <stem>_memory.png,
<stem>_needle.png). --quick (under 5 minutes on 2 cores): contexts up to 4K, fewer cells.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import logging
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _kvpress  # noqa: E402
from _common import machine_info, print_table, synchronize, write_json  # noqa: E402

log = logging.getLogger("benchmarks.filter")
ROOT = Path(__file__).resolve().parents[1]
PAPER_RATIO = 13 / 32

# ------------------------------------------------------------------------------------------------
# kvpress worker: runs in the kvpress environment (transformers < 5.3), so it imports no llmsys


def kvpress_worker(folder: str, window: int, kernel: int, ratio: float) -> None:
    """Run kvpress's SnapKVPress on the saved model and prompts; write per-layer scores and indices."""
    from kvpress import SnapKVPress
    from transformers import DynamicCache

    folder_path = Path(folder)
    model = _kvpress.load_model(folder_path)
    prompts = torch.load(folder_path / "prompts.pt")
    press = _kvpress.recording(SnapKVPress)(compression_ratio=ratio, window_size=window, kernel_size=kernel)
    press.records = []
    seconds = []
    with torch.no_grad():
        model(prompts[:1])  # warm-up: first-call costs stay out of the timings
    for row in prompts:
        press.records.append({})
        with torch.no_grad(), press(model):
            start = time.perf_counter()
            model(row[None], past_key_values=DynamicCache())
            seconds.append(time.perf_counter() - start)
    payload = {"records": press.records, "prefill_seconds": seconds, "versions": _kvpress.versions()}
    torch.save(payload, folder_path / "kvpress.pt")


# ------------------------------------------------------------------------------------------------
# measurement helpers


def _malloc_returns_memory() -> None:
    """Make glibc serve large blocks with mmap (freed blocks go back to the system): RSS ~ live tensors."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, 256 * 1024)  # a fixed threshold also stops glibc raising it
        libc.mallopt(m_trim_threshold, 1024 * 1024)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak memory above the level at entry, in bytes (CUDA allocator, or sampled RSS on a CPU)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.base = self._max = _rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._max = max(self._max, _rss_bytes())
            time.sleep(0.0005)

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self._max, _rss_bytes()) - self.base


def measure(fn: Callable[[], Any], device: torch.device, repeats: int) -> dict[str, float]:
    """Median / min wall time (ms), median process CPU time (ms) and the largest peak memory (MiB).

    The CPU time (all threads of this process) is what the work costs whatever else the machine
    runs: on a shared box the wall time also counts waiting for a core.
    """
    times, cpu, peaks = [], [], []
    for _ in range(repeats):
        with PeakMemory(device) as memory:
            synchronize(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            synchronize(device)
            times.append((time.perf_counter() - start) * 1e3)
            cpu.append((time.process_time() - start_cpu) * 1e3)
        peaks.append(memory.peak / 2**20)
    return {"ttft_ms": statistics.median(times), "ttft_min_ms": min(times), "cpu_ms": statistics.median(cpu),
            "peak_mib": max(peaks), "repeats": repeats}


# ------------------------------------------------------------------------------------------------
# models


def speed_config(device: torch.device):
    from transformers import LlamaConfig

    if device.type == "cuda":  # ~0.9B parameters in bf16
        size = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16,
                    num_key_value_heads=4)
    else:  # 57M parameters: a 16K prefill takes about a minute on 2 cores
        size = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                    num_key_value_heads=2)
    return LlamaConfig(vocab_size=32000, max_position_embeddings=32768, bos_token_id=1, eos_token_id=2,
                       pad_token_id=0, tie_word_embeddings=False, **size)


def speed_model(device: torch.device):
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(speed_config(device), dtype=dtype, attn_implementation="sdpa")
    return model.to(device).eval()


def quality_model(kind: str) -> tuple[Any, str, str | None]:
    """(model, name, note) for the quality part: the trained reference model if available."""
    note = None
    if kind == "reference":
        try:
            from llmsys.testing.reference import reference_model

            return reference_model(), "reference_model (trained)", None
        except Exception as exc:  # weights not trained / not there yet: say why, use the analytic model
            note = f"reference model unavailable ({type(exc).__name__}: {exc}); used the analytic model instead"
            log.warning(note)
            kind = "analytic"
    if kind == "analytic":
        from llmsys.testing.analytic import analytic_retrieval_model

        model = analytic_retrieval_model(max_length=16384, attn_implementation="sdpa")
        return model, "analytic_retrieval_model (hand-written)", note
    from llmsys.eval.tasks import REFERENCE_VOCAB
    from llmsys.testing import tiny_model

    return tiny_model("llama", vocab_size=REFERENCE_VOCAB.size), "tiny random llama (plumbing only)", note


# ------------------------------------------------------------------------------------------------
# part 1: needle quality


def quality_methods(layer: int, budget: int) -> dict[str, Any]:
    """The compressed methods at one budget, as `llmsys.eval` methods."""
    from llmsys.cache import PagedCache
    from llmsys.eval import cache_method, context_method
    from llmsys.filter import GemFilter
    from llmsys.kv import H2O, SnapKV

    snapkv = SnapKV(budget=budget, window=min(32, budget // 2))
    h2o = H2O(budget=budget)
    return {
        "gemfilter": context_method(GemFilter(layer=layer, topk=budget), name=f"gemfilter k={budget}"),
        "gemfilter_original": context_method(GemFilter(layer=layer, topk=budget, positions="original"),
                                             name=f"gemfilter original positions k={budget}"),  # fmt: skip
        "snapkv": cache_method(lambda model: PagedCache.from_model(model, policy=snapkv), name=f"snapkv k={budget}"),
        "h2o": cache_method(lambda model: PagedCache.from_model(model, policy=h2o), name=f"h2o k={budget}"),
    }


def needle_quality(model, lengths: list[int], depths: list[float], samples: int, budgets: list[int]) -> dict[str, Any]:
    """Needle accuracy per method and budget over length x depth, through `llmsys.eval.evaluate`."""
    from llmsys.eval import NeedleTask, evaluate
    from llmsys.filter import calibrate_layer

    task = NeedleTask()
    calibration = calibrate_layer(model, task=task, lengths=(min(lengths),))
    log.info("quality: %s", calibration.summary())
    full = evaluate(model, task, None, lengths, depths, samples, batch_size=samples, method_name="full")
    results: dict[str, dict[str, Any]] = {"full": {"all": full}}
    for budget in budgets:
        usable = [n for n in lengths if n > budget]  # a budget >= the context compresses nothing
        if not usable:
            continue
        for name, method in quality_methods(calibration.layer, budget).items():
            result = evaluate(model, task, method, usable, depths, samples, batch_size=samples)
            results.setdefault(name, {})[str(budget)] = result
    for per_budget in results.values():
        for result in per_budget.values():
            for cell in result["cells"]:
                cell.pop("predictions", None)
    return {
        "filter_layer": calibration.layer,
        "calibration": {"recall": calibration.recall, "chance": calibration.chance, "fallback": calibration.fallback},
        "lengths": lengths, "depths": depths, "samples_per_cell": samples, "budgets": budgets,
        "results": results,
    }


# ------------------------------------------------------------------------------------------------
# part 2: speed and memory


def speed(device: torch.device, lengths: list[int], repeats: int, topk: int = 1024, long_repeats: int | None = None,
          ) -> dict[str, Any]:  # fmt: skip
    """TTFT and peak memory per method and length (`long_repeats` above 4K tokens, default `repeats`)."""
    from llmsys.cache import PagedCache
    from llmsys.filter import GemFilter
    from llmsys.kv import SnapKV
    from llmsys.models import generate

    model = speed_model(device)
    layers = model.config.num_hidden_layers
    layer = round(layers * PAPER_RATIO)
    gem = GemFilter(layer=layer, topk=topk)
    policy = SnapKV(budget=topk, window=32, kernel=5)

    def full(ids):
        return generate(model, ids, max_new_tokens=1, do_sample=False)

    def gemfilter(ids):
        with gem(model):
            return generate(model, ids, max_new_tokens=1, do_sample=False)

    def snapkv(ids):
        with PagedCache.from_model(model, policy=policy) as cache:
            return generate(model, ids, cache=cache, max_new_tokens=1, do_sample=False)

    methods = {"full": full, "gemfilter": gemfilter, "snapkv": snapkv}
    gen = torch.Generator().manual_seed(0)
    rows = []
    with torch.no_grad():
        warm = torch.randint(3, model.config.vocab_size, (1, min(lengths)), generator=gen).to(device)
        for fn in methods.values():  # first-call costs (allocator, lazy inits) out of the measurements
            fn(warm)
        for length in lengths:
            ids = torch.randint(3, model.config.vocab_size, (1, length), generator=gen).to(device)
            for name, fn in methods.items():
                reps = repeats if length <= 4096 or long_repeats is None else long_repeats
                row = {"method": name, "length": length, **measure(lambda fn=fn, ids=ids: fn(ids), device, reps)}
                rows.append(row)
                log.info("speed %s", row)
    table = {(r["method"], r["length"]): r for r in rows}

    def ratio(a: str, b: str, key: str) -> dict[str, float]:
        return {str(n): table[(a, n)][key] / table[(b, n)][key] for n in lengths}

    return {
        "model": {"params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
                  "layers": layers, "dtype": str(next(model.parameters()).dtype),
                  "config": {k: getattr(model.config, k) for k in ("hidden_size", "intermediate_size",
                             "num_attention_heads", "num_key_value_heads", "vocab_size")}},
        "filter_layer": layer, "topk": topk, "snapkv": {"budget": topk, "window": 32, "kernel": 5},
        "rows": rows,
        "ttft_speedup_vs_full": ratio("full", "gemfilter", "ttft_ms"),
        "ttft_speedup_vs_snapkv": ratio("snapkv", "gemfilter", "ttft_ms"),
        "cpu_time_speedup_vs_full": ratio("full", "gemfilter", "cpu_ms"),
        "cpu_time_speedup_vs_snapkv": ratio("snapkv", "gemfilter", "cpu_ms"),
        "peak_mem_ratio_vs_snapkv": {str(n): table[("gemfilter", n)]["peak_mib"] / max(table[("snapkv", n)]["peak_mib"],
                                     1e-9) for n in lengths},  # fmt: skip
    }


# ------------------------------------------------------------------------------------------------
# part 3: kvpress


def kvpress_compare(python: str, device: torch.device, length: int, budget: int, prompts: int = 2,
                    window: int = 32, kernel: int = 5) -> dict[str, Any]:  # fmt: skip
    """Our SnapKV vs kvpress's SnapKVPress on the speed model (CPU) and the same random prompts."""

    from llmsys.cache import PagedCache
    from llmsys.kv import SnapKV
    from llmsys.models import forward

    if not Path(python).exists():
        return {"status": "skipped", "reason": f"no kvpress environment at {python} (see docs/filter.md)"}
    model = speed_model(torch.device("cpu"))
    ids = torch.randint(3, model.config.vocab_size, (prompts, length), generator=torch.Generator().manual_seed(1))
    ratio = 1 - budget / length
    theirs = _kvpress.run_worker(
        __file__, python, model, lambda folder: torch.save(ids, folder / "prompts.pt"), window, kernel, ratio
    )
    if theirs.get("status") == "failed":
        return theirs

    Recording = _kvpress.recording_snapkv()

    n_kept = theirs["records"][0][0]["indices"].shape[-1]
    with PagedCache.from_model(model, policy=SnapKV(budget=n_kept)) as cache, torch.no_grad():
        forward(model, ids[:1], cache=cache)  # warm-up, as in the kvpress worker
    same_as_head_mean, head_overlap, score_diff, ours_seconds = [], [], [], []
    for row, record in enumerate(theirs["records"]):
        with PagedCache.from_model(model, policy=Recording(budget=n_kept, window=window, kernel=kernel)) as cache:
            start = time.perf_counter()
            with torch.no_grad():
                forward(model, ids[row : row + 1], cache=cache)
            ours_seconds.append(time.perf_counter() - start)
            for layer_idx, layer in enumerate(cache.layers):
                ours = set(layer.token_index[0].tolist())
                their_scores = record[layer_idx]["scores"]  # [Hkv, T]: mean over the window, per KV head
                mean = their_scores.mean(dim=0)
                same_as_head_mean.append(ours == set(mean.topk(n_kept).indices.tolist()))
                for head in record[layer_idx]["indices"]:
                    head_overlap.append(len(ours & set(head.tolist())) / n_kept)
                prefix = length - window  # ours sum over the window; kvpress averages
                diff = (layer.policy_state["scores"][:prefix] / window - mean[:prefix]).abs().max().item()
                score_diff.append(diff)
    return {
        "status": "ok",
        "versions": theirs["versions"],
        "length": length, "kept": n_kept, "window": window, "kernel": kernel, "prompts": prompts,
        "layers": len(theirs["records"][0]),
        "same_tokens_as_kvpress_head_mean": sum(same_as_head_mean) / len(same_as_head_mean),
        "score_max_abs_diff_vs_kvpress_head_mean": max(score_diff),
        "mean_overlap_with_kvpress_per_head": sum(head_overlap) / len(head_overlap),
        "min_overlap_with_kvpress_per_head": min(head_overlap),
        "prefill_seconds": {"llmsys_snapkv": statistics.median(ours_seconds),
                            "kvpress_snapkv": statistics.median(theirs["prefill_seconds"])},
    }


# ------------------------------------------------------------------------------------------------
# plots


def _plots(result: dict[str, Any], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    out.parent.mkdir(parents=True, exist_ok=True)
    stem = out.with_suffix("")
    sp = result.get("speed")
    if sp:
        panels = (("ttft_ms", "time to first token (ms)", "ttft"), ("peak_mib", "peak memory (MiB)", "memory"))
        for key, label, name in panels:
            fig, ax = plt.subplots(figsize=(6.5, 4.2))
            for method in ("full", "snapkv", "gemfilter"):
                rows = [r for r in sp["rows"] if r["method"] == method]
                line = ax.plot([r["length"] for r in rows], [r[key] for r in rows], marker="o", label=method)[0]
                if key == "ttft_ms" and all("cpu_ms" in r for r in rows):  # robust to a busy machine
                    ax.plot([r["length"] for r in rows], [r["cpu_ms"] for r in rows], ls="--", marker=".",
                            color=line.get_color(), label=f"{method} (process CPU time)")  # fmt: skip
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("context length (tokens)")
            ax.set_ylabel(label)
            where = result["machine"].get("gpu") or result["machine"]["cpu"]
            title = (f"{label}: {sp['model']['params_m']}M-param Llama, GemFilter layer "
                     f"{sp['filter_layer']}/{sp['model']['layers']}, top-{sp['topk']}\n{where}")
            ax.set_title(title, fontsize=9)
            ax.legend()
            ax.grid(alpha=0.3)
            fig.tight_layout()
            path = Path(f"{stem}_{name}.png")
            fig.savefig(path, dpi=120)
            plt.close(fig)
            written.append(str(path))
    quality = result.get("quality")
    if quality and quality.get("results"):
        from llmsys.eval import accuracy_grid, plot_budget

        res = quality["results"]
        budget = str(min(quality["budgets"]))
        panels = [("full", "all")] + [(m, budget) for m in ("gemfilter", "gemfilter_original", "snapkv", "h2o")]
        panels = [(m, b) for m, b in panels if b in res.get(m, {})]
        fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels) + 1, 3.4), squeeze=False)
        for ax, (method, b) in zip(axes[0], panels):
            r = res[method][b]
            ax.imshow(accuracy_grid(r), vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="lower")
            ax.set_xticks(range(len(r["depths"])), [f"{d:g}" for d in r["depths"]], fontsize=7)
            ax.set_yticks(range(len(r["lengths"])), r["lengths"], fontsize=7)
            ax.set_title(f"{method}" + (f" k={b}" if b != "all" else "") + f"\nacc {r['accuracy']:.2f}", fontsize=8)
            ax.set_xlabel("depth", fontsize=7)
        axes[0][0].set_ylabel("context length", fontsize=7)
        fig.suptitle(f"needle accuracy, {quality['model']} (GemFilter layer {quality['filter_layer']})", fontsize=9)
        fig.tight_layout()
        path = Path(f"{stem}_needle.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(str(path))
        curves = {m: [(int(b), r) for b, r in per.items()] for m, per in res.items() if m != "full"}
        written.append(plot_budget(curves, f"{stem}_budget.png", xlabel="budget (tokens kept)",
                                   title=f"needle accuracy vs budget, {quality['model']}",
                                   baseline=res["full"]["all"]))  # fmt: skip
    return written


# ------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="contexts up to 4K, fewer cells (< 5 min on 2 cores)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/filter.json"), help="JSON path")
    parser.add_argument("--parts", default="quality,speed,kvpress", help="comma list of quality, speed, kvpress")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--quality-model", default="reference", choices=["reference", "analytic", "tiny"])
    parser.add_argument("--lengths", default=None, help="speed context lengths, e.g. 1024,4096")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per speed measurement")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--update", action="store_true", help="keep the other parts' results already in --out")
    _kvpress.add_arguments(parser, ratio=0.75)
    args = parser.parse_args(argv)
    if args.kvpress_worker:
        kvpress_worker(args.kvpress_worker, args.kvpress_window, args.kvpress_kernel, args.kvpress_ratio)
        return 0

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    _malloc_returns_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    out = Path(args.out)
    result: dict[str, Any] = {"machine": machine_info(), "quick": args.quick, "device": str(device)}
    started = time.perf_counter()

    if "quality" in parts:
        model, name, note = quality_model(args.quality_model)
        model = model.to(device)
        if args.quick:
            lengths, depths, samples, budgets = [512, 2048], [0.0, 0.5, 1.0], 2, [32, 128]
        else:
            lengths, depths, samples = [1024, 2048, 4096, 8192], [0.0, 0.25, 0.5, 0.75, 1.0], 2
            budgets = [64, 256, 1024]
        quality = needle_quality(model, lengths, depths, samples, budgets)
        quality["model"] = name
        if note:
            quality["note"] = note
        result["quality"] = quality
        result["needle_accuracy"] = {m: {b: r["accuracy"] for b, r in per.items()}
                                     for m, per in quality["results"].items()}  # fmt: skip
        rows = [{"method": m, "budget": b, "accuracy": v} for m, per in result["needle_accuracy"].items()
                for b, v in per.items()]  # fmt: skip
        print(f"\nneedle accuracy ({name}; GemFilter layer {quality['filter_layer']}):")
        print_table(rows, ["method", "budget", "accuracy"])

    if "speed" in parts:
        if args.lengths:
            lengths = [int(x) for x in args.lengths.split(",")]
        else:
            lengths = [1024, 2048, 4096] if args.quick else [1024, 2048, 4096, 8192, 16384]
        repeats = args.repeats or (2 if args.quick else 3)
        sp = speed(device, lengths, repeats, long_repeats=None if args.repeats else 2)
        result["speed"] = sp
        for key in ("ttft_speedup_vs_full", "ttft_speedup_vs_snapkv", "peak_mem_ratio_vs_snapkv"):
            result[key] = sp[key]
        longest = str(max(lengths))
        result["goal"] = {
            "length": int(longest),
            "ttft_speedup_vs_full": sp["ttft_speedup_vs_full"][longest],
            "ttft_speedup_vs_snapkv": sp["ttft_speedup_vs_snapkv"][longest],
            "peak_mem_ratio_vs_snapkv": sp["peak_mem_ratio_vs_snapkv"][longest],
            "cpu_time_speedup_vs_full": sp["cpu_time_speedup_vs_full"][longest],
            "cpu_time_speedup_vs_snapkv": sp["cpu_time_speedup_vs_snapkv"][longest],
        }
        g = result["goal"]
        g["met"] = (
            g["ttft_speedup_vs_full"] >= 2 and g["ttft_speedup_vs_snapkv"] > 1 and g["peak_mem_ratio_vs_snapkv"] < 1
        )
        print(f"\nspeed ({sp['model']['params_m']}M params, {device}, filter layer {sp['filter_layer']}):")
        print_table(sp["rows"], ["method", "length", "ttft_ms", "ttft_min_ms", "cpu_ms", "peak_mib", "repeats"])
        print(f"goal at {longest}: {json.dumps(g)}")

    if "kvpress" in parts:
        length, budget = (512, 128) if args.quick else (4096, 1024)
        kv = kvpress_compare(args.kvpress_python, device, length, budget)
        result["kvpress"] = kv
        print(f"\nkvpress SnapKV comparison: {json.dumps(kv, indent=1, default=str)[:1500]}")

    result["seconds"] = round(time.perf_counter() - started, 1)
    if args.update and out.exists():  # e.g. the speed part and the quality part run separately
        result = {**json.loads(out.read_text()), **result}
    write_json(out, result)  # first without plots: a plotting error must not lose the measurements
    result["plots"] = _plots(result, out)
    write_json(out, result)
    print(f"\nwrote {out} and {', '.join(result['plots']) or 'no plots'} in {result['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
