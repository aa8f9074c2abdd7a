"""MoETuner: balanced expert placement and token routing via two ILPs (Go & Mahajan, 2025), reconstructed.

The pipeline (`MoETuner.__call__`):

1. balance (ILP 1, per layer): split the experts of each layer into G clusters (one per GPU),
   minimising sum_c |T_c - mean| (+ the heaviest cluster, as a tie-break) where T_c is the
   cluster's token load; each cluster holds E/G experts when `equal_per_gpu` (deployable on vLLM /
   SGLang), or between 1 and `max_per_gpu` otherwise. Warm start: the EPLB-style balanced packing,
   improved by load-balancing swaps (which is also the heuristic used when the ILP is too large);
   among equally balanced splits it prefers experts that tokens pick together (a tie-break).
2. routing (ILP 2, all layers at once): map each layer's clusters onto GPUs, minimising the sum over
   layer transitions of the heaviest GPU pair's bandwidth-normalised traffic, where cluster traffic
   is C[c1, c2, l] = sum R[e1, e2, l] over e1 in c1 (layer l), e2 in c2 (layer l+1). The y*y products
   are linearised with the tight "row/column sums" form (z >= 0, sum_g2 z = y[l, c1, g1],
   sum_g1 z = y[l+1, c2, g2]); G^4 (L-1) z variables, so `method="auto"` uses it only for G <= 4.
   With unequal clusters, a memory constraint gives every GPU the same number of experts summed over
   layers. Warm start and heuristic: a chain of linear assignments (layer l+1's clusters onto the GPUs
   that minimise their weighted traffic from layer l), then pairwise GPU-swap local search.
3. refine (our addition, `refine="auto"`): re-place one layer at a time exactly (a small ILP with its
   neighbours fixed), or for large shapes swap experts between GPUs, lowering the traffic objective
   while keeping each layer's max/mean load within `balance_tolerance` of stage 1's.

Time limits apply per stage (`time_limit` seconds in total); the MIP gaps are reported in
`placement.meta`. Solutions are never worse than their warm start.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment
from tqdm.auto import tqdm

from llmsys.moe.errors import InfeasiblePlacementError, PlacementConstraintError
from llmsys.moe.milp import ConstraintBuilder, MILPResult, solve_milp
from llmsys.moe.placement import Placement, Topology, as_topology, placement_from_assignment
from llmsys.moe.solvers import balanced_packing
from llmsys.moe.trace import RoutingTrace
from llmsys.registry import register_method

log = logging.getLogger(__name__)

# `method="auto"`: the sizes up to which each stage is solved as an ILP (beyond: the heuristic)
ILP1_MAX_EXPERTS = 64
ILP2_MAX_Z = 20_000  # G^4 * (L-1) product variables
REFINE_ILP_MAX = 256  # experts x GPUs of the per-layer refinement ILP
FOCUS_PAIRS = 10_000  # refine_swaps: above this many expert pairs per layer, score only focused swaps


# ---------------------------------------------------------------------------------------------
# stage 1: balanced clusters per layer
# ---------------------------------------------------------------------------------------------


def balance_swaps(
    load: np.ndarray,
    cluster: np.ndarray,
    num_clusters: int,
    max_swaps: int = 10_000,
    deadline: float = float("inf"),
) -> np.ndarray:
    """Best-improvement swaps of two experts between clusters, on sum|T - mean| + (max T - mean),
    until no swap gains more than 1e-6 of the mean load (or the deadline passes)."""
    cluster = cluster.copy()
    P = np.asarray(load, dtype=float)
    mean = P.sum() / num_clusters
    for _ in range(max_swaps):
        if time.perf_counter() > deadline:
            break
        T = np.bincount(cluster, weights=P, minlength=num_clusters)
        ca, cb = cluster[:, None], cluster[None, :]
        d = P[:, None] - P[None, :]  # moving a out and b in changes T[ca] by -d and T[cb] by +d
        new_a, new_b = T[ca] - d, T[cb] + d
        top = np.argsort(-T)[:3]
        other = np.full(d.shape, -np.inf)  # max of the clusters other than ca and cb
        for g in top[::-1]:
            other = np.where((ca != g) & (cb != g), T[g], other)
        new_max = np.maximum(other, np.maximum(new_a, new_b))
        delta = (
            np.abs(new_a - mean)
            + np.abs(new_b - mean)
            - np.abs(T[ca] - mean)
            - np.abs(T[cb] - mean)
            + new_max
            - T.max()
        )
        delta[ca == cb] = np.inf
        a, b = np.unravel_index(np.argmin(delta), delta.shape)
        if delta[a, b] > -1e-6 * max(mean, 1.0):
            break
        cluster[a], cluster[b] = cluster[b], cluster[a]
    return cluster


def coactivation(topk: np.ndarray, num_experts: int) -> np.ndarray:
    """K [E, E]: tokens that chose both experts in one layer (topk [T, k]); zero diagonal."""
    k = topk.shape[1]
    a = np.repeat(topk, k, axis=1).ravel()
    b = np.tile(topk, (1, k)).ravel()
    ok = (a >= 0) & (b >= 0) & (a != b)
    pairs = np.bincount(a[ok] * num_experts + b[ok], minlength=num_experts**2)
    return pairs.reshape(num_experts, num_experts).astype(float)


def coactivation_swaps(
    load: np.ndarray,
    cluster: np.ndarray,
    num_clusters: int,
    K: np.ndarray,
    max_swaps: int | None = None,
    deadline: float = float("inf"),
) -> np.ndarray:
    """Among splits exactly as balanced as `cluster`, prefer clusters of experts that tokens pick
    together: swap two experts of EQUAL load (so the balance objective is unchanged) when it raises
    the within-cluster co-activation. A tie-break only; it lets stage 2 line clusters up across
    layers when routing is structured, and saves standard-EP dispatch bytes (one send per GPU)."""
    cluster = cluster.copy()
    P = np.asarray(load, dtype=float)
    E = P.size
    same_load = np.abs(P[:, None] - P[None, :]) <= 1e-9 * max(P.mean(), 1.0)
    rows = np.arange(E)
    for _ in range(max_swaps or 4 * E):
        if time.perf_counter() > deadline:
            break
        M = K @ np.eye(num_clusters)[cluster]  # [E, C]: co-activation of e with each cluster
        own = M[rows, cluster]
        # swap a (cluster ca) with b (cluster cb): a joins cb without b, b joins ca without a
        gain = (M[rows[:, None], cluster[None, :]] - K - own[:, None]) + (
            M[rows[None, :], cluster[:, None]] - K - own[None, :]
        )
        gain[(cluster[:, None] == cluster[None, :]) | ~same_load] = -np.inf
        a, b = np.unravel_index(np.argmax(gain), gain.shape)
        if not gain[a, b] > 1e-9:
            break
        cluster[a], cluster[b] = cluster[b], cluster[a]
    return cluster


def _canonical(cluster: np.ndarray, order: np.ndarray, num_clusters: int) -> np.ndarray:
    """Relabel clusters by their hottest member's rank (the ILP's symmetry-breaking order)."""
    first = {}
    for e in order:
        first.setdefault(int(cluster[e]), len(first))
    labels = np.array([first.get(c, -1) for c in range(num_clusters)])
    return labels[cluster]


def ilp_balance(
    load: np.ndarray,
    num_clusters: int,
    sizes: tuple[int, int],
    *,
    time_limit: float,
    mip_rel_gap: float,
    warm: np.ndarray | None = None,
    backend: str = "auto",
) -> tuple[np.ndarray, MILPResult]:
    """ILP 1 for one layer: cluster of each expert, and the solver's result (objective, gap)."""
    P = np.asarray(load, dtype=float)
    E, G = P.size, num_clusters
    scale = P.mean() if P.mean() > 0 else 1.0
    P = P / scale  # keep coefficients near 1 for the solver
    mean = P.sum() / G
    nx = G * E
    ix = np.arange(nx).reshape(G, E)  # x[c, e]
    idx_d, idx_t = nx + np.arange(G), nx + G
    n = nx + G + 1
    cb = ConstraintBuilder(n)
    cb.add_many(ix.T, 1.0, 1.0, 1.0)  # each expert in exactly one cluster
    cb.add_many(ix, 1.0, sizes[0], sizes[1])  # cluster sizes
    cols = np.concatenate([ix, idx_d[:, None]], axis=1)
    cb.add_many(cols, np.append(P, -1.0), -np.inf, mean)  # T_c - d_c <= mean
    cb.add_many(cols, np.append(P, 1.0), mean, np.inf)  # T_c + d_c >= mean
    cb.add_many(np.concatenate([ix, np.full((G, 1), idx_t)], axis=1), np.append(P, -1.0), -np.inf, 0.0)
    A, lo, hi = cb.matrix()
    c = np.zeros(n)
    c[idx_d] = 1.0
    c[idx_t] = 1.0
    col_lo, col_hi = np.zeros(n), np.full(n, np.inf)
    col_hi[:nx] = 1.0
    order = np.argsort(-P, kind="stable")
    for rank, e in enumerate(order):  # symmetry: the rank-th hottest expert sits in a cluster <= rank
        col_hi[ix[rank + 1 :, e]] = 0.0
    integer = np.zeros(n, dtype=bool)
    integer[:nx] = True
    x0 = None
    if warm is not None:
        w = _canonical(warm, order, G)
        x0 = np.zeros(n)
        x0[ix[w, np.arange(E)]] = 1.0
        T = np.bincount(w, weights=P, minlength=G)
        x0[idx_d] = np.abs(T - mean)
        x0[idx_t] = T.max()
    res = solve_milp(
        c,
        A,
        lo,
        hi,
        col_lo,
        col_hi,
        integer,
        time_limit=time_limit,
        mip_rel_gap=mip_rel_gap,
        warm_start=x0,
        backend=backend,
    )
    if res.x is None:
        raise InfeasiblePlacementError(
            f"ILP 1 found no way to put {E} experts into {G} clusters of {sizes[0]}..{sizes[1]} experts "
            f"({res.status}); allow more experts per GPU or a longer time_limit"
        )
    cluster = np.argmax(res.x[:nx].reshape(G, E), axis=0)
    return cluster, res


