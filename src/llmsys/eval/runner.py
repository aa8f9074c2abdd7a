"""Run a task over lengths x depths with a method, and measure accuracy, latency, memory and KV bytes.

A *method* is how the model is run:

- ``None`` / ``"full"``: plain prefill + greedy decode with the model's own cache;
- a **context manager factory** ``f(model) -> context manager`` (kvpress style, e.g. a GemFilter
  instance): every sample runs inside ``with f(model):``;
- a **cache factory** ``f(model) -> transformers Cache`` (or ``f() -> Cache``): a fresh cache per
  batch, passed to ``llmsys.models.forward``;
- a **generate function** ``f(model, input_ids, max_new_tokens) -> token ids`` (the new tokens, or
  the prompt followed by them, like ``model.generate``); may return ``(ids, info)`` where info may
  hold ``"kv_bytes"``.

Wrap a callable with `context_method`, `cache_method` or `generate_method` to say which it is;
`as_method` guesses for a bare callable (two or more required arguments: a generate function;
otherwise it calls it once on the model and looks at what comes back).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from llmsys.eval.tasks import Sample, exact_match, make_samples

log = logging.getLogger(__name__)

DEFAULT_LENGTHS = (1024, 2048, 4096)
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


# --------------------------------------------------------------------------------------------------
# methods


@dataclass(frozen=True)
class Method:
    """How the model is run: kind is "full", "context", "cache" or "generate"."""

    name: str
    kind: str
    fn: Callable | None = None

    def __post_init__(self):
        if self.kind not in ("full", "context", "cache", "generate"):
            raise ValueError(f"unknown method kind {self.kind!r}")
        if self.kind != "full" and not callable(self.fn):
            raise TypeError(f"a {self.kind} method needs a callable, got {self.fn!r}")


def _name(obj: Any, default: str) -> str:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return repr(obj)
    return getattr(obj, "__name__", None) or type(obj).__name__ or default


def full() -> Method:
    return Method("full", "full")


def context_method(factory: Callable[[Any], Any], name: str | None = None) -> Method:
    """A method applied as ``with factory(model): ...`` around prefill and decode."""
    return Method(name or _name(factory, "context"), "context", factory)


def cache_method(factory: Callable[..., Any], name: str | None = None) -> Method:
    """A method that is a KV cache: ``factory(model)`` or ``factory()`` gives a fresh transformers Cache."""
    return Method(name or _name(factory, "cache"), "cache", factory)


def generate_method(fn: Callable[..., Any], name: str | None = None) -> Method:
    """A method that generates by itself: ``fn(model, input_ids, max_new_tokens) -> ids``."""
    return Method(name or _name(fn, "generate"), "generate", fn)


def _required_positional(fn: Callable) -> int | None:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(1 for p in sig.parameters.values() if p.kind in kinds and p.default is inspect.Parameter.empty)


def _is_cache(obj: Any) -> bool:
    from transformers import Cache

    return isinstance(obj, Cache)


def as_method(method: Any, model: Any = None) -> Method:
    """A `Method` from None / "full" / a Method / a registered method name / a callable (see module doc)."""
    if method is None or (isinstance(method, str) and method in ("full", "none", "baseline")):
        return full()
    if isinstance(method, Method):
        return method
    if isinstance(method, str):
        from llmsys.registry import get_method

        return context_method(get_method(method)(), name=method)
    if _is_cache(method):
        raise TypeError(
            "pass a cache *factory* (e.g. lambda model: MyCache(...)), not a cache: each batch needs a fresh one"
        )
    if not callable(method):
        raise TypeError(f"cannot use {method!r} as a method: expected None, 'full', a Method or a callable")
    required = _required_positional(method)
    if required is not None and required >= 2:
        return generate_method(method)
    probe = method() if required == 0 else method(model)
    if _is_cache(probe):
        return cache_method(method)
    if hasattr(probe, "__enter__") and hasattr(probe, "__exit__"):
        return context_method(method)
    raise TypeError(
        f"{method!r} returned {type(probe).__name__}, neither a transformers Cache nor a context manager; "
        "wrap it with context_method / cache_method / generate_method to say what it is"
    )


# --------------------------------------------------------------------------------------------------
# measurements


def kv_bytes(cache: Any) -> int | None:
    """Bytes of keys and values held by a cache (llmsys PagedCache, DynamicCache, ...), or None."""
    if cache is None:
        return None
    for attr in ("kv_bytes", "nbytes"):
        value = getattr(cache, attr, None)
        if value is not None:
            value = value() if callable(value) else value
            if isinstance(value, (int, float)):
                return int(value)
    by_tier = getattr(cache, "bytes_by_tier", None)
    if callable(by_tier):
        return int(sum(by_tier().values()))
    layers = getattr(cache, "layers", None)
    if layers is None:
        return None
    total = 0
    for layer in layers:
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


class _PeakMemory:
    """Peak memory over a block: max_memory_allocated on CUDA, peak RSS (VmHWM, reset per block) on CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak: int | None = None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            _reset_rss_peak()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = int(torch.cuda.max_memory_allocated(self.device))
        else:
            self.peak = _rss_peak()
        return False


