"""Command-line front of the reference model: train, evaluate, show.

    python -m llmsys.testing.reference train --device cuda --minutes 5 --out DIR
    python -m llmsys.testing.reference eval [--path DIR] [--lengths 1024,2048,4096]
    python -m llmsys.testing.reference info
    llmsys train-reference ...            (the same options as `train`)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Sequence


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="cpu or cuda (bf16 autocast, large steps)")
    p.add_argument("--minutes", type=float, default=None, help="training time limit (default 60 without --steps)")
    p.add_argument("--steps", type=int, default=None, help="step limit (reproducible runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output folder (default: the user cache, keyed by the recipe hash)")
    p.add_argument("--checkpoint-minutes", type=float, default=1.0)
    p.add_argument("--eval-samples", type=int, default=20, help="needle samples per (length, depth) at the end")
    p.add_argument("--eval-lengths", type=_ints, default=(1024, 2048, 4096))
    p.add_argument("--workers", type=int, default=None,
                   help="data worker processes (default: 0 on cpu, up to 8 on cuda)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument(
        "--set", action="append", default=[], metavar="FIELD=JSON",
        help="override a recipe field, e.g. --set lr=0.001 --set 'lengths=[64,128]' (repeatable)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def recipe_from_args(args: argparse.Namespace):
    from llmsys.testing.reference.train import DEFAULT_RECIPE, Recipe, gpu_recipe

    if str(args.device).startswith("cuda"):
        base = gpu_recipe(args.seed)
    else:
        base = dataclasses.replace(DEFAULT_RECIPE, seed=args.seed)
    if not args.set:
        return base
    data = base.to_dict()
    for item in args.set:
        key, _, value = item.partition("=")
        if not _:
            raise SystemExit(f"--set expects FIELD=VALUE, got {item!r}")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        if key.startswith("mixture."):
            data["mixture"][key.split(".", 1)[1]] = parsed
        else:
            data[key] = parsed
    return Recipe.from_dict(data)


def run_train(args: argparse.Namespace) -> int:
    from llmsys.eval.runner import format_table
    from llmsys.testing.reference import cache_dir
    from llmsys.testing.reference.train import train_reference

    _logging()
    recipe = recipe_from_args(args)
    minutes = args.minutes if (args.minutes is not None or args.steps is not None) else 60.0
    out = args.out or str(cache_dir(recipe))
    logging.getLogger(__name__).info("recipe %s -> %s", recipe.hash(), out)
    summary = train_reference(
        out, device=args.device, minutes=minutes, steps=args.steps, seed=args.seed, recipe=recipe,
        checkpoint_minutes=args.checkpoint_minutes, eval_lengths=args.eval_lengths,
        eval_samples=args.eval_samples, workers=args.workers, threads=args.threads, progress=not args.quiet,
    )
    table = summary.pop("eval")
    print(json.dumps({k: v for k, v in summary.items() if k != "stages"}, indent=2))
    print(format_table(table))
    print(f"wrote {out}")
    return 0


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--path", default=None, help="weights folder (default: the installed reference weights)")
    p.add_argument("--task", default="needle", choices=["needle", "mqar", "vt"])
    p.add_argument("--lengths", type=_ints, default=(1024, 2048, 4096))
    p.add_argument("--depths", type=_floats, default=(0.0, 0.25, 0.5, 0.75, 1.0))
    p.add_argument("--samples", type=int, default=10)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=10)


def run_eval(args: argparse.Namespace) -> int:
    from llmsys.eval.runner import evaluate, format_table
    from llmsys.testing.reference import reference_model

    model = reference_model(path=args.path, device=args.device)
    result = evaluate(model, args.task, lengths=args.lengths, depths=args.depths, samples=args.samples,
                      batch_size=args.batch_size)
    print(format_table(result))
    return 0


def run_info(args: argparse.Namespace) -> int:
    from llmsys.eval.runner import format_markdown
    from llmsys.testing.reference import reference_info

    info = reference_info(args.path)
    if args.markdown:
        recipe = info["recipe"]
        print(f"Trained {recipe.get('steps')} steps ({recipe.get('tokens')} tokens) in "
              f"{recipe.get('train_seconds')} s on {recipe.get('device')}; recipe {recipe.get('hash')}.\n")
        if info["eval"]:
            print(format_markdown(info["eval"]))
            for task, accs in info["eval"].get("extra", {}).items():
                print(f"\n{task}: " + ", ".join(f"{k}: {v}" for k, v in accs.items()))
        return 0
    print(json.dumps(info, indent=2))
    return 0


def _logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmsys.testing.reference", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_arguments(sub.add_parser("train", help="train the reference model"))
    add_eval_arguments(sub.add_parser("eval", help="needle / mqar / vt table of the reference model"))
    p_info = sub.add_parser("info", help="recipe and eval table of the installed weights")
    p_info.add_argument("--path", default=None)
    p_info.add_argument("--markdown", action="store_true", help="the table for docs/reference-model.md")
    args = parser.parse_args(argv)
    return {"train": run_train, "eval": run_eval, "info": run_info}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
