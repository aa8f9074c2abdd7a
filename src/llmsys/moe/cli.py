"""`llmsys moe record|place|evaluate|export`: the MoETuner pipeline from the command line.

    llmsys moe record --family mixtral --experts 8 --layers 8 --out trace.npz   # tiny model
    llmsys moe record --model /path/to/Mixtral --tokens 4096 --out trace.npz    # local HF checkpoint
    llmsys moe record --synthetic mixtral --tokens 8192 --out trace.npz         # real shape, synthetic
    llmsys moe record --from-vllm routed.npy --num-experts 8 --out trace.npz    # engine dumps
    llmsys moe place trace.npz --gpus 4 --solver moetuner --out placement.json
    llmsys moe evaluate placement.json trace.npz --shape mixtral --plot eval.png
    llmsys moe export placement.json --format sglang --out init_expert_location.json

The lead's `llmsys` CLI adds this with `add_parser(subparsers)` and calls `args.moe_handler(args)`;
`python -m llmsys.moe.cli ...` runs it standalone.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `moe` subcommand (record | place | evaluate | export) to an argparse subparsers object."""
    moe = subparsers.add_parser("moe", help="MoETuner expert placement: record, place, evaluate, export")
    moe.set_defaults(moe_handler=run)
    sub = moe.add_subparsers(dest="moe_command", required=True)

    rec = sub.add_parser("record", help="record a routing trace (tiny model, local checkpoint, synthetic, or import)")
    src = rec.add_mutually_exclusive_group(required=True)
    src.add_argument("--family", help="tiny random model of this family (mixtral, qwen2_moe, qwen3_moe, olmoe)")
    src.add_argument("--model", help="path of a local transformers MoE checkpoint")
    src.add_argument("--synthetic", help="synthetic trace at a real shape: mixtral, qwen3_moe, deepseek_v3")
    src.add_argument("--from-vllm", help=".npy/.npz/.pt of vLLM routed_experts [seq, layers, topk]")
    src.add_argument("--from-sglang", nargs="+", help="SGLang per-token dump(s) with topk_ids_of_layer")
    rec.add_argument("--num-experts", type=int, help="experts per layer (for --from-vllm/--from-sglang)")
    rec.add_argument("--experts", type=int, help="tiny model: experts per layer")
    rec.add_argument("--layers", type=int, help="tiny model: decoder layers")
    rec.add_argument("--tokens", type=int, default=1024, help="tokens to record (batch x seq-len for models)")
    rec.add_argument("--seq-len", type=int, default=128)
    rec.add_argument("--text", help="model: tokenise this text file instead of random token ids")
    rec.add_argument("--skew", type=float, default=None, help="synthetic: Zipf exponent (default: hottest = 3x mean)")
    rec.add_argument("--affinity", type=float, default=0.5, help="synthetic: inter-layer affinity in [0, 1]")
    rec.add_argument("--seed", type=int, default=0)
    rec.add_argument("--out", required=True)

    place = sub.add_parser("place", help="solve a placement from a trace")
    place.add_argument("trace")
    place.add_argument("--gpus", type=int, required=True)
    place.add_argument("--nodes", type=int, default=1)
    place.add_argument("--solver", default="moetuner", choices=["moetuner", "eplb", "contiguous", "round_robin"])
    place.add_argument("--slots", type=int, help="eplb: physical slots per layer (> experts = replicas)")
    place.add_argument("--time-limit", type=float, default=60.0, help="moetuner: seconds")
    place.add_argument("--method", default="auto", choices=["auto", "ilp", "heuristic"], help="moetuner")
    place.add_argument("--refine", default="auto", choices=["auto", "layer_ilp", "swaps", "none"], help="moetuner")
    place.add_argument(
        "--unequal", action="store_true", help="moetuner: allow unequal experts per GPU (not deployable)"
    )
    place.add_argument("--out", required=True)

    ev = sub.add_parser("evaluate", help="load balance, GPU-pair traffic and estimated step time")
    ev.add_argument("placement")
    ev.add_argument("trace")
    ev.add_argument("--shape", help="hardware figures of a real shape (mixtral, qwen3_moe, deepseek_v3)")
    ev.add_argument("--hidden", type=int, help="hidden size (instead of --shape)")
    ev.add_argument("--intermediate", type=int, help="expert intermediate size (instead of --shape)")
    ev.add_argument("--plot", help="write a PNG (per-layer balance + pair-traffic heatmap)")
    ev.add_argument("--json", action="store_true")

    ex = sub.add_parser("export", help="write a placement for SGLang, vLLM or vLLM-Ascend")
    ex.add_argument("placement")
    ex.add_argument("--format", required=True, choices=["sglang", "vllm", "vllm-ascend"])
    ex.add_argument("--ep-size", type=int)
    ex.add_argument("--out", required=True)
    return moe