# ---------------------------------------------------------------------------------------------
# stage 2: clusters -> GPUs, all layers
# ---------------------------------------------------------------------------------------------


def cluster_traffic(transitions: np.ndarray, clusters: np.ndarray, num_clusters: int) -> np.ndarray:
    """C [L-1, G, G]: tokens from cluster c1 of layer l to cluster c2 of layer l+1."""
    X = np.eye(num_clusters)[clusters]  # [L, E, G] one-hot
    R = np.moveaxis(transitions, 2, 0)
    return X[:-1].transpose(0, 2, 1) @ R @ X[1:]


def _gpu_space(C: np.ndarray, perm: np.ndarray) -> np.ndarray:
    """Cluster traffic C [L-1, G, G] as GPU traffic under perm [L, G] (cluster -> GPU)."""
    out = np.empty_like(C)
    for l in range(C.shape[0]):
        out[l][np.ix_(perm[l], perm[l + 1])] = C[l]
    return out


def mapping_objective(C: np.ndarray, perm: np.ndarray, W: np.ndarray) -> float:
    if C.shape[0] == 0:
        return 0.0
    return float((_gpu_space(C, perm) * W).max(axis=(1, 2)).sum())


def chain_mapping(C: np.ndarray, W: np.ndarray, num_layers: int) -> np.ndarray:
    """Layer by layer, map layer l+1's clusters to the GPUs that minimise their weighted traffic from
    layer l (a linear assignment per layer): the heuristic and the ILP's warm start."""
    G = W.shape[0]
    perm = np.zeros((num_layers, G), dtype=np.int64)
    perm[0] = np.arange(G)
    for l in range(1, num_layers):
        cost = C[l - 1].T @ W[perm[l - 1]]  # [c2, g2] = sum_c1 C[c1, c2] * W[gpu(c1), g2]
        rows, cols = linear_sum_assignment(cost)
        perm[l, rows] = cols
    return perm


