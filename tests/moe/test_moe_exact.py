"""The exact chain DP: brute force agrees, the evaluator agrees, bounds hold, errors are clear."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from llmsys.moe import (
    EPLBGreedy,
    InfeasiblePlacementError,
    MoETuner,
    PlacementConstraintError,
    Topology,
    evaluate,
    synthetic_trace,
)
from llmsys.moe.exact import equal_assignments, exact_placement, num_assignments


def brute_force(trace, topo: Topology) -> float:
    """Every combination of per-layer assignments: S^L evaluations of the objective."""
    states = equal_assignments(trace.num_experts, topo.num_gpus)
    onehot = np.eye(topo.num_gpus)[states]
    R = np.moveaxis(trace.transitions, 2, 0)
    best = np.inf
    for path in itertools.product(range(len(states)), repeat=trace.num_layers):
        total = sum(
            float((onehot[path[l]].T @ R[l] @ onehot[path[l + 1]] * topo.cost).max())
            for l in range(trace.num_layers - 1)
        )
        best = min(best, total)
    return best


def test_assignments_are_all_equal_splits():
    states = equal_assignments(6, 3)
    assert len(states) == num_assignments(6, 3) == 90
    assert len({tuple(s) for s in states}) == 90
    assert all((np.bincount(s, minlength=3) == 2).all() for s in states)


@pytest.mark.parametrize("experts,gpus,layers,nodes", [(4, 2, 4, 1), (6, 3, 2, 1), (4, 4, 3, 2)])
def test_exact_equals_brute_force_and_the_evaluator(experts, gpus, layers, nodes):
    trace = synthetic_trace(experts, layers, top_k=2, num_tokens=512, affinity=0.7, seed=3)
    topo = Topology.make(gpus, nodes)
    placement = exact_placement(trace, topo)
    assert placement.meta["objective"] == pytest.approx(brute_force(trace, topo), rel=1e-6)
    assert evaluate(placement, trace, ep_homes=False).max_pair_traffic == pytest.approx(
        placement.meta["objective"], rel=1e-6
    )
    assert placement.is_equal_per_gpu()


def test_no_solver_beats_the_exact_optimum():
    trace = synthetic_trace(6, 6, top_k=2, num_tokens=2048, seed=1)
    best = exact_placement(trace, 3).meta["objective"]
    for solver in (EPLBGreedy(3), MoETuner(3, time_limit=2)):
        assert evaluate(solver(trace), trace, ep_homes=False).max_pair_traffic >= best - 1e-6


def test_load_bound_is_respected_and_costs_traffic():
    trace = synthetic_trace(6, 5, top_k=2, num_tokens=2048, seed=2)
    greedy = evaluate(EPLBGreedy(3)(trace), trace, ep_homes=False)
    bound = greedy.max_mean_per_layer + 0.01
    bounded = exact_placement(trace, 3, max_load=bound)
    report = evaluate(bounded, trace, ep_homes=False)
    assert (report.max_mean_per_layer <= bound + 1e-9).all()
    free = exact_placement(trace, 3)
    assert free.meta["objective"] <= bounded.meta["objective"] + 1e-6
    # the bound binds on this trace: the unconstrained optimum breaks it somewhere
    assert (evaluate(free, trace, ep_homes=False).max_mean_per_layer > bound + 1e-9).any()


def test_errors_name_the_fix():
    trace = synthetic_trace(8, 3, top_k=2, num_tokens=256, seed=0)
    with pytest.raises(InfeasiblePlacementError, match="raise max_load"):
        exact_placement(trace, 4, max_load=0.5)
    with pytest.raises(PlacementConstraintError, match="use MoETuner"):
        exact_placement(synthetic_trace(16, 2, top_k=2, num_tokens=64, seed=0), 4)
    with pytest.raises(PlacementConstraintError, match="equally"):
        exact_placement(synthetic_trace(6, 2, top_k=2, num_tokens=64, seed=0), 4)
