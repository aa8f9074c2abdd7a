"""Figures (matplotlib, Agg): the needle-in-a-haystack heat map and accuracy/latency against budget."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from llmsys.eval.runner import accuracy_grid


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_heatmap(result: dict[str, Any], path: str | os.PathLike, title: str | None = None) -> str:
    """Accuracy over context length (rows) x depth (columns) of one `evaluate` result, as a PNG."""
    plt = _pyplot()
    grid = accuracy_grid(result)
    lengths, depths = result["lengths"], result["depths"]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(depths), 1.2 + 0.6 * len(lengths)))
    im = ax.imshow(grid, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto", origin="lower")
    ax.set_xticks(range(len(depths)), [f"{d:g}" for d in depths])
    ax.set_yticks(range(len(lengths)), [str(L) for L in lengths])
    ax.set_xlabel("depth of the asked fact")
    ax.set_ylabel("context length (tokens)")
    for i, row in enumerate(grid):
        for j, acc in enumerate(row):
            ax.text(j, i, f"{acc:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax, label="accuracy")
    ax.set_title(title or f"{result['task']} / {result['method']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def plot_budget(
    curves: Mapping[str, Sequence[tuple[float, dict[str, Any]]]],
    path: str | os.PathLike,
    xlabel: str = "budget (fraction of the context kept)",
    latency: str = "prefill_s",
    title: str | None = None,
    baseline: dict[str, Any] | None = None,
) -> str:
    """Accuracy (left) and latency (right) against a budget, one line per method.

    `curves` maps a method name to [(budget, evaluate result), ...]; `latency` is "prefill_s",
    "decode_s_per_token" or "total_s" (median over cells). A `baseline` result (full attention)
    is drawn as horizontal lines.
    """
    plt = _pyplot()
    fig, (ax_acc, ax_lat) = plt.subplots(1, 2, figsize=(10, 4))
    for name, points in curves.items():
        points = sorted(points, key=lambda p: p[0])
        xs = [p[0] for p in points]
        ax_acc.plot(xs, [p[1]["accuracy"] for p in points], marker="o", label=name)
        lat = [_latency(p[1], latency) for p in points]
        if any(v is not None for v in lat):
            ax_lat.plot(xs, [v if v is not None else float("nan") for v in lat], marker="o", label=name)
    if baseline is not None:
        ax_acc.axhline(baseline["accuracy"], color="k", ls="--", lw=1, label=f"{baseline['method']}")
        base_lat = _latency(baseline, latency)
        if base_lat is not None:
            ax_lat.axhline(base_lat, color="k", ls="--", lw=1, label=f"{baseline['method']}")
    ax_acc.set_xlabel(xlabel)
    ax_acc.set_ylabel("accuracy")
    ax_acc.set_ylim(-0.02, 1.02)
    ax_lat.set_xlabel(xlabel)
    names = {"prefill_s": "prefill (s)", "decode_s_per_token": "decode (s/token)", "total_s": "total (s)"}
    ax_lat.set_ylabel(names.get(latency, latency))
    for ax in (ax_acc, ax_lat):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title or "accuracy and latency against budget")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def _latency(result: dict[str, Any], key: str) -> float | None:
    values = [c.get(key) for c in result["cells"] if c.get(key) is not None]
    if not values:
        return None
    values.sort()
    return values[len(values) // 2]
