"""MoETuner: both ILPs against brute force, the heuristics, the MILP front end, the whole method."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest
from scipy import sparse

from llmsys.moe import (
    EPLBGreedy,
    InfeasiblePlacementError,
    MoETuner,
    PlacementConstraintError,
    RoutingTrace,
    Topology,
    evaluate,
    synthetic_trace,
)
from llmsys.moe.milp import available_backends, solve_milp
from llmsys.moe.moetuner import (
    balance_swaps,
    chain_mapping,
    cluster_traffic,
    ilp_balance,
    ilp_mapping,
    mapping_objective,
    mapping_swaps,
    memory_repair,
    refine_layer_ilp,
    refine_swaps,
)
from llmsys.moe.solvers import balanced_packing


def _balance_cost(load, cluster, G):
    T = np.bincount(cluster, weights=load, minlength=G)
    mean = load.sum() / G
    return np.abs(T - mean).sum() + T.max() - mean


@pytest.mark.parametrize("seed", range(3))
def test_ilp_balance_matches_brute_force_equal_sizes(seed):
    load = np.random.default_rng(seed).lognormal(0, 1, 8)
    cluster, res = ilp_balance(load, 4, (2, 2), time_limit=20, mip_rel_gap=0.0)
    assert res.status == "optimal" and (np.bincount(cluster, minlength=4) == 2).all()
    best = min(
        _balance_cost(load, np.array(a), 4)
        for a in itertools.product(range(4), repeat=8)
        if (np.bincount(a, minlength=4) == 2).all()
    )
    assert np.isclose(_balance_cost(load, cluster, 4), best)


def test_ilp_balance_unequal_sizes_matches_brute_force():
    load = np.array([9.0, 1, 1, 1, 1, 5])
    cluster, res = ilp_balance(load, 3, (1, 3), time_limit=20, mip_rel_gap=0.0)
    sizes = np.bincount(cluster, minlength=3)
    assert res.status == "optimal" and sizes.min() >= 1 and sizes.max() <= 3
    best = min(
        _balance_cost(load, np.array(a), 3)
        for a in itertools.product(range(3), repeat=6)
        if 1 <= np.bincount(a, minlength=3).min() and np.bincount(a, minlength=3).max() <= 3
    )
    assert np.isclose(_balance_cost(load, cluster, 3), best)


def test_balance_swaps_never_worse_than_packing():
    rng = np.random.default_rng(0)
    for _ in range(5):
        load = rng.lognormal(0, 1, 32)
        start = balanced_packing(load, 8, 4)
        better = balance_swaps(load, start, 8)
        assert (np.bincount(better, minlength=8) == 4).all()
        assert _balance_cost(load, better, 8) <= _balance_cost(load, start, 8) + 1e-9


def _brute_force_mapping(C, W):
    L, G = C.shape[0] + 1, W.shape[0]
    perms = list(itertools.permutations(range(G)))
    best = np.inf
    for combo in itertools.product(perms, repeat=L):
        best = min(best, mapping_objective(C, np.array(combo), W))
    return best


@pytest.mark.parametrize("topology", [Topology.make(3), Topology.make(4, num_nodes=2)], ids=["1node", "2nodes"])
def test_ilp_mapping_matches_brute_force(topology):
    G = topology.num_gpus
    L = 3
    rng = np.random.default_rng(1)
    C = rng.integers(0, 20, size=(L - 1, G, G)).astype(float)
    W = topology.cost
    sizes = np.ones((L, G))
    warm = chain_mapping(C, W, L)
    perm, res = ilp_mapping(C, W, sizes, topology=topology, time_limit=60, mip_rel_gap=0.0, warm=warm)
    assert res.status == "optimal"
    assert np.isclose(mapping_objective(C, perm, W), _brute_force_mapping(C, W))
    assert np.isclose(res.objective, mapping_objective(C, perm, W))  # the linearisation is exact


def test_ilp_mapping_balances_memory_with_unequal_clusters():
    topo = Topology.make(2)
    sizes = np.array([[3, 1], [3, 1], [1, 3], [3, 1]])  # experts per cluster per layer
    C = np.ones((3, 2, 2))
    perm, _ = ilp_mapping(C, topo.cost, sizes, topology=topo, time_limit=20, mip_rel_gap=0.0, warm=None)
    per_gpu = [sum(sizes[l, c] for l in range(4) for c in range(2) if perm[l, c] == g) for g in range(2)]
    assert per_gpu == [8, 8]


def test_mapping_heuristics_do_not_increase_the_objective():
    trace = synthetic_trace(16, 6, 2, 2000, affinity=0.7, seed=2)
    topo = Topology.make(8, num_nodes=2)
    clusters = np.stack([balanced_packing(trace.load[:, l], 8, 2) for l in range(6)])
    C = cluster_traffic(trace.transitions, clusters, 8)
    identity = np.tile(np.arange(8), (6, 1))
    chained = chain_mapping(C, topo.cost, 6)
    swapped = mapping_swaps(C, chained, topo.cost, time.perf_counter() + 30)
    assert mapping_objective(C, swapped, topo.cost) <= mapping_objective(C, chained, topo.cost) + 1e-9
    for p in (chained, swapped):
        assert all(sorted(row) == list(range(8)) for row in p)  # permutations

    # total weighted traffic: the chain assignment is optimal step by step, so no worse than identity
    def total(p):
        return sum((np.eye(8)[p[l]].T @ C[l] @ np.eye(8)[p[l + 1]] * topo.cost).sum() for l in range(5))

    assert total(chained) <= total(identity) + 1e-9


def _objective_and_caps(trace, placement, tolerance):
    report = evaluate(placement, trace, ep_homes=False)
    caps = report.load.max(axis=1) + tolerance * report.load.mean(axis=1)
    return report, caps


@pytest.mark.parametrize("refiner", ["swaps", "layer_ilp"])
def test_refinement_lowers_traffic_within_the_balance_cap(refiner):
    trace = synthetic_trace(8, 6, 2, 3000, affinity=0.8, seed=5)
    topo = Topology.make(4)
    start = EPLBGreedy(topo)(trace)
    before, caps = _objective_and_caps(trace, start, 0.05)
    assign = np.stack([np.argmax(start.gpu_share()[l], axis=1) for l in range(6)])
    if refiner == "swaps":
        new, moves = refine_swaps(trace.transitions, trace.load, assign, topo.cost, caps, time.perf_counter() + 30)
    else:
        new, moves = refine_layer_ilp(trace.transitions, trace.load, assign, topo.cost, caps, time.perf_counter() + 30)
    from llmsys.moe import placement_from_assignment

    after = evaluate(placement_from_assignment(new, topo, 2), trace, ep_homes=False)
    assert moves > 0
    assert after.max_pair_traffic <= before.max_pair_traffic + 1e-9
    assert (after.load.max(axis=1) <= caps + 1e-6).all()
    assert all((np.bincount(row, minlength=4) == 2).all() for row in new)


def _chain_trace(E=8, L=5, per_pair=100, seed=0):
    """Tokens pick one of E/2 expert pairs (each pair equally often) and keep it, relabelled by a fixed
    permutation per layer: co-locating each pair on one GPU in every layer is perfectly balanced and
    has zero cross-GPU traffic."""
    rng = np.random.default_rng(seed)
    sigma = [np.arange(E)] + [rng.permutation(E) for _ in range(L - 1)]
    pairs = rng.permutation(np.repeat(np.arange(E // 2), per_pair))
    topk = np.stack([np.stack([sigma[l][2 * pairs], sigma[l][2 * pairs + 1]], axis=1) for l in range(L)], axis=1)
    return RoutingTrace(topk, E)


def test_moetuner_finds_the_zero_traffic_placement_of_perfect_affinity():
    trace = _chain_trace()
    tuned = evaluate(MoETuner(4, time_limit=20)(trace), trace, ep_homes=False)
    greedy = evaluate(EPLBGreedy(4)(trace), trace, ep_homes=False)
    assert greedy.max_pair_traffic > 0
    assert tuned.max_pair_traffic == 0 and tuned.cross_fraction == 0
    assert tuned.max_mean_load <= greedy.max_mean_load + 0.02


def test_moetuner_stages_and_guarantees():
    trace = synthetic_trace(8, 6, 2, 2000, seed=3)
    p = MoETuner(4, time_limit=3, refine="none")(trace)
    greedy = EPLBGreedy(4)(trace)
    assert p.is_equal_per_gpu() and p.meta["method"] == "ilp+ilp"
    assert p.meta["stage1"]["optimal_layers"] == 6 and p.meta["mip_gap"] is not None
    # stage 1 is optimal for sum|T - mean| + max, so never worse than the greedy's split on it
    for l in range(6):
        mine = np.argmax(p.gpu_share()[l], axis=1)
        theirs = np.argmax(greedy.gpu_share()[l], axis=1)
        assert _balance_cost(trace.load[:, l], mine, 4) <= _balance_cost(trace.load[:, l], theirs, 4) + 1e-6
    h = MoETuner(4, method="heuristic", refine="swaps", time_limit=3)(trace)
    assert h.meta["method"] == "heuristic+heuristic+swaps"


def test_moetuner_unequal_placement_balances_memory():
    trace = synthetic_trace(8, 4, 2, 1000, seed=1)
    p = MoETuner(3, equal_per_gpu=False, time_limit=20, refine="none")(trace)  # 8 experts over 3 GPUs
    per_gpu = p.experts_per_gpu()
    assert per_gpu.min() >= 1
    assert per_gpu.sum(axis=0).max() - per_gpu.sum(axis=0).min() <= 1  # 32 experts: 11 / 11 / 10


@pytest.mark.parametrize("seed", range(5))
def test_memory_repair_makes_the_mapping_memory_feasible(seed):
    rng = np.random.default_rng(seed)
    L, G = 12, 4
    sizes = np.array([rng.permutation([1, 2, 2, 3]) for _ in range(L)])  # 8 experts per layer, unequal
    C = rng.random((L - 1, G, G))
    W = Topology.make(G).cost
    perm = np.array([rng.permutation(G) for _ in range(L)])
    repaired = memory_repair(C, perm, W, sizes)
    assert repaired is not None
    held = np.zeros(G)
    for l in range(L):
        np.add.at(held, repaired[l], sizes[l])
        assert sorted(repaired[l].tolist()) == list(range(G))  # still one cluster per GPU per layer
    assert held.max() - held.min() <= 1 and held.sum() == sizes.sum()


def test_moetuner_unequal_with_a_short_time_limit_starts_from_a_feasible_mapping():
    # ILP 2 drops a warm start that breaks the memory balance; with the repaired one it has an
    # incumbent from the start, so a short limit still returns a memory-balanced placement
    trace = synthetic_trace(8, 12, 2, 2000, seed=0)
    p = MoETuner(4, equal_per_gpu=False, time_limit=3)(trace)
    assert p.meta["stage2"]["warm_start_memory_feasible"]
    per_gpu = p.experts_per_gpu().sum(axis=0)
    assert per_gpu.max() == per_gpu.min() == 8 * 12 // 4


def test_moetuner_errors_name_the_fix():
    trace = synthetic_trace(8, 3, 2, 100)
    with pytest.raises(PlacementConstraintError, match="equal_per_gpu=False"):
        MoETuner(3)(trace)
    with pytest.raises(InfeasiblePlacementError, match="max_per_gpu"):
        MoETuner(4, equal_per_gpu=False, max_per_gpu=1)(trace)
    with pytest.raises(ValueError, match="method"):
        MoETuner(4, method="magic")
    with pytest.raises(ValueError, match="refine"):
        MoETuner(4, refine="yes")
    with pytest.raises(ValueError, match="needs the ILP"):
        MoETuner(4, equal_per_gpu=False, method="heuristic")(trace)


def _knapsack():
    c = -np.array([5.0, 4, 3])
    A = sparse.csr_matrix(np.array([[2.0, 3, 1]]))
    return c, A, np.array([-np.inf]), np.array([4.0]), np.zeros(3), np.ones(3), np.ones(3, dtype=bool)


@pytest.mark.parametrize("backend", available_backends())
def test_milp_backends_agree_and_keep_the_warm_start(backend):
    res = solve_milp(*_knapsack(), backend=backend, time_limit=10)
    assert res.status == "optimal" and res.objective == -8.0 and res.gap == 0.0
    warm = solve_milp(*_knapsack(), backend=backend, time_limit=10, warm_start=np.array([1.0, 0, 1]))
    assert warm.objective == -8.0
    with pytest.raises(ValueError, match="warm start"):
        solve_milp(*_knapsack(), backend=backend, warm_start=np.zeros(2))


def test_milp_unknown_backend():
    with pytest.raises(ValueError, match="unknown MILP backend"):
        solve_milp(*_knapsack(), backend="gurobi")
