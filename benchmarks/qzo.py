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
   (interpreter + libraries: the part a GPU's ``max_memory_allocated`` would not count either).
   ``peak_allocated_bytes`` is the CPU analogue of ``torch.cuda.max_memory_allocated``: the peak of
   live tensor bytes during the training steps, from torch's CPU allocator events (the profiler with
   ``profile_memory=True``, `AllocTracker`), counted from after the imports; it is measured in a
   second process per method, so the profiler's own memory never enters the RSS numbers, and comes
   with a breakdown: the model's tensors by component and the blocks alive at the peak by the module
   and op that allocated them. On CUDA the worker reports ``torch.cuda.max_memory_allocated``
   instead. The loss is llmsys.qzo's default (`causal_lm_loss`: no KV cache; without autograd no
   float32 copies of the logits); ``--model-loss`` uses the model's own. Methods: QZO on NF4
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
from collections.abc import Callable
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
METHODS = [
    "qzo_nf4", "qzo_nf4_in_place", "qzo_int4", "mezo_bf16", "mezo_fp32", "sgd_bf16", "adamw_bf16", "adamw_fp32",
    "adamw_amp", "lora_bf16",
]


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


# -- live tensor bytes on CPU: the analogue of torch.cuda.max_memory_allocated ---------------------


class AllocTracker:
    """Peak *live tensor bytes* on CPU, the analogue of ``torch.cuda.max_memory_allocated``.

    torch's profiler with ``profile_memory=True`` makes torch's CPU allocator report every allocation
    and free it serves while profiling (``[memory]`` events: address, bytes, and the running
    "Total Allocated" kept under the allocator's lock). So the counter covers every tensor storage
    (model, optimizer state, activations, temporaries inside C++ kernels, bitsandbytes' outputs) and
    nothing else: no interpreter, no library code, no malloc slack or fragmentation - like the GPU
    counter. It starts at 0 when profiling starts (blocks allocated before are not counted, and their
    frees are ignored), so start the tracker before the model is built: everything after the imports.

    Use ``with tracker.region("train"):`` to mark a phase; `summary` gives the live bytes when the
    region began and the peak inside it; `live_at_peak` the blocks alive at that peak, each labelled
    with the innermost region (``annotate_modules`` adds one per module call) and the op that
    allocated it. Cost: one event per op and per allocation (a few MB of host memory for a training
    run; the per-op overhead is microseconds).
    """

    def __init__(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._hooks: list[Any] = []
        self.memory: list[tuple[float, int, int, int, int]] = []  # (ts us, total, bytes, addr, tid)
        self.spans: list[tuple[float, float, str, int, bool]] = []  # (start, end, name, tid, user region)

    def __enter__(self) -> AllocTracker:
        self._prof.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._hooks:
            h.remove()
        self._prof.__exit__(*exc)
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "trace.json"
            self._prof.export_chrome_trace(str(path))
            events = json.loads(path.read_text())["traceEvents"]
        for e in events:
            if e.get("name") == "[memory]":
                a = e["args"]
                if a.get("Device Type", 0) == 0:  # CPU
                    self.memory.append((float(e["ts"]), int(a["Total Allocated"]), int(a["Bytes"]),
                                        int(a["Addr"]), int(e.get("tid", 0))))
            elif e.get("ph") == "X" and e.get("cat") in ("cpu_op", "user_annotation"):
                ts = float(e["ts"])
                self.spans.append((ts, ts + float(e.get("dur", 0)), e["name"], int(e.get("tid", 0)),
                                   e["cat"] == "user_annotation"))
        self.memory.sort(key=lambda m: m[0])
        # the allocator's counter lives as long as the process: it starts where an earlier profiling session
        # left it, and frees of blocks that session allocated still subtract. Count this session's blocks only.
        if self.memory:
            offset = self.memory[0][1] - self.memory[0][2]
            mine: set[int] = set()
            foreign = 0
            fixed = []
            for ts, total, nbytes, addr, tid in self.memory:
                if nbytes > 0:
                    mine.add(addr)
                elif addr in mine:
                    mine.discard(addr)
                else:
                    foreign -= nbytes
                    continue
                fixed.append((ts, total - offset + foreign, nbytes, addr, tid))
            self.memory = fixed
        self.spans.sort(key=lambda s: (s[0], -s[1]))

    @staticmethod
    def region(name: str):
        return torch.profiler.record_function(name)

    def annotate_modules(self, model: nn.Module) -> None:
        """Mark every module call as a region named after the module, so allocations can be traced to it."""
        stack: list[Any] = []

        def pre(name: str):
            def hook(module, args):
                rf = torch.profiler.record_function(f"module:{name or 'model'}")
                rf.__enter__()
                stack.append(rf)
            return hook

        def post(module, args, output):
            if stack:
                stack.pop().__exit__(None, None, None)

        for name, module in model.named_modules():
            self._hooks.append(module.register_forward_pre_hook(pre(name)))
            self._hooks.append(module.register_forward_hook(post))

    def _span(self, name: str) -> tuple[float, float]:
        found = [(s, e) for s, e, n, _, user in self.spans if user and n == name]
        if not found:
            raise KeyError(f"no region {name!r} in the trace")
        return found[0]

    def summary(self, name: str) -> dict[str, int]:
        """Live tensor bytes when region ``name`` began, at its peak, and when it ended."""
        start, end = self._span(name)
        before = [m[1] for m in self.memory if m[0] < start]
        inside = [m[1] for m in self.memory if start <= m[0] <= end]
        live_start = before[-1] if before else 0
        return {"live_at_start": live_start, "peak": max([live_start, *inside]),
                "live_at_end": (inside or [live_start])[-1]}

    def live_at_peak(self, name: str) -> list[dict[str, Any]]:
        """The blocks alive at the peak of region ``name``: bytes, when allocated, innermost region, op."""
        start, end = self._span(name)
        return self._live_at(self._peak_index([(start, end)]), start, end)

    def peak_inside(self, match: Callable[[str], bool], within: str) -> tuple[int, list[dict[str, Any]]]:
        """The highest live bytes while a region whose name ``match``es is open (inside region ``within``),
        and the blocks alive then (as `live_at_peak`)."""
        start, end = self._span(within)
        spans = sorted((s, e) for s, e, n, _, user in self.spans if user and match(n) and s >= start and e <= end)
        merged: list[tuple[float, float]] = []
        for s, e in spans:
            if merged and s <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], e))
            else:
                merged.append((s, e))
        i = self._peak_index(merged)
        return (self.memory[i][1] if i >= 0 else 0), self._live_at(i, start, end)

    def _peak_index(self, intervals: list[tuple[float, float]]) -> int:
        best, j = -1, 0
        for i, m in enumerate(self.memory):
            while j < len(intervals) and intervals[j][1] < m[0]:
                j += 1
            if j == len(intervals):
                break
            if intervals[j][0] <= m[0] and (best < 0 or m[1] > self.memory[best][1]):
                best = i
        if best < 0 and intervals:  # nothing allocated or freed inside: the state when it began
            best = sum(1 for m in self.memory if m[0] < intervals[0][0]) - 1
        return best

    def _live_at(self, index: int, start: float, end: float) -> list[dict[str, Any]]:
        live: dict[int, tuple[float, int, int]] = {}
        for ts, _, nbytes, addr, tid in self.memory[: index + 1]:
            if nbytes > 0:
                live[addr] = (ts, nbytes, tid)
            else:
                live.pop(addr, None)
        spans = [s for s in self.spans if s[1] >= start and s[0] <= end]
        blocks = []
        for ts, nbytes, tid in live.values():
            if ts < start:  # allocated before the region (the model, the inputs): not attributed here
                blocks.append({"bytes": nbytes, "before_region": True, "region": None, "regions": [], "op": None,
                               "outer_op": None})
                continue
            enclosing = [s for s in spans if s[3] == tid and s[0] <= ts <= s[1]]
            regions = [s[2] for s in enclosing if s[4]]
            ops = [s[2] for s in enclosing if not s[4]]
            blocks.append({"bytes": nbytes, "before_region": False, "region": regions[-1] if regions else None,
                           "regions": regions, "op": ops[-1] if ops else None, "outer_op": ops[0] if ops else None})
        return sorted(blocks, key=lambda b: -b["bytes"])