def mapping_swaps(C: np.ndarray, perm: np.ndarray, W: np.ndarray, deadline: float) -> np.ndarray:
    """Local search: swap the GPUs of two clusters of one layer while the objective drops."""
    perm = perm.copy()
    L, G = perm.shape
    if L < 2 or G < 2:
        return perm
    X = _gpu_space(C, perm)  # [L-1, G, G]
    a, b = np.triu_indices(G, 1)
    improved = True
    while improved and time.perf_counter() < deadline:
        improved = False
        for l in range(L):
            if time.perf_counter() >= deadline:
                break
            cur, new = 0.0, 0.0
            if l < L - 1:  # rows a <-> b of the outgoing transition
                M = np.repeat(X[l][None], a.size, axis=0)
                M[np.arange(a.size), a], M[np.arange(a.size), b] = X[l][b], X[l][a]
                new = new + (M * W).max(axis=(1, 2))
                cur += (X[l] * W).max()
            if l > 0:  # columns a <-> b of the incoming transition
                M = np.repeat(X[l - 1][None], a.size, axis=0)
                M[np.arange(a.size), :, a], M[np.arange(a.size), :, b] = X[l - 1][:, b].T, X[l - 1][:, a].T
                new = new + (M * W).max(axis=(1, 2))
                cur += (X[l - 1] * W).max()
            best = int(np.argmin(new))
            if new[best] < cur - 1e-9 * max(cur, 1.0):
                ga, gb = a[best], b[best]
                inv = np.argsort(perm[l])
                perm[l, inv[ga]], perm[l, inv[gb]] = gb, ga
                if l < L - 1:
                    X[l][[ga, gb]] = X[l][[gb, ga]]
                if l > 0:
                    X[l - 1][:, [ga, gb]] = X[l - 1][:, [gb, ga]]
                improved = True
    return perm


def memory_repair(C: np.ndarray, perm: np.ndarray, W: np.ndarray, sizes: np.ndarray) -> np.ndarray | None:
    """Make a cluster -> GPU mapping meet ILP 2's memory constraint for unequal clusters (every GPU holds
    floor or ceil of E * L / G experts summed over layers): repeatedly swap the GPUs of two clusters of
    one layer, taking the swap that evens the memory most and, among those, costs the least traffic.
    The traffic heuristics ignore memory, so this turns their answer into a feasible warm start.
    Returns None when no swap evens the memory further (the ILP then starts without a warm start)."""
    perm = perm.copy()
    L, G = perm.shape
    total = sizes.sum() / G
    lo, hi = math.floor(total), math.ceil(total)

    def excess(held: np.ndarray) -> float:
        return float(np.maximum(held - hi, 0).sum() + np.maximum(lo - held, 0).sum())

    held = np.zeros(G)
    for l in range(L):
        np.add.at(held, perm[l], sizes[l])
    pairs = [(a, b) for a in range(G) for b in range(a + 1, G)]
    while excess(held) > 0:
        best: tuple[tuple[float, float], np.ndarray, np.ndarray] | None = None
        for l in range(L):
            for a, b in pairs:
                moved = sizes[l, a] - sizes[l, b]
                if moved == 0:
                    continue
                after = held.copy()
                after[perm[l, a]] -= moved
                after[perm[l, b]] += moved
                gain = excess(held) - excess(after)
                if gain <= 0:
                    continue
                swapped = perm.copy()
                swapped[l, a], swapped[l, b] = perm[l, b], perm[l, a]
                key = (-gain, mapping_objective(C, swapped, W))
                if best is None or key < best[0]:
                    best = (key, swapped, after)
        if best is None:
            return None
        _, perm, held = best
    return perm


