"""Nexus's cost model: a forward's latency as a function of its SM share and of bandwidth contention.

A forward (one lane's batch) is a sequence of kernels, so its time is a sum of per-operator terms,
each bounded by compute or by memory (a roofline per operator):

    t = overhead + per_seq * seqs + per_prefill_seq * prefill_seqs
        + max(linear FLOPs / (F * c),  (weights + activations) / (B * m))      # the GEMMs
        + max(attention FLOPs / (Fa * c),  chunk-context KV / (Ba * m))         # prefill attention
        + decode KV / (Ba * m) * (mixed_decode_penalty if prefill shares the forward)

with the phase's SM share `s` entering through two saturating curves (diminishing returns):

* compute `c = min(s, max(tokens / fill_tokens, 1 / num_sms))`: a forward of few tokens has too few
  GEMM tiles to occupy every SM, so SMs past that point add nothing;
* memory `m = min(1, s / bandwidth_saturation)`: a fraction of the SMs already draws the whole HBM
  bandwidth (memory-bound decode saturates early).

When the other lane runs at the same time (a disaggregated split), the SMs are disjoint but the L2
and the HBM are shared. With `rho_mem` / `rho_comp` the fraction of the device's bandwidth / FLOP/s
the other lane's forward draws alone:

* memory terms are divided by `1 - contention_memory * rho_mem` (the bandwidth is shared) and
  multiplied by `1 + contention_cache * rho_comp` (a compute-heavy neighbour's tiles evict L2);
* compute terms are multiplied by `1 + contention_compute * rho_mem`.

Decode, memory-bound next to a compute-bound prefill, therefore suffers most, as the Nexus paper
observes; the coefficients are assumptions until a GPU profile fits them.

A `Profile` holds the hardware numbers (and the model shape they are applied to). `default_profile()`
is *shaped like* an 8B Llama-3 model in bf16 on an H100 SXM from public specifications and stated
assumptions; it is not a measurement. `llmsys serve profile` measures one (`profile.py`).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from torch import nn

from llmsys.serve.errors import ProfileError
from llmsys.serve.request import Batch

PROFILE_VERSION = 1


@dataclass(frozen=True)
class ModelShape:
    """What the cost model needs to know of a model: FLOPs, bytes and KV per token."""

    name: str
    linear_params: float  # parameters of the projections and the LM head (2 FLOPs per token each)
    weight_bytes: float  # all parameters, read once per forward
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    kv_bytes_per_token: float  # K and V over all layers
    activation_bytes_per_token: float  # activations written and read by one token's forward

    @property
    def attention_flops_per_pair(self) -> float:
        """FLOPs of one (query, key) pair over all layers and heads: q.k and p.v, 2*D each."""
        return 4.0 * self.num_layers * self.num_q_heads * self.head_dim

    @classmethod
    def llama3_8b(cls) -> ModelShape:
        """Llama-3-8B in bf16 (32 layers, hidden 4096, MLP 14336, 32 q / 8 kv heads of 128, vocab 128256)."""
        layers, hidden, inter, heads, kv, hd, vocab, b = 32, 4096, 14336, 32, 8, 128, 128256, 2
        per_layer = hidden * heads * hd + 2 * hidden * kv * hd + heads * hd * hidden + 3 * hidden * inter
        linear = layers * per_layer + vocab * hidden  # + LM head; the input embedding is a lookup
        total = linear + vocab * hidden
        return cls(
            name="llama3-8b (bf16)",
            linear_params=float(linear),
            weight_bytes=float(total * b),
            num_layers=layers,
            num_q_heads=heads,
            num_kv_heads=kv,
            head_dim=hd,
            kv_bytes_per_token=float(2 * layers * kv * hd * b),
            activation_bytes_per_token=float(layers * (8 * hidden + 3 * inter) * b),
        )

    @classmethod
    def from_model(cls, model: nn.Module) -> ModelShape:
        """The shape of a loaded transformers model (a supported dense family)."""
        from llmsys.models import decoder_layers, family_of, kv_heads, lm_head

        family_of(model, moe=False)
        q_heads, kv, hd = kv_heads(model)
        params = list(model.parameters())
        itemsize = params[0].element_size()
        linear = sum(m.weight.numel() for layer in decoder_layers(model) for m in layer.modules() if _is_linear(m))
        linear += lm_head(model).weight.numel()
        config = model.config
        layers = len(decoder_layers(model))
        inter = getattr(config, "intermediate_size", 4 * config.hidden_size)
        return cls(
            name=f"{config.model_type} ({sum(p.numel() for p in params) / 1e6:.1f}M params)",
            linear_params=float(linear),
            weight_bytes=float(sum(p.numel() * p.element_size() for p in params)),
            num_layers=layers,
            num_q_heads=q_heads,
            num_kv_heads=kv,
            head_dim=hd,
            kv_bytes_per_token=float(2 * layers * kv * hd * itemsize),
            activation_bytes_per_token=float(layers * (8 * config.hidden_size + 3 * inter) * itemsize),
        )


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear)


def vllm_max_num_seqs(memory_bytes: float, device_name: str) -> int:
    """vLLM v1's default cap on admitted requests for a GPU: 1024 with at least 70 GiB of memory
    (H100, H200, MI300X; vLLM excludes the A100, on which it measured a regression), 256 otherwise."""
    return 1024 if memory_bytes >= 70 * 2**30 and "a100" not in device_name.lower() else 256


@dataclass(frozen=True)
class Profile:
    """Hardware numbers of the cost model for one device (see the module docstring for the formula).

    Rates are *achieved* rates of a whole device (not datasheet peaks). `concurrent` says whether two
    lanes can run at once (a GPU); a CPU runs one forward at a time.
    """

    name: str
    source: str  # where the numbers come from: "measured on ..." or the assumptions behind them
    device: str
    model: ModelShape
    flops: float  # FLOP/s of the GEMMs on the whole device
    attention_flops: float  # FLOP/s of prefill attention
    bandwidth: float  # bytes/s streaming weights and activations
    attention_bandwidth: float  # bytes/s reading KV in attention
    overhead_s: float  # per forward: launches, Python, scheduling
    per_seq_s: float = 0.0  # per sequence in a forward (metadata, sampling)
    per_prefill_seq_s: float = 0.0  # extra per prompt chunk (its own attention call)
    num_sms: int = 1
    sm_granularity: int = 1  # SMs per partition step (8 on Hopper green contexts)
    fill_tokens: float = 1.0  # tokens a forward needs before its GEMMs occupy every SM
    bandwidth_saturation: float = 1.0  # SM share that already draws the whole bandwidth
    contention_memory: float = 1.0
    contention_cache: float = 0.0
    contention_compute: float = 0.0
    mixed_decode_penalty: float = 1.0  # decode attention slowdown inside a mixed (chunked) batch
    concurrent: bool = False
    memory_bytes: float = 0.0  # device memory for weights + KV (0: unknown; the simulator then needs num_pages)
    fit: dict[str, Any] = field(default_factory=dict)  # fitting report (samples, error), if fitted

    def __post_init__(self) -> None:
        for name in ("flops", "attention_flops", "bandwidth", "attention_bandwidth"):
            if not getattr(self, name) > 0:
                raise ProfileError(f"profile {self.name!r}: {name} must be > 0, got {getattr(self, name)}")
        for name in (
            "overhead_s",
            "per_seq_s",
            "per_prefill_seq_s",
            "contention_memory",
            "contention_cache",
            "contention_compute",
        ):
            if getattr(self, name) < 0:
                raise ProfileError(f"profile {self.name!r}: {name} must be >= 0, got {getattr(self, name)}")
        if self.num_sms < 1 or self.sm_granularity < 1 or self.sm_granularity > self.num_sms:
            raise ProfileError(
                f"profile {self.name!r}: need 1 <= sm_granularity <= num_sms, got {self.sm_granularity}, {self.num_sms}"
            )
        if not 0 < self.bandwidth_saturation <= 1:
            raise ProfileError(f"profile {self.name!r}: bandwidth_saturation must lie in (0, 1]")
        if self.fill_tokens <= 0 or self.mixed_decode_penalty < 1:
            raise ProfileError(f"profile {self.name!r}: need fill_tokens > 0 and mixed_decode_penalty >= 1")

    @property
    def partitions(self) -> int:
        """How many SM steps a split can be chosen from (num_sms // sm_granularity)."""
        return max(1, self.num_sms // self.sm_granularity)

    def kv_capacity_tokens(self, usable: float = 0.9) -> int:
        """KV tokens that fit next to the weights in `usable` of the device memory (0 if unknown)."""
        free = usable * self.memory_bytes - self.model.weight_bytes
        return max(0, int(free // self.model.kv_bytes_per_token)) if self.memory_bytes else 0

    def default_max_num_seqs(self) -> int:
        """How many requests an engine on this device admits at once (`vllm_max_num_seqs`); 256 when
        the profile is not a GPU's or its memory is unknown."""
        return vllm_max_num_seqs(self.memory_bytes, self.device) if self.concurrent else 256

    def with_model(self, model: ModelShape) -> Profile:
        """The same hardware applied to another model shape."""
        return replace(self, model=model)

    # ------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["version"] = PROFILE_VERSION
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Profile:
        data = dict(data)
        version = data.pop("version", PROFILE_VERSION)
        if version != PROFILE_VERSION:
            raise ProfileError(f"profile version {version} is not supported (expected {PROFILE_VERSION}); re-run "
                               "`llmsys serve profile`")  # fmt: skip
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ProfileError(f"unknown profile fields {unknown}; expected a subset of {sorted(known)}")
        try:
            data["model"] = ModelShape(**data["model"])
            return cls(**data)
        except (KeyError, TypeError) as exc:
            raise ProfileError(f"malformed profile ({exc}); write one with `llmsys serve profile --out FILE`") from exc

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ProfileError(f"no profile at {path}; write one with `llmsys serve profile --out {path}`") from None
        except json.JSONDecodeError as exc:
            raise ProfileError(f"{path} is not JSON ({exc}); write one with `llmsys serve profile`") from None
        return cls.from_dict(data)


def default_profile() -> Profile:
    """An H100-SXM-like device serving a Llama-3-8B-shaped model in bf16. NOT a measurement.

    Where each number comes from:
    * 132 SMs, 989 TFLOP/s dense bf16 and 3.35 TB/s HBM3: NVIDIA's H100 SXM5 datasheet. Achieved
      rates assumed at 65% (GEMMs), 50% (attention) and 85% (streaming) of those peaks.
    * 8-SM partition granularity: CUDA green contexts on Hopper (compute capability 9.x).
    * fill_tokens=256: a GEMM of M tokens against N in 4096..14336 has ~(M/128)(N/128) output tiles,
      which cover 132 SMs from a few hundred tokens on; bandwidth_saturation=0.5: assumed.
    * overhead 2 ms/forward, 20 us/sequence: assumed (launches with CUDA graphs for decode).
    * 80 GB of HBM; 90% of it usable for weights and KV (16 GB of weights leave ~427k KV tokens).
    * contention: the HBM is shared in proportion to use (contention_memory=1); a neighbour running
      at full compute slows memory-bound work by 30% (L2, contention_cache=0.3) and a neighbour at
      full bandwidth slows compute-bound work by 5% (contention_compute=0.05). Assumed.
    * mixed_decode_penalty=2: the Nexus paper measured the decode kernel up to 10x slower inside mixed
      (chunked) batches; 2 is a conservative assumption (benchmarks/serve.py also reports 1).
    Calibrate a real profile on a GPU with `llmsys serve profile --out FILE`.
    """
    return Profile(
        name="h100-llama3-8b-shape",
        source=(
            "shaped like Llama-3-8B bf16 on an H100 SXM from public specs (989 TFLOP/s bf16, 3.35 TB/s, "
            "132 SMs) and stated assumptions (65%/50%/85% achieved, 2 ms overhead); not a measurement"
        ),
        device="H100 SXM (assumed)",
        model=ModelShape.llama3_8b(),
        flops=0.65 * 989e12,
        attention_flops=0.50 * 989e12,
        bandwidth=0.85 * 3.35e12,
        attention_bandwidth=0.85 * 3.35e12,
        overhead_s=2e-3,
        per_seq_s=20e-6,
        per_prefill_seq_s=0.0,
        num_sms=132,
        sm_granularity=8,
        fill_tokens=256.0,
        bandwidth_saturation=0.5,
        contention_memory=1.0,
        contention_cache=0.3,
        contention_compute=0.05,
        mixed_decode_penalty=2.0,
        concurrent=True,
        memory_bytes=80e9,
    )


@dataclass(frozen=True)
class BatchWork:
    """The numbers of a batch the cost model needs (so the simulator and the engine share it)."""

    prefill_tokens: int = 0
    prefill_seqs: int = 0
    prefill_pairs: float = 0.0  # sum over chunk tokens of the keys each attends to
    prefill_context: int = 0  # KV tokens stored before the chunks (read by their attention)
    decode_seqs: int = 0
    decode_kv: int = 0  # KV tokens the decode rows attend to (their new token included)

    @property
    def tokens(self) -> int:
        return self.prefill_tokens + self.decode_seqs

    @property
    def seqs(self) -> int:
        return self.prefill_seqs + self.decode_seqs

    @property
    def mixed(self) -> bool:
        return self.prefill_seqs > 0 and self.decode_seqs > 0

    @classmethod
    def of(cls, batch: Batch) -> BatchWork:
        pairs = 0.0
        context = 0
        for req, n in batch.prefill:
            start = req.prefilled
            pairs += n * start + n * (n + 1) / 2  # token i of the chunk sees start + i + 1 keys
            context += start
        return cls(
            prefill_tokens=batch.prefill_tokens,
            prefill_seqs=len(batch.prefill),
            prefill_pairs=pairs,
            prefill_context=context,
            decode_seqs=len(batch.decode),
            decode_kv=sum(r.prefilled + r.generated for r in batch.decode),  # = kv_len + 1 once decoding
        )

    @classmethod
    def prefill_only(cls, chunks: list[tuple[int, int]]) -> BatchWork:
        """Prefill of (start, tokens) chunks."""
        pairs = sum(n * s + n * (n + 1) / 2 for s, n in chunks)
        return cls(
            prefill_tokens=sum(n for _, n in chunks),
            prefill_seqs=len(chunks),
            prefill_pairs=pairs,
            prefill_context=sum(s for s, _ in chunks),
        )

    @classmethod
    def decode_only(cls, kv_lens: list[int]) -> BatchWork:
        """Decode of rows that attend to `kv_lens` tokens each (their new token included)."""
        return cls(decode_seqs=len(kv_lens), decode_kv=sum(kv_lens))


@dataclass(frozen=True)
class Terms:
    """The cost model's answer, term by term (seconds), and the bytes the forward moves."""

    fixed: float
    linear: float
    prefill_attention: float
    decode_attention: float
    bytes: float
    flops: float

    @property
    def total(self) -> float:
        return self.fixed + self.linear + self.prefill_attention + self.decode_attention


class CostModel:
    """Predicts a batch's forward latency on an SM share, alone or next to the other lane's batch."""

    def __init__(self, profile: Profile | None = None):
        self.profile = profile if profile is not None else default_profile()

    def _fractions(self, work: BatchWork, share: float) -> tuple[float, float]:
        p = self.profile
        share = min(max(share, 1.0 / p.num_sms), 1.0)
        compute = min(share, max(work.tokens / p.fill_tokens, 1.0 / p.num_sms))
        memory = min(1.0, share / p.bandwidth_saturation)
        return compute, memory

    def terms(self, work: BatchWork, share: float = 1.0, pressure: tuple[float, float] = (0.0, 0.0)) -> Terms:
        """Each term of the latency of `work` on `share` of the SMs while the other lane draws
        `pressure = (rho_mem, rho_comp)` of the device's bandwidth and FLOP/s."""
        p, m = self.profile, self.profile.model
        if work.tokens == 0:
            return Terms(0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
        c, mem = self._fractions(work, share)
        rho_mem, rho_comp = pressure
        slow_mem = (1.0 + p.contention_cache * rho_comp) / max(0.05, 1.0 - p.contention_memory * rho_mem)
        slow_comp = 1.0 + p.contention_compute * rho_mem
        fixed = p.overhead_s + p.per_seq_s * work.seqs + p.per_prefill_seq_s * work.prefill_seqs
        linear_flops = 2.0 * m.linear_params * work.tokens
        linear_bytes = m.weight_bytes + m.activation_bytes_per_token * work.tokens
        linear = max(
            linear_flops / (p.flops * c) * slow_comp,
            linear_bytes / (p.bandwidth * mem) * slow_mem,
        )
        attn_flops = m.attention_flops_per_pair * work.prefill_pairs
        context_bytes = m.kv_bytes_per_token * work.prefill_context
        prefill_attn = 0.0
        if work.prefill_tokens:
            prefill_attn = max(
                attn_flops / (p.attention_flops * c) * slow_comp,
                context_bytes / (p.attention_bandwidth * mem) * slow_mem,
            )
        decode_bytes = m.kv_bytes_per_token * work.decode_kv
        decode_attn = decode_bytes / (p.attention_bandwidth * mem) * slow_mem
        if work.mixed:
            decode_attn *= p.mixed_decode_penalty
        return Terms(
            fixed,
            linear,
            prefill_attn,
            decode_attn,
            linear_bytes + context_bytes + decode_bytes,
            linear_flops + attn_flops,
        )

    def latency(self, work: BatchWork, share: float = 1.0, other: BatchWork | None = None, other_share: float = 0.0):
        """Seconds for `work` on `share` of the SMs; `other` runs concurrently on `other_share`."""
        pressure = self.pressure(other, other_share) if other is not None else (0.0, 0.0)
        return self.terms(work, share, pressure).total

    def pressure(self, work: BatchWork | None, share: float) -> tuple[float, float]:
        """(fraction of the bandwidth, fraction of the FLOP/s) `work` draws running alone on `share`."""
        if work is None or work.tokens == 0 or share <= 0:
            return 0.0, 0.0
        t = self.terms(work, share)
        seconds = max(t.total, 1e-12)
        return min(1.0, t.bytes / seconds / self.profile.bandwidth), min(1.0, t.flops / seconds / self.profile.flops)

    def batch_latency(self, batch: Batch, other: Batch | None = None) -> float:
        """Latency of a scheduled batch (on its `sm_share`), next to the other lane's batch if any."""
        other_work = BatchWork.of(other) if other else None
        return self.latency(BatchWork.of(batch), batch.sm_share, other_work, other.sm_share if other else 0.0)

    def split_latencies(self, prefill: BatchWork, decode: BatchWork, prefill_share: float) -> tuple[float, float]:
        """(prefill, decode) latency when the two run concurrently on complementary shares."""
        d_share = 1.0 - prefill_share
        tp = self.latency(prefill, prefill_share, decode if decode.tokens else None, d_share)
        td = self.latency(decode, d_share, prefill if prefill.tokens else None, prefill_share)
        return tp, td


def quantize_share(share: float, profile: Profile) -> float:
    """Round an SM share to the device's partition granularity (at least one step, at most all)."""
    steps = profile.partitions
    k = min(steps, max(1, math.floor(share * steps + 1e-9)))
    return k / steps


__all__ = [
    "BatchWork",
    "CostModel",
    "ModelShape",
    "Profile",
    "Terms",
    "default_profile",
    "quantize_share",
]
