"""`benchmarks/moe.py --trace ... --test-trace ...`: the comparison on a user's own trace, end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from llmsys.moe import synthetic_trace

ROOT = Path(__file__).resolve().parents[2]


def test_benchmark_on_a_users_trace_with_a_held_out_sample(tmp_path):
    model = dict(num_experts=8, num_layers=4, top_k=2, num_tokens=400, affinity=0.9, seed=0)
    fit = synthetic_trace(**model, sample_seed=1).save(tmp_path / "fit.npz")
    test = synthetic_trace(**model, sample_seed=2).save(tmp_path / "test.npz")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "moe.py"), "--trace", str(fit), "--test-trace", str(test),
           "--time-limit", "2", "--out", str(tmp_path / "out")]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "out" / "moe_trace.json").read_text())
    assert (tmp_path / "out" / "moe_trace.png").exists()
    solvers = result["case"]["solvers"]
    assert {"contiguous", "round_robin", "eplb_greedy", "moetuner", "moetuner_2ilp"} <= set(solvers)
    # the unbounded optimum over every 2-experts-per-GPU placement: nothing of that kind beats it
    assert result["exact_optimum"]["no_load_bound"]["max_pair_traffic"] <= solvers["moetuner"]["max_pair_traffic"]
    exact = result["exact_optimum"]["load_within_0.05"]["max_pair_traffic"]
    assert result["exact_optimum"]["no_load_bound"]["max_pair_traffic"] <= exact
    held = result["held_out"]
    assert set(held["on_test"]) == {"eplb_greedy", "moetuner", "exact_load_within_0.05"}
    assert held["on_fit"]["exact_load_within_0.05"]["max_pair_traffic"] == exact
    assert held["test_stats"]["tokens"] == 400 and held["fit_stats"]["interlayer_mi"] > 0


def test_test_trace_alone_is_refused(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "moe.py"), "--test-trace", "x.npz", "--out", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 2 and "--test-trace needs --trace" in done.stderr


def test_lpt_unequal_packs_every_expert_once_and_balances_at_least_as_well_as_the_greedy():
    import importlib.util

    spec = importlib.util.spec_from_file_location("moe_benchmark", ROOT / "benchmarks" / "moe.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    from llmsys.moe import EPLBGreedy, Topology, evaluate

    trace = synthetic_trace(8, 5, 2, 1000, seed=0)
    topo = Topology.make(4)
    placement = bench.lpt_unequal(trace, topo)
    for row in placement.phy2log:
        assert sorted(e for e in row.tolist() if e >= 0) == list(range(8))  # each expert exactly once
    lpt = evaluate(placement, trace, ep_homes=False)
    greedy = evaluate(EPLBGreedy(topo)(trace), trace, ep_homes=False)
    assert lpt.max_mean_load <= greedy.max_mean_load + 1e-9
