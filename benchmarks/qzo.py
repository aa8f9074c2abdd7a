"""QZO benchmark: peak memory, learning (accuracy lost to 4-bit and won back), clipping, throughput.

    .venv/bin/python benchmarks/qzo.py --quick          # < 5 min on 2 CPU cores
    .venv/bin/python benchmarks/qzo.py                  # the full memory model (~370M parameters)

1. Memory. Each method runs in its own subprocess on the same random-weight Llama (``--quick``: ~134M
   parameters, one step; default: ~374M, three steps, the first a warm-up): build the model, return
   freed memory to the OS (``malloc_trim``), reset the kernel's peak-RSS counter
   (``/proc/self/clear_refs`` = 5, which resets VmHWM), run the training steps, read VmHWM. So
   ``peak_rss`` is the peak resident memory *during training* of the
   whole process (weights, optimizer state, activations, Python, torch, transformers, bitsandbytes,
   PEFT - every worker imports all of them first) and
   ``peak_minus_import`` subtracts the RSS measured right after the imports, before the model exists
   (interpreter + libraries: the part a GPU's ``max_memory_allocated`` would not count either). On
   CUDA the worker reports ``torch.cuda.max_memory_allocated`` instead. Methods: QZO on NF4
   (bitsandbytes) and on llmsys int4 (group 128), MeZO in bf16 and fp32, SGD and AdamW full
   fine-tuning in bf16 and fp32, LoRA (r=8, all linear layers) in bf16. CPUs train in bf16 where a
   GPU would use fp16; fp32 AdamW holds 16 bytes per parameter, the same as mixed-precision AdamW
   (fp16 weights + fp16 grads + fp32 master copy and moments).
2. Learning. A small classifier trained here (a 4-layer MLP student fitted with AdamW to the labels of a
   random teacher MLP; a few input channels are scaled by 0.03, so the student needs large weights on
   them - the weight outliers that make 4-bit quantisation hurt real LLMs). Quantised to int4 (group
   128, round to nearest) and NF4, it loses accuracy; QZO then trains only the scales for N steps,
   and MeZO trains the full-precision student for the same N steps. Loss curves; the clipping
   ablation (the same QZO run with and without directional-derivative clipping at a large lr).
3. Throughput: QZO and MeZO steps/s on the classifier (median over repeats) and on the memory model.

Writes ``--out`` (default benchmarks/results/qzo.json) and qzo_memory.png, qzo_learning.png,
qzo_clipping.png next to it.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, print_table, write_json  # noqa: E402

# -------------------------------------------------------------------------------------------------
# 1. memory (one subprocess per method)
# -------------------------------------------------------------------------------------------------

SIZES = {
    # ~134M parameters (85M in the decoder layers, 49M in embeddings + head)
    "quick": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12),
    # ~374M parameters (308M in the decoder layers, 66M in embeddings + head)
    "full": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=24, num_attention_heads=16),
}
METHODS = ["qzo_nf4", "qzo_int4", "mezo_bf16", "mezo_fp32", "sgd_bf16", "adamw_bf16", "adamw_fp32", "lora_bf16"]


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed build-time memory back before the reset
    except OSError:
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux >= 4.0)
        return True
    except OSError:
        return False


def memory_worker(method: str, size: str, steps: int, seq: int, batch: int) -> dict[str, Any]:
    """Build the model for ``method``, train ``steps`` steps, return peak memory and step times."""
    from llmsys.qzo import QZO, MeZO, first_order, lora, quantize_bnb, quantize_int4
    from llmsys.testing import tiny_model

    # every worker imports the same libraries before the baseline RSS, so code size is the same for all
    for lib in ("bitsandbytes", "peft"):
        try:
            __import__(lib)
        except ImportError:
            pass
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    rss_import = _status_kb("VmRSS")
    dtype = torch.float32 if method.endswith("fp32") else torch.bfloat16
    model = tiny_model(
        "llama", dtype=dtype, vocab_size=32000, num_key_value_heads=SIZES[size]["num_attention_heads"],
        max_position_embeddings=2048, **SIZES[size],
    ).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    if method == "qzo_nf4":
        quantize_bnb(model, "nf4", compute_dtype=torch.bfloat16)
        opt: Any = QZO(model, lr=1e-5)
    elif method == "qzo_int4":
        quantize_int4(model, 128)
        opt = QZO(model, lr=1e-5)
    elif method.startswith("mezo"):
        opt = MeZO(model, lr=1e-6)
    elif method.startswith(("sgd", "adamw")):
        opt = first_order(model, method.split("_")[0], lr=1e-5)
    elif method == "lora_bf16":
        model, opt = lora(model, r=8, lr=1e-4)
    else:
        raise ValueError(method)
    if method.startswith(("qzo", "mezo")):
        model.requires_grad_(False)  # zeroth order: inference only, no autograd graph
    ids = torch.randint(3, 32000, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)

    def loss() -> torch.Tensor:
        return model(input_ids=ids, labels=ids).loss

    reset_ok = _reset_peak() if not cuda else True
    rss_setup = _status_kb("VmRSS")  # after malloc_trim: the model, ready to train
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        if method.startswith(("qzo", "mezo")):
            opt.step(loss)
        else:
            opt.zero_grad(set_to_none=True)
            loss().backward()
            opt.step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    out: dict[str, Any] = {
        "method": method, "size": size, "params": n_params, "steps": steps, "batch": batch, "seq": seq,
        "step_s": times, "median_step_s": statistics.median(times[1:] or times),
        "step_time_note": "median after the warm-up step" if steps > 1 else "the only step (includes warm-up)",
    }
    if cuda:
        out["peak_bytes"] = torch.cuda.max_memory_allocated()
        out["measure"] = "torch.cuda.max_memory_allocated"
    else:
        peak = _status_kb("VmHWM") if reset_ok else None
        if peak is None:  # no resettable counter: lifetime peak (includes the model build)
            import resource

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            out["measure"] = "ru_maxrss (lifetime, includes the build)"
        else:
            out["measure"] = "VmHWM after reset (training only)"
        out.update(
            peak_bytes=peak * 1024, rss_import_bytes=(rss_import or 0) * 1024,
            rss_setup_bytes=(rss_setup or 0) * 1024, peak_minus_import_bytes=(peak - (rss_import or 0)) * 1024,
        )
    return out


def run_memory(size: str, steps: int, seq: int, batch: int, threads: int) -> list[dict[str, Any]]:
    rows = []
    for method in METHODS:
        cmd = [sys.executable, __file__, "--memory-worker", method, "--size", size, "--mem-steps", str(steps),
               "--seq", str(seq), "--batch", str(batch), "--threads", str(threads)]
        began = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TRITON_INTERPRET": "0"})
        if proc.returncode != 0:
            print(f"[memory] {method} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
            rows.append({"method": method, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"})
            continue
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        row["wall_s"] = time.perf_counter() - began
        print(f"[memory] {method}: peak {row['peak_bytes'] / 2**20:.0f} MiB, step {row['median_step_s']:.2f} s",
              flush=True)
        rows.append(row)
    return rows


# -------------------------------------------------------------------------------------------------
# 2. learning: a classifier where 4-bit quantisation hurts
# -------------------------------------------------------------------------------------------------

D = H = 128
WEAK = slice(0, D, 16)  # 8 input channels scaled by 0.03


def mlp(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(D, H), nn.GELU(), nn.Linear(H, H), nn.GELU(), nn.Linear(H, H), nn.GELU(), nn.Linear(H, 2)
    )


class Task:
    """Labels from a random teacher MLP, thresholded at its median (balanced classes); the student sees
    the inputs with a few channels scaled down, so it needs ~30x larger weights on them."""

    def __init__(self) -> None:
        rng_state = torch.random.get_rng_state()
        self.teacher = mlp(123)
        torch.random.set_rng_state(rng_state)
        x = torch.randn(20000, D, generator=torch.Generator().manual_seed(9))
        with torch.no_grad():
            d = self.teacher(x)
        self.threshold = (d[:, 1] - d[:, 0]).median()
        self.scale = torch.ones(D)
        self.scale[WEAK] = 0.03

    def batch(self, n: int, seed: int) -> dict[str, torch.Tensor]:
        x = torch.randn(n, D, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            d = self.teacher(x)
        return {"x": x * self.scale, "y": ((d[:, 1] - d[:, 0]) > self.threshold).long()}


def ce_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch["x"]).float(), batch["y"])


@torch.no_grad()
def accuracy(model: nn.Module, batch: dict[str, torch.Tensor]) -> float:
    return float((model(batch["x"]).argmax(-1) == batch["y"]).float().mean())


def run_learning(args: argparse.Namespace) -> dict[str, Any]:
    from llmsys.qzo import QZO, MeZO, first_order, quantize_bnb, quantize_int4, quantized_scales, train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny MLP: a second thread only adds contention
    task = Task()
    test = task.batch(8192, 1)
    student = mlp(0)
    began = time.perf_counter()
    train(student, first_order(student, "adamw", lr=3e-3), lambda s: task.batch(256, 10_000 + s),
          args.pretrain_steps, loss_fn=ce_loss, progress=False)
    for p in student.parameters():
        p.requires_grad_(False)
    state = {k: v.clone() for k, v in student.state_dict().items()}
    pretrain_s = time.perf_counter() - began

    def fresh(quant: str | None) -> nn.Sequential:
        m = mlp(0)
        m.load_state_dict(state)
        for p in m.parameters():
            p.requires_grad_(False)
        if quant == "int4":
            quantize_int4(m, 128, skip=["6"], backend="reference")  # "6" = the head, kept in full precision
        elif quant == "nf4":
            quantize_bnb(m, "nf4", skip=["6"])
        return m

    n = args.zo_steps
    data = lambda s: task.batch(args.zo_batch, 50_000 + s)  # noqa: E731 - the same batches for every run

    def run(name: str, model: nn.Module, opt, steps: int | None = None) -> dict[str, Any]:
        t = time.perf_counter()
        steps = steps or n
        r = train(model, opt, data, steps, loss_fn=ce_loss, eval_fn=lambda m: accuracy(m, test),
                  eval_every=max(1, steps // 20), progress=False)
        out = {
            "method": name, "steps": steps, "seconds": time.perf_counter() - t, "losses": r.losses,
            "acc_curve": [(0, accuracy_start[name])] + [(e["step"], e["eval"]) for e in r.evals],
            "acc": r.evals[-1]["eval"], "skipped_steps": r.skipped_steps, "clipped_steps": r.clipped_steps,
            "trained_tensors": opt.num_trained(),
        }
        print(f"[learning] {name}: acc {accuracy_start[name]:.4f} -> {out['acc']:.4f} in {steps} steps "
              f"({out['seconds']:.1f}s, skipped {r.skipped_steps}, clipped {r.clipped_steps})", flush=True)
        return out

    models = {"qzo_int4": fresh("int4"), "qzo_nf4": fresh("nf4"), "mezo_fp32": fresh(None)}
    accuracy_start = {k: accuracy(m, test) for k, m in models.items()}
    acc_fp = accuracy_start["mezo_fp32"]
    print(f"[learning] student fp32 {acc_fp:.4f}, int4 g128 {accuracy_start['qzo_int4']:.4f}, "
          f"nf4 {accuracy_start['qzo_nf4']:.4f} (pretraining {pretrain_s:.1f}s)", flush=True)
    runs = [
        run("qzo_int4", models["qzo_int4"], QZO(models["qzo_int4"], lr=args.qzo_lr, eps=1e-3)),
        run("qzo_nf4", models["qzo_nf4"], QZO(models["qzo_nf4"], lr=args.qzo_nf4_lr, eps=1e-3)),
        run("mezo_fp32", models["mezo_fp32"], MeZO(models["mezo_fp32"], lr=args.mezo_lr, eps=1e-3)),
    ]

    # clipping ablation: the same int4 QZO run at a large lr, with and without clipping
    ablation = []
    for clip in (None, 100.0):
        name = f"qzo_int4_lr{args.ablation_lr:g}_clip{clip}"
        m = fresh("int4")
        accuracy_start[name] = accuracy(m, test)
        ablation.append({"clip": clip, **run(name, m, QZO(m, lr=args.ablation_lr, eps=1e-3, clip=clip),
                                             args.ablation_steps)})

    # throughput on the classifier: the same number of steps, median over repeats
    def steps_per_s(make) -> float:
        rates = []
        for _ in range(args.repeats):
            m, opt = make()
            t = time.perf_counter()
            train(m, opt, data, 50, loss_fn=ce_loss, progress=False)
            rates.append(50 / (time.perf_counter() - t))
        return statistics.median(rates)

    def qzo_maker(q: str):
        def make():
            m = fresh(q)
            return m, QZO(m, lr=args.qzo_lr)
        return make

    def mezo_maker():
        m = fresh(None)
        return m, MeZO(m, lr=args.mezo_lr)

    throughput = {"qzo_int4": steps_per_s(qzo_maker("int4")), "qzo_nf4": steps_per_s(qzo_maker("nf4")),
                  "mezo_fp32": steps_per_s(mezo_maker)}

    # reference point, not a method: what the scale-only parameterisation reaches with exact gradients
    m = fresh("int4")
    scales = [t for _, t in quantized_scales(m)]
    for t in scales:
        t.requires_grad_(True)
    train(m, torch.optim.Adam(scales, lr=1e-3), data, min(n, 1000), loss_fn=ce_loss, progress=False)
    fo_acc = accuracy(m, test)
    print(f"[learning] first-order Adam on the int4 scales only: {accuracy_start['qzo_int4']:.4f} -> {fo_acc:.4f}")
    torch.set_num_threads(threads)
    return {
        "task": "teacher-student MLP classifier (128-128-128-128-2, GELU), 8 of 128 input channels x0.03",
        "pretrain": {"optimizer": "AdamW lr 3e-3, batch 256", "steps": args.pretrain_steps, "seconds": pretrain_s},
        "test_samples": 8192, "zo_batch": args.zo_batch,
        "acc_fp": acc_fp, "acc_quantized": accuracy_start["qzo_int4"], "acc_quantized_nf4": accuracy_start["qzo_nf4"],
        "acc_qzo": runs[0]["acc"], "acc_qzo_nf4": runs[1]["acc"], "acc_mezo": runs[2]["acc"],
        "lr": {"qzo": args.qzo_lr, "qzo_nf4": args.qzo_nf4_lr, "mezo": args.mezo_lr, "ablation": args.ablation_lr},
        "acc_scales_first_order": fo_acc,
        "scales_first_order": "Adam lr 1e-3 on the int4 scales only (autograd), min(N, 1000) steps",
        "runs": runs, "clipping_ablation": ablation, "classifier_steps_per_s": throughput,
    }


# -------------------------------------------------------------------------------------------------
# report
# -------------------------------------------------------------------------------------------------


def plots(out: Path, memory: list[dict[str, Any]], learning: dict[str, Any] | None, title: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    ok = [r for r in memory if "peak_bytes" in r]
    if ok:
        fig, ax = plt.subplots(figsize=(8, 4.2))
        names = [r["method"] for r in ok]
        ax.bar(names, [r["peak_bytes"] / 2**30 for r in ok], label="peak (whole process)", color="#9ecae1")
        if all("peak_minus_import_bytes" in r for r in ok):
            ax.bar(names, [r["peak_minus_import_bytes"] / 2**30 for r in ok], label="peak - RSS after imports",
                   color="#3182bd", width=0.5)
        ax.set_ylabel("GiB")
        ax.set_title(f"Peak memory while training, {ok[0]['params'] / 1e6:.0f}M-parameter Llama\n{title}",
                     fontsize=9)
        ax.tick_params(axis="x", rotation=30)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "qzo_memory.png", dpi=120)
        plt.close(fig)
        written.append(out / "qzo_memory.png")
    if learning:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
        for r in learning["runs"]:
            steps, accs = zip(*r["acc_curve"])
            a1.plot(steps, accs, marker=".", label=r["method"])
            losses = torch.tensor(r["losses"])
            k = max(1, len(losses) // 50)
            smooth = losses[: len(losses) // k * k].reshape(-1, k).mean(1)
            a2.plot(range(k, k * len(smooth) + 1, k), smooth, label=r["method"])
        a1.axhline(learning["acc_fp"], color="gray", ls="--", label="full-precision student")
        a1.set_xlabel("step")
        a1.set_ylabel("test accuracy")
        a1.legend(fontsize=8)
        a2.set_xlabel("step")
        a2.set_ylabel("training loss (mean of +/- eps)")
        a2.legend(fontsize=8)
        fig.suptitle(f"QZO (scales only) vs MeZO (all weights), {title}", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / "qzo_learning.png", dpi=120)
        plt.close(fig)
        written.append(out / "qzo_learning.png")

        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
        for r in learning["clipping_ablation"]:
            losses = [x if math.isfinite(x) else float("nan") for x in r["losses"]]  # NaN: a gap in the line
            label = f"clip={r['clip']} (final acc {r['acc']:.3f}, skipped {r['skipped_steps']}, " \
                    f"clipped {r['clipped_steps']})"
            line, = a1.plot(range(1, len(losses) + 1), losses, label=label, lw=0.8)
            bad = next((i + 1 for i, x in enumerate(r["losses"]) if not math.isfinite(x)), None)
            if bad is not None:
                a1.axvline(bad, color=line.get_color(), ls=":", label=f"first non-finite loss (step {bad})")
            steps, accs = zip(*r["acc_curve"])
            a2.plot(steps, accs, marker=".", color=line.get_color(), label=f"clip={r['clip']}")
        a1.set_yscale("log")
        a1.set_xlabel("step")
        a1.set_ylabel("training loss (log; gaps = non-finite)")
        a1.legend(fontsize=7)
        a2.set_xlabel("step")
        a2.set_ylabel("test accuracy")
        a2.legend(fontsize=8)
        fig.suptitle(f"Directional-derivative clipping, QZO int4 lr={learning['lr']['ablation']:g} (too large on "
                     f"purpose)", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / "qzo_clipping.png", dpi=120)
        plt.close(fig)
        written.append(out / "qzo_clipping.png")
    return written


def summarize(memory: list[dict[str, Any]]) -> dict[str, Any]:
    by = {r["method"]: r for r in memory if "peak_bytes" in r}

    def ratio(a: str, b: str, key: str = "peak_bytes") -> float | None:
        if a in by and b in by and key in by[a] and key in by[b]:
            return by[a][key] / by[b][key]
        return None

    s = {
        # the headline: AdamW full fine-tuning in 16-bit (bf16 here) over QZO on NF4, whole-process peaks
        "peak_mem_ratio_vs_adamw": ratio("adamw_bf16", "qzo_nf4"),
        "peak_mem_ratio_vs_adamw_fp32": ratio("adamw_fp32", "qzo_nf4"),
        "peak_mem_ratio_vs_adamw_minus_import": ratio("adamw_bf16", "qzo_nf4", "peak_minus_import_bytes"),
        "peak_mem_ratio_vs_adamw_fp32_minus_import": ratio("adamw_fp32", "qzo_nf4", "peak_minus_import_bytes"),
        "peak_mem_ratio_vs_mezo_bf16": ratio("mezo_bf16", "qzo_nf4"),
        "peak_mem_ratio_vs_mezo_bf16_minus_import": ratio("mezo_bf16", "qzo_nf4", "peak_minus_import_bytes"),
        "peak_mem_ratio_vs_sgd_bf16": ratio("sgd_bf16", "qzo_nf4"),
        "qzo_int4_peak_ratio_vs_adamw": ratio("adamw_bf16", "qzo_int4"),
    }
    if "qzo_nf4" in by and "mezo_bf16" in by:
        s["steps_per_s_qzo_nf4"] = 1 / by["qzo_nf4"]["median_step_s"]
        s["steps_per_s_mezo_bf16"] = 1 / by["mezo_bf16"]["median_step_s"]
        s["qzo_nf4_speed_vs_mezo_bf16"] = by["mezo_bf16"]["median_step_s"] / by["qzo_nf4"]["median_step_s"]
    if "qzo_int4" in by and "mezo_bf16" in by:
        s["qzo_int4_speed_vs_mezo_bf16"] = by["mezo_bf16"]["median_step_s"] / by["qzo_int4"]["median_step_s"]
    return s


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller memory model and fewer steps (< 5 min on 2 cores)")
    p.add_argument("--out", default="benchmarks/results/qzo.json")
    p.add_argument("--size", choices=sorted(SIZES), help="memory model (default: quick with --quick, else full)")
    p.add_argument("--mem-steps", type=int, help="training steps per memory run (first one is warm-up)")
    p.add_argument("--seq", type=int, help="tokens per row in the memory runs (default 64 quick, 128 full)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--pretrain-steps", type=int)
    p.add_argument("--zo-steps", type=int)
    p.add_argument("--zo-batch", type=int, default=64)
    # learning rates from a sweep on this task (docs/qzo.md): QZO int4 {1e-4, 3e-4, 1e-3, 3e-3},
    # NF4 {1e-3, 3e-3}, MeZO {3e-4, 1e-3, 3e-3}; 3e-3 is where unclipped int4 QZO diverges
    p.add_argument("--qzo-lr", type=float, default=1e-4)
    p.add_argument("--qzo-nf4-lr", type=float, default=1e-3)
    p.add_argument("--mezo-lr", type=float, default=3e-4)
    p.add_argument("--ablation-lr", type=float, default=3e-3)
    p.add_argument("--ablation-steps", type=int, help="steps of each clipping-ablation run (default 600 quick)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--skip-learning", action="store_true")
    p.add_argument("--memory-worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    size = args.size or ("quick" if args.quick else "full")
    # the first step is a warm-up for timing; the peak is reached in it (optimizer state, activations), so
    # --quick runs only that step: its step time then includes the warm-up
    mem_steps = args.mem_steps or (1 if args.quick else 3)
    args.seq = args.seq or (64 if args.quick else 128)
    if args.memory_worker:
        print(json.dumps(memory_worker(args.memory_worker, size, mem_steps, args.seq, args.batch)))
        return 0
    args.pretrain_steps = args.pretrain_steps or 1000
    args.zo_steps = args.zo_steps or (2000 if args.quick else 5000)
    args.ablation_steps = args.ablation_steps or (600 if args.quick else args.zo_steps)

    began = time.perf_counter()
    machine = machine_info()
    title = f"{machine['cpu']} ({args.threads} threads)" if not torch.cuda.is_available() else machine.get("gpu", "")
    learning = None if args.skip_learning else run_learning(args)
    memory = [] if args.skip_memory else run_memory(size, mem_steps, args.seq, args.batch, args.threads)
    summary = summarize(memory)
    if learning:
        summary.update({k: learning[k] for k in ("acc_fp", "acc_quantized", "acc_quantized_nf4", "acc_qzo",
                                                 "acc_qzo_nf4", "acc_mezo")})
        summary["classifier_steps_per_s"] = learning["classifier_steps_per_s"]
    payload = {
        "benchmark": "qzo", "quick": args.quick, "machine": machine, "seconds": None,
        **summary,
        "memory": {"size": size, "config": SIZES[size], "vocab": 32000, "batch": args.batch, "seq": args.seq,
                   "runs": memory},
        "learning": learning,
    }
    if memory:
        print_table(
            [{"method": r["method"], "peak GiB": r.get("peak_bytes", 0) / 2**30,
              "peak-import GiB": r.get("peak_minus_import_bytes", 0) / 2**30, "step s": r.get("median_step_s"),
              "error": r.get("error")} for r in memory],
            ["method", "peak GiB", "peak-import GiB", "step s", "error"],
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    pngs = plots(out.parent, memory, learning, title)
    payload["seconds"] = time.perf_counter() - began
    write_json(out, payload)
    keys = [k for k in summary if not isinstance(summary[k], dict)]
    for k in keys:
        v = summary[k]
        print(f"{k:45s} {v:.4g}" if isinstance(v, float) else f"{k:45s} {v}")
    print(f"wrote {out} and {', '.join(str(x) for x in pngs)} in {payload['seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
