"""The exact optimum of MoETuner's traffic objective for small shapes, by dynamic programming.

MoETuner's routing objective, sum over layer transitions of the heaviest GPU pair's
bandwidth-normalised traffic, is a sum of terms that each depend on two NEIGHBOURING layers only.
With E/G experts on every GPU in every layer (what vLLM and SGLang deploy), each layer has
S = E! / ((E/G)!^G) possible expert -> GPU assignments (2,520 at Mixtral's 8 experts on 4 GPUs), so
the whole problem is a shortest path through L layers of S states: O(L S^2 G^2) work, exact, no MIP
gap. A per-layer load bound (max/mean GPU load <= `max_load[l]`) removes states, which keeps the
balance of the answer where the caller wants it (e.g. within 0.05 of the EPLB greedy's, the issue's
tolerance).

This is not the paper's two-stage method (balance first, then map clusters to GPUs): it solves
both stages jointly, and only where S is small. It is the yardstick that tells how much traffic any
placement with that balance can save on a trace, e.g. whether a target cut is reachable at all.

    best = exact_placement(trace, topology=4, max_load=greedy_report.max_mean_per_layer + 0.05)
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from llmsys.moe.errors import InfeasiblePlacementError, PlacementConstraintError
from llmsys.moe.placement import Placement, Topology, as_topology, placement_from_assignment
from llmsys.moe.trace import RoutingTrace

MAX_STATES = 5_000  # assignments per layer; the DP holds S x S costs per transition (in blocks)


def num_assignments(num_experts: int, num_gpus: int) -> int:
    """E! / ((E/G)!^G): ways to put E experts on G labelled GPUs, E/G each."""
    per = num_experts // num_gpus
    return math.factorial(num_experts) // math.factorial(per) ** num_gpus


def equal_assignments(num_experts: int, num_gpus: int) -> np.ndarray:
    """All expert -> GPU maps ``[S, E]`` with E/G experts on every GPU (lexicographic order)."""
    if num_experts % num_gpus:
        raise PlacementConstraintError(f"{num_experts} experts cannot be split equally over {num_gpus} GPUs")
    per = num_experts // num_gpus
    states: list[tuple[int, ...]] = []

    def fill(assign: list[int], counts: list[int]) -> None:
        if len(assign) == num_experts:
            states.append(tuple(assign))
            return
        for g in range(num_gpus):
            if counts[g] < per:
                counts[g] += 1
                assign.append(g)
                fill(assign, counts)
                assign.pop()
                counts[g] -= 1

    fill([], [0] * num_gpus)
    return np.array(states, dtype=np.int64)


def _transition_costs(
    onehot: np.ndarray, R: np.ndarray, W: np.ndarray, rows: np.ndarray, cols: np.ndarray, block: int
) -> np.ndarray:
    """C[a, b] = max_{g1, g2} W[g1, g2] * traffic(a -> b) for states a in `rows`, b in `cols`."""
    S_b = cols.size
    G = onehot.shape[2]
    right = onehot[cols].transpose(1, 0, 2).reshape(onehot.shape[1], S_b * G)  # [E, S_b*G]
    out = np.empty((rows.size, S_b), dtype=np.float32)
    for start in range(0, rows.size, block):
        a = rows[start : start + block]
        left = np.einsum("seg,ef->sgf", onehot[a], R)  # [s, G, E]: traffic from GPU g (layer l) to expert f
        T = (left.reshape(-1, R.shape[1]) @ right).reshape(a.size, G, S_b, G)  # [s, g1, b, g2]
        out[start : start + a.size] = (T * W[None, :, None, :]).max(axis=(1, 3))
    return out


def exact_placement(
    trace: RoutingTrace,
    topology: Topology | int,
    *,
    max_load: float | np.ndarray | None = None,
    max_states: int = MAX_STATES,
    block: int = 256,
) -> Placement:
    """The placement (E/G experts per GPU per layer) minimising MoETuner's traffic objective exactly.

    Args:
        trace: the routing trace (load P and transitions R).
        topology: GPUs and link bandwidths (or a number of GPUs in one node).
        max_load: per-layer bound on max/mean GPU load (a float for every layer or ``[L]``); None:
            no bound (the unconstrained optimum of the traffic objective).
        max_states: refuse shapes with more assignments per layer than this (clear error).

    Returns a `Placement` whose ``meta`` holds ``objective`` (the optimum), ``states`` and
    ``solve_seconds``. Raises `InfeasiblePlacementError` when no assignment meets `max_load` in
    some layer, `PlacementConstraintError` when the shape is too large for the DP.
    """
    start = time.perf_counter()
    topo = as_topology(topology)
    E, L, G = trace.num_experts, trace.num_layers, topo.num_gpus
    if E % G:
        raise PlacementConstraintError(f"{E} experts cannot be split equally over {G} GPUs")
    S = num_assignments(E, G)
    if S > max_states:
        raise PlacementConstraintError(
            f"the exact DP needs {S:,} assignments per layer ({E} experts on {G} GPUs), more than "
            f"max_states={max_states:,}: use MoETuner (ILP with time limit, or its heuristic) for this shape"
        )
    states = equal_assignments(E, G)
    onehot = np.eye(G, dtype=np.float32)[states]  # [S, E, G]
    loads = np.einsum("el,seg->slg", trace.load.astype(np.float64), onehot)  # [S, L, G]
    mean = loads.mean(axis=2)
    balance = np.where(mean > 0, loads.max(axis=2) / np.maximum(mean, 1e-12), 1.0)  # [S, L]
    bound = np.full(L, np.inf) if max_load is None else np.broadcast_to(np.asarray(max_load, float), (L,))
    allowed = balance <= bound[None, :] + 1e-9
    empty = np.flatnonzero(~allowed.any(axis=0))
    if empty.size:
        best = balance.min(axis=0)
        raise InfeasiblePlacementError(
            f"no assignment meets max_load in layers {empty.tolist()} (best possible there: "
            f"{[round(float(best[l]), 4) for l in empty]}); raise max_load"
        )
    W = topo.cost.astype(np.float32)
    R = np.moveaxis(trace.transitions, 2, 0).astype(np.float32)  # [L-1, E, E]

    # Viterbi: value[b] = cheapest objective of layers 0..l ending in state b at layer l
    current = np.flatnonzero(allowed[:, 0])
    value = np.zeros(current.size, dtype=np.float64)
    back: list[np.ndarray] = []
    for l in range(L - 1):
        nxt = np.flatnonzero(allowed[:, l + 1])
        cost = _transition_costs(onehot, R[l], W, current, nxt, block)
        total = value[:, None] + cost
        arg = total.argmin(axis=0)
        back.append(current[arg])
        value = total[arg, np.arange(nxt.size)]
        current = nxt
    path = [int(current[int(np.argmin(value))])]
    for l in range(L - 2, -1, -1):
        position = int(np.searchsorted(np.flatnonzero(allowed[:, l + 1]), path[-1]))
        path.append(int(back[l][position]))
    path.reverse()
    assign = states[path]  # [L, E]
    meta: dict[str, Any] = {
        "solver": "exact_dp",
        "method": "exact chain DP",
        "objective": float(value.min()),
        "states": int(S),
        "solve_seconds": time.perf_counter() - start,
    }
    return placement_from_assignment(assign, topo, meta=meta)


__all__ = ["MAX_STATES", "equal_assignments", "exact_placement", "num_assignments"]