def ilp_mapping(
    C: np.ndarray,
    W: np.ndarray,
    sizes: np.ndarray,
    *,
    topology: Topology,
    time_limit: float,
    mip_rel_gap: float,
    warm: np.ndarray | None,
    backend: str = "auto",
) -> tuple[np.ndarray, MILPResult]:
    """ILP 2: perm [L, G] (cluster -> GPU) minimising sum_l max_{g1 != g2} W * traffic."""
    L1, G, _ = C.shape
    L = L1 + 1
    ny = L * G * G
    iy = np.arange(ny).reshape(L, G, G)  # y[l, c, g]
    nz = L1 * G**4
    iz = ny + np.arange(nz).reshape(L1, G, G, G, G)  # z[l, c1, g1, c2, g2]
    it = ny + nz + np.arange(L1)
    n = ny + nz + L1
    cb = ConstraintBuilder(n)
    cb.add_many(iy.reshape(L * G, G), 1.0, 1.0, 1.0)  # each cluster on one GPU
    cb.add_many(iy.transpose(0, 2, 1).reshape(L * G, G), 1.0, 1.0, 1.0)  # each GPU one cluster
    # linking: sum_g2 z[l,c1,g1,c2,g2] = y[l,c1,g1]  and  sum_g1 z[l,c1,g1,c2,g2] = y[l+1,c2,g2]
    rows = iz.reshape(L1 * G * G * G, G)
    ys = np.broadcast_to(iy[:-1, :, :, None], (L1, G, G, G)).reshape(-1, 1)
    cb.add_many(np.concatenate([rows, ys], axis=1), np.append(np.ones(G), -1.0), 0.0, 0.0)
    rows = iz.transpose(0, 1, 3, 4, 2).reshape(L1 * G * G * G, G)
    ys = np.broadcast_to(iy[1:, None, :, :], (L1, G, G, G)).reshape(-1, 1)
    cb.add_many(np.concatenate([rows, ys], axis=1), np.append(np.ones(G), -1.0), 0.0, 0.0)
    # t_l >= weighted traffic of every GPU pair
    for l in range(L1):
        for g1 in range(G):
            for g2 in range(G):
                if g1 == g2 or W[g1, g2] == 0:
                    continue
                cols = np.append(iz[l, :, g1, :, g2].ravel(), it[l])
                cb.add(cols, np.append(C[l].ravel() * W[g1, g2], -1.0), -np.inf, 0.0)
    if not (sizes == sizes.flat[0]).all():  # unequal clusters: equal experts per GPU over all layers
        total = sizes.sum() / G
        for g in range(G):
            cb.add(iy[:, :, g].ravel(), sizes.ravel(), math.floor(total), math.ceil(total))
    A, lo, hi = cb.matrix()
    c = np.zeros(n)
    c[it] = 1.0
    col_lo, col_hi = np.zeros(n), np.full(n, np.inf)
    col_hi[: ny + nz] = 1.0
    if topology.is_node_uniform:  # GPUs interchangeable (up to nodes): fix where layer 0's clusters go
        fixed = range(G) if topology.num_nodes == 1 else range(1)
        for cl in fixed:
            col_lo[iy[0, cl, cl]] = 1.0
    integer = np.zeros(n, dtype=bool)
    integer[:ny] = True
    x0 = None
    if warm is not None:
        if topology.is_node_uniform:  # relabel GPUs so the warm start satisfies the symmetry fix
            relabel = _symmetry_relabel(warm[0], topology)
            warm = relabel[warm]
        x0 = np.zeros(n)
        for l in range(L):
            x0[iy[l, np.arange(G), warm[l]]] = 1.0
        for l in range(L1):
            x0[iz[l][np.arange(G)[:, None], warm[l][:, None], np.arange(G)[None, :], warm[l + 1][None, :]]] = 1.0
            x0[it[l]] = (_gpu_space(C[l : l + 1], warm[l : l + 2])[0] * W).max()
    res = solve_milp(
        c,
        A,
        lo,
        hi,
        col_lo,
        col_hi,
        integer,
        time_limit=time_limit,
        mip_rel_gap=mip_rel_gap,
        warm_start=x0,
        backend=backend,
    )
    if res.x is None:
        raise InfeasiblePlacementError(f"ILP 2 found no cluster-to-GPU mapping ({res.status}); raise time_limit")
    perm = np.argmax(res.x[:ny].reshape(L, G, G), axis=2)
    return perm, res


