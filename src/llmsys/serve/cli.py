"""`llmsys serve profile|simulate|run`: the Nexus plug-in from the command line.

    llmsys serve profile --out profile.json                  # CUDA: measure and fit a cost-model profile
    llmsys serve profile --device cpu --out cpu.json          # CPU: the tiny model the CPU engine runs
    llmsys serve simulate --scheduler all --dataset sharegpt --rate 20 --num-requests 500
    llmsys serve simulate --scheduler nexus --csv trace.csv --rate 5 --profile profile.json --json
    llmsys serve run --family llama --requests 8 --scheduler nexus   # the real engine on a tiny model

The lead's `llmsys` CLI adds this with `add_parser(subparsers)` and calls `args.serve_handler(args)`;
`python -m llmsys.serve.cli serve ...` runs it standalone.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

SCHEDULER_CHOICES = ["fcfs", "chunked", "static", "nexus", "all"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `serve` subcommand (profile | simulate | run) to an argparse subparsers object."""
    serve = subparsers.add_parser("serve", help="Nexus serving: profile a device, simulate schedulers, run the engine")
    serve.set_defaults(serve_handler=run)
    sub = serve.add_subparsers(dest="serve_command", required=True)

    prof = sub.add_parser("profile", help="measure a cost-model profile (GPU: 8B-shaped model; CPU: tiny model)")
    prof.add_argument("--out", required=True, help="JSON file to write")
    prof.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    prof.add_argument("--layers", type=int, default=8, help="cuda: decoder layers of the 8B-shaped model")
    prof.add_argument("--family", default="llama", help="cpu: tiny model family")
    prof.add_argument("--quick", action="store_true", help="fewer samples")

    sim = sub.add_parser("simulate", help="simulate schedulers on a synthetic or CSV workload")
    sim.add_argument("--scheduler", default="all", choices=SCHEDULER_CHOICES)
    src = sim.add_mutually_exclusive_group()
    src.add_argument("--dataset", default="sharegpt", help="sharegpt | longbench | arxiv")
    src.add_argument("--csv", help="CSV with prompt_len,output_len[,arrival]")
    sim.add_argument("--rate", type=float, default=10.0, help="requests/s (Poisson)")
    sim.add_argument("--num-requests", type=int, default=500)
    sim.add_argument("--profile", help="profile JSON (default: the 8B-on-H100-shaped default profile)")
    sim.add_argument("--ttft-slo", type=float, default=1.0, help="seconds")
    sim.add_argument("--tbt-slo", type=float, default=0.1, help="seconds")
    sim.add_argument("--token-budget", type=int, default=2048, help="chunked prefill's token budget")
    sim.add_argument("--max-num-seqs", type=int, default=None,
                     help="requests admitted at once (default: vLLM's for the profile's device, 1024 on an H100)")
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--json", action="store_true")

    eng = sub.add_parser("run", help="the real engine on a tiny random model: concurrent requests, timings")
    eng.add_argument("--family", default="llama")
    eng.add_argument("--scheduler", default="nexus", choices=SCHEDULER_CHOICES[:-1])
    eng.add_argument("--requests", type=int, default=8)
    eng.add_argument("--max-new-tokens", type=int, default=16)
    eng.add_argument("--seed", type=int, default=0)
    eng.add_argument("--json", action="store_true")
    return serve


