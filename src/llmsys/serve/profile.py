"""Measure a cost-model profile: time real forwards of the engine's runner, fit the cost model to them.

    llmsys serve profile --out profile.json                 # CUDA: an 8B-shaped model (8 layers), bf16
    llmsys serve profile --out cpu.json --device cpu        # CPU: a tiny model (what the CPU engine runs)

On a CPU each sample is one batch of the real engine serving a calibration burst (scheduling,
forward, sampling, bookkeeping), so the simulator's clock advances as the engine's does. On CUDA each
sample is one forward of `ModelRunner.run` on a synthetic batch (prompt chunks at given offsets,
decode rows with given context lengths), timed wall-clock as the engine sees it (launch, forward,
argmax, copy of the tokens to the host), median of repeats after warm-up, on the whole device, on
SM partitions (green contexts) of several sizes, and prefill next to decode on complementary
partitions, so that the saturation points and the contention terms can be fitted.

Fitting: on a CPU (one share, one forward at a time) the cost model is linear in its per-token
coefficients and is fitted by non-negative least squares (absolute errors: unbiased sums); on CUDA every
parameter is fitted by least squares on log-latencies (scipy), starting from `default_profile()`.
The fit's per-sample errors are stored in `Profile.fit`.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from torch import nn

from llmsys.machine import cpu_name
from llmsys.serve.costmodel import BatchWork, CostModel, ModelShape, Profile, default_profile
from llmsys.serve.errors import GPUUnavailableError, ProfileError
from llmsys.serve.request import Batch, RequestState
from llmsys.serve.runner import ModelRunner

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sample:
    """One timed forward: its work, its SM share, what ran next to it, and the seconds it took."""

    work: BatchWork
    seconds: float
    share: float = 1.0
    other: BatchWork | None = None
    other_share: float = 0.0
    label: str = ""

    def to_dict(self) -> dict:
        return {
            "label": self.label,
            "seconds": self.seconds,
            "share": self.share,
            "work": asdict(self.work),
            "other": asdict(self.other) if self.other is not None else None,
            "other_share": self.other_share,
        }


# ----------------------------------------------------------------------------------------------
# synthetic batches on a runner
def synthetic_batch(
    prefill: Sequence[tuple[int, int]] = (), decode: Sequence[int] = (), lane: str = "mixed", share: float = 1.0
) -> tuple[Batch, dict[str, list[int]]]:
    """A batch of prompt chunks (start, tokens) and decode rows (kv tokens stored before the step),
    with the token ids to feed (arbitrary; timing does not depend on them)."""
    batch = Batch(lane, sm_share=share)
    inputs: dict[str, list[int]] = {}
    for i, (start, n) in enumerate(prefill):
        req = RequestState(f"p{i}", prompt_len=start + n, max_new_tokens=1, arrival=0.0, prefilled=start)
        batch.prefill.append((req, n))
        inputs[req.request_id] = [3 + (j % 97) for j in range(n)]
    for i, kv in enumerate(decode):
        req = RequestState(f"d{i}", prompt_len=kv, max_new_tokens=2, arrival=0.0, prefilled=kv, generated=1)
        batch.decode.append(req)
        inputs[req.request_id] = [5]
    return batch, inputs


def _time_runner(runner: ModelRunner, batch: Batch, inputs, repeats: int, stream=None) -> float:
    def once() -> float:
        start = time.perf_counter()
        out = runner.run(batch, inputs, stream)
        if out.event is not None:
            out.event.synchronize()  # the lane's stream: .tolist() alone would copy on the default stream
        if out.greedy is not None:
            out.greedy.tolist()
        return time.perf_counter() - start

    once()  # warm-up (allocations, kernel selection)
    times = [once() for _ in range(repeats)]
    for req in batch.requests:
        runner.free(req.request_id)
    return statistics.median(times)


def calibration_burst(n: int, seed: int = 1) -> tuple[list[int], list[int]]:
    """Prompt and output lengths of a calibration burst for a tiny model: prompts 8-256, outputs 4-48."""
    rng = np.random.default_rng(seed)
    prompts = np.clip(np.rint(np.exp(rng.normal(np.log(60), 1.0, n))), 8, 256).astype(int).tolist()
    outputs = rng.integers(4, 49, n).tolist()
    return prompts, outputs


def measure_cpu(
    model: nn.Module, *, requests: int = 16, seed: int = 1, page_size: int = 16, schedulers=None
) -> list[Sample]:
    """Per-batch samples of the real engine on a CPU, serving a calibration burst.

    Each sample is one batch as the engine ran it (`Engine(record_batches=True)`): scheduling, the
    forward, sampling and the bookkeeping around it, so the simulator's clock advances as the
    engine's does. The burst is run once per scheduler so that prompt chunks, decode batches and
    mixed batches of many sizes are all sampled. A shared CPU is noisy (other processes take the
    cores for milliseconds at a time); the least-squares fit averages that noise over the samples.
    """
    from llmsys.serve.engine import Engine
    from llmsys.serve.request import SamplingParams
    from llmsys.serve.schedulers import ChunkedPrefill, FCFSPrefillFirst, Nexus

    if schedulers is None:
        schedulers = [lambda: ChunkedPrefill(token_budget=48), lambda: Nexus(prefill_budget=200),
                      lambda: FCFSPrefillFirst(max_batch_tokens=400)]  # fmt: skip
    prompts, outputs = calibration_burst(requests, seed)
    gen = torch.Generator().manual_seed(seed)
    ids = [torch.randint(3, model.config.vocab_size, (n,), generator=gen) for n in prompts]
    params = [SamplingParams(max_new_tokens=o, ignore_eos=True) for o in outputs]
    samples: list[Sample] = []
    for make in schedulers:
        with Engine(model, make(), page_size=page_size, num_pages=2048, max_num_seqs=256, record_batches=True) as e:
            e.generate(ids, params)
            samples.extend(Sample(work, seconds, label=lane) for lane, work, seconds in e.batch_log)
    return samples


# ----------------------------------------------------------------------------------------------
# fitting
def _cpu_features(shape: ModelShape, work: BatchWork) -> list[float]:
    return [
        1.0,
        work.seqs,
        work.prefill_seqs,
        2.0 * shape.linear_params * work.tokens,
        shape.attention_flops_per_pair * work.prefill_pairs,
        shape.kv_bytes_per_token * work.decode_kv,
    ]


def fit_cpu_profile(samples: Sequence[Sample], shape: ModelShape, name: str = "cpu") -> Profile:
    """A serial (one forward at a time) profile from full-share samples, by non-negative least squares."""
    from scipy.optimize import nnls

    if len(samples) < 6:
        raise ProfileError(f"need at least 6 samples to fit a CPU profile, got {len(samples)}")
    works = [s.work for s in samples]
    if not any(w.prefill_tokens for w in works) or not any(w.decode_seqs for w in works):
        raise ProfileError("fitting a CPU profile needs samples with prompt chunks and samples with decode rows")
    a = np.array([_cpu_features(shape, s.work) for s in samples])
    t = np.array([s.seconds for s in samples])
    scale = a.max(axis=0)
    scale[scale == 0] = 1.0
    # Absolute (not relative) errors: the simulator adds batch times up, so the fit must be unbiased
    # for the mean time; on a shared CPU the times are skewed by preemptions, and a fit on relative
    # errors lands near the median instead (10% low in sums, measured).
    coef, _ = nnls(a / scale, t)
    coef = coef / scale

    def rate(c: float) -> float:
        return 1.0 / float(c) if c > 0 else 1e30  # a zero coefficient: the term costs nothing measurable

    profile = Profile(
        name=name,
        source=f"fitted to {len(samples)} batches of llmsys.serve's engine on {cpu_name()}",
        device=cpu_name(),
        model=shape,
        flops=rate(coef[3]),
        attention_flops=rate(coef[4]),
        bandwidth=1e30,  # weight streaming is not separable from the per-token terms on a CPU
        attention_bandwidth=rate(coef[5]),
        overhead_s=float(coef[0]),
        per_seq_s=float(coef[1]),
        per_prefill_seq_s=float(coef[2]),
        num_sms=1,
        sm_granularity=1,
        fill_tokens=1.0,
        bandwidth_saturation=1.0,
        contention_memory=0.0,
        contention_cache=0.0,
        contention_compute=0.0,
        mixed_decode_penalty=1.0,
        concurrent=False,
        memory_bytes=0.0,
    )
    return replace(profile, fit=_fit_report(profile, samples))


_GPU_FREE = (
    "overhead_s",
    "per_seq_s",
    "flops",
    "attention_flops",
    "bandwidth",
    "attention_bandwidth",
    "fill_tokens",
    "bandwidth_saturation",
    "contention_memory",
    "contention_cache",
    "contention_compute",
    "mixed_decode_penalty",
)
_BOUNDS = {
    "bandwidth_saturation": (0.05, 1.0),
    "mixed_decode_penalty": (1.0, 20.0),
    "contention_memory": (0.0, 0.95),
    "contention_cache": (0.0, 5.0),
    "contention_compute": (0.0, 5.0),
}


def fit_gpu_profile(samples: Sequence[Sample], base: Profile) -> Profile:
    """Fit every cost-model parameter to samples with shares and concurrency (least squares on logs)."""
    from scipy.optimize import least_squares

    if len(samples) < len(_GPU_FREE):
        raise ProfileError(f"need at least {len(_GPU_FREE)} samples to fit a GPU profile, got {len(samples)}")
    measured = np.log([s.seconds for s in samples])

    def make(x: np.ndarray) -> Profile:
        values = {}
        for name, v in zip(_GPU_FREE, x):
            lo, hi = _BOUNDS.get(name, (None, None))
            value = math.exp(v) if name not in _BOUNDS else lo + (hi - lo) / (1 + math.exp(-v))
            values[name] = value
        return replace(base, **values)

    def start(name: str) -> float:
        v = getattr(base, name)
        if name in _BOUNDS:
            lo, hi = _BOUNDS[name]
            f = min(max((v - lo) / (hi - lo), 1e-3), 1 - 1e-3)
            return math.log(f / (1 - f))
        return math.log(max(v, 1e-9))

    def residuals(x: np.ndarray) -> np.ndarray:
        cm = CostModel(make(x))
        pred = [cm.latency(s.work, s.share, s.other, s.other_share) for s in samples]
        return np.log(np.maximum(pred, 1e-12)) - measured

    # the max() terms make the loss piecewise smooth: a few starts guard against a poor local minimum
    x0 = np.array([start(n) for n in _GPU_FREE])
    rng = np.random.default_rng(0)
    starts = [x0] + [x0 + rng.normal(0.0, 0.5, size=x0.shape) for _ in range(3)]
    best = min((least_squares(residuals, x, method="trf") for x in starts), key=lambda r: r.cost)
    profile = make(best.x)
    return replace(profile, fit=_fit_report(profile, samples))


def _fit_report(profile: Profile, samples: Sequence[Sample]) -> dict:
    cm = CostModel(profile)
    rows = []
    for s in samples:
        pred = cm.latency(s.work, s.share, s.other, s.other_share)
        rows.append({**s.to_dict(), "predicted": pred, "rel_error": (pred - s.seconds) / s.seconds})
    errors = [abs(r["rel_error"]) for r in rows]
    return {
        "samples": rows,
        "median_abs_rel_error": statistics.median(errors),
        "max_abs_rel_error": max(errors),
    }


# ----------------------------------------------------------------------------------------------
# end to end
def profile_cpu(
    model: nn.Module | None = None, *, family: str = "llama", quick: bool = False, seed: int = 1
) -> Profile:
    """Measure and fit a CPU profile (a tiny random model of `family` if no model is given)."""
    if model is None:
        from llmsys.testing import tiny_model

        model = tiny_model(family)
    samples = measure_cpu(model, requests=12 if quick else 24, seed=seed)
    return fit_cpu_profile(samples, ModelShape.from_model(model), name=f"cpu-{model.config.model_type}")


def gpu_model(layers: int = 8, device: str | torch.device = "cuda", dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """A random-weight Llama-3-8B-shaped model with `layers` decoder layers, built on the GPU."""
    from transformers import AutoModelForCausalLM

    from llmsys.testing import tiny_config

    config = tiny_config(
        "llama",
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=32768,
        rope_theta=500000.0,
    )
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def gpu_plan(quick: bool = False) -> dict[str, list]:
    """Batches of the GPU samples: full device, SM partitions, and prefill next to decode."""
    prefill = [(0, n) for n in ((512, 2048, 4096) if quick else (256, 512, 1024, 2048, 4096))]
    decode = [(b, kv) for b in ((16, 128) if quick else (8, 32, 128)) for kv in (512, 2048)]
    return {
        "prefill": [[c] for c in prefill] + [[(4096, 1024)]],
        "decode": [[kv] * b for b, kv in decode],
        "mixed": [([(0, 1024)], [1024] * 32), ([(0, 2048)], [2048] * 64)],
        "shares": [0.25, 0.5, 0.75] if quick else [0.125, 0.25, 0.5, 0.75],
        "split": [0.5, 0.75],
    }


def profile_gpu(model: nn.Module | None = None, *, layers: int = 8, quick: bool = False, repeats: int = 5) -> Profile:
    """Measure and fit a GPU profile (default: an 8B-shaped model cut to `layers` layers, bf16).

    The fitted rates are the device's; `Profile.with_model(ModelShape.llama3_8b())` applies them to
    the full 32-layer model for the simulator.
    """
    from llmsys.serve.partition import LaneStreams

    if not torch.cuda.is_available():
        raise GPUUnavailableError(
            "GPU profiling needs a CUDA device; on this machine use `llmsys serve profile --device cpu`, or "
            "simulate with the default profile (shaped like an 8B model on an H100)"
        )
    if model is None:
        model = gpu_model(layers)
    device = next(model.parameters()).device
    runner = ModelRunner(model, page_size=16, num_pages=_gpu_pages(model))
    lanes = LaneStreams.create(device, use_green_contexts=True)
    plan = gpu_plan(quick)
    samples: list[Sample] = []

    def solo(chunks, decode, share=1.0, label=""):
        lane = "prefill" if chunks and not decode else "decode" if decode and not chunks else "mixed"
        batch, inputs = synthetic_batch(chunks, decode, lane, share)
        stream = lanes.stream(lane, share)
        seconds = _time_runner(runner, batch, inputs, repeats, stream)
        samples.append(Sample(BatchWork.of(batch), seconds, share, label=label))

    for chunks in plan["prefill"]:
        solo(chunks, [], label=f"prefill {chunks}")
    for decode in plan["decode"]:
        solo([], decode, label=f"decode {len(decode)}x{decode[0]}")
    for chunks, decode in plan["mixed"]:
        solo(chunks, decode, label=f"mixed {chunks} + {len(decode)}x{decode[0]}")
    if lanes.info.mode == "green-contexts":
        for share in plan["shares"]:
            solo([(0, 2048)], [], share, label=f"prefill 2048 on {share:.3f}")
            solo([], [1024] * 64, share, label=f"decode 64x1024 on {share:.3f}")
    for share in plan["split"]:
        samples.extend(_concurrent_samples(runner, lanes, share, repeats))
    shape = ModelShape.from_model(model)
    props = torch.cuda.get_device_properties(device)
    base = replace(
        default_profile(),
        name=f"measured-{props.name.replace(' ', '-').lower()}",
        source=(
            f"measured by `llmsys serve profile` on {props.name} ({lanes.info.describe()}); torch {torch.__version__}"
        ),
        device=props.name,
        model=shape,
        num_sms=props.multi_processor_count,
        sm_granularity=lanes.info.granularity or 8,
        memory_bytes=float(props.total_memory),
    )
    return fit_gpu_profile(samples, base)


def _concurrent_samples(runner: ModelRunner, lanes, share: float, repeats: int) -> list[Sample]:
    """Prefill 2048 on `share` next to decode 64x1024 on the rest: each lane's latency."""
    p_batch, p_inputs = synthetic_batch([(0, 2048)], [], "prefill", share)
    d_batch, d_inputs = synthetic_batch([], [1024] * 64, "decode", 1.0 - share)
    p_stream, d_stream = lanes.stream("prefill", share), lanes.stream("decode", 1.0 - share)
    p_times, d_times = [], []
    for i in range(repeats + 1):
        start = time.perf_counter()
        d_out = runner.run(d_batch, d_inputs, d_stream)
        p_out = runner.run(p_batch, p_inputs, p_stream)
        p_end = d_end = None
        while p_end is None or d_end is None:
            now = time.perf_counter()
            if d_end is None and d_out.done():
                d_end = now
            if p_end is None and p_out.done():
                p_end = now
        if i:  # the first round warms up
            p_times.append(p_end - start)
            d_times.append(d_end - start)
    for req in p_batch.requests + d_batch.requests:
        runner.free(req.request_id)
    pw, dw = BatchWork.of(p_batch), BatchWork.of(d_batch)
    return [
        Sample(pw, statistics.median(p_times), share, dw, 1.0 - share, label=f"prefill 2048 || decode, {share:.2f}"),
        Sample(dw, statistics.median(d_times), 1.0 - share, pw, share, label=f"decode || prefill 2048, {share:.2f}"),
    ]


def _gpu_pages(model: nn.Module) -> int:
    # enough for the largest sample (128 rows x 2048 tokens, or 64 x 2048 + a 2048 prompt), with slack
    return (128 * 2049 + 8192) // 16 + 64


__all__ = [
    "Sample",
    "calibration_burst",
    "fit_cpu_profile",
    "fit_gpu_profile",
    "gpu_model",
    "gpu_plan",
    "measure_cpu",
    "profile_cpu",
    "profile_gpu",
    "synthetic_batch",
]