def _record(args: argparse.Namespace):
    import numpy as np
    import torch

    from llmsys.moe.trace import RoutingRecorder, RoutingTrace, synthetic_shape_trace

    if args.synthetic:
        return synthetic_shape_trace(
            args.synthetic, args.tokens, skew=args.skew, affinity=args.affinity, seed=args.seed
        )
    if args.from_vllm or args.from_sglang:
        if not args.num_experts:
            raise SystemExit("--num-experts is required with --from-vllm / --from-sglang")
        if args.from_sglang:
            return RoutingTrace.from_sglang(args.from_sglang, args.num_experts)
        path = Path(args.from_vllm)
        data = torch.load(path, weights_only=True) if path.suffix == ".pt" else np.load(path)
        if hasattr(data, "files"):  # .npz: every array is one request
            data = [data[k] for k in data.files]
        return RoutingTrace.from_vllm(data, args.num_experts)
    from llmsys.models import forward

    if args.family:
        from llmsys.testing import tiny_model

        overrides: dict[str, Any] = {}
        if args.layers:
            overrides["num_hidden_layers"] = args.layers
        if args.experts:
            overrides["num_local_experts" if args.family == "mixtral" else "num_experts"] = args.experts
        model = tiny_model(args.family, seed=args.seed, **overrides)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True).eval()
    seq = min(args.seq_len, args.tokens)
    batch = max(1, args.tokens // seq)
    if args.text:  # real text: the checkpoint's tokenizer, or the tiny models' local one
        if args.model:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
        else:
            from llmsys.testing import local_tokenizer

            tok = local_tokenizer()
        ids = tok(Path(args.text).read_text(), return_tensors="pt").input_ids[:, : args.tokens]
        batches = [chunk[None] for chunk in ids[0].split(seq)]  # one sequence per seq-len tokens
    else:
        gen = torch.Generator().manual_seed(args.seed)
        ids = torch.randint(3, model.config.vocab_size, (batch, seq), generator=gen)
        batches = list(ids.split(8))
    with torch.no_grad(), RoutingRecorder(model) as rec:
        for chunk in batches:
            forward(model, chunk)
    return rec.trace()


def run(args: argparse.Namespace) -> int:
    """Handler of `llmsys moe ...`; returns the exit code (2 with a one-line message on bad input)."""
    from llmsys.models import UnsupportedModelError
    from llmsys.moe.errors import PlacementError, TraceError

    try:
        return _run(args)
    except (PlacementError, TraceError, UnsupportedModelError, FileNotFoundError) as err:
        print(f"llmsys moe {args.moe_command}: {err}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from llmsys.moe import SOLVERS, Hardware, MoETuner, Topology, evaluate, export, load_placement, load_trace

    cmd = args.moe_command
    if cmd == "record":
        trace = _record(args)
        path = trace.save(args.out)
        print(
            f"recorded {trace.num_tokens} tokens x {trace.num_layers} MoE layers x top-{trace.top_k} "
            f"of {trace.num_experts} experts -> {path}"
        )
        stats = trace.stats()
        print(
            f"hottest expert / mean: {stats['hot_ratio']:.2f} (worst layer {stats['hot_ratio_max']:.2f}); "
            f"inter-layer mutual information {stats['interlayer_mi']:.4f} nats "
            f"(independent layers would read {stats['interlayer_mi_shuffled']:.4f})"
        )
        return 0
    if cmd == "place":
        trace = load_trace(args.trace)
        topo = Topology.make(args.gpus, args.nodes)
        if args.solver == "moetuner":
            solver = MoETuner(
                topo,
                equal_per_gpu=not args.unequal,
                method=args.method,
                refine=args.refine,
                time_limit=args.time_limit,
                progress=True,
            )
        elif args.solver == "eplb":
            solver = SOLVERS["eplb"](topo, num_slots=args.slots)
        else:
            solver = SOLVERS[args.solver](topo)
        placement = solver(trace)
        placement.save(args.out)
        summary = evaluate(placement, trace, ep_homes=False).summary()
        print(json.dumps({**summary, "out": args.out}))
        return 0
    if cmd == "evaluate":
        placement, trace = load_placement(args.placement), load_trace(args.trace)
        hw = None
        if args.shape:
            hw = Hardware.for_shape(args.shape)
        elif args.hidden and args.intermediate:
            hw = Hardware(args.hidden, args.intermediate)
        report = evaluate(placement, trace, hw)
        if args.plot:
            from llmsys.moe.evaluate import plot_reports

            plot_reports({report.solver: report}, args.plot)
        summary = report.summary()
        if args.json:
            print(json.dumps(summary))
        else:
            for key, value in summary.items():
                print(f"{key:28s} {value}")
        return 0
    if cmd == "export":
        path = export(load_placement(args.placement), args.format, args.out, args.ep_size)
        print(f"wrote {args.format} placement -> {path}")
        return 0
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="llmsys", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.moe_handler(args)


if __name__ == "__main__":
    sys.exit(main())
