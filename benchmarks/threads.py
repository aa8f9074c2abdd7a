"""TIMRUN benchmark: subtask pruning vs no pruning on forced-script reasoning trees.

A random-weight tiny model is driven by a `ScriptedPolicy` through a deterministic reasoning tree
(`synthetic_tree_of_size`: branching 3, a calculator call in every task) with the whole
runtime on: grammar, tree tracking, tool calls, pruning, the paged cache. For each pruning buffer
(none = the baseline, 0, 1, 2) one run generates the largest tree; the observer stamps the time,
the KV bytes and the tool calls when the run passes each size, so "a tree of N tokens" is the
first N generated tokens of that run. Runs are repeated (configurations interleaved) and medians
reported, in wall-clock tokens/s and in tokens per CPU-second of this process (steadier on a
shared machine).

    .venv/bin/python benchmarks/threads.py --quick        # 1K..4K tokens, < 5 min on 2 cores
    .venv/bin/python benchmarks/threads.py                # 1K..32K tokens (tens of minutes on a CPU)

Writes benchmarks/results/threads.json (``speedup_vs_no_pruning``, ``kv_bytes_ratio``,
``max_position`` per buffer at the largest size, and every measurement) and threads.png.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, print_table, write_json  # noqa: E402
from llmsys.testing import local_tokenizer, tiny_model  # noqa: E402
from llmsys.threads import ScriptedPolicy, ThreadRunner  # noqa: E402
from llmsys.threads.synthetic import calculator, script_tokens, synthetic_tree_of_size  # noqa: E402

WINDOW = 256  # tokens per throughput window (the flatness curve)


def run_once(
    model: Any, tokenizer: Any, tree: dict, buffer: int | None, sizes: list[int], page_size: int, progress: bool = False
) -> dict:
    """One generation of the tree's first max(sizes) tokens; stamps at every size and window."""
    top = max(sizes)
    runner = ThreadRunner(
        model,
        tokenizer,
        tools={"calc": calculator},
        pruning_buffer=buffer,
        system="",
        max_new_tokens=top,
        page_size=page_size,
        progress=progress,
    )
    marks: dict[int, dict[str, float]] = {}
    wanted = set(sizes) | set(range(WINDOW, top + 1, WINDOW))

    def observer(view: Any) -> None:
        n = view.thread.stats.tokens_generated
        if n in wanted and n not in marks:
            marks[n] = {
                "t": time.perf_counter(),
                "cpu": time.process_time(),
                "kv_peak_bytes": view.kv.peak_bytes(),
                "kv_reserved_bytes": view.kv.reserved_bytes(),
                "tool_calls": len(view.thread.tool_calls),
                "working_memory": len(view.thread.wm),
                "max_position": view.thread.stats.max_position,
            }

    start, cpu_start = time.perf_counter(), time.process_time()
    result = runner.run("Benchmark question", policy=ScriptedPolicy.from_tree(tokenizer, tree), observer=observer)
    end, cpu_end = time.perf_counter(), time.process_time()
    stats = result.stats
    if stats.tokens_generated >= top and top not in marks:  # no forward follows the last token
        before = marks[max(marks)] if marks else {}
        marks[top] = {
            "t": end,
            "cpu": cpu_end,
            "kv_peak_bytes": stats.kv_peak_bytes,
            "kv_reserved_bytes": before.get("kv_reserved_bytes", 0),
            "tool_calls": len(result.tool_calls),
            "working_memory": before.get("working_memory", 0),
            "max_position": stats.max_position,
        }
    return {
        "marks": {n: {**m, "seconds": m["t"] - start, "cpu_seconds": m["cpu"] - cpu_start} for n, m in marks.items()},
        "outcome": result.outcome.value,
        "tokens_generated": stats.tokens_generated,
        "tool_calls": len(result.tool_calls),
        "prunes": stats.prunes,
        "tokens_reencoded": stats.tokens_reencoded,
        "pruned_share": stats.pruned_share,
        "max_position": stats.max_position,
        "peak_working_memory": stats.peak_working_memory,
        "kv_peak_bytes": stats.kv_peak_bytes,
        "seconds": end - start,
    }


