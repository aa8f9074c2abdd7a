"""KV policies benchmark (issue #5): quality against the KV budget, LeoAM's speed, agreement with kvpress.

    python benchmarks/kv.py [--quick] [--out benchmarks/results/kv.json] [--parts quality,speed,kvpress]
    python benchmarks/kv.py --parts quality --policies leoam,leoam_tiered --update   # re-measure LeoAM only
    python benchmarks/kv.py --parts quality --policies leoam_prefill,leoam_tiered_prefill --update   # the old rule

1. quality: on the trained reference model (`llmsys.testing.reference_model`), needle and
   multi-query associative recall (MQAR) accuracy for Full, StreamingLLM, H2O, SnapKV, Quest, LeoAM
   (its selection policy, every page on the device) and leoam_tiered (`LeoAMCache`: the device holds
   the budget plus page slack, the host as much again, the rest goes to disk, 8-bit compressed) at
   KV budgets of 1/2, 1/4, 1/8 and 1/16 of the prompt length. Protocol (kvpress's, for
   RULER-style runs; `llmsys.kv.protocol`): the context - the prompt up to its first `<q>` - is
   prefilled into a fresh `PagedCache` with the policy (eviction policies compress it here, without
   seeing the question), then the question is fed one token at a time (decode steps: Quest and LeoAM
   select per step, H2O and StreamingLLM keep evicting) and the answer is decoded greedily; exact
   match. Budgets count tokens per layer and apply to the prompt length; the question and the answer
   add their tokens.
2. speed: `run_speed(quick, out_dir)` from benchmarks/kv_speed.py (LeoAM's decode speed against
   whole-layer offloading, and its disk bytes), merged into the JSON.
3. kvpress: the same saved reference model and the same needle contexts through kvpress's
   `StreamingLLMPress` and `SnapKVPress` in their own environment (`--kvpress-python`, default
   .venv-kvpress/bin/python; kvpress 0.5.x pins transformers < 5.3) at the same budget: per layer,
   are the kept token indices identical (kvpress keeps a set per KV head; `PagedCache` one per
   layer), how do the scores compare, and what does each answer?

Writes the JSON (--out) with `accuracy[policy][budget]` (mean over the two tasks), `accuracy_by_task`,
`decode_speedup_vs_offload` and `disk_bytes_ratio` (from kv_speed), `kvpress`, `goal` (every LeoAM cell
also has `selection_cost`: abstracts scored and pages chosen per layer, row and decode step, and the
mean run of consecutive chosen pages, `transfer_pages`), and PNG
plots next to it (<stem>_accuracy.png, <stem>_kvpress.png). --quick: < 5 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, kv_speed (imported in main: the
# kvpress worker runs this file in the kvpress environment, which has no llmsys)
import _kvpress  # noqa: E402  (imports no llmsys: the kvpress worker uses it too)

log = logging.getLogger("benchmarks.kv")
ROOT = Path(__file__).resolve().parents[1]
FRACTIONS = {"1/2": 2, "1/4": 4, "1/8": 8, "1/16": 16}
POLICIES = ("streamingllm", "h2o", "snapkv", "quest", "leoam", "leoam_tiered")
# LeoAM's prefill-only chunking (`refine=False, rechunk=False`, the rule before the adaptive selection):
# measured only when named in --policies
OPTIONAL = ("leoam_prefill", "leoam_tiered_prefill")
PAGE_SIZE = 16
SINKS = 4

# ------------------------------------------------------------------------------------------------
# kvpress worker: runs in the kvpress environment (transformers < 5.3), so it imports no llmsys


def kvpress_worker(folder: str, window: int, kernel: int, ratio: float) -> None:
    """StreamingLLMPress and SnapKVPress on the saved model and contexts: kept indices per head, answers."""
    from kvpress import SnapKVPress, StreamingLLMPress
    from transformers import DynamicCache

    folder_path = Path(folder)
    model = _kvpress.load_model(folder_path)
    data = torch.load(folder_path / "prompts.pt")
    out: dict[str, Any] = {}
    presses = {
        "streamingllm": _kvpress.recording(StreamingLLMPress)(compression_ratio=ratio, n_sink=4),
        "snapkv": _kvpress.recording(SnapKVPress)(compression_ratio=ratio, window_size=window, kernel_size=kernel),
    }
    for name, press in presses.items():
        press.records = []
        answers = []
        for context, question in zip(data["contexts"], data["questions"]):
            press.records.append({})
            cache = DynamicCache()
            with torch.no_grad():
                with press(model):
                    model(context[None], past_key_values=cache)
                # as kvpress's pipeline answers: the question at its true positions, outside the press
                positions = torch.arange(context.shape[0], context.shape[0] + question.shape[0])[None]
                logits = model(question[None], past_key_values=cache, position_ids=positions).logits
            answers.append(int(logits[0, -1].argmax()))
        out[name] = {"records": press.records, "answers": answers}
    out["versions"] = _kvpress.versions()
    torch.save(out, folder_path / "kvpress.pt")


# ------------------------------------------------------------------------------------------------
# policies and the protocol


def leoam_available() -> bool:
    import llmsys.kv  # noqa: F401  (registers the kv methods)
    from llmsys.registry import list_methods

    return any(e.name == "leoam" for e in list_methods())


def cache_factory(name: str, budget: int) -> Callable[[Any], Any]:
    """A fresh cache for `model` holding policy `name` at `budget` tokens per layer."""
    from llmsys.cache import PagedCache
    from llmsys.kv import H2O, Full, Quest, SnapKV, StreamingLLM

    if name in ("leoam", "leoam_prefill"):
        return leoam_factory(budget, adaptive=name == "leoam")
    if name in ("leoam_tiered", "leoam_tiered_prefill"):
        return leoam_tiered_factory(budget, adaptive=name == "leoam_tiered")
    policies = {
        "full": lambda: Full(),
        "streamingllm": lambda: StreamingLLM(budget=budget, sinks=SINKS),
        "h2o": lambda: H2O(budget=budget),
        "snapkv": lambda: SnapKV(budget=budget, window=min(32, budget // 2)),
        "quest": lambda: Quest(budget=budget),
    }
    make = policies[name]
    return lambda model: PagedCache.from_model(model, policy=make(), page_size=PAGE_SIZE)


def leoam_factory(budget: int, adaptive: bool = True) -> Callable[[Any], Any]:
    """LeoAM's selection at `budget` tokens per layer, every page on the device (`llmsys.kv.leoam`);
    `adaptive=False`: the prefill-only chunks (``refine=False, rechunk=False``)."""
    from llmsys.cache import PagedCache
    from llmsys.registry import get_method

    leoam = get_method("leoam")
    kw = {"count_cost": True} | ({} if adaptive else {"refine": False, "rechunk": False})
    return lambda model: PagedCache.from_model(model, policy=leoam(budget=budget, **kw), page_size=PAGE_SIZE)


def leoam_tiered_factory(budget: int, adaptive: bool = True) -> Callable[[Any], Any]:
    """`LeoAMCache` attending `budget` tokens: the device holds the budget plus LeoAM's page slack, the
    host as much again, the rest goes to disk, 8-bit min/max compressed (LeoAMCache's default);
    `adaptive=False`: the prefill-only chunks."""
    from llmsys.kv import LeoAMCache

    window = min(64, (budget - SINKS) // 4)  # LeoAM's own default window for this budget
    kw = {"count_cost": True} | ({} if adaptive else {"refine": False, "rechunk": False})
    return lambda model: LeoAMCache.from_model(
        model, device_budget=budget + 5 * PAGE_SIZE, host_budget=budget, budget=budget, sink=SINKS, window=window,
        page_size=PAGE_SIZE, **kw,
    )  # fmt: skip


def recording(factory: Callable[[Any], Any], sink: list[dict[str, float]]) -> Callable[[Any], Any]:
    """`factory` whose caches append LeoAM's selection cost (`llmsys.kv.leoam.chunk_stats`) to `sink`
    when they are closed (a policy without LeoAM's state records nothing)."""
    from llmsys.kv.leoam import chunk_stats

    def make(model: Any) -> Any:
        cache = factory(model)
        close = cache.close

        def closing() -> None:
            stats = chunk_stats(cache)
            if stats["rows"]:
                sink.append(stats)
            close()

        cache.close = closing
        return cache

    return make


# ------------------------------------------------------------------------------------------------
# part 1: quality


def quality(model: Any, lengths: list[int], depths: list[float], samples: int, policies: list[str],
            previous: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """Accuracy per task, policy, budget fraction and length (the same samples for every policy).

    `previous`: an earlier result on the same grid whose cells stand for the policies not in
    `policies` (`--policies leoam --update` re-measures LeoAM only; Full is always re-measured)."""
    from tqdm import tqdm

    from llmsys.eval import MQARTask, NeedleTask, evaluate, generate_method
    from llmsys.kv.protocol import context_then_question

    tasks = {"needle": NeedleTask(), "mqar": MQARTask()}
    cells: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}  # task -> policy -> fraction -> length -> result

    def run(task: Any, name: str, budget: int, length: int) -> dict[str, Any]:
        costs: list[dict[str, float]] = []
        factory = recording(cache_factory(name, budget), costs)
        method = generate_method(context_then_question(factory), name=f"{name} k={budget}")
        r = evaluate(model, task, method, [length], depths, samples, batch_size=samples, progress=False)
        out = {"correct": sum(c["correct"] for c in r["cells"]), "n": sum(c["n"] for c in r["cells"]),
               "accuracy": r["accuracy"], "budget": budget, "seconds": r["seconds"],
               "kv_bytes": r["by_length"][str(length)].get("kv_bytes"),
               "by_depth": {str(c["depth"]): c["accuracy"] for c in r["cells"]}}  # fmt: skip
        if costs:  # LeoAM: abstracts scored and pages chosen per layer, row and decode step; transfer size
            rows = sum(c["rows"] for c in costs)
            out["selection_cost"] = {
                "rows": rows,
                **{k: sum(c[k] * c["rows"] for c in costs) / rows for k in ("abstracts_per_step", "pages_per_step")},
                "transfer_pages": sum(c["pages_per_step"] * c["rows"] for c in costs)
                / max(sum(c["pages_per_step"] * c["rows"] / max(c["transfer_pages"], 1e-9) for c in costs), 1e-9),
            }
        return out

    jobs = [(t, "full", "all", n) for t in tasks for n in lengths]
    jobs += [(t, p, f, n) for t in tasks for p in policies for f in FRACTIONS for n in lengths]
    errors: list[str] = []
    for task_name, policy, fraction, length in tqdm(jobs, desc="kv quality", mininterval=5):
        budget = length if fraction == "all" else length // FRACTIONS[fraction]
        try:
            result = run(tasks[task_name], policy, budget, length)
        except Exception as exc:  # recorded (accuracy None: "-" in the tables) and reported as a TODO
            log.exception("%s %s %s %d failed", task_name, policy, fraction, length)
            result = {"accuracy": None, "budget": budget, "error": f"{type(exc).__name__}: {exc}"}
            errors.append(f"{task_name} {policy} {fraction} {length}: {result['error'][:300]}")
        cells.setdefault(task_name, {}).setdefault(policy, {}).setdefault(fraction, {})[str(length)] = result
        log.info("%s %s %s %d: %.3f", task_name, policy, fraction, length, result["accuracy"])

    def pooled(per_length: dict[str, dict[str, Any]]) -> float | None:
        if any("error" in r for r in per_length.values()):
            return None
        return sum(r["correct"] for r in per_length.values()) / sum(r["n"] for r in per_length.values())

    def mean(values: list[float | None]) -> float | None:
        return None if None in values else sum(values) / len(values)  # type: ignore[arg-type]

    kept_from_previous = []
    if previous is not None:
        if [previous[k] for k in ("lengths", "depths", "samples_per_cell")] != [lengths, depths, samples]:
            raise ValueError("--update --policies: the JSON in --out was measured on another grid; rerun everything")
        for t, per_policy in previous["cells"].items():
            for p, per in per_policy.items():
                if p not in cells[t]:
                    cells[t][p] = per
                    kept_from_previous.append(p)
    policies = [p for p in (*POLICIES, *OPTIONAL) if any(p in cells[t] for t in cells)]
    cells = {t: {p: per[p] for p in ["full", *policies] if p in per} for t, per in cells.items()}  # table order
    by_task = {t: {p: {f: pooled(per) for f, per in fr.items()} for p, fr in pol.items()} for t, pol in cells.items()}
    for t in by_task:  # Full does not depend on the budget: its one measurement stands in every column
        by_task[t]["full"] = {f: by_task[t]["full"]["all"] for f in FRACTIONS}
    accuracy = {p: {f: mean([by_task[t][p][f] for t in tasks]) for f in FRACTIONS} for p in ["full", *policies]}
    return {"tasks": {t: repr(v) for t, v in tasks.items()}, "lengths": lengths, "depths": depths,
            "samples_per_cell": samples, "page_size": PAGE_SIZE, "fractions": FRACTIONS, "policies": policies,
            "from_previous_run": sorted(set(kept_from_previous)),
            "accuracy": accuracy, "accuracy_by_task": by_task, "cells": cells, "errors": errors}  # fmt: skip


# ------------------------------------------------------------------------------------------------
# part 3: kvpress


def kvpress_compare(python: str, model: Any, length: int, budget: int, depths: list[float], seeds: int,
                    window: int = 32, kernel: int = 5) -> dict[str, Any]:  # fmt: skip
    """Our StreamingLLM and SnapKV against kvpress's presses: same model, contexts and budget."""
    from llmsys.cache import PagedCache
    from llmsys.eval import REFERENCE_VOCAB, NeedleTask
    from llmsys.kv import StreamingLLM
    from llmsys.models import forward

    if not Path(python).exists():
        return {"status": "missing", "reason": f"no kvpress environment at {python} (see docs/kv.md)"}
    task = NeedleTask()
    samples = [task(length + 2, d, s) for d in depths for s in range(seeds)]  # context = `length` tokens
    contexts = torch.stack([torch.tensor(s.prompt[:length]) for s in samples])
    questions = torch.stack([torch.tensor(s.prompt[length:]) for s in samples])
    if not bool((questions[:, 0] == REFERENCE_VOCAB.Q).all()):
        raise RuntimeError("NeedleTask no longer ends with a 2-token question; update kvpress_compare")
    ratio = 1 - budget / length

    def save_prompts(folder: Path) -> None:
        torch.save({"contexts": contexts, "questions": questions}, folder / "prompts.pt")

    theirs = _kvpress.run_worker(__file__, python, model, save_prompts, window, kernel, ratio)
    if theirs.get("status") == "failed":
        return theirs

    answers = [s.answer[0] for s in samples]
    result: dict[str, Any] = {"status": "ok", "versions": theirs.pop("versions"), "context_length": length,
                              "budget": budget, "window": window, "kernel": kernel, "sinks": 4,
                              "prompts": len(samples), "depths": depths}  # fmt: skip
    RecordingSnapKV = _kvpress.recording_snapkv()
    policies = {"streamingllm": StreamingLLM(budget=budget, sinks=4),
                "snapkv": RecordingSnapKV(budget=budget, window=window, kernel=kernel)}  # fmt: skip
    for name, policy in policies.items():
        records = theirs[name]["records"]
        identical_layers, identical_heads, overlap, same_as_mean, score_diff, ours_right = [], [], [], [], [], []
        value_ours: dict[int, list[bool]] = {}
        value_theirs: dict[int, dict[int, list[bool]]] = {}
        for row, record in enumerate(records):
            with PagedCache.from_model(model, policy=policy, page_size=PAGE_SIZE) as cache, torch.no_grad():
                out = forward(model, contexts[row][None], cache=cache)
                kept = [layer.token_index[0].tolist() for layer in cache.layers]
                scores = [layer.policy_state.get("scores") for layer in cache.layers]
                for token in questions[row]:
                    out = forward(model, token.view(1, 1), cache=cache)
                ours_right.append(int(out.logits[0, -1].argmax()) == answers[row])
            value = samples[row].positions[0] + 2  # the asked fact `<kv> k v`: where its value sits
            for layer_idx, ours in enumerate(kept):
                heads = [h.tolist() for h in record[layer_idx]["indices"]]
                value_ours.setdefault(layer_idx, []).append(value in ours)
                for head, h in enumerate(heads):
                    value_theirs.setdefault(layer_idx, {}).setdefault(head, []).append(value in h)
                identical_layers.append(all(h == ours for h in heads))
                identical_heads += [h == ours for h in heads]
                overlap += [len(set(h) & set(ours)) / len(ours) for h in heads]
                if name == "snapkv":
                    mean = record[layer_idx]["scores"].mean(dim=0)  # kvpress's per-KV-head scores, averaged
                    same_as_mean.append(ours == sorted(mean.topk(budget).indices.tolist()))
                    prefix = length - window  # ours sum over the window, kvpress averages over it
                    diff = (scores[layer_idx][:prefix] / window - mean[:prefix]).abs().max().item()
                    score_diff.append(diff)
        theirs_right = [a == b for a, b in zip(theirs[name]["answers"], answers)]
        entry = {
            "layers_identical_to_every_kvpress_head": sum(identical_layers) / len(identical_layers),
            "heads_identical": sum(identical_heads) / len(identical_heads),
            "mean_overlap_per_head": sum(overlap) / len(overlap),
            "min_overlap_per_head": min(overlap),
            "needle_accuracy_llmsys": sum(ours_right) / len(ours_right),
            "needle_accuracy_kvpress": sum(theirs_right) / len(theirs_right),
            "same_answer": sum(a == b for a, b in zip(ours_right, theirs_right)) / len(ours_right),
            # how often the asked fact's value survives: per layer (ours), per layer and KV head (kvpress)
            "needle_value_kept_llmsys": [sum(v) / len(v) for _, v in sorted(value_ours.items())],
            "needle_value_kept_kvpress": [[sum(v) / len(v) for _, v in sorted(heads.items())]
                                          for _, heads in sorted(value_theirs.items())],  # fmt: skip
        }
        if name == "snapkv":
            entry["layers_identical_to_topk_of_kvpress_head_mean"] = sum(same_as_mean) / len(same_as_mean)
            entry["score_max_abs_diff_vs_kvpress_head_mean"] = max(score_diff)
        result[name] = entry
    return result


# ------------------------------------------------------------------------------------------------
# reporting


def markdown(result: dict[str, Any]) -> str:
    """The accuracy tables (mean and per task, per length) and the kvpress table, in Markdown."""

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.1e}" if 0 < abs(v) < 0.01 else f"{v:.2f}"
        return "-" if v is None else str(v)

    lines: list[str] = []
    q = result.get("quality")
    if q:
        head = "| policy | " + " | ".join(FRACTIONS) + " |"
        rule = "|---|" + "---:|" * len(FRACTIONS)
        lines += ["mean of needle and MQAR:", "", head, rule]
        lines += [f"| {p} | " + " | ".join(fmt(per[f]) for f in FRACTIONS) + " |" for p, per in q["accuracy"].items()]
        for task, acc in q["accuracy_by_task"].items():
            lines += ["", f"{task}:", "", head, rule]
            lines += [f"| {p} | " + " | ".join(fmt(per[f]) for f in FRACTIONS) + " |" for p, per in acc.items()]
        lengths = q["lengths"]
        lines += ["", "per length (mean of the tasks, budget 1/8):", "",
                  "| policy | " + " | ".join(str(n) for n in lengths) + " |", "|---|" + "---:|" * len(lengths)]
        for policy in next(iter(q["cells"].values())):
            fraction = "all" if policy == "full" else "1/8"
            row = []
            for n in q["lengths"]:
                accs = [q["cells"][t][policy][fraction][str(n)].get("accuracy") for t in q["cells"]]
                row.append(None if None in accs else sum(accs) / len(accs))
            lines.append(f"| {policy} | " + " | ".join(fmt(v) for v in row) + " |")
    kv = result.get("kvpress")
    if kv and kv.get("status") == "ok":
        keys = sorted({k for n in ("streamingllm", "snapkv") for k in kv[n] if not k.startswith("needle_value")})
        lines += ["", "| measure | StreamingLLM | SnapKV |", "|---|---:|---:|"]
        lines += [f"| {k} | {fmt(kv['streamingllm'].get(k))} | {fmt(kv['snapkv'].get(k))} |" for k in keys]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# plots


def _plots(result: dict[str, Any], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    stem = out.with_suffix("")
    q = result.get("quality")
    if q:
        fractions = list(FRACTIONS)
        tasks = list(q["accuracy_by_task"])
        fig, axes = plt.subplots(1, len(tasks) + 1, figsize=(4.2 * (len(tasks) + 1), 3.8), squeeze=False)
        panels = [(t, q["accuracy_by_task"][t]) for t in tasks] + [("mean of the tasks", q["accuracy"])]
        for ax, (title, acc) in zip(axes[0], panels):
            for policy, per in acc.items():
                style = dict(ls="--", color="black", marker=None, zorder=5) if policy == "full" else dict(marker="o")
                ax.plot(range(len(fractions)), [float("nan") if per[f] is None else per[f] for f in fractions],
                        label=policy, **style)  # fmt: skip
            ax.set_xticks(range(len(fractions)), fractions)
            ax.set_ylim(-0.03, 1.03)
            ax.set_xlabel("KV budget (fraction of the prompt)")
            ax.set_title(title, fontsize=9)
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("accuracy (exact match)")
        axes[0][-1].legend(fontsize=7)
        fig.suptitle(f"reference model, lengths {q['lengths']}, {q['samples_per_cell']} samples x "
                     f"{len(q['depths'])} depths per length; {result['machine']['cpu']}", fontsize=8)  # fmt: skip
        fig.tight_layout()
        path = Path(f"{stem}_accuracy.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(str(path))
    kv = result.get("kvpress")
    if kv and kv.get("status") == "ok":
        names = [n for n in ("streamingllm", "snapkv") if n in kv]
        metrics = [("heads_identical", "kept set = kvpress head's"), ("mean_overlap_per_head", "overlap per head"),
                   ("needle_accuracy_llmsys", "needle acc. llmsys"), ("needle_accuracy_kvpress", "needle acc. kvpress")]
        fig, ax = plt.subplots(figsize=(7, 3.8))
        width = 0.8 / len(metrics)
        for i, (key, label) in enumerate(metrics):
            ax.bar([j + (i - (len(metrics) - 1) / 2) * width for j in range(len(names))],
                   [kv[n][key] for n in names], width=width, label=label)  # fmt: skip
        ax.set_xticks(range(len(names)), names)
        ax.set_ylim(0, 1.3)  # room for the legend above the bars
        ax.set_title(f"llmsys vs kvpress {kv['versions']['kvpress']}: reference model, {kv['prompts']} needle "
                     f"contexts of {kv['context_length']}, budget {kv['budget']}", fontsize=8)  # fmt: skip
        ax.legend(fontsize=7, loc="upper center", ncol=2)
        fig.tight_layout()
        path = Path(f"{stem}_kvpress.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(str(path))
    return written


# ------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer lengths and samples (< 5 min on 2 cores)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/kv.json"), help="JSON path")
    parser.add_argument("--parts", default="quality,speed,kvpress", help="comma list of quality, speed, kvpress")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--update", action="store_true", help="keep the other parts' results already in --out")
    parser.add_argument("--policies", default=None,
                        help="policies to (re)measure, comma list; with --update the others come from --out")
    _kvpress.add_arguments(parser, ratio=0.875)
    args = parser.parse_args(argv)
    if args.kvpress_worker:
        kvpress_worker(args.kvpress_worker, args.kvpress_window, args.kvpress_kernel, args.kvpress_ratio)
        return 0

    from _common import machine_info, print_table, write_json

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("llmsys.cache", "llmsys.cache.cache"):  # the "no model attached" batch warning: rows are unpadded
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if args.threads:
        torch.set_num_threads(args.threads)
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    out = Path(args.out)
    result: dict[str, Any] = {"machine": machine_info(), "quick": args.quick}
    started = time.perf_counter()
    todo: list[str] = []

    from llmsys.testing import reference_model

    model = reference_model()  # committed weights; raises ReferenceWeightsMissing naming the fix
    policies = [p for p in POLICIES if not p.startswith("leoam") or leoam_available()]
    if args.policies:
        unknown = set(args.policies.split(",")) - set(POLICIES) - set(OPTIONAL)
        if unknown:
            choices = ", ".join((*POLICIES, *OPTIONAL))
            raise SystemExit(f"--policies: unknown {sorted(unknown)}; choose from {choices}")
        wanted = args.policies.split(",")
        policies = [p for p in (*policies, *OPTIONAL) if p in wanted and (p in policies or leoam_available())]
    if not leoam_available():
        todo.append("leoam is not registered (llmsys.kv.leoam missing): the quality sweep ran without LeoAM")

    if "quality" in parts:
        if args.quick:
            lengths, depths, samples = [1024], [0.0, 0.25, 0.5, 0.75, 1.0], 4
        else:
            lengths, depths, samples = [1024, 2048, 4096], [0.0, 0.25, 0.5, 0.75, 1.0], 4
        previous = None
        if args.update and out.exists() and args.policies:
            previous = json.loads(out.read_text()).get("quality")
        q = quality(model, lengths, depths, samples, policies, previous)
        result["quality"] = q
        result["accuracy"] = q["accuracy"]
        result["accuracy_by_task"] = q["accuracy_by_task"]
        todo += [f"quality cell failed (no accuracy): {e}" for e in q["errors"]]
        rows = [{"policy": p, **{f: v for f, v in per.items()}} for p, per in q["accuracy"].items()]
        print(f"\naccuracy (mean of needle and MQAR; reference model, lengths {lengths}):")
        print_table(rows, ["policy", *FRACTIONS])
        for t, acc in q["accuracy_by_task"].items():
            print(f"\n{t}:")
            print_table([{"policy": p, **per} for p, per in acc.items()], ["policy", *FRACTIONS])
        if "leoam" in q["accuracy"]:
            leo, full = q["accuracy"]["leoam"]["1/8"], q["accuracy"]["full"]["1/8"]
            gap = None if leo is None else round(100 * (full - leo), 2)
            result["goal"] = {"leoam_1/8": leo, "full": full, "gap_points": gap, "met": gap is not None and gap <= 2}
            print(f"\ngoal (LeoAM at 1/8 within 2 points of Full): {json.dumps(result['goal'])}")

    if "speed" in parts:
        try:
            from kv_speed import run_speed  # the LeoAM half of issue #5
        except ImportError as exc:
            todo.append(f"benchmarks/kv_speed.py not importable ({exc}): no speedup / disk bytes numbers")
            result["speed"] = {"status": "missing", "reason": str(exc)}
        else:
            speed = run_speed(args.quick, out.parent)
            result["speed"] = speed
            for key in ("decode_speedup_vs_offload", "disk_bytes_ratio"):
                if key not in speed:
                    todo.append(f"run_speed returned no {key!r}")
                result[key] = speed.get(key)

    if "kvpress" in parts:
        length, seeds = (1024, 2) if args.quick else (2048, 4)
        kv = kvpress_compare(args.kvpress_python, model, length, length // 8, [0.0, 0.25, 0.5, 0.75, 1.0], seeds)
        result["kvpress"] = kv
        if kv.get("status") != "ok":
            todo.append(f"kvpress comparison {kv.get('status')}: {kv.get('reason') or kv.get('stderr', '')[-300:]}")
        print(f"\nkvpress comparison: {json.dumps(kv, indent=1, default=str)[:3000]}")

    result["todo"] = todo
    result["seconds"] = round(time.perf_counter() - started, 1)
    if args.update and out.exists():
        result = {**json.loads(out.read_text()), **result}
    write_json(out, result)  # first without plots: a plotting error must not lose the measurements
    result["plots"] = _plots(result, out)
    write_json(out, result)
    print("\n" + markdown(result))
    for item in todo:
        log.warning("TODO: %s", item)
    print(f"\nwrote {out} and {', '.join(result['plots']) or 'no plots'} in {result['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
