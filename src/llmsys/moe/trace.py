"""Routing traces: which experts each token chose in each MoE layer.

A `RoutingTrace` holds the raw per-token choices `topk [tokens, layers, k]` (the layout of vLLM's
`routed_experts`), and derives what MoETuner needs from them:

- `load` P[e, l]: how many tokens expert e processes in MoE layer l (compute load);
- `transitions` R[e1, e2, l]: how many tokens went to e1 in layer l and to e2 in layer l+1
  (inter-layer affinity, MoETuner's proxy for all-to-all traffic). A token counts once for each
  of its k x k (e1, e2) pairs, so `R[:, :, l].sum(1) == k * P[:, l]`.

Traces come from `RoutingRecorder` (any supported transformers MoE model), from vLLM / SGLang dumps
(`from_vllm`, `from_sglang`), or from `synthetic_trace` (real shapes, tunable skew and affinity).
An entry of -1 means "no expert" (padding in engine dumps) and is ignored by every statistic.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from llmsys.models import moe_blocks
from llmsys.moe.errors import TraceError

log = logging.getLogger(__name__)


@dataclass
class RoutingTrace:
    """Per-token expert choices of a MoE model: `topk[t, l, j]` = j-th expert of token t in MoE layer l."""

    topk: np.ndarray
    num_experts: int
    layer_ids: tuple[int, ...] | None = None  # decoder-layer index of each MoE layer, when known
    source: str = ""  # free text: where the trace came from (model, engine dump, synthetic parameters)
    _load: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)
    _transitions: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        topk = np.asarray(self.topk)
        if topk.ndim != 3:
            raise TraceError(f"topk must be [tokens, layers, k], got shape {topk.shape}")
        if not np.issubdtype(topk.dtype, np.integer):
            raise TraceError(f"topk must hold integer expert ids, got dtype {topk.dtype}")
        if topk.size and (topk.min() < -1 or topk.max() >= self.num_experts):
            raise TraceError(
                f"expert ids must lie in [0, {self.num_experts}) (or -1 for padding); "
                f"found [{topk.min()}, {topk.max()}]: is num_experts={self.num_experts} right?"
            )
        self.topk = topk.astype(np.int32 if self.num_experts < 2**31 else np.int64, copy=False)
        if self.layer_ids is not None:
            self.layer_ids = tuple(int(i) for i in self.layer_ids)
            if len(self.layer_ids) != self.num_layers:
                raise TraceError(f"{len(self.layer_ids)} layer_ids for {self.num_layers} MoE layers")

    # -- shape -----------------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return self.topk.shape[0]

    @property
    def num_layers(self) -> int:
        return self.topk.shape[1]

    @property
    def top_k(self) -> int:
        return self.topk.shape[2]

    # -- statistics ------------------------------------------------------------------------------
    @property
    def load(self) -> np.ndarray:
        """P[e, l]: tokens processed by expert e in MoE layer l (float64, [E, L])."""
        if self._load is None:
            E, L = self.num_experts, self.num_layers
            load = np.zeros((E, L))
            for l in range(L):
                ids = self.topk[:, l].ravel()
                load[:, l] = np.bincount(ids[ids >= 0], minlength=E)
            self._load = load
        return self._load

    @property
    def transitions(self) -> np.ndarray:
        """R[e1, e2, l]: tokens routed to e1 in layer l and to e2 in layer l+1 (float64, [E, E, L-1])."""
        if self._transitions is None:
            E, L, k = self.num_experts, self.num_layers, self.top_k
            out = np.zeros((E, E, max(L - 1, 0)))
            for l in range(L - 1):
                a = np.repeat(self.topk[:, l], k, axis=1).ravel()  # every (j1, j2) pair of the token
                b = np.tile(self.topk[:, l + 1], (1, k)).ravel()
                ok = (a >= 0) & (b >= 0)
                out[:, :, l] = np.bincount(a[ok] * E + b[ok], minlength=E * E).reshape(E, E)
            self._transitions = out
        return self._transitions

    def stats(self, seed: int = 0) -> dict[str, float]:
        """How much structure a placement can exploit: popularity skew and inter-layer dependence.

        - `hot_ratio`, `hot_ratio_max`: the hottest expert's load over the mean expert's load, mean and
          max over layers (1 = uniform; what balance-only placement has to even out);
        - `interlayer_mi`: mutual information (nats) between the layer-l and layer-(l+1) experts of a
          token's expert pairs (from R), mean over transitions: 0 means consecutive layers are independent
          and there is nothing for MoETuner's second ILP to line up;
        - `interlayer_mi_shuffled`: the same after shuffling each layer's tokens (independent layers,
          same loads, same token count): the plug-in estimate's small-sample bias. Only the excess of
          `interlayer_mi` over it is structure.
        """
        rng = np.random.default_rng(seed)
        shuffled = np.stack([self.topk[rng.permutation(self.num_tokens), l] for l in range(self.num_layers)], 1)
        share = self.load / np.maximum(self.load.mean(axis=0, keepdims=True), 1e-12)
        return {
            "tokens": float(self.num_tokens),
            "hot_ratio": round(float(share.max(axis=0).mean()), 4),
            "hot_ratio_max": round(float(share.max()), 4),
            "interlayer_mi": round(_mean_mutual_information(self.transitions), 5),
            "interlayer_mi_shuffled": round(
                _mean_mutual_information(RoutingTrace(shuffled, self.num_experts).transitions), 5
            ),
        }

    def select(self, tokens: slice | np.ndarray) -> RoutingTrace:
        """The sub-trace of some tokens (e.g. a calibration split)."""
        return RoutingTrace(self.topk[tokens], self.num_experts, self.layer_ids, self.source)

    @staticmethod
    def concat(traces: Sequence[RoutingTrace]) -> RoutingTrace:
        """Traces of the same model, one after the other along the token axis."""
        if not traces:
            raise TraceError("concat needs at least one trace")
        first = traces[0]
        for t in traces[1:]:
            if (t.num_experts, t.num_layers) != (first.num_experts, first.num_layers):
                raise TraceError("cannot concatenate traces of different shapes (experts, layers)")
        k = max(t.top_k for t in traces)
        parts = [np.pad(t.topk, ((0, 0), (0, 0), (0, k - t.top_k)), constant_values=-1) for t in traces]
        return RoutingTrace(np.concatenate(parts), first.num_experts, first.layer_ids, first.source)

    # -- persistence -----------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write a compressed .npz (topk + metadata); `RoutingTrace.from_file` reads it back."""
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_suffix(".npz")
        meta = {"num_experts": self.num_experts, "layer_ids": self.layer_ids, "source": self.source}
        np.savez_compressed(path, topk=self.topk, meta=np.array(json.dumps(meta)))
        return path

    @classmethod
    def from_file(cls, path: str | Path) -> RoutingTrace:
        """Read a trace written by `save`."""
        try:
            data = np.load(Path(path), allow_pickle=False)
        except (ValueError, OSError) as err:
            if isinstance(err, FileNotFoundError):
                raise
            raise TraceError(f"{path} is not a RoutingTrace file (a .npz written by RoutingTrace.save): {err}") from err
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise TraceError(
                f"{path} holds a single array, not a RoutingTrace .npz: import engine dumps with "
                "RoutingTrace.from_vllm(np.load(path), num_experts) or `llmsys moe record --from-vllm`"
            )
        with data:
            if "topk" not in data or "meta" not in data:
                raise TraceError(f"{path} is not a RoutingTrace file (expected arrays 'topk' and 'meta')")
            meta = json.loads(str(data["meta"]))
            return cls(data["topk"], meta["num_experts"], meta.get("layer_ids"), meta.get("source", ""))

    # -- importers -------------------------------------------------------------------------------
    @classmethod
    def from_vllm(
        cls, routed_experts: np.ndarray | torch.Tensor | Iterable, num_experts: int, source: str = "vllm"
    ) -> RoutingTrace:
        """From vLLM `routed_experts` arrays, each [seq, layers, topk] (one per request; concatenated)."""
        if isinstance(routed_experts, (np.ndarray, torch.Tensor)):
            routed_experts = [routed_experts]
        arrays = [np.asarray(a.cpu() if isinstance(a, torch.Tensor) else a) for a in routed_experts]
        for a in arrays:
            if a.ndim != 3:
                raise TraceError(f"vLLM routed_experts must be [seq, layers, topk]; got shape {a.shape}")
        if not arrays:
            raise TraceError("no routed_experts arrays given")
        return cls(np.concatenate(arrays).astype(np.int64), num_experts, source=source)

    @classmethod
    def from_sglang(
        cls, dumps: str | Path | dict | Sequence[str | Path | dict], num_experts: int, source: str = "sglang"
    ) -> RoutingTrace:
        """From SGLang per-token expert-distribution dumps: dicts (or .pt files) holding
        `topk_ids_of_layer [layers, tokens, topk]`. Tokens whose every entry is -1 (padding) are dropped."""
        if isinstance(dumps, (str, Path, dict)):
            dumps = [dumps]
        parts = []
        for dump in dumps:
            data = torch.load(dump, map_location="cpu", weights_only=True) if not isinstance(dump, dict) else dump
            if "topk_ids_of_layer" not in data:
                raise TraceError(
                    f"SGLang dump has no 'topk_ids_of_layer' (keys: {sorted(data)}); record it with "
                    "SGLang's expert distribution recorder in per-token mode"
                )
            ids = data["topk_ids_of_layer"]
            ids = np.asarray(ids.cpu() if isinstance(ids, torch.Tensor) else ids)
            if ids.ndim != 3:
                raise TraceError(f"topk_ids_of_layer must be [layers, tokens, topk]; got {ids.shape}")
            ids = ids.transpose(1, 0, 2)
            parts.append(ids[(ids >= 0).any(axis=(1, 2))])
        return cls(np.concatenate(parts).astype(np.int64), num_experts, source=source)