def _reset_rss_peak() -> None:
    if sys.platform.startswith("linux"):
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the peak resident set size (Linux >= 4.0)
        except OSError:
            pass


def _rss_peak() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import resource

        scale = 1 if sys.platform == "darwin" else 1024
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale
    except Exception:  # pragma: no cover - no resource module (Windows)
        return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _accepts_logits_to_keep(model: Any) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


@torch.no_grad()
def greedy_decode(model: Any, ids: torch.Tensor, new_tokens: int, cache: Any = None) -> dict[str, Any]:
    """Prefill `ids` then decode `new_tokens` greedily through `llmsys.models.forward`, timed.

    Returns {"tokens" [B, new_tokens], "prefill_s", "decode_s" (list per step), "cache"}.
    """
    from llmsys.models import forward, output_cache

    device = ids.device
    extra = {"logits_to_keep": 1} if _accepts_logits_to_keep(model) else {}
    _sync(device)
    t0 = time.perf_counter()
    out = forward(model, ids, cache=cache, use_cache=True, **extra)
    step = out.logits[:, -1:].argmax(-1)
    _sync(device)
    prefill = time.perf_counter() - t0
    cache = output_cache(out) if output_cache(out) is not None else cache
    tokens, decode = [step], []
    for _ in range(new_tokens - 1):
        t0 = time.perf_counter()
        out = forward(model, step, cache=cache, use_cache=True, **extra)
        step = out.logits[:, -1:].argmax(-1)
        _sync(device)
        decode.append(time.perf_counter() - t0)
        cache = output_cache(out) if output_cache(out) is not None else cache
        tokens.append(step)
    return {"tokens": torch.cat(tokens, dim=1), "prefill_s": prefill, "decode_s": decode, "cache": cache}


def _run_batch(model: Any, method: Method, ids: torch.Tensor, new_tokens: int) -> dict[str, Any]:
    if method.kind == "full":
        return greedy_decode(model, ids, new_tokens)
    if method.kind == "cache":
        factory = method.fn
        cache = factory() if _required_positional(factory) == 0 else factory(model)
        try:
            res = greedy_decode(model, ids, new_tokens, cache=cache)
            res["kv_bytes"] = kv_bytes(res["cache"])
            return res
        finally:
            close = getattr(cache, "close", None)
            if callable(close) and _needs_close(cache):
                close()
    if method.kind == "context":
        with method.fn(model):
            return greedy_decode(model, ids, new_tokens)
    # generate function
    device = ids.device
    _sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = method.fn(model, ids, new_tokens)
    _sync(device)
    total = time.perf_counter() - t0
    info: dict[str, Any] = {}
    if isinstance(out, tuple):
        out, info = out[0], dict(out[1] or {})
    out = torch.as_tensor(out)
    if out.dim() == 1:
        out = out[None]
    if out.shape[1] >= ids.shape[1] + 1 and torch.equal(out[:, : ids.shape[1]].cpu(), ids.cpu()):
        out = out[:, ids.shape[1] :]
    return {"tokens": out[:, :new_tokens], "prefill_s": None, "decode_s": [], "total_s": total,
            "cache": None, "kv_bytes": info.get("kv_bytes")}


def _needs_close(cache: Any) -> bool:
    """Close caches that hold resources beyond tensors (llmsys PagedCache: disk tiers)."""
    return type(cache).__module__.startswith("llmsys.")


