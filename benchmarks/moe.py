"""MoETuner benchmark: expert placements compared on load balance, GPU-pair traffic and solve time.

    python benchmarks/moe.py [--quick] [--out DIR]

1. traces recorded from tiny Mixtral and Qwen2-MoE models (random weights, 8 experts x 8 layers);
2. synthetic traces at real shapes (documented skew and affinity, llmsys.moe.synthetic_trace):
   Mixtral 8 x 32 on 4 and 8 GPUs, Qwen3-MoE 128 x 48 on 8 and 16 GPUs, DeepSeek-V3 256 x 58 on 32
   and 64 GPUs (8 GPUs per node: NVLink inside, network across);
3. an affinity sweep at the Mixtral shape (0 = no structure to exploit);
4. the expert-parallel runtime on 2 and 4 CPU processes: EP output vs single process, measured bytes
   vs the evaluator's prediction;
5. the exact optimum of the traffic objective at Mixtral / 4 GPUs (`llmsys.moe.exact`, a chain DP over
   all 2,520 per-layer assignments): with each layer's load within 0.05 of the greedy's, and (full
   run) with no load bound - how much any placement can cut against the greedy on these traces.
   `--exact-only` runs just this part (and the affinity sweep's exact rows) into moe_exact.json.
6. held out: greedy, MoETuner and the exact optimum solved on one sample of the Mixtral workload and
   evaluated on another sample of the same synthetic model (a placement is deployed on traffic it
   was not fitted to);
7. unequal clusters at Mixtral / 4 GPUs: MoETuner with the paper's "no empty cluster" ILP 1
   (`equal_per_gpu=False`, engines need padding) against the greedy and against longest-processing-
   time packing without a per-GPU expert count (the balance such freedom buys with no affinity).

    python benchmarks/moe.py --trace fit.npz [--test-trace test.npz] [--gpus 4] [--time-limit 30]

runs the comparison on a trace of your own instead (`RoutingTrace.save` / `llmsys moe record`, e.g. a
real model's routing): its statistics, every solver, the exact optimum where the shape allows it, and,
with --test-trace, the placements fitted on the first trace evaluated on the second -> moe_trace.json.
For contiguous / round-robin / EPLB greedy / MoETuner: max/mean load, max pair traffic (MoETuner's
inter-layer model), estimated step time, solve time. Writes moe.json and PNG plots into --out
(default benchmarks/results). --quick (under 5 minutes on 2 cores) uses fewer tokens and shorter time limits.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import bar_plot, machine_info, print_table, write_json  # noqa: E402
from llmsys.models import forward  # noqa: E402
from llmsys.moe import (  # noqa: E402
    SHAPES,
    Contiguous,
    EPCase,
    EPLBGreedy,
    Hardware,
    MoETuner,
    Placement,
    RoundRobin,
    RoutingRecorder,
    RoutingTrace,
    Topology,
    check_expert_parallel,
    evaluate,
    plot_reports,
    synthetic_shape_trace,
)
from llmsys.moe.exact import MAX_STATES, exact_placement, num_assignments  # noqa: E402
from llmsys.moe.trace import HOT_RATIO  # noqa: E402
from llmsys.testing import tiny_model  # noqa: E402

GPUS_PER_NODE = 8
AFFINITIES = (0.0, 0.5, 0.9)
COLUMNS = [
    "case",
    "solver",
    "max_mean_load",
    "max_pair_traffic",
    "vs_greedy",
    "link_vs_greedy",
    "est_step_ms",
    "solve_seconds",
    "mip_gap",
]


def _topology(gpus: int) -> Topology:
    return Topology.make(gpus, max(1, gpus // GPUS_PER_NODE))


def _solvers(topo: Topology, time_limit: float, paper_variant: bool) -> dict[str, Any]:
    solvers: dict[str, Any] = {
        "contiguous": Contiguous(topo),
        "round_robin": RoundRobin(topo),
        "eplb_greedy": EPLBGreedy(topo),
        "moetuner": MoETuner(topo, time_limit=time_limit),
    }
    if paper_variant:  # the paper's two ILPs without our refinement stage
        solvers["moetuner_2ilp"] = MoETuner(topo, time_limit=time_limit, refine="none")
    return solvers


def run_case(name: str, trace: RoutingTrace, gpus: int, time_limit: float, hw: Hardware | None, out: Path,
             paper_variant: bool = False) -> dict[str, Any]:  # fmt: skip
    topo = _topology(gpus)
    reports, placements = {}, {}
    for solver_name, solver in _solvers(topo, time_limit, paper_variant).items():
        placements[solver_name] = solver(trace)
        reports[solver_name] = evaluate(placements[solver_name], trace, hw)
    greedy = reports["eplb_greedy"]
    rows = {}
    for solver_name, report in reports.items():
        row = report.summary()
        row["vs_greedy"] = round(report.max_pair_traffic / max(greedy.max_pair_traffic, 1e-9) - 1, 4)
        row["link_vs_greedy"] = round(report.max_link_traffic / max(greedy.max_link_traffic, 1e-9) - 1, 4)
        row["load_minus_greedy"] = round(report.max_mean_load - greedy.max_mean_load, 4)
        row["method"] = placements[solver_name].meta.get("method", solver_name)
        rows[solver_name] = row
    plot_reports(reports, out / f"moe_{name}.png", title=f"{name}: {trace.source}")
    return {
        "trace": trace.source,
        "trace_stats": trace.stats(),
        "gpus": gpus,
        "nodes": topo.num_nodes,
        "tokens": trace.num_tokens,
        "time_limit": time_limit,
        "solvers": rows,
        "moetuner_meta": {k: v for k, v in placements["moetuner"].meta.items() if k != "solver"},
    }


def exact_bounds(trace: RoutingTrace, gpus: int, unbounded: bool) -> dict[str, Any]:
    """Greedy vs the exact optimum of the traffic objective (load within 0.05 of the greedy's, or free)."""
    topo = _topology(gpus)
    greedy = evaluate(EPLBGreedy(topo)(trace), trace, ep_homes=False)
    out: dict[str, Any] = {"greedy": greedy.summary()}
    variants = {"load_within_0.05": greedy.max_mean_per_layer + 0.05}
    if unbounded:
        variants["no_load_bound"] = None
    for name, bound in variants.items():
        placement = exact_placement(trace, topo, max_load=bound)
        report = evaluate(placement, trace, ep_homes=False)
        out[name] = {
            **report.summary(),
            "solve_seconds": round(placement.meta["solve_seconds"], 2),
            "vs_greedy": round(report.max_pair_traffic / greedy.max_pair_traffic - 1, 4),
            "load_minus_greedy": round(report.max_mean_load - greedy.max_mean_load, 4),
        }
    return out


def _exact_fits(trace: RoutingTrace, gpus: int) -> bool:
    """Whether the exact DP can solve this shape (E/G experts per GPU, few enough assignments per layer)."""
    return trace.num_experts % gpus == 0 and num_assignments(trace.num_experts, gpus) <= MAX_STATES


def held_out(fit: RoutingTrace, test: RoutingTrace, gpus: int, time_limit: float) -> dict[str, Any]:
    """Placements solved on `fit` (greedy, MoETuner, the exact optimum where the shape allows it),
    evaluated on `fit` itself and on `test`, another sample of the workload."""
    topo = _topology(gpus)
    greedy = EPLBGreedy(topo)(fit)
    placements = {"eplb_greedy": greedy, "moetuner": MoETuner(topo, time_limit=time_limit)(fit)}
    if _exact_fits(fit, gpus):
        bound = evaluate(greedy, fit, ep_homes=False).max_mean_per_layer + 0.05
        placements["exact_load_within_0.05"] = exact_placement(fit, topo, max_load=bound)
    out: dict[str, Any] = {"fit": fit.source, "test": test.source, "fit_stats": fit.stats(),
                           "test_stats": test.stats(), "gpus": gpus}  # fmt: skip
    for where, trace in (("on_fit", fit), ("on_test", test)):
        reports = {name: evaluate(p, trace, ep_homes=False) for name, p in placements.items()}
        base = reports["eplb_greedy"]
        out[where] = {
            name: {
                "max_mean_load": round(r.max_mean_load, 4),
                "max_pair_traffic": round(r.max_pair_traffic, 2),
                "vs_greedy": round(r.max_pair_traffic / max(base.max_pair_traffic, 1e-9) - 1, 4),
                "load_minus_greedy": round(r.max_mean_load - base.max_mean_load, 4),
            }
            for name, r in reports.items()
        }
    return out


def print_held_out(res: dict[str, Any]) -> None:
    rows = [{"evaluated": where, "solver": name, **row} for where in ("on_fit", "on_test")
            for name, row in res[where].items()]  # fmt: skip
    print_table(rows, ["evaluated", "solver", "max_mean_load", "max_pair_traffic", "vs_greedy", "load_minus_greedy"])


def trace_mode(args: argparse.Namespace, out: Path) -> int:
    """The comparison on a user's trace (--trace, optionally --test-trace) -> moe_trace.json."""
    start = time.perf_counter()
    fit = RoutingTrace.from_file(args.trace)
    print(f"trace {args.trace}: {fit.num_tokens} tokens x {fit.num_layers} layers x top-{fit.top_k} of "
          f"{fit.num_experts} experts; {fit.stats()}")  # fmt: skip
    case = run_case("trace", fit, args.gpus, args.time_limit, None, out, paper_variant=True)
    print_table([{**row, "case": "trace", "solver": name} for name, row in case["solvers"].items()], COLUMNS)
    payload: dict[str, Any] = {"benchmark": "moe_trace", "machine": machine_info(), "trace": str(args.trace),
                               "case": case}  # fmt: skip
    if _exact_fits(fit, args.gpus):
        payload["exact_optimum"] = exact_bounds(fit, args.gpus, unbounded=True)
        print_exact({"trace": payload["exact_optimum"]})
    if args.test_trace:
        test = RoutingTrace.from_file(args.test_trace)
        payload["held_out"] = held_out(fit, test, args.gpus, args.time_limit)
        print(f"fitted on {args.trace}, evaluated on {args.test_trace} ({test.num_tokens} tokens)")
        print_held_out(payload["held_out"])
    payload["seconds"] = round(time.perf_counter() - start, 1)
    path = write_json(out / "moe_trace.json", payload)
    print(f"\nwrote {path} and {out / 'moe_trace.png'} ({payload['seconds']}s)")
    return 0


def lpt_unequal(trace: RoutingTrace, topo: Topology) -> Placement:
    """Per layer, each expert (hottest first) onto the least-loaded GPU, any number per GPU: longest-
    processing-time packing, a balance-only yardstick when GPUs may hold unequal expert counts (slots
    padded with -1). It ignores routing and the memory balance over layers."""
    G, (E, L) = topo.num_gpus, trace.load.shape
    owner = np.zeros((L, E), dtype=np.int64)
    for l in range(L):
        gpu_load = np.zeros(G)
        for e in np.argsort(-trace.load[:, l], kind="stable"):
            owner[l, e] = int(np.argmin(gpu_load))
            gpu_load[owner[l, e]] += trace.load[e, l]
    per_gpu = max(int(np.bincount(row, minlength=G).max()) for row in owner)
    phy2log = np.full((L, G * per_gpu), -1, dtype=np.int64)
    for l in range(L):
        for g in range(G):
            experts = np.flatnonzero(owner[l] == g)
            phy2log[l, g * per_gpu : g * per_gpu + experts.size] = experts
    return Placement(phy2log, E, topo, {"solver": "lpt_unequal"})


def unequal_part(trace: RoutingTrace, gpus: int, time_limit: float, equal: dict[str, Any]) -> dict[str, Any]:
    """Part 7: MoETuner with unequal clusters (the paper's ILP 1) vs the greedy and unequal LPT packing;
    `equal` is part 2's row of the equal-count MoETuner on the same trace (not solved again)."""
    topo = _topology(gpus)
    placements = {
        "eplb_greedy": EPLBGreedy(topo)(trace),
        "lpt_unequal": lpt_unequal(trace, topo),
        "moetuner_unequal": MoETuner(topo, equal_per_gpu=False, time_limit=time_limit)(trace),
    }
    rows = {}
    for name, placement in placements.items():
        r = evaluate(placement, trace, ep_homes=False)
        rows[name] = {"max_mean_load": round(r.max_mean_load, 4), "max_pair_traffic": round(r.max_pair_traffic, 2),
                      "slots_per_gpu": placement.slots_per_gpu, "mip_gap": placement.meta.get("mip_gap")}  # fmt: skip
    rows["moetuner"] = {"max_mean_load": equal["max_mean_load"], "max_pair_traffic": equal["max_pair_traffic"],
                        "slots_per_gpu": trace.num_experts // gpus, "mip_gap": equal.get("mip_gap")}  # fmt: skip
    base, lpt = rows["eplb_greedy"], rows["lpt_unequal"]
    for row in rows.values():
        row["vs_greedy"] = round(row["max_pair_traffic"] / base["max_pair_traffic"] - 1, 4)
        row["vs_lpt_unequal"] = round(row["max_pair_traffic"] / lpt["max_pair_traffic"] - 1, 4)
        row["load_minus_greedy"] = round(row["max_mean_load"] - base["max_mean_load"], 4)
    return rows


def exact_part(q: bool) -> dict[str, Any]:
    """Part 5: the exact optimum at Mixtral / 4 GPUs, on the main trace and on the affinity sweep's."""
    result = {"mixtral_4gpu": exact_bounds(synthetic_shape_trace("mixtral", 8192, seed=0), 4, unbounded=not q)}
    for affinity in AFFINITIES:
        trace = synthetic_shape_trace("mixtral", 4096, affinity=affinity, seed=1)
        result[f"affinity_{affinity}"] = exact_bounds(trace, 4, unbounded=False)
    return result


def tiny_trace(family: str, tokens: int, seed: int = 0) -> RoutingTrace:
    key = "num_local_experts" if family == "mixtral" else "num_experts"
    model = tiny_model(family, seed=seed, num_hidden_layers=8, **{key: 8})
    ids = torch.randint(3, model.config.vocab_size, (tokens // 64, 64), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad(), RoutingRecorder(model) as rec:
        for chunk in ids.split(8):
            forward(model, chunk)
    return rec.trace()


def ep_check(world_sizes: tuple[int, ...]) -> list[dict[str, Any]]:
    results = []
    for world in world_sizes:
        cases = []
        for family in ("mixtral", "qwen2_moe"):
            key = "num_local_experts" if family == "mixtral" else "num_experts"
            config = {key: 8}
            ids = torch.randint(3, 500, (world * 2, 32), generator=torch.Generator().manual_seed(world))
            model = tiny_model(family, **config)
            with torch.no_grad(), RoutingRecorder(model) as rec:
                forward(model, ids)
            trace = rec.trace()
            solvers = (EPLBGreedy(world), EPLBGreedy(world, num_slots=8 + world), MoETuner(world, time_limit=3))
            for solver in solvers:  # no replicas, one replica per GPU, MoETuner
                cases.append(EPCase(family, solver(trace), ids, config=config))
        start = time.perf_counter()
        checks = check_expert_parallel(cases, world)
        seconds = time.perf_counter() - start
        for case, check in zip(cases, checks):
            results.append({
                "world_size": world,
                "family": check.family,
                "placement": f"{case.placement.meta['solver']} ({case.placement.num_slots} slots)",
                "max_abs_diff": check.max_abs_diff,
                "bytes_match": check.bytes_match,
                "measured_total_bytes": float(check.measured["total"].sum()),
                "predicted_total_bytes": float(check.predicted["total"].sum()),
                "max_pair_bytes": float(check.measured["total"].max()),
                "run_seconds_all_cases": round(seconds, 2),
            })  # fmt: skip
    return results


def print_exact(exact: dict[str, Any]) -> None:
    rows = []
    for case, res in exact.items():
        for name in ("load_within_0.05", "no_load_bound"):
            if name in res:
                r = res[name]
                rows.append({
                    "trace": case, "bound": name, "greedy": res["greedy"]["max_pair_traffic"],
                    "optimum": r["max_pair_traffic"], "vs_greedy": r["vs_greedy"],
                    "load_minus_greedy": r["load_minus_greedy"], "solve_seconds": r["solve_seconds"],
                })  # fmt: skip
    print_table(rows, ["trace", "bound", "greedy", "optimum", "vs_greedy", "load_minus_greedy", "solve_seconds"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer tokens, shorter solver time limits (< 5 min)")
    parser.add_argument("--out", default="benchmarks/results", help="output folder (default: benchmarks/results)")
    parser.add_argument("--exact-only", action="store_true", help="only part 5 (exact optimum) -> moe_exact.json")
    parser.add_argument("--trace", help="a RoutingTrace .npz of your own: compare the solvers on it instead")
    parser.add_argument("--test-trace", help="with --trace: another sample of the workload to evaluate on")
    parser.add_argument("--gpus", type=int, default=4, help="with --trace: GPUs (8 per node; default 4)")
    parser.add_argument("--time-limit", type=float, default=30.0, help="with --trace: MoETuner seconds")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    start = time.perf_counter()
    q = args.quick
    if args.test_trace and not args.trace:
        parser.error("--test-trace needs --trace (the trace the placements are fitted on)")
    if args.trace:
        return trace_mode(args, out)
    if args.exact_only:
        exact = exact_part(q)
        print_exact(exact)
        seconds = round(time.perf_counter() - start, 1)
        payload = {"benchmark": "moe_exact", "machine": machine_info(), "quick": q, "seconds": seconds, "exact": exact}
        write_json(out / "moe_exact.json", payload)
        return 0
    tokens = {"mixtral": 8192, "qwen3_moe": 4096 if q else 8192, "deepseek_v3": 4096 if q else 8192}
    limits = {"mixtral": 12.0 if q else 60.0, "qwen3_moe": 15.0 if q else 60.0, "deepseek_v3": 15.0 if q else 60.0}
    # the goal: 128 x 48 x 16 solves within 60 s: a 55 s limit leaves room for the set-up
    # around the search (the refinement uses whatever time it is given); quick mode gives it 30 s
    limit_qwen16 = 30.0 if q else 55.0

    cases: dict[str, Any] = {}
    print("== traces from tiny models (random weights), 8 experts x 8 layers, 4 GPUs")
    for family in ("mixtral", "qwen2_moe"):
        trace = tiny_trace(family, 2048)
        cases[f"tiny_{family}_4gpu"] = run_case(f"tiny_{family}_4gpu", trace, 4, 10.0, None, out)

    print("== synthetic traces at real shapes")
    plan = [
        ("mixtral", 4),
        ("mixtral", 8),
        ("qwen3_moe", 8),
        ("qwen3_moe", 16),
        ("deepseek_v3", 32),
        ("deepseek_v3", 64),
    ]
    traces = {}
    for shape, gpus in plan:
        if shape not in traces:
            traces[shape] = synthetic_shape_trace(shape, tokens[shape], seed=0)
        limit = limit_qwen16 if (shape, gpus) == ("qwen3_moe", 16) else limits[shape]
        name = f"{shape}_{gpus}gpu"
        cases[name] = run_case(
            name, traces[shape], gpus, limit, Hardware.for_shape(shape), out, paper_variant=shape == "mixtral"
        )
        print(f"   {name} done ({time.perf_counter() - start:.0f}s)")

    print("== affinity sweep, Mixtral shape, 4 GPUs")
    sweep = {}
    for affinity in AFFINITIES:
        trace = synthetic_shape_trace("mixtral", 4096, affinity=affinity, seed=1)
        topo = _topology(4)
        greedy = evaluate(EPLBGreedy(topo)(trace), trace, ep_homes=False)
        tuned = evaluate(MoETuner(topo, time_limit=6.0 if q else 30.0)(trace), trace, ep_homes=False)
        sweep[str(affinity)] = {
            "greedy": greedy.summary(),
            "moetuner": tuned.summary(),
            "vs_greedy": round(tuned.max_pair_traffic / greedy.max_pair_traffic - 1, 4),
        }

    print("== expert-parallel runtime (gloo, CPU processes)")
    ep = ep_check((2, 4))

    print("== exact optimum of the traffic objective, Mixtral shape, 4 GPUs")
    exact = exact_part(q)

    print("== held out: fitted on one sample of the Mixtral workload, evaluated on another")
    held = held_out(
        synthetic_shape_trace("mixtral", 8192, seed=0, sample_seed=1),
        synthetic_shape_trace("mixtral", 8192, seed=0, sample_seed=2),
        4,
        12.0 if q else 60.0,
    )

    print("== unequal clusters (the paper's ILP 1), Mixtral shape, 4 GPUs")
    unequal = unequal_part(traces["mixtral"], 4, 12.0 if q else 60.0, cases["mixtral_4gpu"]["solvers"]["moetuner"])

    # goals of the issue, evaluated on the numbers above
    goals: dict[str, Any] = {}
    for name in ("mixtral_4gpu", "mixtral_8gpu"):
        row = cases[name]["solvers"]["moetuner"]
        goals[f"{name}_traffic_cut_vs_greedy"] = -row["vs_greedy"]
        goals[f"{name}_load_minus_greedy"] = row["load_minus_greedy"]
        goals[f"{name}_met"] = bool(-row["vs_greedy"] >= 0.25 and row["load_minus_greedy"] <= 0.05)
    q16 = cases["qwen3_moe_16gpu"]
    goals["qwen3_moe_16gpu_solve_seconds"] = q16["solvers"]["moetuner"]["solve_seconds"]
    goals["qwen3_moe_16gpu_method"] = q16["solvers"]["moetuner"]["method"]
    goals["qwen3_moe_16gpu_mip_gap"] = q16["moetuner_meta"].get("mip_gap")  # None: no ILP at this size
    # the heuristic's reported gap: stage-1 balance against the bound max(mean, hottest expert)
    goals["qwen3_moe_16gpu_stage1_max_mean"] = q16["moetuner_meta"]["stage1"]["max_mean_load"]
    goals["qwen3_moe_16gpu_stage1_lower_bound"] = q16["moetuner_meta"]["stage1"]["max_mean_lower_bound"]
    goals["qwen3_moe_16gpu_within_60s"] = bool(q16["solvers"]["moetuner"]["solve_seconds"] <= 60.0)
    goals["mixtral_4gpu_best_possible_cut_vs_greedy"] = -exact["mixtral_4gpu"]["load_within_0.05"]["vs_greedy"]
    goals["mixtral_4gpu_held_out_cut_vs_greedy"] = -held["on_test"]["moetuner"]["vs_greedy"]
    goals["mixtral_4gpu_unequal_cut_vs_greedy"] = -unequal["moetuner_unequal"]["vs_greedy"]
    goals["mixtral_4gpu_unequal_load_minus_greedy"] = unequal["moetuner_unequal"]["load_minus_greedy"]
    goals["ep_bytes_match_prediction"] = all(r["bytes_match"] for r in ep)
    goals["ep_max_abs_diff"] = max(r["max_abs_diff"] for r in ep)

    rows = []
    for name, case in cases.items():
        for solver_name, row in case["solvers"].items():
            rows.append({**row, "case": name, "solver": solver_name})
    print_table(rows, COLUMNS)
    print_table(
        [
            {
                "affinity": a,
                "greedy": s["greedy"]["max_pair_traffic"],
                "moetuner": s["moetuner"]["max_pair_traffic"],
                "vs_greedy": s["vs_greedy"],
            }
            for a, s in sweep.items()
        ],  # fmt: skip
        ["affinity", "greedy", "moetuner", "vs_greedy"],
    )
    print_table(ep, ["world_size", "family", "placement", "max_abs_diff", "bytes_match", "measured_total_bytes"])
    print_exact(exact)
    print_held_out(held)
    unequal_columns = ["solver", "max_mean_load", "max_pair_traffic", "vs_greedy", "vs_lpt_unequal", "slots_per_gpu"]
    print_table([{"solver": name, **row} for name, row in unequal.items()], unequal_columns)
    for key, value in goals.items():
        print(f"{key:40s} {value}")

    names = [n for n in cases if not n.startswith("tiny")]
    solvers = ["contiguous", "round_robin", "eplb_greedy", "moetuner"]
    bar_plot(
        out / "moe_pair_traffic.png",
        names,
        {
            s: [
                cases[n]["solvers"][s]["max_pair_traffic"] / cases[n]["solvers"]["eplb_greedy"]["max_pair_traffic"]
                for n in names
            ]
            for s in solvers
        },  # fmt: skip
        ylabel="max pair traffic / EPLB greedy's",
        title="MoETuner-model max GPU-pair traffic (sum over layer transitions), relative to EPLB greedy",
        log=False,
    )
    bar_plot(
        out / "moe_balance.png",
        names,
        {s: [cases[n]["solvers"][s]["max_mean_load"] for n in names] for s in solvers},
        ylabel="per-layer max / mean GPU load (mean over layers)",
        title="load balance (1.0 = perfect)",
        log=False,
    )
    payload = {
        "benchmark": "moe",
        "machine": machine_info(),
        "quick": q,
        "seconds": round(time.perf_counter() - start, 1),
        "synthetic_model": {
            "hot_ratio": HOT_RATIO,
            "affinity": 0.5,
            "concentration": 0.3,
            "shapes": {
                k: dict(zip(("experts", "layers", "top_k", "hidden", "intermediate"), v)) for k, v in SHAPES.items()
            },
            "gpus_per_node": GPUS_PER_NODE,
        },
        "metrics": {
            "max_mean_load": "per-layer max/mean GPU token load, averaged over MoE layers",
            "max_pair_traffic": "sum over layer transitions of the heaviest GPU pair's bandwidth-normalised "
            "token moves (MoETuner's inter-layer model, R[e1,e2,l])",
            "max_link_traffic": "the heaviest GPU pair's normalised traffic summed over all transitions",
            "ep_max_pair_traffic": "standard EP (home -> expert GPU dispatch + combine), same normalisation",
            "est_step_ms": "slowest GPU's expert GEMMs + slowest link per all-to-all (H100 figures)",
        },
        "cases": cases,
        "affinity_sweep": sweep,
        "expert_parallel": ep,
        "exact_optimum": exact,
        "held_out": held,
        "unequal_clusters": unequal,
        "goals": goals,
    }
    path = write_json(out / "moe.json", payload)
    print(f"\nwrote {path} and PNG plots in {out} ({payload['seconds']}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