def tensor_components(model: nn.Module, opt: Any = None) -> dict[str, int]:
    """Bytes of the tensors that exist before training, by component (each storage counted once)."""
    from llmsys.qzo import Int4Linear
    from llmsys.qzo.bnb import is_bnb_4bit

    seen: set[int] = set()
    parts: dict[str, int] = {}

    def add(part: str, t: torch.Tensor | None) -> None:
        if t is None or not isinstance(t, torch.Tensor):
            return
        st = t.untyped_storage()
        if st.data_ptr() in seen or st.nbytes() == 0:
            return
        seen.add(st.data_ptr())
        parts[part] = parts.get(part, 0) + st.nbytes()

    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for m in model.modules():
        if is_bnb_4bit(m):
            qs = m.weight.quant_state
            add("4-bit codes (bnb NF4, uint8 x2)", m.weight.data)
            add("scales (bnb absmax, fp32, 1 per 64)", qs.absmax)
            add("bnb NF4 code book", qs.code)
        elif isinstance(m, Int4Linear):
            add("4-bit codes (llmsys int4, uint8 x2)", m.codes)
            add("scales (llmsys int4, 1 per 128)", m.scales)
            add("zero points (llmsys int4, uint8)", m.zeros)
    for name, p in model.named_parameters():
        if embed is not None and p is embed.weight:
            owner = "embeddings"
        elif head is not None and p is head.weight:
            owner = "head"
        else:
            owner = "LoRA adapters" if "lora_" in name else "norms" if "norm" in name else "other parameters"
        add(f"{owner} ({str(p.dtype).replace('torch.', '')})", p)
    for b in model.buffers():
        add("buffers (rotary inv_freq, ...)", b)
    return parts