def _mean_mutual_information(transitions: np.ndarray) -> float:
    """Mean over layer transitions of the mutual information (nats) of the joint counts R[:, :, l]."""
    values = []
    for l in range(transitions.shape[2]):
        joint = transitions[:, :, l]
        total = joint.sum()
        if total <= 0:
            continue
        joint = joint / total
        outer = joint.sum(axis=1, keepdims=True) * joint.sum(axis=0, keepdims=True)
        nz = joint > 0
        values.append(float((joint[nz] * np.log(joint[nz] / outer[nz])).sum()))
    return float(np.mean(values)) if values else 0.0


class RoutingRecorder:
    """Record the top-k experts of every token in every MoE layer of a model.

        with RoutingRecorder(model) as rec:
            model(input_ids)
        trace = rec.trace()

    It hooks each router (`llmsys.models.moe_blocks`), so routing itself is untouched. Every token the
    model processes is recorded, padding included: feed unpadded sequences for a clean trace.
    """

    def __init__(self, model: nn.Module, source: str | None = None) -> None:
        self.blocks = moe_blocks(model)  # raises UnsupportedModelError for non-MoE / unknown families
        if not self.blocks:
            raise TraceError(f"{type(model).__name__} has no sparse MoE layer to record")
        self.num_experts = self.blocks[0].num_experts
        self.source = source or f"{model.config.model_type} ({type(model).__name__})"
        self._chunks: list[list[torch.Tensor]] = [[] for _ in self.blocks]
        self._handles: list[Any] = []

    def _hook(self, idx: int):
        def record(module: nn.Module, args: Any, output: Any) -> None:
            indices = output[2]  # routers return (logits, scores, indices)
            self._chunks[idx].append(indices.detach().to("cpu", torch.int32).reshape(-1, indices.shape[-1]))

        return record

    def __enter__(self) -> RoutingRecorder:
        self._handles = [b.router.register_forward_hook(self._hook(i)) for i, b in enumerate(self.blocks)]
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def clear(self) -> None:
        self._chunks = [[] for _ in self.blocks]

    def trace(self) -> RoutingTrace:
        """Everything recorded so far, as one trace (tokens in the order the model saw them)."""
        per_layer = [
            torch.cat(c) if c else torch.zeros(0, self.blocks[0].top_k, dtype=torch.int32) for c in self._chunks
        ]
        counts = {p.shape[0] for p in per_layer}
        if len(counts) != 1:
            raise TraceError(
                f"MoE layers saw different token counts {sorted(counts)}: a forward pass was interrupted; "
                "call clear() and record again"
            )
        topk = torch.stack(per_layer, dim=1).numpy()
        return RoutingTrace(topk, self.num_experts, tuple(b.layer_idx for b in self.blocks), self.source)


