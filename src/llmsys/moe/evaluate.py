"""How good is a placement for a trace: GPU load balance, GPU-pair traffic, estimated step time.

Two traffic models, both computed from the same trace and placement:

- MoETuner's inter-layer model (`traffic`): a token handled by expert e1 (on GPU g1) in MoE layer l
  and by e2 (on GPU g2) in layer l+1 moves g1 -> g2 (once per (e1, e2) pair, i.e. R[e1, e2, l]).
  Placing experts that tokens chain through on the same GPU (or node) removes that traffic. This is
  the model the MoETuner ILP minimises and the benchmark reports (`max_pair_traffic`).
- Standard expert parallelism (`predict_ep_bytes`, `ep_traffic`): every token lives on a home GPU;
  each MoE layer sends it to every GPU serving one of its experts (once per GPU) and gets one
  partial sum back. This is exactly what `llmsys.moe.ExpertParallel` executes, so its measured bytes
  are predicted to the byte. With homes independent of routing it rewards balance, not affinity.

Traffic is bandwidth-normalised with `Topology.cost` (max bandwidth / link bandwidth): a token over
a 50 GB/s network link counts 9x a token over 450 GB/s NVLink.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llmsys.moe.errors import TraceError
from llmsys.moe.placement import Placement
from llmsys.moe.trace import SHAPES, RoutingTrace

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Hardware:
    """The figures the step-time estimate needs. Defaults: an H100 node (see docs/moe.md)."""

    hidden_size: int
    expert_intermediate_size: int
    bytes_per_element: int = 2  # bf16 activations
    gpu_tflops: float = 400.0  # sustained dense bf16 TFLOP/s for the expert GEMMs (~40% of H100 peak)
    latency_us: float = 20.0  # fixed cost of one all-to-all
    tokens_per_step: int | None = None  # scale the trace to a batch of this many tokens (None: as is)

    @classmethod
    def for_shape(cls, shape: str, **kwargs: Any) -> Hardware:
        """Hidden and expert sizes of a named real shape (`trace.SHAPES`)."""
        if shape not in SHAPES:
            raise ValueError(f"unknown shape {shape!r}; one of {sorted(SHAPES)}")
        _, _, _, hidden, inter = SHAPES[shape]
        return cls(hidden, inter, **kwargs)


@dataclass(frozen=True)
class StepEstimate:
    """Estimated MoE time of one step: slowest GPU's expert GEMMs + slowest link of each all-to-all."""

    compute_seconds: float
    all_to_all_seconds: float

    @property
    def step_seconds(self) -> float:
        return self.compute_seconds + self.all_to_all_seconds


@dataclass
class PlacementReport:
    """Balance and traffic of one placement on one trace (see the module docstring for the models)."""

    solver: str
    load: np.ndarray  # [L, G] token-expert assignments per GPU per MoE layer
    traffic: np.ndarray  # [L-1, G, G] tokens moving GPU g1 (layer l) -> g2 (layer l+1)
    cost: np.ndarray  # [G, G] bandwidth-normalised link cost (0 on the diagonal)
    ep_traffic: np.ndarray | None = None  # [L, G, G] tokens sent home -> GPU by standard EP dispatch
    estimate: StepEstimate | None = None
    solve_seconds: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def max_mean_per_layer(self) -> np.ndarray:
        mean = self.load.mean(axis=1)
        return np.where(mean > 0, self.load.max(axis=1) / np.maximum(mean, 1e-12), 1.0)

    @property
    def max_mean_load(self) -> float:
        """Per-layer max/mean GPU load, averaged over layers (1.0 = perfect balance)."""
        return float(self.max_mean_per_layer.mean())

    @property
    def worst_max_mean_load(self) -> float:
        return float(self.max_mean_per_layer.max())

    @property
    def pair_traffic(self) -> np.ndarray:
        """[G, G] bandwidth-normalised traffic per GPU pair, summed over layer transitions."""
        return self.traffic.sum(axis=0) * self.cost

    @property
    def max_pair_per_transition(self) -> np.ndarray:
        """[L-1] the heaviest GPU pair's normalised traffic at each layer transition."""
        if self.traffic.shape[0] == 0:
            return np.zeros(0)
        return (self.traffic * self.cost).max(axis=(1, 2))

    @property
    def max_pair_traffic(self) -> float:
        """Sum over layer transitions of the heaviest pair's normalised traffic (MoETuner's objective)."""
        return float(self.max_pair_per_transition.sum())

    @property
    def max_link_traffic(self) -> float:
        """The heaviest GPU pair's normalised traffic summed over all layer transitions (per-link load)."""
        return float(self.pair_traffic.max()) if self.traffic.shape[0] else 0.0

    @property
    def cross_fraction(self) -> float:
        """Share of inter-layer token moves that leave their GPU."""
        total = self.traffic.sum()
        off = total - np.trace(self.traffic, axis1=1, axis2=2).sum()
        return float(off / total) if total else 0.0

    @property
    def ep_max_pair(self) -> float | None:
        """Standard EP: sum over layers of the heaviest pair's normalised dispatch+combine tokens."""
        if self.ep_traffic is None:
            return None
        both = self.ep_traffic + self.ep_traffic.transpose(0, 2, 1)  # combine mirrors dispatch
        return float((both * self.cost).max(axis=(1, 2)).sum())

    def summary(self) -> dict[str, Any]:
        """Scalars for tables and JSON."""
        out: dict[str, Any] = {
            "solver": self.solver,
            "max_mean_load": round(self.max_mean_load, 4),
            "worst_layer_max_mean_load": round(self.worst_max_mean_load, 4),
            "max_pair_traffic": round(self.max_pair_traffic, 2),
            "max_link_traffic": round(self.max_link_traffic, 2),
            "cross_gpu_fraction": round(self.cross_fraction, 4),
            "solve_seconds": round(self.solve_seconds, 3),
        }
        if self.ep_traffic is not None:
            out["ep_max_pair_traffic"] = round(self.ep_max_pair or 0.0, 2)
        if self.estimate is not None:
            out["est_compute_ms"] = round(self.estimate.compute_seconds * 1e3, 4)
            out["est_all_to_all_ms"] = round(self.estimate.all_to_all_seconds * 1e3, 4)
            out["est_step_ms"] = round(self.estimate.step_seconds * 1e3, 4)
        for key in ("mip_gap", "method"):
            if key in self.meta:
                out[key] = self.meta[key]
        return out


