"""Placement and Topology types, the baseline solvers and the EPLB-style greedy."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmsys.moe import (
    Contiguous,
    EPLBGreedy,
    InfeasiblePlacementError,
    Placement,
    PlacementConstraintError,
    RoundRobin,
    RoutingTrace,
    Topology,
    balanced_packing,
    load_placement,
    replicate,
    synthetic_trace,
)
from llmsys.registry import get_method


def _trace_with_load(load: np.ndarray, top_k: int = 1) -> RoutingTrace:
    """A trace whose layer-l load is exactly load[:, l] (top_k=1: one token per unit of load)."""
    E, L = load.shape
    T = int(load[:, 0].sum())
    topk = np.zeros((T, L, 1), dtype=np.int64)
    for l in range(L):
        topk[:, l, 0] = np.repeat(np.arange(E), load[:, l].astype(int))
    return RoutingTrace(topk, E)


def test_topology_make_and_cost():
    topo = Topology.make(8, num_nodes=2, intra_node_gbps=400, inter_node_gbps=50)
    assert (topo.num_gpus, topo.num_nodes, topo.gpus_per_node) == (8, 2, 4)
    assert topo.bandwidth[0, 3] == 400 and topo.bandwidth[0, 4] == 50
    assert topo.cost[0, 3] == 1.0 and topo.cost[0, 4] == 8.0 and topo.cost[2, 2] == 0.0
    assert topo.is_node_uniform
    skewed = topo.bandwidth.copy()
    skewed[0, 1] = skewed[1, 0] = 100
    assert not Topology(skewed, 4).is_node_uniform
    with pytest.raises(ValueError):
        Topology.make(6, num_nodes=4)
    with pytest.raises(ValueError, match="> 0"):
        Topology(np.zeros((2, 2)), 2)
    assert Topology.from_dict(topo.to_dict()).bandwidth.tolist() == topo.bandwidth.tolist()


def test_placement_validation_names_the_fix():
    topo = Topology.make(4)
    with pytest.raises(PlacementConstraintError, match="multiple of 4"):
        Placement(np.arange(6)[None], 6, topo)
    with pytest.raises(InfeasiblePlacementError, match=r"experts \[7\] have no slot"):
        Placement(np.array([[0, 1, 2, 3, 4, 5, 6, 6]]), 8, topo)
    with pytest.raises(ValueError, match="logical expert ids"):
        Placement(np.array([[0, 1, 2, 9]]), 4, topo)
    p = Placement(np.array([[3, 2, 1, 0]]), 4, topo)
    with pytest.raises(ValueError):
        p.phy2log[0, 0] = 1  # read-only: the dispatch caches depend on it


def test_placement_views():
    topo = Topology.make(2)
    p = Placement(np.array([[0, 1, 0, 2], [1, 2, 0, -1]]), 3, topo)  # layer 0: expert 0 replicated
    assert p.slots_per_gpu == 2
    np.testing.assert_array_equal(p.replica_counts(), [[2, 1, 1], [1, 1, 1]])
    np.testing.assert_array_equal(p.log2phy()[0], [[0, 2], [1, -1], [3, -1]])
    np.testing.assert_array_equal(p.experts_per_gpu(), [[2, 2], [2, 1]])
    assert not p.is_equal_per_gpu()
    np.testing.assert_allclose(p.gpu_share()[0], [[0.5, 0.5], [1, 0], [0, 1]])
    assert p.gpus_of_expert(0) == [[0, 1], [0], [1]]


def test_dispatch_ranks_prefers_local_replicas_then_round_robin():
    topo = Topology.make(3)
    # slots (2 per GPU): expert 0 in slots 0, 4 (GPUs 0, 2); expert 1 in slots 1, 2, 3 (GPUs 0, 1, 1);
    # expert 2 in slot 5 (GPU 2)
    p = Placement(np.array([[0, 1, 1, 1, 0, 2]]), 3, topo)
    experts = np.array([[0, 1], [0, 2], [0, -1], [1, 0]])
    tids = np.arange(4)
    # home GPU 1: expert 0 has no local replica -> slots [0, 4] round robin by token id -> GPUs 0, 2
    np.testing.assert_array_equal(p.dispatch_ranks(0, experts, 1, tids), [[0, 1], [2, 2], [0, -1], [1, 2]])
    # home GPU 2: expert 0 is local; expert 1 is not: slot 1 + 3 % 3 = slot 1 -> GPU 0
    np.testing.assert_array_equal(p.dispatch_ranks(0, experts, 2, tids)[:, 0], [2, 2, 2, 0])
    # per-token homes give the same answer as one call per home
    homes = np.array([1, 2, 1, 2])
    both = p.dispatch_ranks(0, experts, homes, tids)
    for h in (1, 2):
        np.testing.assert_array_equal(both[homes == h], p.dispatch_ranks(0, experts, h, tids)[homes == h])


def test_placement_roundtrip(tmp_path):
    p = EPLBGreedy(4, num_slots=12)(synthetic_trace(8, 3, 2, 200, seed=1))
    path = p.save(tmp_path / "p.json")
    q = load_placement(path)
    np.testing.assert_array_equal(q.phy2log, p.phy2log)
    assert q.meta["solver"] == "eplb_greedy" and q.num_experts == 8 and q.num_gpus == 4


def test_contiguous_and_round_robin_layouts():
    trace = synthetic_trace(8, 2, 2, 50)
    c = Contiguous(4)(trace)
    r = RoundRobin(4)(trace)
    np.testing.assert_array_equal(c.phy2log[0], np.arange(8))
    assert r.gpus_of_expert(1) == [[0], [1], [2], [3], [0], [1], [2], [3]]
    uneven = Contiguous(3)(trace)  # 8 experts over 3 GPUs: 3 + 3 + 2, one empty slot
    np.testing.assert_array_equal(uneven.experts_per_gpu()[0], [3, 3, 2])
    assert get_method("moetuner") is not None and get_method("eplb_greedy") is EPLBGreedy


def test_replicate_hand_example_and_optimality():
    np.testing.assert_array_equal(replicate(np.array([10.0, 1, 1, 4]), 6), [3, 1, 1, 1])
    with pytest.raises(InfeasiblePlacementError, match="at least 4"):
        replicate(np.ones(4), 3)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(1, 50), min_size=2, max_size=4), st.integers(0, 3))
def test_replicate_minimises_the_heaviest_replica(weights, extra):
    w = np.array(weights, dtype=float)
    got = replicate(w, w.size + extra)
    best = min(
        max(w / np.array(c)) for c in itertools.product(range(1, extra + 2), repeat=w.size) if sum(c) == w.size + extra
    )
    assert np.isclose(max(w / got), best)


def test_balanced_packing_respects_capacity_and_balances():
    w = np.array([9.0, 8, 7, 1, 1, 1, 1, 1])  # hot experts adjacent: contiguous pairs are badly unbalanced
    bins = balanced_packing(w, 4, 2)
    assert (np.bincount(bins, minlength=4) == 2).all()
    loads = np.bincount(bins, weights=w, minlength=4)
    contiguous = w.reshape(4, 2).sum(axis=1)
    assert loads.max() < contiguous.max()
    with pytest.raises(InfeasiblePlacementError):
        balanced_packing(np.ones(9), 4, 2)


def test_eplb_greedy_replicates_the_hottest_and_balances():
    load = np.array([[400, 100, 100, 100, 50, 50, 50, 50]]).T.repeat(2, axis=1)
    trace = _trace_with_load(load)
    plain = EPLBGreedy(4)(trace)
    reps = EPLBGreedy(4, num_slots=12)(trace)
    assert reps.replica_counts()[0, 0] >= 3  # the 400-token expert takes most spare slots
    from llmsys.moe import evaluate

    contiguous = evaluate(Contiguous(4)(trace), trace, ep_homes=False)
    plain_r, reps_r = evaluate(plain, trace, ep_homes=False), evaluate(reps, trace, ep_homes=False)
    assert reps_r.max_mean_load < plain_r.max_mean_load <= contiguous.max_mean_load
    assert reps.meta["num_slots"] == 12 and plain.is_equal_per_gpu()


def test_eplb_hierarchical_keeps_groups_inside_nodes():
    trace = synthetic_trace(16, 3, 2, 500, seed=4)
    topo = Topology.make(4, num_nodes=2)
    p = EPLBGreedy(topo, num_slots=20, hierarchical=True, num_groups=4)(trace)
    assert p.meta["hierarchical"]
    per_node = p.num_slots // 2
    for l in range(3):
        for node in range(2):
            experts = set(p.phy2log[l, node * per_node : (node + 1) * per_node].tolist())
            groups = {e // 4 for e in experts}
            assert {e for g in groups for e in range(4 * g, 4 * g + 4)} == experts  # whole groups only
    with pytest.raises(ValueError, match="num_groups"):
        EPLBGreedy(topo, hierarchical=True, num_groups=3)(trace)


def test_greedy_errors_name_the_fix():
    trace = synthetic_trace(8, 2, 2, 50)
    with pytest.raises(InfeasiblePlacementError, match=">= 8"):
        EPLBGreedy(4, num_slots=6)(trace)
    with pytest.raises(PlacementConstraintError, match="multiple of 4"):
        EPLBGreedy(4, num_slots=10)(trace)
