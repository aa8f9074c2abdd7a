"""`llmsys eval` and `llmsys train-reference`: subcommand adders for the llmsys CLI.

    llmsys eval --task needle --method full --lengths 1024,2048,4096
    llmsys eval --task mqar --model analytic --samples 20 --out benchmarks/results
    llmsys eval --task needle --method gemfilter --method-arg layer=1 --method-arg topk=256
    llmsys train-reference --device cuda --minutes 5 --out DIR

`add_parser(subparsers)` and `add_train_parser(subparsers)` each add one subcommand whose
namespace carries ``handler`` (``args.handler(args) -> exit code``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from pathlib import Path
from typing import Any

from llmsys.testing.reference.cli import _floats, _ints, add_train_arguments, run_train

log = logging.getLogger(__name__)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `eval` (and `train-reference`) to an argparse subparsers object."""
    add_train_parser(subparsers)
    p = subparsers.add_parser(
        "eval", help="accuracy / latency / memory of a model on a synthetic long-context task",
        description="Run a task over lengths x depths; print a table, write JSON + a heat map PNG.",
    )
    p.add_argument("--task", default="needle", choices=["needle", "mqar", "vt"])
    p.add_argument("--method", default="full", help="'full' or a registered method name (see --method-arg)")
    p.add_argument("--method-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="a field of the method (JSON value), repeatable")
    p.add_argument("--model", default="reference",
                   help="'reference' (trained), 'analytic' (hand-written), 'tiny' (random) or a weights folder")
    p.add_argument("--lengths", type=_ints, default=(1024, 2048, 4096))
    p.add_argument("--depths", type=_floats, default=(0.0, 0.25, 0.5, 0.75, 1.0))
    p.add_argument("--samples", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="benchmarks/results", help="folder for the JSON and PNG")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=run_eval)
    return p


def add_train_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `train-reference` to an argparse subparsers object."""
    p = subparsers.add_parser(
        "train-reference", help="train the reference retrieval model (see docs/reference-model.md)",
    )
    add_train_arguments(p)
    p.set_defaults(handler=run_train)
    return p


def _load_model(spec: str, device: str):
    from llmsys.testing import tiny_model
    from llmsys.testing.analytic import analytic_retrieval_model
    from llmsys.testing.reference import load_model, reference_model

    if spec == "reference":
        return reference_model(device=device)
    if spec == "analytic":
        return analytic_retrieval_model().to(device)
    if spec == "tiny":
        return tiny_model("llama").to(device)
    if Path(spec).is_dir():
        return load_model(spec, device=device)
    raise SystemExit(f"--model must be reference, analytic, tiny or a weights folder; got {spec!r}")


def _method(name: str, pairs: list[str]) -> Any:
    if name in ("full", "none"):
        if pairs:
            raise SystemExit("--method-arg given for --method full")
        return None
    from llmsys.registry import PLUGINS, UnknownMethodError, get_method

    for plugin in PLUGINS:  # registering happens on import
        try:
            importlib.import_module(f"llmsys.{plugin}")
        except ImportError:
            pass
    kwargs = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--method-arg expects KEY=VALUE, got {pair!r}")
        try:
            kwargs[key] = json.loads(value)
        except json.JSONDecodeError:
            kwargs[key] = value
    try:
        factory = get_method(name)
    except UnknownMethodError as exc:
        raise SystemExit(str(exc)) from None
    from llmsys.eval.runner import context_method

    return context_method(factory(**kwargs), name=name)


def run_eval(args: argparse.Namespace) -> int:
    from llmsys.eval.plots import plot_heatmap
    from llmsys.eval.runner import evaluate, format_table
    from llmsys.testing.reference import ReferenceWeightsMissing

    try:
        model = _load_model(args.model, args.device)
    except ReferenceWeightsMissing as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    method = _method(args.method, args.method_arg)
    result = evaluate(
        model, args.task, method=method, lengths=args.lengths, depths=args.depths, samples=args.samples,
        seed=args.seed, batch_size=args.batch_size, device=args.device, progress=not args.quiet,
    )
    result["model"]["spec"] = args.model
    print(format_table(result))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{args.task}_{args.method}_{args.model if args.model in ('reference', 'analytic', 'tiny') else 'model'}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    plot_heatmap(result, out / f"{stem}.png")
    print(f"wrote {out / (stem + '.json')} and {out / (stem + '.png')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m llmsys.eval.cli eval ...``); `llmsys eval` is the same."""
    parser = argparse.ArgumentParser(prog="llmsys")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
