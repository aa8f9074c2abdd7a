"""Baseline placements: contiguous, round-robin, and an EPLB-style greedy (balanced packing + replicas).

Every solver is a dataclass of its hyper-parameters; calling it on a `RoutingTrace` returns a
`Placement`. The greedy follows the published description of DeepSeek's EPLB (written from the
algorithm, not from its code):

1. replication: while there are spare slots, give one more replica to the expert with the highest
   load per replica;
2. balanced packing: sort the replicas by load (descending) and put each on the least-loaded GPU
   that still has a free slot;
3. hierarchical variant (several nodes): first pack whole expert groups onto nodes, then replicate
   and pack inside each node, so a token's experts tend to stay inside one node.
It balances compute only: it ignores communication and cross-layer affinity, the gap MoETuner fills.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from llmsys.moe.errors import InfeasiblePlacementError, PlacementConstraintError
from llmsys.moe.placement import Placement, Topology, as_topology, placement_from_assignment
from llmsys.moe.trace import RoutingTrace
from llmsys.registry import register_method


def replicate(weight: np.ndarray, num_slots: int) -> np.ndarray:
    """Replica count per expert: one each, then spare slots go to the highest load-per-replica."""
    weight = np.asarray(weight, dtype=float)
    if num_slots < weight.size:
        raise InfeasiblePlacementError(
            f"{num_slots} slots cannot hold {weight.size} experts: use at least {weight.size} slots"
        )
    count = np.ones(weight.size, dtype=np.int64)
    for _ in range(num_slots - weight.size):
        count[np.argmax(weight / count)] += 1
    return count


def balanced_packing(weight: np.ndarray, num_bins: int, capacity: int) -> np.ndarray:
    """Bin of each item: heaviest first, each into the least-loaded bin with room (LPT with capacities)."""
    weight = np.asarray(weight, dtype=float)
    if weight.size > num_bins * capacity:
        raise InfeasiblePlacementError(f"{weight.size} items do not fit {num_bins} bins of {capacity}")
    load = np.zeros(num_bins)
    fill = np.zeros(num_bins, dtype=np.int64)
    out = np.empty(weight.size, dtype=np.int64)
    for i in np.argsort(-weight, kind="stable"):
        b = int(np.argmin(np.where(fill < capacity, load, np.inf)))
        out[i] = b
        load[b] += weight[i]
        fill[b] += 1
    return out


def _fill_slots(experts: np.ndarray, bins: np.ndarray, num_bins: int, capacity: int) -> np.ndarray:
    """Slot row: bin b's items (ascending expert id) in slots [b*capacity, (b+1)*capacity)."""
    row = np.full(num_bins * capacity, -1, dtype=np.int64)
    for b in range(num_bins):
        members = np.sort(experts[bins == b])
        row[b * capacity : b * capacity + members.size] = members
    return row


def _check_slots(num_slots: int, num_experts: int, num_gpus: int) -> None:
    if num_slots < num_experts:
        raise InfeasiblePlacementError(
            f"num_slots={num_slots} < {num_experts} experts: every expert needs a slot; use >= {num_experts}"
        )
    if num_slots % num_gpus:
        raise PlacementConstraintError(
            f"num_slots={num_slots} is not divisible by the {num_gpus} GPUs: engines need the same number "
            f"of slots on every GPU; use a multiple of {num_gpus} "
            f"(e.g. {(-(-num_slots // num_gpus)) * num_gpus})"
        )


@register_method("contiguous_placement", plugin="moe")
@dataclass
class Contiguous:
    """Expert e on GPU e // ceil(E/G): the default layout of vLLM and SGLang without EPLB."""

    topology: Topology | int

    def __call__(self, trace: RoutingTrace) -> Placement:
        topo = as_topology(self.topology)
        E, G = trace.num_experts, topo.num_gpus
        per = -(-E // G)
        assign = np.tile(np.arange(E) // per, (trace.num_layers, 1))
        return placement_from_assignment(assign, topo, per, {"solver": "contiguous", "solve_seconds": 0.0})


@register_method("round_robin_placement", plugin="moe")
@dataclass
class RoundRobin:
    """Expert e on GPU e % G (vLLM's round-robin expert placement strategy)."""

    topology: Topology | int

    def __call__(self, trace: RoutingTrace) -> Placement:
        topo = as_topology(self.topology)
        E, G = trace.num_experts, topo.num_gpus
        assign = np.tile(np.arange(E) % G, (trace.num_layers, 1))
        return placement_from_assignment(assign, topo, -(-E // G), {"solver": "round_robin", "solve_seconds": 0.0})


@register_method("eplb_greedy", plugin="moe")
@dataclass
class EPLBGreedy:
    """EPLB-style greedy: replicate hot experts into spare slots, then balanced packing onto GPUs.

    num_slots: physical slots per layer (>= experts, a multiple of the GPU count); None = one slot
        per expert (no replicas, the same memory as the other solvers).
    hierarchical: pack expert groups onto nodes first (needs num_nodes > 1 to matter).
    num_groups: expert groups for the hierarchical pass (DeepSeek-V3 uses 8); None = one per node.
    """

    topology: Topology | int
    num_slots: int | None = None
    hierarchical: bool = False
    num_groups: int | None = None

    def __call__(self, trace: RoutingTrace) -> Placement:
        start = time.perf_counter()
        topo = as_topology(self.topology)
        E, G, L = trace.num_experts, topo.num_gpus, trace.num_layers
        S = E if self.num_slots is None else self.num_slots
        _check_slots(S, E, G)
        load = trace.load  # [E, L]
        if self.hierarchical and topo.num_nodes > 1:
            rows = [self._hierarchical(load[:, l], S, topo) for l in range(L)]
        else:
            rows = [self._global(load[:, l], S, G) for l in range(L)]
        meta = {
            "solver": "eplb_greedy",
            "num_slots": S,
            "hierarchical": bool(self.hierarchical and topo.num_nodes > 1),
            "solve_seconds": time.perf_counter() - start,
        }
        return Placement(np.stack(rows), E, topo, meta)

    @staticmethod
    def _global(weight: np.ndarray, num_slots: int, num_gpus: int) -> np.ndarray:
        count = replicate(weight, num_slots)
        experts = np.repeat(np.arange(weight.size), count)
        bins = balanced_packing(weight[experts] / count[experts], num_gpus, num_slots // num_gpus)
        return _fill_slots(experts, bins, num_gpus, num_slots // num_gpus)

    def _hierarchical(self, weight: np.ndarray, num_slots: int, topo: Topology) -> np.ndarray:
        E, G, N = weight.size, topo.num_gpus, topo.num_nodes
        groups = self.num_groups or N
        if E % groups or groups % N:
            raise ValueError(
                f"hierarchical EPLB needs experts ({E}) divisible by num_groups ({groups}) and num_groups "
                f"divisible by the {N} nodes; pick num_groups accordingly or use hierarchical=False"
            )
        if num_slots % N or (num_slots // N) < E // N:
            raise InfeasiblePlacementError(
                f"{num_slots} slots over {N} nodes leave fewer slots per node than its {E // N} experts"
            )
        per_group = E // groups
        group_of = np.arange(E) // per_group
        node_of_group = balanced_packing(np.bincount(group_of, weights=weight, minlength=groups), N, groups // N)
        node_slots, gpus_per_node = num_slots // N, G // N
        row = np.empty(num_slots, dtype=np.int64)
        for n in range(N):
            members = np.flatnonzero(node_of_group[group_of] == n)
            local = self._global(weight[members], node_slots, gpus_per_node)
            row[n * node_slots : (n + 1) * node_slots] = members[local]
        return row
