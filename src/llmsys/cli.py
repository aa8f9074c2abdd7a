"""The `llmsys` command: info, demo, and the subcommands each plug-in adds (moe, eval, threads, serve)."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import platform
import sys
from collections.abc import Sequence


def _version(name: str) -> str:
    try:
        return importlib.import_module(name).__version__
    except Exception:  # missing or broken optional dependency: report, don't crash `info`
        return "not installed"


def info() -> dict:
    import torch

    from llmsys import kernels
    from llmsys.registry import PLUGINS

    if torch.cuda.is_available():
        device = torch.cuda.get_device_name(0)
    else:
        device = f"cpu ({platform.processor() or platform.machine()})"
    plugins = {}
    for name, (paper, _) in PLUGINS.items():
        found = importlib.util.find_spec(f"llmsys.{name}") is not None
        plugins[name] = f"{paper}: {'available' if found else 'not yet implemented'}"
    return {
        "llmsys": _version("llmsys"),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "transformers": _version("transformers"),
        "triton": _version("triton"),
        "device": device,
        "plugins": plugins,
        "kernels": kernels.available_ops(),
    }


def _print_info(as_json: bool) -> None:
    data = info()
    if as_json:
        print(json.dumps(data, indent=2))
        return
    for key in ("llmsys", "python", "torch", "transformers", "triton", "device"):
        print(f"{key:13s} {data[key]}")
    print("plug-ins")
    for name, status in data["plugins"].items():
        print(f"  {name:11s} {status}")
    print("kernels")
    for name, backend in data["kernels"].items():
        print(f"  {name:28s} {backend}")


#: modules whose `add_parser(subparsers)` adds a plug-in's subcommands (setting a `*handler` default)
PLUGIN_CLIS = ("llmsys.eval.cli", "llmsys.moe.cli", "llmsys.threads.cli", "llmsys.serve.cli", "llmsys.filter.cli")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llmsys", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="versions, device, available plug-ins and kernels")
    p_info.add_argument("--json", action="store_true")
    p_demo = sub.add_parser("demo", help="one row per plug-in: a tiny model through each method")
    p_demo.add_argument("--json", action="store_true")
    for module in PLUGIN_CLIS:  # each plug-in adds its own subcommands, if it is installed
        try:
            importlib.import_module(module).add_parser(sub)
        except ModuleNotFoundError as exc:
            if not (exc.name and module.startswith(exc.name)):
                raise
    args = parser.parse_args(argv)
    handler = next((v for k, v in vars(args).items() if k.endswith("handler") and callable(v)), None)
    if handler is not None:
        return int(handler(args) or 0)

    if args.command == "info":
        _print_info(args.json)
        return 0
    if args.command == "demo":
        from llmsys.demo import run_demo

        return run_demo(as_json=args.json)
    return 2


if __name__ == "__main__":
    sys.exit(main())
