"""`llmsys moe record|place|evaluate|export` end to end, the demo row, and the example's pipeline."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from llmsys.moe import load_placement, load_trace
from llmsys.moe.cli import add_parser, main
from llmsys.moe.demo import demo_row


def test_record_place_evaluate_export(tmp_path, capsys):
    trace_path = tmp_path / "trace.npz"
    assert main(["moe", "record", "--family", "mixtral", "--experts", "8", "--layers", "3",
                 "--tokens", "96", "--seq-len", "32", "--out", str(trace_path)]) == 0  # fmt: skip
    trace = load_trace(trace_path)
    assert (trace.num_tokens, trace.num_layers, trace.num_experts) == (96, 3, 8)

    place = tmp_path / "placement.json"
    assert main(["moe", "place", str(trace_path), "--gpus", "4", "--time-limit", "3", "--out", str(place)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["solver"] == "moetuner" and load_placement(place).num_gpus == 4

    plot = tmp_path / "eval.png"
    assert main(["moe", "evaluate", str(place), str(trace_path), "--shape", "mixtral", "--json",
                 "--plot", str(plot)]) == 0  # fmt: skip
    report = json.loads(capsys.readouterr().out)
    assert report["max_mean_load"] >= 1.0 and "est_step_ms" in report and plot.exists()

    for fmt, name in (("sglang", "loc.json"), ("vllm", "p2l.pt"), ("vllm-ascend", "map.json")):
        assert main(["moe", "export", str(place), "--format", fmt, "--out", str(tmp_path / name)]) == 0
    p2l = torch.load(tmp_path / "p2l.pt", weights_only=True)
    np.testing.assert_array_equal(p2l.numpy(), load_placement(place).phy2log)


def test_record_real_text_with_the_local_tokenizer(tmp_path):
    from llmsys import testing

    corpus = Path(testing.__file__).with_name("corpus.txt")
    out = tmp_path / "text.npz"
    assert main(["moe", "record", "--family", "olmoe", "--text", str(corpus), "--tokens", "200",
                 "--seq-len", "64", "--out", str(out)]) == 0  # fmt: skip
    assert load_trace(out).num_tokens == 200


def test_record_synthetic_and_imports(tmp_path):
    assert main(["moe", "record", "--synthetic", "mixtral", "--tokens", "50", "--out", str(tmp_path / "s")]) == 0
    assert load_trace(tmp_path / "s.npz").num_layers == 32
    np.save(tmp_path / "routed.npy", np.random.default_rng(0).integers(0, 8, (20, 4, 2)))
    assert main(["moe", "record", "--from-vllm", str(tmp_path / "routed.npy"), "--num-experts", "8",
                 "--out", str(tmp_path / "v.npz")]) == 0  # fmt: skip
    torch.save({"topk_ids_of_layer": torch.randint(0, 8, (4, 20, 2))}, tmp_path / "dump.pt")
    assert main(["moe", "record", "--from-sglang", str(tmp_path / "dump.pt"), "--num-experts", "8",
                 "--out", str(tmp_path / "g.npz")]) == 0  # fmt: skip
    assert load_trace(tmp_path / "g.npz").num_tokens == 20


def test_bad_input_is_one_line_not_a_traceback(tmp_path, capsys):
    trace = tmp_path / "t.npz"
    main(["moe", "record", "--synthetic", "mixtral", "--tokens", "100", "--out", str(trace)])
    place = tmp_path / "p.json"
    main(["moe", "place", str(trace), "--gpus", "4", "--solver", "eplb", "--slots", "12", "--out", str(place)])
    capsys.readouterr()
    assert (
        main(["moe", "export", str(place), "--format", "sglang", "--ep-size", "8", "--out", str(tmp_path / "x.json")])
        == 2
    )
    assert "not divisible by ep_size=8" in capsys.readouterr().err
    assert main(["moe", "evaluate", str(place), str(tmp_path / "missing.npz")]) == 2


def test_add_parser_plugs_into_a_parent_cli():
    parser = argparse.ArgumentParser(prog="llmsys")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["moe", "export", "p.json", "--format", "vllm", "--out", "x.pt"])
    assert args.command == "moe" and args.moe_command == "export" and callable(args.moe_handler)


def test_demo_row():
    row = demo_row()
    assert row["plugin"] == "moe" and row["method"] == "MoETuner" and row["ok"] is True
    assert "max pair traffic" in row["result"]
