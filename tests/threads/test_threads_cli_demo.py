"""`llmsys threads run` on a saved tiny model, and the demo row."""

from __future__ import annotations

import json

import pytest

from llmsys.testing import local_tokenizer, tiny_model
from llmsys.threads import cli
from llmsys.threads.synthetic import synthetic_tree

TOOLS = '''
def calc(expression: str) -> dict:
    """Evaluate an addition."""
    a, b = expression.split("+")
    return {"value": int(a) + int(b)}

def _helper():
    pass
'''


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    tiny_model("qwen2").save_pretrained(path)
    local_tokenizer().save_pretrained(path)
    return path


def test_cli_runs_a_scripted_tree_with_tools(model_dir, tmp_path, capsys):
    tools = tmp_path / "tools.py"
    tools.write_text(TOOLS)
    assert list(cli.load_tools(tools)) == ["calc"]
    script = tmp_path / "tree.json"
    script.write_text(json.dumps(synthetic_tree(depth=2, branching=2, top_tasks=1, tool_every=2)))
    argv = [
        "threads",
        "run",
        "--model",
        str(model_dir),
        "--tools",
        str(tools),
        "--script",
        str(script),
        "--pruning-buffer",
        "0",
        "--system",
        "",
        "What is it?",
    ]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "outcome: answered" in out and "[KV pruned]" in out and "tool calc(" in out and "prunes 1" in out
    assert cli.main([*argv, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["outcome"] == "answered" and result["tool_calls"][0]["result"]["value"] > 0
    assert result["stats"]["prunes"] == 1 and result["pruned_lists"] == [[0]]


def test_cli_outcomes_and_bad_input(model_dir, tmp_path, capsys):
    # an untrained model under the grammar writes valid but endless JSON: truncated, exit code 1
    assert cli.main(["threads", "run", "--model", str(model_dir), "--max-new-tokens", "8", "q"]) == 1
    assert "outcome: truncated" in capsys.readouterr().out
    assert cli.main(["threads", "run", "--model", str(tmp_path / "missing"), "q"]) == 2
    assert "llmsys threads run:" in capsys.readouterr().err
    empty = tmp_path / "empty.py"
    empty.write_text("X = 1\n")
    assert cli.main(["threads", "run", "--model", str(model_dir), "--tools", str(empty), "q"]) == 2
    assert "defines no tools" in capsys.readouterr().err


def test_demo_row():
    from llmsys.threads.demo import demo_row

    row = demo_row()
    assert row["plugin"] == "threads" and row["method"] == "TIMRUN"
    assert row["ok"] is True, row["result"]
    assert "2 tool calls" in row["result"]
