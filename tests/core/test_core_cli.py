"""The CLI, the demo table and the method registry."""

from __future__ import annotations

import json

import pytest

from llmsys import cli, demo
from llmsys.registry import PLUGINS, UnknownMethodError, get_method, list_methods, register_method


def test_info_json_lists_versions_plugins_and_kernels(capsys):
    assert cli.main(["info", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["torch"] != "not installed" and data["transformers"].startswith("5.")
    assert set(data["plugins"]) == set(PLUGINS)
    assert "paged_decode_attention" in data["kernels"]


def test_cache_demo_row_agrees_with_dynamic_cache():
    row = demo.cache_row(new_tokens=8)
    assert row["ok"] is True, row


def test_unimplemented_plugin_row_is_neutral(monkeypatch):
    monkeypatch.setitem(PLUGINS, "nothing_here", ("Nothing", "a plug-in that does not exist"))
    row = demo._plugin_row("nothing_here")
    assert row["ok"] is None and "not yet implemented" in row["result"]


def test_registry_round_trip_and_errors():
    class Method:
        pass

    register_method("test-only-method", plugin="core")(Method)
    assert get_method("test-only-method") is Method
    assert any(e.name == "test-only-method" for e in list_methods())
    with pytest.raises(ValueError, match="already registered"):
        register_method("test-only-method", plugin="core")(type("Other", (), {}))
    with pytest.raises(ValueError, match="unknown plug-in"):
        register_method("x", plugin="nope")
    with pytest.raises(UnknownMethodError, match="no method named 'missing'"):
        get_method("missing")