# -- synthetic traces ---------------------------------------------------------------------------

#: real MoE shapes: name -> (experts, MoE layers, top-k, hidden size, expert intermediate size)
SHAPES: dict[str, tuple[int, int, int, int, int]] = {
    "mixtral": (8, 32, 2, 4096, 14336),  # Mixtral-8x7B
    "qwen3_moe": (128, 48, 8, 4096, 1536),  # Qwen3-235B-A22B
    "deepseek_v3": (256, 58, 8, 7168, 2048),  # DeepSeek-V3 (58 MoE layers after 3 dense ones)
}


#: default popularity imbalance of synthetic traces: hottest expert / mean expert (see synthetic_trace)
HOT_RATIO = 3.0


def zipf_exponent(num_experts: int, hot_ratio: float) -> float:
    """The Zipf exponent s at which the hottest of `num_experts` experts has `hot_ratio` x the mean."""
    if not 1 <= hot_ratio <= num_experts:
        raise ValueError(f"hot_ratio must be in [1, num_experts={num_experts}], got {hot_ratio}")
    ranks = np.arange(1, num_experts + 1)
    lo, hi = 0.0, 20.0
    for _ in range(60):  # bisection: the ratio E / sum(r^-s) grows monotonically with s
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if num_experts / np.sum(ranks**-mid) < hot_ratio else (lo, mid)
    return round((lo + hi) / 2, 4)