def alloc_report(tracker: AllocTracker, model: nn.Module, opt: Any, steps: int) -> dict[str, Any]:
    """``peak_allocated_bytes`` and its breakdown: what existed before training, and what was alive at
    the peak, grouped by the module (region) and op that allocated it."""
    train = tracker.summary("train")
    per_step = [tracker.summary(f"step{i}")["peak"] for i in range(steps)]

    def by_origin(blocks: list[dict[str, Any]]) -> dict[str, int]:
        groups: dict[str, int] = {}
        for b in blocks:
            if b["before_region"]:
                key = "before training (model, inputs)"
            else:
                regions = [r for r in b["regions"] if r.startswith(("module:", "Optimizer"))]
                where = regions[-1] if regions else (b["regions"][-1] if b["regions"] else "-")
                key = f"{where} / {b['outer_op']}" + (f" > {b['op']}" if b["op"] != b["outer_op"] else "")
            groups[key] = groups.get(key, 0) + b["bytes"]
        return dict(sorted(groups.items(), key=lambda kv: -kv[1]))

    # inside the decoder layers (attention, MLP; bitsandbytes / int4 dequantisation temporaries), the
    # peak that the logits and the loss do not reach
    layer_peak, layer_blocks = tracker.peak_inside(lambda n: n.startswith("module:") and ".layers." in n, "train")
    step_of_peak = max(range(steps), key=lambda i: per_step[i])
    return {
        "peak_allocated_bytes": train["peak"],
        "allocated_before_train_bytes": train["live_at_start"],
        "allocated_after_train_bytes": train["live_at_end"],
        "peak_allocated_per_step_bytes": per_step,
        "peak_allocated_step": step_of_peak,
        "model_tensor_bytes": tensor_components(model),
        "live_at_peak_by_origin": by_origin(tracker.live_at_peak("train")),
        "peak_allocated_in_layers_bytes": layer_peak,
        "live_at_layer_peak_by_origin": by_origin(layer_blocks),
        "allocated_measure": "torch profiler (profile_memory) CPU allocator events: live tensor bytes, counted "
                             "from after the imports",
    }