# --------------------------------------------------------------------------------------------------
# the runner


def _median(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def _model_info(model: Any) -> dict[str, Any]:
    config = getattr(model, "config", None)
    info = {"class": type(model).__name__}
    if config is not None:
        info.update(
            name_or_path=getattr(config, "_name_or_path", "") or getattr(config, "name_or_path", ""),
            model_type=getattr(config, "model_type", None),
            layers=getattr(config, "num_hidden_layers", None),
            hidden_size=getattr(config, "hidden_size", None),
        )
    try:
        info["parameters"] = int(sum(p.numel() for p in model.parameters()))
    except Exception:  # not an nn.Module
        pass
    return info


def _task_info(task: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(task):
        return {f.name: getattr(task, f.name) for f in dataclasses.fields(task) if f.name != "vocab"}
    return {"name": getattr(task, "name", type(task).__name__)}


def evaluate(
    model: Any,
    task: Any,
    method: Any = None,
    lengths: Sequence[int] = DEFAULT_LENGTHS,
    depths: Sequence[float] = DEFAULT_DEPTHS,
    samples: int = 5,
    seed: int = 0,
    batch_size: int = 1,
    decode_tokens: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    method_name: str | None = None,
) -> dict[str, Any]:
    """Accuracy, prefill time, per-token decode time, peak memory and KV bytes of `model` under `method`.

    `task` is a task object (``task(length, depth, seed) -> Sample``, e.g. `NeedleTask()`) or a
    name ("needle", "mqar", "vt"). Each (length, depth) cell gets `samples` samples (seeds seed,
    seed+1, ...), run in batches of `batch_size` (all samples of a cell have the same length);
    answers are decoded greedily (`decode_tokens`, default: the answer length, at least 2 so that a
    decode step is timed) and scored by exact match. Returns a JSON-able dict; see docs/eval.md.
    """
    from llmsys.eval.tasks import get_task

    if isinstance(task, str):
        task = get_task(task)
    m = as_method(method, model)
    if method_name:
        m = dataclasses.replace(m, name=method_name)
    if samples < 1 or batch_size < 1:
        raise ValueError("samples and batch_size must be >= 1")
    dev = torch.device(device) if device is not None else _model_device(model)
    cells = [(int(L), float(d)) for L in lengths for d in depths]
    bar = _bar(progress, len(cells) * samples, f"eval {getattr(task, 'name', 'task')} / {m.name}")
    results = []
    start = time.perf_counter()
    try:
        for length, depth in cells:
            cell_samples = make_samples(task, length, depth, samples, seed)
            results.append(_run_cell(model, m, cell_samples, length, depth, batch_size, decode_tokens, dev, bar))
    finally:
        bar.close()
    return _collect(model, task, m, lengths, depths, samples, seed, batch_size, dev, results, start)


def _model_device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def _run_cell(model, method, cell_samples: list[Sample], length, depth, batch_size, decode_tokens, dev, bar):
    correct, prefill, decode, totals, peaks, kvs, preds = 0, [], [], [], [], [], []
    for i in range(0, len(cell_samples), batch_size):
        chunk = cell_samples[i : i + batch_size]
        n_new = decode_tokens or max(2, max(len(s.answer) for s in chunk))
        n_new = max(n_new, max(len(s.answer) for s in chunk))
        ids = torch.tensor([s.prompt for s in chunk], dtype=torch.long, device=dev)
        with _PeakMemory(dev) as mem:
            res = _run_batch(model, method, ids, n_new)
        tokens = res["tokens"].cpu()
        for s, row in zip(chunk, tokens):
            ok = exact_match(row, s.answer)
            correct += ok
            preds.append(row[: len(s.answer)].tolist())
        prefill.append(res.get("prefill_s"))
        decode.extend(res.get("decode_s") or [])
        totals.append(res.get("total_s"))
        peaks.append(mem.peak)
        kv = res.get("kv_bytes")
        if kv is None and res.get("cache") is not None:
            kv = kv_bytes(res["cache"])
        kvs.append(None if kv is None else kv // len(chunk))  # per sample
        bar.update(len(chunk))
    n = len(cell_samples)
    peak_values = [p for p in peaks if p is not None]
    kv_values = [k for k in kvs if k is not None]
    return {
        "length": length,
        "depth": depth,
        "n": n,
        "correct": int(correct),
        "accuracy": correct / n,
        "prefill_s": _median(prefill),
        "decode_s_per_token": _median(decode),
        "total_s": _median(totals),
        "peak_memory_bytes": max(peak_values) if peak_values else None,
        "kv_bytes": max(kv_values) if kv_values else None,
        "predictions": preds,
    }


def _collect(model, task, method, lengths, depths, samples, seed, batch_size, dev, cells, start) -> dict[str, Any]:
    import transformers

    by_length: dict[str, dict[str, Any]] = {}
    for L in lengths:
        rows = [c for c in cells if c["length"] == int(L)]
        n = sum(c["n"] for c in rows)
        by_length[str(int(L))] = {
            "accuracy": sum(c["correct"] for c in rows) / n if n else None,
            "prefill_s": _median(c["prefill_s"] for c in rows),
            "decode_s_per_token": _median(c["decode_s_per_token"] for c in rows),
            "peak_memory_bytes": max((c["peak_memory_bytes"] or 0) for c in rows) or None,
            "kv_bytes": max((c["kv_bytes"] or 0) for c in rows) or None,
        }
    total_n = sum(c["n"] for c in cells)
    return {
        "task": getattr(task, "name", type(task).__name__),
        "task_config": _task_info(task),
        "method": method.name,
        "method_kind": method.kind,
        "model": _model_info(model),
        "lengths": [int(L) for L in lengths],
        "depths": [float(d) for d in depths],
        "samples": samples,
        "seed": seed,
        "batch_size": batch_size,
        "accuracy": sum(c["correct"] for c in cells) / total_n if total_n else None,
        "by_length": by_length,
        "cells": cells,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({platform.machine()})",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "seconds": round(time.perf_counter() - start, 3),
    }


class _NoBar:
    def update(self, n: int) -> None: ...
    def close(self) -> None: ...


def _bar(enabled: bool, total: int, desc: str):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="sample", leave=False)


# --------------------------------------------------------------------------------------------------
# reading results


def accuracy_grid(result: dict[str, Any]) -> list[list[float]]:
    """Accuracy [len(lengths)][len(depths)] from an `evaluate` result."""
    index = {(c["length"], c["depth"]): c["accuracy"] for c in result["cells"]}
    return [[index[(L, d)] for d in result["depths"]] for L in result["lengths"]]


def format_table(result: dict[str, Any]) -> str:
    """The length x depth accuracy table, plus latency per length, as text."""
    depths = result["depths"]
    head = f"{'length':>7} | " + " ".join(f"d={d:<5g}" for d in depths)
    head += " |   acc | prefill s | decode ms/tok |  KV MiB"
    lines = [f"{result['task']} / {result['method']} ({result['samples']} samples per cell)", head, "-" * len(head)]
    grid = accuracy_grid(result)
    for L, row in zip(result["lengths"], grid):
        info = result["by_length"][str(L)]
        pre = info["prefill_s"]
        dec = info["decode_s_per_token"]
        kv = info["kv_bytes"]
        lines.append(
            f"{L:>7} | " + " ".join(f"{a:7.2f}" for a in row) + f" | {info['accuracy']:5.2f} | "
            + (f"{pre:9.4f}" if pre is not None else f"{'-':>9}") + " | "
            + (f"{1000 * dec:13.2f}" if dec is not None else f"{'-':>13}") + " | "
            + (f"{kv / 2**20:7.2f}" if kv else f"{'-':>7}")
        )
    lines.append(f"overall accuracy {result['accuracy']:.3f}")
    return "\n".join(lines)


def format_markdown(result: dict[str, Any]) -> str:
    """The length x depth accuracy table as Markdown (for docs)."""
    depths = result["depths"]
    lines = [
        "| length | " + " | ".join(f"depth {d:g}" for d in depths) + " | all |",
        "|---:|" + "---:|" * (len(depths) + 1),
    ]
    for L, row in zip(result["lengths"], accuracy_grid(result)):
        acc = result["by_length"][str(L)]["accuracy"]
        lines.append(f"| {L} | " + " | ".join(f"{a:.2f}" for a in row) + f" | **{acc:.3f}** |")
    return "\n".join(lines)