def summarize(runs: list[dict], sizes: list[int]) -> dict[str, Any]:
    """Medians over repeats: cumulative tokens/s and peak KV bytes per size, windowed tokens/s."""
    per_size = {}
    for n in sizes:
        secs = [r["marks"][n]["seconds"] for r in runs if n in r["marks"]]
        if not secs:
            continue
        cpu = [r["marks"][n]["cpu_seconds"] for r in runs if n in r["marks"]]
        per_size[n] = {
            "tokens_per_s": statistics.median(n / s for s in secs),
            "tokens_per_cpu_s": statistics.median(n / s for s in cpu),
            "kv_peak_bytes": statistics.median(r["marks"][n]["kv_peak_bytes"] for r in runs if n in r["marks"]),
            "kv_reserved_bytes": statistics.median(r["marks"][n]["kv_reserved_bytes"] for r in runs if n in r["marks"]),
            "max_position": max(r["marks"][n]["max_position"] for r in runs if n in r["marks"]),
            "tool_calls": runs[0]["marks"][n]["tool_calls"],
        }
    windows = []
    top = max(sizes)
    for end in range(2 * WINDOW, top + 1, WINDOW):
        both = [r for r in runs if end in r["marks"] and end - WINDOW in r["marks"]]
        if both:
            windows.append(
                {
                    "tokens": end,
                    "tokens_per_s": statistics.median(
                        WINDOW / (r["marks"][end]["seconds"] - r["marks"][end - WINDOW]["seconds"]) for r in both
                    ),
                    "tokens_per_cpu_s": statistics.median(
                        WINDOW / max(r["marks"][end]["cpu_seconds"] - r["marks"][end - WINDOW]["cpu_seconds"], 1e-9)
                        for r in both
                    ),
                    "tool_calls": runs[0]["marks"][end]["tool_calls"],
                }
            )
    return {"per_size": per_size, "windows": windows}