def synthetic_trace(
    num_experts: int,
    num_layers: int,
    top_k: int,
    num_tokens: int,
    skew: float | None = None,
    affinity: float = 0.5,
    concentration: float = 0.3,
    seed: int = 0,
    sample_seed: int | None = None,
) -> RoutingTrace:
    """A routing trace with tunable expert-popularity skew and inter-layer affinity.

    `seed` draws the model (popularities, preferred successors) and, by default, the tokens too.
    With `sample_seed`, the tokens come from their own generator: traces with the same `seed` and
    different `sample_seed`s are independent samples of one workload (fit a placement on one,
    evaluate it on another).

    The model (documented in docs/moe.md, fixed before any benchmark was run):
    - popularity: in each layer expert popularity follows a Zipf law, p(rank r) ~ 1 / r**skew, over a
      random permutation of the experts (hot experts differ per layer). skew=0 is uniform. The
      default (skew=None) picks the exponent at which the hottest expert draws `HOT_RATIO` = 3x the
      mean popularity: skew~1.02 at 8 experts (classic Zipf; Mixtral-shape layers where the hottest of
      4 contiguous expert pairs gets about half of all assignments, the regime MoETuner reports), and
      the same 3x imbalance at 128 or 256 experts, where Zipf(1) would give a load-balanced model an
      implausible 12-23x hottest expert;
    - affinity: for layer l+1 a token draws from the mixture
      (1 - affinity) * popularity[l+1] + affinity * mean over its layer-l experts e of succ[l, e],
      where succ[l, e] = popularity[l+1] * Dirichlet(concentration) (normalised): a few preferred
      successors per expert that still respect the next layer's popularity. affinity=0 gives layers
      that are independent given popularity (no structure to exploit);
    - each token picks top_k distinct experts by Gumbel-top-k sampling from its distribution.
    """
    if not 0 <= affinity <= 1:
        raise ValueError(f"affinity must be in [0, 1], got {affinity}")
    if (skew is not None and skew < 0) or concentration <= 0:
        raise ValueError("skew must be >= 0 and concentration > 0")
    if not 0 < top_k <= num_experts:
        raise ValueError(f"top_k={top_k} must be in [1, num_experts={num_experts}]")
    rng = np.random.default_rng(seed)
    draw = rng if sample_seed is None else np.random.default_rng([sample_seed, seed])
    E, L, T = num_experts, num_layers, num_tokens
    skew = zipf_exponent(E, HOT_RATIO) if skew is None else skew
    zipf = 1.0 / np.arange(1, E + 1) ** skew
    popularity = np.stack([zipf[rng.permutation(E)] for _ in range(L)])
    popularity /= popularity.sum(axis=1, keepdims=True)

    def pick(logp: np.ndarray) -> np.ndarray:  # Gumbel-top-k = sampling k without replacement
        u = draw.random(logp.shape, dtype=np.float32)
        keys = logp.astype(np.float32) - np.log(-np.log(np.maximum(u, np.float32(1e-30))))
        return np.argpartition(-keys, top_k - 1, axis=1)[:, :top_k]

    topk = np.empty((T, L, top_k), dtype=np.int32)
    topk[:, 0] = pick(np.broadcast_to(np.log(popularity[0]), (T, E)))
    for l in range(L - 1):
        succ = popularity[l + 1] * rng.dirichlet(np.full(E, concentration), size=E)
        succ /= succ.sum(axis=1, keepdims=True)
        follow = succ[topk[:, l]].mean(axis=1)  # [T, E]
        mix = (1 - affinity) * popularity[l + 1] + affinity * follow
        topk[:, l + 1] = pick(np.log(np.maximum(mix, 1e-300)))
    source = (
        f"synthetic(E={E}, L={L}, k={top_k}, T={T}, skew={skew:g}, affinity={affinity}, "
        f"concentration={concentration}, seed={seed}"
        + ("" if sample_seed is None else f", sample_seed={sample_seed}")
        + ")"
    )
    return RoutingTrace(topk, E, None, source)


def load_trace(path: str | Path) -> RoutingTrace:
    """Read a trace written by `RoutingTrace.save`."""
    return RoutingTrace.from_file(path)


def synthetic_shape_trace(shape: str, num_tokens: int, **kwargs: Any) -> RoutingTrace:
    """`synthetic_trace` at a named real shape (`SHAPES`: mixtral, qwen3_moe, deepseek_v3)."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; one of {sorted(SHAPES)}")
    E, L, k, _, _ = SHAPES[shape]
    return synthetic_trace(E, L, k, num_tokens, **kwargs)