def _symmetry_relabel(first: np.ndarray, topology: Topology) -> np.ndarray:
    """A GPU relabelling (automorphism of the node topology) sending layer 0's cluster c to GPU c
    (single node), or cluster 0 to GPU 0 (several nodes): what the ILP's symmetry fix assumes."""
    G = topology.num_gpus
    if topology.num_nodes == 1:
        relabel = np.empty(G, dtype=np.int64)
        relabel[first] = np.arange(G)
        return relabel
    per = topology.gpus_per_node
    node_of = np.arange(G) // per
    src = int(first[0])
    relabel = np.arange(G)
    # swap the node of src with node 0, then src with GPU 0 inside node 0
    n_src = node_of[src]
    if n_src != 0:
        relabel = np.where(
            node_of == n_src, relabel - n_src * per, np.where(node_of == 0, relabel + n_src * per, relabel)
        )
    s = relabel[src]
    swap = np.arange(G)
    swap[[0, s]] = swap[[s, 0]]
    return swap[relabel]


# ---------------------------------------------------------------------------------------------
# stage 3: expert swaps
# ---------------------------------------------------------------------------------------------


def _max_excluding(values: np.ndarray, ga: np.ndarray, gb: np.ndarray) -> np.ndarray:
    """max over entries of `values` [G] other than ga and gb (elementwise over the pair arrays)."""
    top = np.argsort(-values)[:3]
    out = np.full(ga.shape, -np.inf)
    for g in top[::-1]:
        out = np.where((ga != g) & (gb != g), values[g], out)
    return out


def refine_swaps(
    transitions: np.ndarray,
    load: np.ndarray,
    assign: np.ndarray,
    W: np.ndarray,
    caps: np.ndarray,
    deadline: float,
    progress: bool = False,
) -> tuple[np.ndarray, int]:
    """Swap experts between GPUs of a layer: lower sum_l max pair (primary) or total weighted traffic
    (secondary, without raising the primary), keeping max GPU load <= caps[l] in every layer.

    Beyond `FOCUS_PAIRS` candidate pairs per layer, only swaps that touch a GPU of the layer's heaviest
    outgoing or incoming pair are scored (the only swaps that can lower the primary objective)."""
    assign = assign.copy()
    L, E = assign.shape
    G = W.shape[0]
    P = np.asarray(load, dtype=float)  # [E, L]
    R = np.moveaxis(transitions, 2, 0).astype(np.float64)  # [L-1, E, E]
    A = np.eye(G)[assign]  # [L, E, G]
    X = A[:-1].transpose(0, 2, 1) @ R @ A[1:]  # [L-1, G, G]
    iu = np.triu_indices(E, 1)
    swaps = 0
    improved = True
    bar = tqdm(desc="MoETuner refine", unit="sweep", disable=not progress, leave=False)
    while improved and time.perf_counter() < deadline:
        improved = False
        for l in range(L):
            if time.perf_counter() >= deadline:
                break
            ea, eb = iu
            ga, gb = assign[l, ea], assign[l, eb]
            keep = ga != gb
            if ea.size > FOCUS_PAIRS:
                hot = []
                if l < L - 1:
                    hot.append(np.unravel_index(np.argmax(X[l] * W), (G, G))[0])
                if l > 0:
                    hot.append(np.unravel_index(np.argmax(X[l - 1] * W), (G, G))[1])
                keep &= np.isin(ga, hot) | np.isin(gb, hot)
            ea, eb, ga, gb = ea[keep], eb[keep], ga[keep], gb[keep]
            if ea.size == 0:
                continue
            T = P[:, l] @ A[l]
            d = P[ea, l] - P[eb, l]
            new_a, new_b = T[ga] - d, T[gb] + d
            ok = np.maximum(_max_excluding(T, ga, gb), np.maximum(new_a, new_b)) <= caps[l] + 1e-9
            primary = np.zeros(ea.size)
            secondary = np.zeros(ea.size)
            if l < L - 1:  # rows ga, gb of the outgoing transition
                out = R[l] @ A[l + 1]  # [E, G] tokens from expert e to each GPU of layer l+1
                D = out[eb] - out[ea]  # row ga gains b, loses a
                Xw = X[l] * W
                row_a = (X[l][ga] + D) * W[ga]
                row_b = (X[l][gb] - D) * W[gb]
                new_max = np.maximum(_max_excluding(Xw.max(axis=1), ga, gb), np.maximum(row_a.max(1), row_b.max(1)))
                primary += new_max - Xw.max()
                secondary += (D * (W[ga] - W[gb])).sum(axis=1)
            if l > 0:  # columns ga, gb of the incoming transition
                inn = A[l - 1].T @ R[l - 1]  # [G, E] tokens into expert e from each GPU of layer l-1
                D = (inn[:, eb] - inn[:, ea]).T  # [pairs, G]
                Xw = X[l - 1] * W
                col_a = (X[l - 1][:, ga].T + D) * W[:, ga].T
                col_b = (X[l - 1][:, gb].T - D) * W[:, gb].T
                new_max = np.maximum(_max_excluding(Xw.max(axis=0), ga, gb), np.maximum(col_a.max(1), col_b.max(1)))
                primary += new_max - Xw.max()
                secondary += (D * (W[:, ga].T - W[:, gb].T)).sum(axis=1)
            scale = max(float(X.max()) if X.size else 1.0, 1.0)
            eps = 1e-9 * scale
            score = np.where(primary < -eps, primary * 1e6, np.where(primary <= eps, secondary, np.inf))
            score[~ok] = np.inf
            best = int(np.argmin(score))
            if not score[best] < -eps:
                continue
            a, b = ea[best], eb[best]
            assign[l, a], assign[l, b] = assign[l, b], assign[l, a]
            A[l, a], A[l, b] = A[l, b].copy(), A[l, a].copy()
            if l < L - 1:
                X[l] = A[l].T @ R[l] @ A[l + 1]
            if l > 0:
                X[l - 1] = A[l - 1].T @ R[l - 1] @ A[l]
            swaps += 1
            improved = True
        bar.update(1)
    bar.close()
    return assign, swaps