def gpu_loads(load: np.ndarray, share: np.ndarray) -> np.ndarray:
    """[L, G] from expert loads P [E, L] and per-layer GPU shares [L, E, G]."""
    return np.einsum("el,leg->lg", load, share)


def transition_traffic(transitions: np.ndarray, share: np.ndarray) -> np.ndarray:
    """[L-1, G, G] = share_l^T R_l share_{l+1}: expected tokens moving between GPUs per transition."""
    R = np.moveaxis(transitions, 2, 0)  # [L-1, E, E]
    return share[:-1].transpose(0, 2, 1) @ R @ share[1:]


def _check(trace: RoutingTrace, placement: Placement) -> None:
    if (trace.num_experts, trace.num_layers) != (placement.num_experts, placement.num_layers):
        raise TraceError(
            f"trace has {trace.num_experts} experts x {trace.num_layers} MoE layers but the placement "
            f"{placement.num_experts} x {placement.num_layers}: record the trace on the same model"
        )


def default_homes(num_tokens: int, num_gpus: int) -> np.ndarray:
    """Home GPU of each token when the batch is split into equal contiguous chunks (DP attention)."""
    return (np.arange(num_tokens) * num_gpus) // max(num_tokens, 1)


def local_token_ids(homes: np.ndarray) -> np.ndarray:
    """Each token's index among the tokens of its home GPU (in trace order)."""
    homes = np.asarray(homes)
    out = np.empty(homes.size, dtype=np.int64)
    for g in np.unique(homes):
        idx = np.flatnonzero(homes == g)
        out[idx] = np.arange(idx.size)
    return out


def ep_dispatch_tokens(trace: RoutingTrace, placement: Placement, homes: np.ndarray | None = None) -> np.ndarray:
    """[L, G, G]: tokens each home GPU sends to each GPU in standard EP (once per GPU that serves one
    of the token's experts; the diagonal counts tokens served at home)."""
    _check(trace, placement)
    G, T = placement.num_gpus, trace.num_tokens
    homes = default_homes(T, G) if homes is None else np.asarray(homes)
    if homes.shape != (T,) or (homes < 0).any() or (homes >= G).any():
        raise ValueError(f"homes must be [{T}] GPU ids in [0, {G})")
    tids = local_token_ids(homes)
    out = np.zeros((trace.num_layers, G, G))
    for l in range(trace.num_layers):
        ranks = placement.dispatch_ranks(l, trace.topk[:, l], homes, tids)  # [T, k]
        hit = np.zeros((T, G), dtype=bool)
        rows, cols = np.nonzero(ranks >= 0)
        hit[rows, ranks[rows, cols]] = True
        for g in range(G):
            out[l, g] = hit[homes == g].sum(axis=0)
    return out


