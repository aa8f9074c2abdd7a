"""The Response schema with tool parameter schemas, and the grammar compiled from it."""

from __future__ import annotations

import pytest
from pydantic import BaseModel

from llmsys.testing import local_tokenizer
from llmsys.threads import Tool, ToolSpecError, normalize_tools, response_schema, system_prompt
from llmsys.threads.grammar import ResponseGrammar, allowed_tokens
from llmsys.threads.policies import script_pieces
from llmsys.threads.synthetic import calculator, synthetic_tree


class Search(BaseModel):
    query: str
    top_k: int = 3


def search(args: Search) -> list[str]:
    """Search the notes."""
    return [args.query] * args.top_k


def lookup(key: str, default: dict | None = None, *, exact: bool = True) -> str:
    return key


@pytest.fixture(scope="module")
def tok():
    return local_tokenizer()


def test_tool_schemas_from_signature_pydantic_and_dict():
    tools = normalize_tools(
        {
            "calc": calculator,
            "search": Tool(search, parameters=Search),
            "lookup": lookup,
            "raw": Tool(lambda **kw: kw, parameters={"type": "object", "properties": {"x": {}}}),
        }
    )
    assert tools["calc"].schema["properties"] == {"expression": {"type": "string"}}
    assert tools["calc"].schema["required"] == ["expression"]
    assert tools["calc"].description.startswith("Evaluate an arithmetic expression")
    assert tools["lookup"].schema["properties"]["exact"] == {"type": "boolean"}
    assert tools["lookup"].schema["required"] == ["key"]
    assert tools["search"].invoke({"query": "q", "top_k": 2}) == ["q", "q"]
    assert tools["search"].description == "Search the notes."
    schema = response_schema(tools)
    alternatives = schema["$defs"]["Task"]["properties"]["tooluse"]["anyOf"]
    assert [a["properties"]["tool_name"]["const"] for a in alternatives] == ["calc", "search", "lookup", "raw"]
    raw_params = alternatives[3]["properties"]["parameters"]
    assert raw_params["properties"]["x"] == {"$ref": "#/$defs/JSON"}  # "any value" made explicit
    assert list(schema["$defs"]["Task"]["properties"]) == ["thought", "tooluse", "subtasks", "conclusion"]
    assert "tooluse" not in response_schema({})["$defs"]["Task"]["properties"]
    prompt = system_prompt(tools)
    assert "- calc: Evaluate an arithmetic expression" in prompt and '"top_k"' in prompt


def test_bad_tool_specs_name_the_fix():
    with pytest.raises(ToolSpecError, match="not callable"):
        normalize_tools({"x": 3})
    with pytest.raises(ToolSpecError, match="tool name"):
        normalize_tools({"bad name!": calculator})
    with pytest.raises(ToolSpecError, match="pydantic model class or a JSON-schema dict"):
        Tool(calculator, parameters=42)
    with pytest.raises(ToolSpecError, match="must describe a JSON object"):
        Tool(calculator, parameters={"type": "string"})


def test_grammar_accepts_scripted_trees_and_refuses_the_rest(tok):
    tools = normalize_tools({"calc": calculator, "search": Tool(search, parameters=Search)})
    grammar = ResponseGrammar(tok, 512, response_schema(tools))
    tree = synthetic_tree(depth=2, branching=2, tool_every=2)
    pieces = script_pieces(tree)
    m = grammar.matcher()
    for i, piece in enumerate(pieces):
        for t in tok.encode(piece, add_special_tokens=False):
            assert m.accept_token(t), (piece, t)
        if i < len(pieces) - 1:  # the runtime's compact tool result, nested values included
            assert m.accept_string(',"tool_result":[1,{"a":null,"b":[true,"x",-2.5e3]},{}]')
    assert m.is_terminated()
    # an unknown tool name, whitespace, and fields out of order are refused
    for text in [
        '{"reasoning":[{"thought":"a","tooluse":{"tool_name":"nope"',
        '{ "reasoning"',
        '{"reasoning":[{"conclusion"',
    ]:
        assert not grammar.matcher().accept_string(text)
    # the mask allows exactly what the matcher accepts
    m = grammar.matcher()
    m.accept_string('{"reasoning":[{"thought":"a"')
    mask = grammar.bitmask(1)
    grammar.fill(m, mask, 0)
    allowed = allowed_tokens(mask, 512)[0]
    for t in range(4, 512):
        probe = grammar.matcher()
        probe.accept_string('{"reasoning":[{"thought":"a"')
        assert bool(allowed[t]) == probe.accept_token(t)
