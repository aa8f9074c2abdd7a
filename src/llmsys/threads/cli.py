"""`llmsys threads run`: answer a question with TIMRUN over a local model and Python tools.

    llmsys threads run --model /models/TIM-8b --tools tools.py "How many primes are below 1000?"
    llmsys threads run --model ./tiny --tools tools.py --script tree.json "q"    # forced tokens

``--tools FILE`` is a Python file: its ``TOOLS`` dict (``{name: callable or Tool}``) when it defines
one, else every public function defined in it. ``--script FILE`` forces the tokens of a Response
JSON (tool results come from the real tools), which drives an untrained model through a tree.
The exit code is 0 when the thread answered, 1 for any other outcome (printed), 2 for bad input.

The lead's `llmsys` CLI adds this with `add_parser(subparsers)` and calls `args.threads_handler(args)`;
`python -m llmsys.threads.cli ...` runs it standalone.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `threads` subcommand (``run``) to an argparse subparsers object."""
    threads = subparsers.add_parser("threads", help="TIM/TIMRUN reasoning trees with subtask pruning and tool calls")
    threads.set_defaults(threads_handler=run)
    sub = threads.add_subparsers(dest="threads_command", required=True)
    p = sub.add_parser("run", help="answer a question (prints the tree, the answer and the statistics)")
    p.add_argument("question")
    p.add_argument("--model", required=True, help="local path of a transformers causal LM (and its tokenizer)")
    p.add_argument("--tools", help="Python file with TOOLS = {name: callable} (or public functions)")
    p.add_argument("--script", help="JSON file of a Response whose tokens are forced (tool results are real)")
    p.add_argument("--pruning-buffer", default="2", help="0, 1, 2, ... or 'none' to disable pruning")
    p.add_argument("--max-new-tokens", type=int, default=4096)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-grammar", action="store_true", help="decode without the schema constraint")
    p.add_argument("--tool-timeout", type=float, default=30.0)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--system", help="system prompt (default: the format and the tools)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--json", action="store_true", help="print the whole result as JSON")
    return threads


def load_tools(path: str | Path) -> dict[str, Any]:
    """``TOOLS`` of a Python file, or its public functions defined in that file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tools file {path} does not exist")
    spec = importlib.util.spec_from_file_location(f"llmsys_user_tools_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    tools = getattr(module, "TOOLS", None)
    if tools is None:
        tools = {
            name: fn
            for name, fn in vars(module).items()
            if inspect.isfunction(fn) and not name.startswith("_") and fn.__module__ == module.__name__
        }
    if not isinstance(tools, dict) or not tools:
        raise ValueError(f"{path} defines no tools: add TOOLS = {{'name': function}} or a public function")
    return tools


def run(args: argparse.Namespace) -> int:
    """Handler of `llmsys threads run`; returns the exit code."""
    from llmsys.models import UnsupportedModelError
    from llmsys.threads.errors import ThreadsError

    try:
        return _run(args)
    except (ThreadsError, UnsupportedModelError, FileNotFoundError, ValueError, OSError) as err:
        print(f"llmsys threads {args.threads_command}: {err}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmsys.threads import Sampling, ScriptedPolicy, ThreadRunner
    from llmsys.threads.synthetic import format_tree

    buffer = None if args.pruning_buffer.lower() == "none" else int(args.pruning_buffer)
    tools = load_tools(args.tools) if args.tools else {}
    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True, dtype=dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    runner = ThreadRunner(
        model,
        tokenizer,
        tools=tools,
        pruning_buffer=buffer,
        sampling=Sampling(args.temperature, args.top_p, args.seed),
        max_new_tokens=args.max_new_tokens,
        grammar=not args.no_grammar,
        tool_timeout=args.tool_timeout,
        page_size=args.page_size,
        system=args.system,
        progress=not args.json,
    )
    policy = None
    if args.script:
        policy = ScriptedPolicy.from_tree(tokenizer, json.loads(Path(args.script).read_text()))
    result = runner.run(args.question, policy=policy)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, default=str))
    else:
        s = result.stats
        print(format_tree(result.tree, result.pruned_tasks()))
        print(f"outcome: {result.outcome.value}" + (f" ({result.message})" if result.message else ""))
        print(f"answer: {result.answer}")
        print(
            f"tokens generated {s.tokens_generated}, tool results {s.tokens_injected}, prunes {s.prunes}, "
            f"KV pruned {s.pruned_share:.1%}, largest position {s.max_position}, peak working memory "
            f"{s.peak_working_memory} tokens, tool calls {len(result.tool_calls)}, {s.seconds:.1f} s"
        )
    return 0 if result.ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="llmsys", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.threads_handler(args)


if __name__ == "__main__":
    sys.exit(main())