def plot(path: Path, sizes: list[int], summary: dict[str, dict], title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    for i, (name, s) in enumerate(summary.items()):
        color = f"C{i}"
        xs = [n for n in sizes if n in s["per_size"]]
        axes[0].plot(xs, [s["per_size"][n]["tokens_per_s"] for n in xs], marker="o", color=color, label=name)
        axes[0].plot(xs, [s["per_size"][n]["tokens_per_cpu_s"] for n in xs], linestyle="--", color=color)
        axes[1].plot(xs, [s["per_size"][n]["kv_peak_bytes"] / 2**20 for n in xs], marker="o", color=color, label=name)
        w = s["windows"]
        axes[2].plot([x["tokens"] for x in w], [x["tokens_per_cpu_s"] for x in w], color=color, label=name)
    for ax in axes[:2]:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("generated tokens (tree size)")
    axes[0].set_ylabel("tokens/s, cumulative median (wall; dashed: per CPU-second)")
    axes[1].set_ylabel("peak KV MiB (all layers)")
    axes[2].set_xlabel("generated tokens")
    axes[2].set_ylabel(f"tokens per CPU-second, {WINDOW}-token windows")
    pruned = summary.get("buffer 2")
    if pruned and pruned["windows"]:
        twin = axes[2].twinx()
        twin.plot(
            [x["tokens"] for x in pruned["windows"]],
            [x["tool_calls"] for x in pruned["windows"]],
            color="gray",
            linestyle=":",
            label="tool calls so far",
        )
        twin.set_ylabel("tool calls so far (dotted)")
    axes[0].set_title("throughput")
    axes[1].set_title("KV memory")
    axes[2].set_title("throughput as the tree and tool calls grow")
    axes[0].legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="trees up to 4K tokens, 2 repeats (< 5 min on 2 cores)")
    parser.add_argument("--sizes", type=int, nargs="+", help="tree sizes in generated tokens")
    parser.add_argument("--buffers", default="none,0,1,2", help="pruning buffers; 'none' = no pruning")
    parser.add_argument("--repeats", type=int, help="runs per configuration (median)")
    parser.add_argument("--family", default="llama")
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--tool-every", type=int, default=1, help="every n-th task of the tree calls the calculator")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--out", default="benchmarks/results/threads.json")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    sizes = sorted(args.sizes or ([1024, 2048, 4096] if args.quick else [1024, 2048, 4096, 8192, 16384, 32768]))
    repeats = args.repeats or (2 if args.quick else 3)
    buffers: list[int | None] = [None if b.strip() == "none" else int(b) for b in args.buffers.split(",")]
    tokenizer = local_tokenizer()
    model = tiny_model(args.family, attn_implementation="sdpa")
    tree = synthetic_tree_of_size(tokenizer, max(sizes), branching=3, tool_every=args.tool_every)
    print(f"tree: {script_tokens(tokenizer, tree)} scripted tokens; sizes {sizes}; {repeats} repeats; {args.family}")

    # warm-up (grammar compilation, first-call allocations) outside the timed runs
    run_once(model, tokenizer, tree, buffers[-1], [min(sizes[0], 2 * WINDOW)], args.page_size)
    raw: dict[str, list[dict]] = {}
    for rep in range(repeats):
        for buffer in buffers:  # interleaved, so that machine noise hits every configuration alike
            name = "no pruning" if buffer is None else f"buffer {buffer}"
            start = time.perf_counter()
            raw.setdefault(name, []).append(run_once(model, tokenizer, tree, buffer, sizes, args.page_size, True))
            print(f"  repeat {rep + 1}/{repeats} {name:11s} {time.perf_counter() - start:7.1f} s", flush=True)
    summary = {name: summarize(runs, sizes) for name, runs in raw.items()}

    top = max(sizes)
    base = summary.get("no pruning")
    rows = []
    for name, s in summary.items():
        for n, v in s["per_size"].items():
            row = {"config": name, "tokens": n, **v}
            if base and n in base["per_size"]:
                row["speedup"] = v["tokens_per_s"] / base["per_size"][n]["tokens_per_s"]
                row["speedup_cpu"] = v["tokens_per_cpu_s"] / base["per_size"][n]["tokens_per_cpu_s"]
                row["kv_ratio"] = v["kv_peak_bytes"] / base["per_size"][n]["kv_peak_bytes"]
            rows.append(row)
    print_table(
        rows,
        [
            "config",
            "tokens",
            "tokens_per_s",
            "speedup",
            "tokens_per_cpu_s",
            "speedup_cpu",
            "kv_peak_bytes",
            "kv_ratio",
            "max_position",
            "tool_calls",
        ],
    )

    def at_top(name: str, key: str) -> Any:
        return summary[name]["per_size"].get(top, {}).get(key)

    payload: dict[str, Any] = {
        "benchmark": "threads",
        "model": f"tiny {args.family} (random weights, float32, sdpa), {model.config.num_hidden_layers} layers",
        "machine": machine_info(),
        "sizes": sizes,
        "repeats": repeats,
        "page_size": args.page_size,
        "tree_tokens": script_tokens(tokenizer, tree),
        "speedup_vs_no_pruning": {},
        "speedup_vs_no_pruning_cpu": {},
        "kv_bytes_ratio": {},
        "max_position": {name: at_top(name, "max_position") for name in summary},
        "tool_calls": {name: at_top(name, "tool_calls") for name in summary},
        "summary": summary,
        "runs": raw,
    }
    if base:
        for name in summary:
            if name != "no pruning":
                payload["speedup_vs_no_pruning"][name] = at_top(name, "tokens_per_s") / at_top(
                    "no pruning", "tokens_per_s"
                )
                payload["speedup_vs_no_pruning_cpu"][name] = at_top(name, "tokens_per_cpu_s") / at_top(
                    "no pruning", "tokens_per_cpu_s"
                )
                payload["kv_bytes_ratio"][name] = at_top(name, "kv_peak_bytes") / at_top("no pruning", "kv_peak_bytes")
    for name, s in summary.items():
        w = [x["tokens_per_cpu_s"] for x in s["windows"]]
        if len(w) >= 4:  # flat: the last quarter of the run is about as fast as the second quarter
            q = len(w) // 4
            payload.setdefault("window_flatness", {})[name] = statistics.median(w[-q:]) / statistics.median(
                w[q : 2 * q]
            )
    out = write_json(args.out, payload)
    png = plot(out.with_suffix(".png"), sizes, summary, payload["model"] + f"; {payload['machine']['cpu']}")
    print(f"speedup vs no pruning at {top} tokens (wall): {payload['speedup_vs_no_pruning']}")
    print(f"speedup vs no pruning at {top} tokens (CPU time): {payload['speedup_vs_no_pruning_cpu']}")
    print(f"throughput flatness (last quarter / second quarter, CPU time): {payload.get('window_flatness')}")
    print(f"KV bytes ratio at {top} tokens: {payload['kv_bytes_ratio']}")
    print(f"max position: {payload['max_position']}")
    print(f"wrote {out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
