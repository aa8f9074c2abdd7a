"""`llmsys serve profile|simulate|run`, the demo row."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from llmsys.serve import Profile
from llmsys.serve.cli import add_parser, main
from llmsys.serve.demo import demo_row


def test_add_parser_plugs_into_a_parent_cli():
    parser = argparse.ArgumentParser(prog="llmsys")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", "simulate", "--rate", "3"])
    assert args.serve_handler is not None and args.rate == 3.0 and args.scheduler == "all"


def test_profile_on_cpu_then_simulate_with_it(tmp_path, capsys):
    out = tmp_path / "cpu.json"
    assert main(["serve", "profile", "--device", "cpu", "--quick", "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["samples"] >= 10 and Profile.load(out).device == summary["device"]
    csv = tmp_path / "trace.csv"
    csv.write_text("prompt_len,output_len\n" + "".join(f"{10 + i},{3 + i % 4}\n" for i in range(12)))
    # a CPU profile does not know the device memory: the CLI gives the simulator a pool
    assert main(["serve", "simulate", "--csv", str(csv), "--rate", "50", "--profile", str(out), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["results"]
    assert [r["scheduler"] for r in rows] == ["fcfs", "chunked", "static", "nexus"]
    assert all(r["ttft_p99"] > 0 and r["tbt_p99"] > 0 for r in rows)


def test_simulate_default_profile_table(capsys):
    assert main(["serve", "simulate", "--scheduler", "nexus", "--num-requests", "40", "--rate", "8"]) == 0
    text = capsys.readouterr().out
    assert "h100-llama3-8b-shape" in text and "nexus" in text


def test_run_the_engine(capsys):
    assert main(["serve", "run", "--requests", "3", "--max-new-tokens", "4", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["requests"]) == 3 and all(r["tokens"] == 4 for r in data["requests"])
    assert "logical" in data["execution"] or "CUDA" in data["execution"] or "SM" in data["execution"]


def test_bad_input_is_one_line_not_a_traceback(tmp_path, capsys):
    assert main(["serve", "simulate", "--profile", str(tmp_path / "none.json")]) == 2
    assert "llmsys serve profile" in capsys.readouterr().err
    assert main(["serve", "simulate", "--dataset", "wiki"]) == 2
    assert "unknown dataset" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["serve", "profile", "--device", "cuda", "--out", str(tmp_path / "p.json")]) == 2
        assert "--device cpu" in capsys.readouterr().err


def test_demo_row():
    row = demo_row()
    assert row["plugin"] == "serve" and row["method"] == "Nexus" and row["ok"] is True
    assert "6/6" in row["result"] and "P99 TBT" in row["result"]


@pytest.mark.parametrize("argv", [["serve"], ["serve", "simulate", "--scheduler", "sjf"]])
def test_usage_errors_exit_2(argv):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