def memory_worker(method: str, size: str, steps: int, seq: int, batch: int,
                  track_alloc: bool = True, model_loss: bool = False) -> dict[str, Any]:
    """Build the model for ``method``, train ``steps`` steps, return peak memory and step times."""
    from llmsys.qzo import QZO, MeZO, causal_lm_loss, first_order, lora, quantize_bnb, quantize_int4
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
    # live tensor bytes (CPU): counted from here on, so the model build is in the counter's baseline
    tracker = AllocTracker() if track_alloc and not cuda else None
    if tracker is not None:
        tracker.__enter__()
    # adamw_amp: mixed precision as `Trainer(bf16=True)` runs it - fp32 weights, gradients and moments,
    # the forward and backward under bf16 autocast
    amp = method == "adamw_amp"
    dtype = torch.float32 if method.endswith("fp32") or amp else torch.bfloat16
    model = tiny_model(
        "llama", dtype=dtype, vocab_size=32000, num_key_value_heads=SIZES[size]["num_attention_heads"],
        max_position_embeddings=2048, **SIZES[size],
    ).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    if method.startswith("qzo_nf4"):
        quantize_bnb(model, "nf4", compute_dtype=torch.bfloat16)
        # qzo_nf4_in_place: the ablation of forward-time perturbation (every scale shifted for the whole
        # closure, restored from a copy of all of them)
        opt: Any = QZO(model, lr=1e-5, perturb="in_place" if method.endswith("in_place") else "forward")
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
    if tracker is not None:
        tracker.annotate_modules(model)

    def loss() -> torch.Tensor:
        if model_loss:  # the model's own loss, as before: a KV cache and two float32 copies of the logits
            return model(input_ids=ids, labels=ids).loss
        # llmsys.qzo's default loss (train()): no KV cache; without autograd (QZO, MeZO) the same number
        # computed without float32 copies of all the logits; with autograd the model's own loss
        with torch.autocast(device, dtype=torch.bfloat16, enabled=amp):
            return causal_lm_loss(model, {"input_ids": ids, "labels": ids})

    reset_ok = _reset_peak() if not cuda else True
    rss_setup = _status_kb("VmRSS")  # after malloc_trim: the model, ready to train
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    with AllocTracker.region("train"):
        for i in range(steps):
            start = time.perf_counter()
            with AllocTracker.region(f"step{i}"):
                if method.startswith(("qzo", "mezo")):
                    opt.step(loss)
                else:
                    opt.zero_grad(set_to_none=True)
                    loss().backward()
                    opt.step()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    if tracker is not None:
        peak_vm = _status_kb("VmHWM")  # read before the trace is parsed (that needs memory of its own)
        tracker.__exit__(None, None, None)
    out: dict[str, Any] = {
        "method": method, "size": size, "params": n_params, "steps": steps, "batch": batch, "seq": seq,
        "loss": "model(input_ids, labels).loss" if model_loss else "llmsys.qzo.causal_lm_loss",
        "perturb": getattr(opt, "perturb", None),
        "step_s": times, "median_step_s": statistics.median(times[1:] or times),
        "step_time_note": "median after the warm-up step" if steps > 1 else "the only step (includes warm-up)",
    }
    if cuda:
        out["peak_bytes"] = out["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
        out["measure"] = "torch.cuda.max_memory_allocated"
    else:
        if tracker is not None:
            out.update(alloc_report(tracker, model, opt, steps))
        peak = (peak_vm if tracker is not None else _status_kb("VmHWM")) if reset_ok else None
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


def _worker(method: str, size: str, steps: int, seq: int, batch: int, threads: int, *flags: str) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--memory-worker", method, "--size", size, "--mem-steps", str(steps),
           "--seq", str(seq), "--batch", str(batch), "--threads", str(threads), *flags]
    began = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TRITON_INTERPRET": "0"})
    if proc.returncode != 0:
        print(f"[memory] {method} {' '.join(flags)} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
        return {"method": method, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"}
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    row["wall_s"] = time.perf_counter() - began
    return row


def run_memory(size: str, steps: int, seq: int, batch: int, threads: int, track_alloc: bool = True,
               methods: list[str] | None = None, model_loss: bool = False) -> list[dict[str, Any]]:
    """Per method: one process measures RSS (and step times) without the profiler, whose event buffers
    would add to RSS; on CPU a second process measures peak allocated bytes under the profiler."""
    rows = []
    loss_flag = ["--model-loss"] if model_loss else []
    for method in methods or METHODS:
        row = _worker(method, size, steps, seq, batch, threads, "--no-alloc", *loss_flag)
        if track_alloc and "error" not in row and "peak_allocated_bytes" not in row:  # CUDA reports it already
            alloc = _worker(method, size, steps, seq, batch, threads, *loss_flag)
            if "error" in alloc:
                row["alloc_error"] = alloc["error"]
            else:
                row.update({k: v for k, v in alloc.items()
                            if "alloc" in k or k in ("model_tensor_bytes", "live_at_peak_by_origin",
                                                      "live_at_layer_peak_by_origin")})
                row["alloc_run"] = {"step_s": alloc["step_s"], "peak_rss_bytes": alloc["peak_bytes"],
                                    "wall_s": alloc["wall_s"]}
        if "error" not in row:
            alloc_b = row.get("peak_allocated_bytes")
            print(f"[memory] {method}: peak {row['peak_bytes'] / 2**20:.0f} MiB"
                  + (f", peak allocated {alloc_b / 2**20:.0f} MiB" if alloc_b is not None else "")
                  + f", step {row['median_step_s']:.2f} s", flush=True)
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
        if all("peak_allocated_bytes" in r for r in ok):
            ax.bar(names, [r["peak_allocated_bytes"] / 2**30 for r in ok], color="#08306b", width=0.25,
                   label="peak allocated (live tensor bytes)")
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
        # live tensor bytes (CPU: profiler allocator events; CUDA: max_memory_allocated) - no library
        # footprint, no allocator slack: the measure a GPU reports
        "peak_alloc_ratio_vs_adamw": ratio("adamw_bf16", "qzo_nf4", "peak_allocated_bytes"),
        "peak_alloc_ratio_vs_adamw_fp32": ratio("adamw_fp32", "qzo_nf4", "peak_allocated_bytes"),
        "peak_alloc_ratio_vs_adamw_amp": ratio("adamw_amp", "qzo_nf4", "peak_allocated_bytes"),
        "peak_mem_ratio_vs_adamw_amp": ratio("adamw_amp", "qzo_nf4"),
        "peak_alloc_ratio_vs_mezo_bf16": ratio("mezo_bf16", "qzo_nf4", "peak_allocated_bytes"),
        "peak_alloc_ratio_vs_sgd_bf16": ratio("sgd_bf16", "qzo_nf4", "peak_allocated_bytes"),
        "qzo_int4_peak_alloc_ratio_vs_adamw": ratio("adamw_bf16", "qzo_int4", "peak_allocated_bytes"),
        "qzo_int4_peak_ratio_vs_adamw": ratio("adamw_bf16", "qzo_int4"),
        # what shifting each layer's scales only inside its forward saves (> 1: in place holds more)
        "qzo_nf4_in_place_peak_alloc_ratio": ratio("qzo_nf4_in_place", "qzo_nf4", "peak_allocated_bytes"),
    }
    goal = s["peak_alloc_ratio_vs_adamw_amp"]
    if goal is not None:
        # the 18x, stated with its measure and baseline (docs/qzo.md: why these), and the
        # measures under which it is not reached
        s["goal_18x_vs_16bit_adamw"] = {
            "ratio": goal, "met": goal >= 18,
            "measure": "peak allocated tensor bytes (on a GPU: torch.cuda.max_memory_allocated)",
            "baseline": "adamw_amp: bf16 mixed precision (fp32 weights, gradients, moments; bf16 autocast)",
            "other_measures": {"whole-process RSS vs adamw_amp": s["peak_mem_ratio_vs_adamw_amp"],
                               "peak allocated vs pure-bf16 adamw": s["peak_alloc_ratio_vs_adamw"],
                               "whole-process RSS vs pure-bf16 adamw": s["peak_mem_ratio_vs_adamw"]},
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
    p.add_argument("--methods", help=f"comma-separated memory methods (default all: {','.join(METHODS)})")
    p.add_argument("--no-alloc", action="store_true",
                   help="RSS only: skip the second, profiled process per method that measures peak allocated bytes")
    p.add_argument("--reuse-learning", action="store_true",
                   help="with --skip-learning: keep the learning section of the existing --out file")
    p.add_argument("--model-loss", action="store_true",
                   help="memory runs with the model's own loss (KV cache, float32 logits) instead of llmsys's")
    p.add_argument("--memory-worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    size = args.size or ("quick" if args.quick else "full")
    # the first step is a warm-up for timing; the peak is reached in it (optimizer state, activations), so
    # --quick runs only that step: its step time then includes the warm-up
    mem_steps = args.mem_steps or (1 if args.quick else 3)
    args.seq = args.seq or (64 if args.quick else 128)
    if args.memory_worker:
        print(json.dumps(memory_worker(args.memory_worker, size, mem_steps, args.seq, args.batch,
                                       track_alloc=not args.no_alloc, model_loss=args.model_loss)))
        return 0
    args.pretrain_steps = args.pretrain_steps or 1000
    args.zo_steps = args.zo_steps or (2000 if args.quick else 5000)
    args.ablation_steps = args.ablation_steps or (600 if args.quick else args.zo_steps)

    began = time.perf_counter()
    machine = machine_info()
    title = f"{machine['cpu']} ({args.threads} threads)" if not torch.cuda.is_available() else machine.get("gpu", "")
    learning = None if args.skip_learning else run_learning(args)
    reused = None
    if args.skip_learning and args.reuse_learning and Path(args.out).exists():
        previous = json.loads(Path(args.out).read_text())
        learning = previous.get("learning")  # the learning part does not depend on the memory part
        reused = {"from": args.out, "seconds_of_that_run": previous.get("seconds")} if learning else None
    methods = args.methods.split(",") if args.methods else None
    memory = [] if args.skip_memory else run_memory(size, mem_steps, args.seq, args.batch, args.threads,
                                                    not args.no_alloc, methods, args.model_loss)
    summary = summarize(memory)
    if learning:
        summary.update({k: learning[k] for k in ("acc_fp", "acc_quantized", "acc_quantized_nf4", "acc_qzo",
                                                 "acc_qzo_nf4", "acc_mezo")})
        summary["classifier_steps_per_s"] = learning["classifier_steps_per_s"]
    payload = {
        "benchmark": "qzo", "quick": args.quick, "machine": machine, "seconds": None,
        "learning_reused": reused,
        **summary,
        "memory": {"size": size, "config": SIZES[size], "vocab": 32000, "batch": args.batch, "seq": args.seq,
                   "runs": memory},
        "learning": learning,
    }
    if memory:
        print_table(
            [{"method": r["method"], "peak GiB": r.get("peak_bytes", 0) / 2**30,
              "peak-import GiB": r.get("peak_minus_import_bytes", 0) / 2**30,
              "peak alloc GiB": r.get("peak_allocated_bytes", 0) / 2**30, "step s": r.get("median_step_s"),
              "error": r.get("error")} for r in memory],
            ["method", "peak GiB", "peak-import GiB", "peak alloc GiB", "step s", "error"],
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