def refine_layer_ilp(
    transitions: np.ndarray,
    load: np.ndarray,
    assign: np.ndarray,
    W: np.ndarray,
    caps: np.ndarray,
    deadline: float,
    *,
    backend: str = "auto",
    max_sweeps: int = 8,
    progress: bool = False,
) -> tuple[np.ndarray, int]:
    """Large-neighbourhood search: re-place ONE layer's experts exactly (a small ILP) with both
    neighbouring layers fixed, sweep over the layers until nothing improves.

    With layers l-1 and l+1 fixed, both transitions touching layer l are linear in its expert -> GPU
    variables x[e, g]: minimise t_in + t_out (the heaviest weighted pair of each), subject to max GPU
    load <= caps[l] and the layer's current number of experts per GPU. A tiny weight on the total
    weighted traffic breaks ties toward fewer cross-GPU moves. Returns (assign, layers changed)."""
    assign = assign.copy()
    L, E = assign.shape
    G = W.shape[0]
    P = np.asarray(load, dtype=float)
    R = np.moveaxis(transitions, 2, 0)
    eye = np.eye(G)
    nx = E * G
    ix = np.arange(nx).reshape(E, G)  # x[e, g]
    n = nx + 2  # + t_in, t_out
    changed = 0
    for _ in tqdm(range(max_sweeps), desc="MoETuner layer ILPs", disable=not progress, leave=False):
        improved = False
        for l in range(L):
            left = deadline - time.perf_counter()
            if left <= 0.05:
                return assign, changed
            counts = np.bincount(assign[l], minlength=G)
            cb = ConstraintBuilder(n)
            cb.add_many(ix, 1.0, 1.0, 1.0)
            cb.add_many(ix.T, 1.0, counts, counts)
            cb.add_many(ix.T, P[:, l], -np.inf, caps[l] + 1e-9)
            c = np.zeros(n)
            c[nx:] = 1.0
            x0 = np.zeros(n)
            x0[ix[np.arange(E), assign[l]]] = 1.0
            tie = np.zeros((E, G))
            if l > 0:
                f_in = eye[assign[l - 1]].T @ R[l - 1]  # [G, E] tokens into expert e from each GPU
                for g1 in range(G):
                    for g in range(G):
                        if W[g1, g] > 0:
                            cb.add(np.append(ix[:, g], nx), np.append(W[g1, g] * f_in[g1], -1.0), -np.inf, 0.0)
                tie += (W[:, None, :] * f_in[:, :, None]).sum(axis=0)  # [E, G]
                x0[nx] = ((f_in @ eye[assign[l]]) * W).max()
            if l < L - 1:
                f_out = R[l] @ eye[assign[l + 1]]  # [E, G] tokens from expert e to each GPU
                for g in range(G):
                    for g2 in range(G):
                        if W[g, g2] > 0:
                            cb.add(
                                np.append(ix[:, g], nx + 1),
                                np.append(W[g, g2] * f_out[:, g2], -1.0),
                                -np.inf,
                                0.0,
                            )
                tie += f_out @ W.T
                x0[nx + 1] = ((eye[assign[l]].T @ f_out) * W).max()
            c[:nx] = 1e-4 * tie.ravel() / max(L, 1)
            A, lo, hi = cb.matrix()
            col_hi = np.full(n, np.inf)
            col_hi[:nx] = 1.0
            integer = np.zeros(n, dtype=bool)
            integer[:nx] = True
            res = solve_milp(
                c,
                A,
                lo,
                hi,
                np.zeros(n),
                col_hi,
                integer,
                time_limit=min(left, 5.0),
                mip_rel_gap=1e-4,
                warm_start=x0,
                backend=backend,
            )
            new = np.argmax(res.x[:nx].reshape(E, G), axis=1)
            if res.objective < float(c @ x0) - 1e-9 * max(abs(float(c @ x0)), 1.0) and (new != assign[l]).any():
                assign[l] = new
                changed += 1
                improved = True
        if not improved:
            break
    return assign, changed


