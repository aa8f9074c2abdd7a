"""The evaluator: hand-computed balance and traffic, EP byte prediction against a token-by-token count."""

from __future__ import annotations

import numpy as np
import pytest

from llmsys.moe import (
    EPLBGreedy,
    Hardware,
    Placement,
    RoutingTrace,
    Topology,
    TraceError,
    ep_dispatch_tokens,
    evaluate,
    plot_reports,
    predict_ep_bytes,
    synthetic_trace,
)
from llmsys.moe.evaluate import local_token_ids


def _hand_case():
    # 4 experts, 2 MoE layers, top-1, 2 GPUs: GPU 0 holds experts {0, 1}, GPU 1 holds {2, 3}
    topk = np.array([[[0], [2]], [[1], [1]], [[0], [3]], [[2], [3]]])
    trace = RoutingTrace(topk, 4)
    placement = Placement(np.array([[0, 1, 2, 3], [0, 1, 2, 3]]), 4, Topology.make(2))
    return trace, placement


def test_hand_computed_balance_and_traffic():
    trace, placement = _hand_case()
    r = evaluate(placement, trace, ep_homes=False)
    # layer 0: experts 0, 1, 0, 2 -> GPU loads [3, 1]; layer 1: 2, 1, 3, 3 -> [1, 3]
    np.testing.assert_array_equal(r.load, [[3, 1], [1, 3]])
    np.testing.assert_allclose(r.max_mean_per_layer, [1.5, 1.5])
    # moves: token0 GPU0->GPU1, token1 0->0, token2 0->1, token3 1->1
    np.testing.assert_array_equal(r.traffic[0], [[1, 2], [0, 1]])
    assert r.max_pair_traffic == 2.0 and r.cross_fraction == 0.5
    np.testing.assert_array_equal(r.pair_traffic, [[0, 2], [0, 0]])


def test_replicas_split_traffic_evenly():
    trace, _ = _hand_case()
    # expert 0 replicated on both GPUs in layer 0 (6 slots: 3 per GPU)
    placement = Placement(np.array([[0, 1, 0, 2, 3, 0], [0, 1, 3, 2, 3, 0]]), 4, Topology.make(2))
    r = evaluate(placement, trace, ep_homes=False)
    # layer 0 expert 0 (2 tokens): slots 0, 2 on GPU 0 and slot 5 on GPU 1 -> 2/3 and 1/3
    np.testing.assert_allclose(r.load[0], [2 * 2 / 3 + 1, 2 / 3 + 1])


def test_bandwidth_normalisation_weights_network_links():
    trace = synthetic_trace(8, 3, 2, 300, seed=0)
    one = evaluate(EPLBGreedy(Topology.make(4))(trace), trace, ep_homes=False)
    topo = Topology.make(4, num_nodes=2, intra_node_gbps=400, inter_node_gbps=100)
    two = evaluate(EPLBGreedy(topo)(trace), trace, ep_homes=False)
    np.testing.assert_array_equal(one.traffic, two.traffic)  # same placement, same moves
    np.testing.assert_allclose(two.pair_traffic[0, 2], 4 * two.traffic[:, 0, 2].sum())  # 4x slower link


def _reference_ep_tokens(trace, placement, homes):
    """Token by token: the set of GPUs serving each token's experts (the runtime's dispatch rule)."""
    G = placement.num_gpus
    out = np.zeros((trace.num_layers, G, G))
    seen = {g: 0 for g in range(G)}
    local_ids = []
    for h in homes:
        local_ids.append(seen[h])
        seen[h] += 1
    for l in range(trace.num_layers):
        gpus_of = placement.gpus_of_expert(l)
        for t in range(trace.num_tokens):
            h = homes[t]
            dests = set()
            for e in trace.topk[t, l]:
                if e < 0:
                    continue
                options = gpus_of[e]
                dests.add(h if h in options else options[local_ids[t] % len(options)])
            for g in dests:
                out[l, h, g] += 1
    return out


def test_ep_dispatch_tokens_match_a_token_by_token_count():
    trace = synthetic_trace(8, 3, 2, 120, seed=7)
    placement = EPLBGreedy(4, num_slots=12)(trace)  # with replicas
    homes = np.random.default_rng(0).integers(0, 4, trace.num_tokens)
    np.testing.assert_array_equal(
        ep_dispatch_tokens(trace, placement, homes), _reference_ep_tokens(trace, placement, homes)
    )
    np.testing.assert_array_equal(local_token_ids(np.array([2, 0, 2, 2, 0])), [0, 0, 1, 2, 1])


def test_predicted_bytes_categories():
    trace = synthetic_trace(8, 3, 2, 64, seed=1)
    placement = EPLBGreedy(4)(trace)
    b = predict_ep_bytes(trace, placement, hidden_size=16, activation_bytes=2, weight_bytes=4)
    tokens = ep_dispatch_tokens(trace, placement).sum(axis=0)
    np.fill_diagonal(tokens, 0)
    np.testing.assert_array_equal(b["dispatch"], tokens * 16 * 2)
    np.testing.assert_array_equal(b["combine"], b["dispatch"].T)
    np.testing.assert_array_equal(b["routing"], tokens * 2 * (8 + 4))
    assert (np.diag(b["total"]) == 0).all() and b["counts"][0, 1] == 8 * 3
    with pytest.raises(ValueError, match="homes"):
        predict_ep_bytes(trace, placement, 16, homes=np.zeros(3, dtype=int))


def test_step_estimate_follows_the_formula():
    trace, placement = _hand_case()
    hw = Hardware(hidden_size=1000, expert_intermediate_size=500, gpu_tflops=1.0, latency_us=0.0)
    est = evaluate(placement, trace, hw).estimate
    flops = 6 * 1000 * 500
    assert est.compute_seconds == pytest.approx((3 + 3) * flops / 1e12)
    # one transition: heaviest link carries 2 tokens of 1000 x 2 bytes over 450 GB/s NVLink
    assert est.all_to_all_seconds == pytest.approx(2 * 1000 * 2 / 450e9)
    scaled = evaluate(placement, trace, Hardware(1000, 500, gpu_tflops=1.0, latency_us=0.0, tokens_per_step=8)).estimate
    assert scaled.step_seconds == pytest.approx(2 * est.step_seconds)
    assert Hardware.for_shape("deepseek_v3").hidden_size == 7168


def test_evaluate_rejects_a_foreign_trace():
    trace, placement = _hand_case()
    with pytest.raises(TraceError, match="same model"):
        evaluate(placement, synthetic_trace(8, 2, 1, 10))


def test_summary_and_plot(tmp_path):
    trace = synthetic_trace(8, 4, 2, 200, seed=2)
    report = evaluate(EPLBGreedy(4)(trace), trace, Hardware.for_shape("mixtral"))
    s = report.summary()
    for key in ("max_mean_load", "max_pair_traffic", "solve_seconds", "est_step_ms", "ep_max_pair_traffic"):
        assert key in s
    path = plot_reports({"greedy": report, "again": report}, tmp_path / "plot.png")
    assert path.stat().st_size > 10_000 and path.read_bytes()[:4] == b"\x89PNG"