def predict_ep_bytes(
    trace: RoutingTrace,
    placement: Placement,
    hidden_size: int,
    homes: np.ndarray | None = None,
    activation_bytes: int = 4,
    weight_bytes: int = 4,
    index_bytes: int = 8,
    num_calls: int = 1,
) -> dict[str, np.ndarray]:
    """Bytes that `ExpertParallel` sends between ranks for this trace, [G, G] per category (row = sender).

    - "counts": the split sizes exchanged before each all-to-all (one int64 per peer per MoE call);
    - "dispatch": hidden states home -> expert GPU (one row per token per GPU);
    - "routing": the k expert ids (int64) and k routing weights sent with each dispatched row;
    - "combine": one partial sum per dispatched row, back to the home GPU.
    Self-sends are not network traffic and are excluded. `num_calls` = model forward calls the trace
    spans (the count exchange happens once per MoE layer per call).
    """
    tokens = ep_dispatch_tokens(trace, placement, homes).sum(axis=0)
    np.fill_diagonal(tokens, 0)
    G, k = placement.num_gpus, trace.top_k
    counts = np.full((G, G), float(index_bytes * placement.num_layers * num_calls))
    np.fill_diagonal(counts, 0)
    out = {
        "counts": counts,
        "dispatch": tokens * hidden_size * activation_bytes,
        "routing": tokens * k * (index_bytes + weight_bytes),
        "combine": tokens.T * hidden_size * activation_bytes,
    }
    out["total"] = sum(out.values())
    return out


def step_estimate(
    report_load: np.ndarray, traffic: np.ndarray, placement: Placement, hw: Hardware, num_tokens: int
) -> StepEstimate:
    """Compute: slowest GPU's GEMMs per layer (2 * 3 * H * I FLOPs per token-expert, SwiGLU experts).
    All-to-all: per layer transition, fixed latency + the slowest link (bytes / bandwidth)."""
    scale = 1.0 if hw.tokens_per_step is None else hw.tokens_per_step / max(num_tokens, 1)
    flops = 6.0 * hw.hidden_size * hw.expert_intermediate_size
    compute = float(report_load.max(axis=1).sum() * scale * flops / (hw.gpu_tflops * 1e12))
    bw = placement.topology.bandwidth * 1e9
    off = ~np.eye(placement.num_gpus, dtype=bool)
    link_seconds = np.where(off, traffic * scale * hw.hidden_size * hw.bytes_per_element / bw, 0.0)
    a2a = float((link_seconds.max(axis=(1, 2)) + hw.latency_us * 1e-6).sum()) if traffic.shape[0] else 0.0
    return StepEstimate(compute, a2a)


def evaluate(
    placement: Placement,
    trace: RoutingTrace,
    hardware: Hardware | None = None,
    ep_homes: np.ndarray | None | bool = None,
) -> PlacementReport:
    """Balance, traffic (both models) and, with `hardware`, the step-time estimate of a placement.

    ep_homes: token home GPUs for the standard-EP traffic (None: contiguous split; False: skip it).
    """
    _check(trace, placement)
    share = placement.gpu_share()
    load = gpu_loads(trace.load, share)
    traffic = transition_traffic(trace.transitions, share) if trace.num_layers > 1 else np.zeros((0,) * 3)
    ep = None if ep_homes is False else ep_dispatch_tokens(trace, placement, ep_homes)  # type: ignore[arg-type]
    est = None if hardware is None else step_estimate(load, traffic, placement, hardware, trace.num_tokens)
    return PlacementReport(
        solver=str(placement.meta.get("solver", "?")),
        load=load,
        traffic=traffic,
        cost=placement.topology.cost,
        ep_traffic=ep,
        estimate=est,
        solve_seconds=float(placement.meta.get("solve_seconds", 0.0)),
        meta={k: v for k, v in placement.meta.items() if k in ("mip_gap", "method")},
    )


def plot_reports(reports: Mapping[str, PlacementReport], path: str | Path, title: str = "") -> Path:
    """Two panels per figure: per-layer max/mean GPU load of every solver, and each solver's GPU-pair
    traffic heatmap (MoETuner model, bandwidth-normalised, shared colour scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(reports)
    fig = plt.figure(figsize=(max(10, 3.2 * len(names)), 7.5), constrained_layout=True)
    grid = fig.add_gridspec(2, len(names))
    ax = fig.add_subplot(grid[0, :])
    for name in names:
        r = reports[name]
        ax.plot(r.max_mean_per_layer, marker=".", label=f"{name} (mean {r.max_mean_load:.3f})")
    ax.axhline(1.0, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("max / mean GPU load")
    ax.legend(fontsize=8)
    ax.set_title(title or "per-layer load balance")
    vmax = max(float(reports[n].pair_traffic.max()) for n in names) or 1.0
    for i, name in enumerate(names):
        a = fig.add_subplot(grid[1, i])
        im = a.imshow(reports[name].pair_traffic, vmin=0, vmax=vmax, cmap="viridis")
        a.set_title(f"{name}\nmax pair (sum/layer) {reports[name].max_pair_traffic:.0f}", fontsize=9)
        a.set_xlabel("to GPU")
        a.set_ylabel("from GPU")
    fig.colorbar(im, ax=fig.axes[1:], shrink=0.8, label="normalised tokens (sum over layers)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