# ---------------------------------------------------------------------------------------------
# the method
# ---------------------------------------------------------------------------------------------


@register_method("moetuner", plugin="moe")
@dataclass
class MoETuner:
    """MoETuner placement: balanced clusters (ILP 1) mapped onto GPUs to cut inter-layer traffic (ILP 2).

    topology: GPUs (int = one node) or a `Topology` with nodes and link bandwidths.
    equal_per_gpu: E/G experts on every GPU in every layer (what vLLM and SGLang can deploy).
        False is the paper's original form (any non-empty cluster, memory balanced over layers).
    max_per_gpu: with equal_per_gpu=False, the most experts one GPU may hold in a layer.
    method: "ilp" (both stages as ILPs), "heuristic" (packing + swaps, any size), or "auto" (ILP where
        the model is small enough: <= 64 experts for stage 1, G^4 (L-1) <= 20k for stage 2).
    time_limit: seconds for the whole solve; mip_rel_gap: stop an ILP at this relative gap (paper: 0.025).
    refine: improvement after stage 2 that may raise a layer's max/mean load by at most
        `balance_tolerance`: "layer_ilp" (each layer re-placed exactly with its neighbours fixed),
        "swaps" (expert-swap local search, any size), "auto" (layer_ilp up to 256 experts x GPUs,
        else swaps) or "none" (the paper's two ILPs only).
    backend: MILP backend ("auto", "highspy", "scipy-highs", "milp"; see llmsys.moe.milp).
    """

    topology: Topology | int
    equal_per_gpu: bool = True
    max_per_gpu: int | None = None
    method: str = "auto"
    time_limit: float = 60.0
    mip_rel_gap: float = 0.025
    refine: str = "auto"
    balance_tolerance: float = 0.02
    backend: str = "auto"
    progress: bool = False

    def __post_init__(self) -> None:
        if self.method not in ("auto", "ilp", "heuristic"):
            raise ValueError(f"method must be 'auto', 'ilp' or 'heuristic', got {self.method!r}")
        if self.refine not in ("auto", "layer_ilp", "swaps", "none"):
            raise ValueError(f"refine must be 'auto', 'layer_ilp', 'swaps' or 'none', got {self.refine!r}")
        if self.time_limit <= 0 or not 0 <= self.mip_rel_gap < 1 or self.balance_tolerance < 0:
            raise ValueError("time_limit must be > 0, mip_rel_gap in [0, 1), balance_tolerance >= 0")

    def _sizes(self, E: int, G: int) -> tuple[int, int]:
        if self.equal_per_gpu:
            if E % G:
                raise PlacementConstraintError(
                    f"{E} experts cannot be split equally over {G} GPUs (equal_per_gpu=True): use a GPU "
                    f"count that divides {E}, or equal_per_gpu=False (then no engine can deploy the result)"
                )
            return E // G, E // G
        if E < G:
            raise InfeasiblePlacementError(f"{E} experts cannot fill {G} GPUs with at least one expert each")
        hi = self.max_per_gpu or -(-E // G) + 1
        if hi * G < E:
            raise InfeasiblePlacementError(f"max_per_gpu={hi} x {G} GPUs < {E} experts: raise max_per_gpu")
        return 1, hi

    def __call__(self, trace: RoutingTrace) -> Placement:
        start = time.perf_counter()
        deadline = start + self.time_limit
        topo = as_topology(self.topology)
        E, L, G = trace.num_experts, trace.num_layers, topo.num_gpus
        lo, hi = self._sizes(E, G)
        P, R, W = trace.load, trace.transitions, topo.cost
        meta: dict[str, Any] = {"solver": "moetuner", "equal_per_gpu": self.equal_per_gpu}

        # stage 1: balanced clusters
        use_ilp1 = self.method == "ilp" or (self.method == "auto" and E <= ILP1_MAX_EXPERTS)
        if not self.equal_per_gpu and not use_ilp1:
            raise ValueError("equal_per_gpu=False needs the ILP (method='ilp' or 'auto' with <= 64 experts)")
        clusters = np.zeros((L, E), dtype=np.int64)
        gaps, statuses = [], []
        stage1_budget = 0.3 * self.time_limit
        for l in tqdm(
            range(L),
            desc="MoETuner ILP 1" if use_ilp1 else "MoETuner balance",
            disable=not self.progress,
            leave=False,
        ):
            # each layer gets its share of the stage-1 budget for the heuristic polish
            layer_deadline = start + stage1_budget * (l + 1) / L
            packed = balanced_packing(P[:, l], G, hi if self.equal_per_gpu else -(-E // G))
            warm = balance_swaps(P[:, l], packed, G, deadline=layer_deadline)
            warm = coactivation_swaps(P[:, l], warm, G, coactivation(trace.topk[:, l], E), deadline=layer_deadline)
            if use_ilp1:
                left = max(stage1_budget - (time.perf_counter() - start), 0.05)
                cl, res = ilp_balance(
                    P[:, l],
                    G,
                    (lo, hi),
                    time_limit=left / (L - l),
                    mip_rel_gap=self.mip_rel_gap,
                    warm=warm,
                    backend=self.backend,
                )
                gaps.append(res.gap)
                statuses.append(res.status)
                clusters[l] = cl
            else:
                clusters[l] = warm
        stage1 = {
            "method": "ilp" if use_ilp1 else "heuristic",
            "seconds": round(time.perf_counter() - start, 3),
        }
        if use_ilp1:
            known = [g for g in gaps if g is not None]
            stage1.update(max_gap=max(known) if known else None, optimal_layers=statuses.count("optimal"))
        # how far the balance is from a simple bound: no GPU can carry less than the mean or than its
        # hottest expert (the heuristic's "gap"; per-layer max/mean, averaged over layers)
        T = np.stack([np.bincount(clusters[l], weights=P[:, l], minlength=G) for l in range(L)])
        mean = np.maximum(T.mean(axis=1), 1e-12)
        stage1["max_mean_load"] = round(float((T.max(axis=1) / mean).mean()), 4)
        stage1["max_mean_lower_bound"] = round(float((np.maximum(mean, P.max(axis=0)) / mean).mean()), 4)
        meta["stage1"] = stage1
        sizes = np.stack([np.bincount(clusters[l], minlength=G) for l in range(L)])

        # stage 2: clusters -> GPUs
        t2 = time.perf_counter()
        C = cluster_traffic(R, clusters, G) if L > 1 else np.zeros((0, G, G))
        perm = chain_mapping(C, W, L)
        stage2_deadline = t2 + 0.5 * (deadline - t2)
        perm = mapping_swaps(C, perm, W, stage2_deadline)
        use_ilp2 = L > 1 and (self.method == "ilp" or (self.method == "auto" and G**4 * (L - 1) <= ILP2_MAX_Z))
        if not self.equal_per_gpu and not use_ilp2 and L > 1:
            raise ValueError(
                "equal_per_gpu=False needs ILP 2 to balance memory over layers; use method='ilp' (small G only)"
            )
        stage2: dict[str, Any] = {"method": "ilp" if use_ilp2 else "heuristic"}
        if use_ilp2:
            warm = perm
            if not (sizes == sizes.flat[0]).all():  # unequal clusters: give HiGHS a memory-feasible start
                repaired = memory_repair(C, perm, W, sizes)
                stage2["warm_start_memory_feasible"] = repaired is not None
                warm = perm if repaired is None else repaired
            left = max(stage2_deadline - time.perf_counter(), 1.0)
            perm, res = ilp_mapping(
                C,
                W,
                sizes,
                topology=topo,
                time_limit=left,
                mip_rel_gap=self.mip_rel_gap,
                warm=warm,
                backend=self.backend,
            )
            stage2.update(status=res.status, mip_gap=res.gap, backend=res.backend, bound=res.bound)
            meta["mip_gap"] = None if res.gap is None else round(float(res.gap), 4)
        stage2["objective"] = round(mapping_objective(C, perm, W), 3)
        stage2["seconds"] = round(time.perf_counter() - t2, 3)
        meta["stage2"] = stage2
        assign = np.take_along_axis(perm, clusters, axis=1)  # [L, E] expert -> GPU

        # stage 3: expert swaps under a balance cap
        refine = self.refine
        if refine == "auto":
            refine = "layer_ilp" if E * G <= REFINE_ILP_MAX else "swaps"
        if refine != "none" and L > 1 and G > 1:
            t3 = time.perf_counter()
            T = np.stack([np.bincount(assign[l], weights=P[:, l], minlength=G) for l in range(L)])
            caps = T.max(axis=1) + self.balance_tolerance * T.mean(axis=1)
            if refine == "layer_ilp":
                assign, moves = refine_layer_ilp(
                    R, P, assign, W, caps, deadline, backend=self.backend, progress=self.progress
                )
            else:
                assign, moves = refine_swaps(R, P, assign, W, caps, deadline, self.progress)
            meta["refine"] = {"method": refine, "moves": moves, "seconds": round(time.perf_counter() - t3, 3)}
        meta["method"] = f"{stage1['method']}+{stage2['method']}" + (
            f"+{meta['refine']['method']}" if "refine" in meta else ""
        )
        meta["solve_seconds"] = round(time.perf_counter() - start, 3)
        slots = hi if self.equal_per_gpu else int(np.max([np.bincount(assign[l], minlength=G).max() for l in range(L)]))
        log.info("MoETuner: %s in %.1fs", meta["method"], meta["solve_seconds"])
        return placement_from_assignment(assign, topo, slots, meta)
