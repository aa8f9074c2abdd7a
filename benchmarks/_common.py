"""Small helpers shared by the llmsys benchmarks: timing, machine description, JSON, plots, tables.

Usage from a script in benchmarks/ (the script's folder is on sys.path)::

    from _common import time_fn, machine_info, write_json, bar_plot, print_table
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "bar_plot",
    "copy_bandwidth",
    "machine_info",
    "print_table",
    "synchronize",
    "time_cuda_graph",
    "time_fn",
    "write_json",
]


def synchronize(device: torch.device | str) -> None:
    """Wait for queued GPU work (no-op on CPU), so wall-clock timings cover the kernels."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(
    fn: Callable[[], Any],
    device: torch.device | str = "cpu",
    *,
    warmup: int = 3,
    repeats: int = 10,
    min_repeat_s: float = 1e-3,
    max_total_s: float | None = None,
) -> dict[str, float]:
    """Median wall time of ``fn()`` in milliseconds, over ``repeats`` timed repeats after ``warmup`` calls.

    Each repeat runs ``fn`` ``inner`` times back to back (chosen from the first warm-up so a repeat
    lasts >= ``min_repeat_s``: a 10 us kernel is not timed one launch at a time) and synchronizes the
    device before reading the clock. ``max_total_s`` caps the number of repeats for slow functions
    (e.g. the Triton interpreter). Returns median/min/max per call and the counts used.
    """
    device = torch.device(device)
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    first = time.perf_counter() - start
    inner = max(1, math.ceil(min_repeat_s / max(first, 1e-9))) if first < min_repeat_s else 1
    for _ in range(max(warmup - 1, 0)):
        if max_total_s is not None and first * warmup > max_total_s:
            break
        fn()
    if max_total_s is not None:
        repeats = max(1, min(repeats, int(max_total_s / max(first * inner, 1e-9))))
    synchronize(device)

    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        synchronize(device)
        samples.append((time.perf_counter() - start) / inner * 1e3)
    return {
        "median_ms": statistics.median(samples),
        "min_ms": min(samples),
        "max_ms": max(samples),
        "repeats": repeats,
        "inner": inner,
    }


def time_cuda_graph(
    fn: Callable[[], Any], device: torch.device | str, *, repeats: int = 20, inner: int = 10
) -> dict[str, float] | None:
    """GPU time of ``fn()`` in ms with CPU launch overhead removed: ``inner`` calls are captured in a
    CUDA graph, whose replays are timed with CUDA events. Returns None when ``fn`` cannot be captured
    (it synchronizes with the host, for instance) or the device is not CUDA."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm up (compile, allocate) off the capture
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            for _ in range(inner):
                fn()
    except Exception:  # not capturable: report wall-clock time only
        torch.cuda.synchronize(device)
        return None
    graph.replay()
    torch.cuda.synchronize(device)
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / inner)
    del graph
    return {"median_ms": statistics.median(samples), "min_ms": min(samples), "repeats": repeats}


def copy_bandwidth(device: torch.device | str, nbytes: int = 1 << 30, repeats: int = 10) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read + written, measured as
    ``torch.empty_like(x).copy_(x)`` on an ``nbytes`` tensor: the practical ceiling for memory-bound ops."""
    x = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    t = time_fn(lambda: torch.empty_like(x).copy_(x), device, warmup=3, repeats=repeats)
    return 2 * x.numel() * x.element_size() / (t["median_ms"] * 1e-3)


def machine_info() -> dict[str, Any]:
    """Where numbers come from: CPU/GPU names, core count, torch/triton/python versions."""
    # imported here: the kvpress workers load this module in an environment without llmsys
    from llmsys.machine import cpu_name

    info: dict[str, Any] = {
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            gpu_sms=props.multi_processor_count,
            cuda=torch.version.cuda,
        )
    return info


def write_json(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` as indented JSON, creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


def bar_plot(
    path: str | Path,
    labels: Sequence[str],
    series: dict[str, Sequence[float | None]],
    *,
    ylabel: str,
    title: str,
    log: bool = True,
) -> Path:
    """Grouped bar chart (one group per label, one bar per series; None leaves a gap) saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = max(len(series), 1)
    width = 0.8 / n
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(labels) + 2), 4.5))
    for i, (name, values) in enumerate(series.items()):
        xs = [j + (i - (n - 1) / 2) * width for j, v in enumerate(values) if v is not None]
        ys = [v for v in values if v is not None]
        ax.bar(xs, ys, width=width, label=name)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if log:
        ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """Format ``rows`` as a fixed-width text table (floats to 4 significant digits), print and return it."""

    def fmt(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    text = "\n".join(lines)
    print(text)
    return text