def run(args: argparse.Namespace) -> int:
    """Handler of `llmsys serve ...`; returns the exit code (2 with a one-line message on bad input)."""
    from llmsys.models import UnsupportedModelError
    from llmsys.serve.errors import ServeError

    try:
        return _run(args)
    except (ServeError, UnsupportedModelError, ValueError, FileNotFoundError) as err:
        print(f"llmsys serve {args.serve_command}: {err}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.serve_command == "profile":
        return _profile(args)
    if args.serve_command == "simulate":
        return _simulate(args)
    return _engine(args)


def _profile(args: argparse.Namespace) -> int:
    import torch

    from llmsys.serve.errors import GPUUnavailableError
    from llmsys.serve.profile import profile_cpu, profile_gpu

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise GPUUnavailableError("--device cuda: no CUDA device here; use --device cpu")
        profile = profile_gpu(layers=args.layers, quick=args.quick)
    else:
        torch.set_num_threads(1)  # a tiny model: threads only add noise
        profile = profile_cpu(family=args.family, quick=args.quick)
    path = profile.save(args.out)
    fit = profile.fit
    print(
        json.dumps(
            {
                "out": str(path),
                "device": profile.device,
                "samples": len(fit.get("samples", [])),
                "median_abs_rel_error": fit.get("median_abs_rel_error"),
                "max_abs_rel_error": fit.get("max_abs_rel_error"),
            }
        )
    )
    return 0


def _simulate(args: argparse.Namespace) -> int:
    from llmsys.serve.costmodel import CostModel, Profile, default_profile
    from llmsys.serve.schedulers import ChunkedPrefill, FCFSPrefillFirst, Nexus, StaticSplit
    from llmsys.serve.simulator import simulate
    from llmsys.serve.workload import load_csv_workload, synthetic_workload

    profile = Profile.load(args.profile) if args.profile else default_profile()
    if args.csv:
        workload = load_csv_workload(args.csv, rate=args.rate, num_requests=args.num_requests, seed=args.seed)
    else:
        workload = synthetic_workload(args.dataset, args.rate, args.num_requests, seed=args.seed)
    cost = CostModel(profile)
    factories = {
        "fcfs": lambda: FCFSPrefillFirst(),
        "chunked": lambda: ChunkedPrefill(token_budget=args.token_budget),
        "static": lambda: StaticSplit(),
        "nexus": lambda: Nexus(cost_model=cost, ttft_slo=args.ttft_slo, tbt_slo=args.tbt_slo),
    }
    names = list(factories) if args.scheduler == "all" else [args.scheduler]
    num_pages = None if profile.memory_bytes else 4096
    rows = []
    for name in names:
        res = simulate(
            factories[name](), workload, cost, ttft_slo=args.ttft_slo, tbt_slo=args.tbt_slo, num_pages=num_pages,
            max_num_seqs=args.max_num_seqs,
        )
        m = res.metrics
        rows.append({"scheduler": name, **m.row()})
    if args.json:
        print(json.dumps({"profile": profile.name, "rate": args.rate, "results": rows}, indent=2))
        return 0
    print(f"profile: {profile.name}; {len(workload)} requests at {args.rate} req/s")
    cols = ["scheduler", "ttft_p50", "ttft_p99", "tbt_p50", "tbt_p99", "throughput_rps", "slo_attainment", "meets_slo"]
    print("  ".join(f"{c:>14s}" for c in cols))
    for r in rows:
        print("  ".join(f"{r[c]:>14.4g}" if isinstance(r[c], float) else f"{r[c]!s:>14s}" for c in cols))
    return 0


def _engine(args: argparse.Namespace) -> int:
    import torch

    from llmsys.serve.engine import Engine
    from llmsys.serve.request import SamplingParams
    from llmsys.testing import tiny_model

    torch.set_num_threads(1)
    model = tiny_model(args.family, seed=args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    lengths = torch.randint(4, 128, (args.requests,), generator=gen).tolist()
    prompts = [torch.randint(3, model.config.vocab_size, (n,), generator=gen) for n in lengths]
    engine = Engine(model, args.scheduler, page_size=16, num_pages=1024)
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=args.max_new_tokens, ignore_eos=True))
    engine.check()
    engine.close()
    rows = [
        {"request": o.request_id, "prompt_len": len(o.prompt), "tokens": len(o.tokens), "ttft_ms": o.ttft * 1e3}
        for o in outs
    ]
    if args.json:
        print(json.dumps({"execution": engine.execution.describe(), "requests": rows}, indent=2))
    else:
        print(engine.execution.describe())
        for r in rows:
            print(
                f"{r['request']:>8s}  prompt {r['prompt_len']:4d}  tokens {r['tokens']:3d}  TTFT {r['ttft_ms']:8.1f} ms"
            )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llmsys")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.serve_handler(args)


if __name__ == "__main__":
    sys.exit(main())
