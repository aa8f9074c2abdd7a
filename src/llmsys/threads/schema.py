"""The TIM output format: a JSON reasoning tree, extensible with the tools' parameter schemas.

    Response = {"reasoning": [Task], "answer": str}
    Task     = {"thought": str, "tooluse"?: {"tool_name", "parameters", "tool_result"},
                "subtasks"?: [Task], "conclusion": str}                      (fields in this order)

`response_schema(tools)` gives the JSON schema the grammar is compiled from: ``tooluse`` is one
alternative per tool (``tool_name`` is the tool's name as a constant, ``parameters`` its schema),
and ``tool_result`` is any JSON value (the runtime writes it, never the model).

A tool is a Python callable. Its parameter schema comes from, in order: a pydantic model given as
``Tool(parameters=Model)``, a JSON-schema dict given the same way, or the callable's signature
(``str`` -> string, ``int`` -> integer, ``float`` -> number, ``bool`` -> boolean, lists, dicts,
anything else -> any JSON value).
"""

from __future__ import annotations

import copy
import inspect
import json
import re
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from llmsys.threads.errors import ToolSpecError

#: the fields of a Task, in the order the grammar imposes
TASK_FIELDS = ("thought", "tooluse", "subtasks", "conclusion")
TOOLUSE_FIELDS = ("tool_name", "parameters", "tool_result")

# Any JSON value, spelled out as a recursive schema. xgrammar 0.2.8 writes its built-in "any value"
# rule with ", " separators even when compact separators are asked for, so an unconstrained value
# (``{}``) would refuse compact JSON like [1,2]; this definition follows the chosen separators.
ANY_JSON_REF = {"$ref": "#/$defs/JSON"}
_ANY_JSON_DEF: dict[str, Any] = {
    "anyOf": [
        {"type": "string"},
        {"type": "number"},
        {"type": "boolean"},
        {"type": "null"},
        {"type": "array", "items": ANY_JSON_REF},
        {"type": "object", "additionalProperties": ANY_JSON_REF},
    ]
}

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")


@dataclass
class Tool:
    """A tool the model may call: ``fn(**parameters)`` (or ``fn(model_instance)``), returning JSON-able data.

    Args:
        fn: the Python callable.
        parameters: a pydantic model class or a JSON schema of the ``parameters`` object
            (default: derived from ``fn``'s signature).
        description: shown to the model in the system prompt (default: the first line of the docstring).
        name: set by the runner from the key of the ``tools`` mapping.
    """

    fn: Callable[..., Any]
    parameters: Any = None
    description: str | None = None
    name: str = ""
    schema: dict[str, Any] = field(init=False, repr=False, default_factory=dict)
    model: Any = field(init=False, repr=False, default=None)  # the pydantic model, if any

    def __post_init__(self) -> None:
        if not callable(self.fn):
            raise ToolSpecError(f"tool {self.name or '?'}: {self.fn!r} is not callable; pass a function")
        if self.description is None:
            doc = inspect.getdoc(self.fn) or ""
            self.description = doc.strip().splitlines()[0] if doc.strip() else ""
        params = self.parameters
        if params is None:
            self.schema = signature_schema(self.fn)
        elif isinstance(params, dict):
            self.schema = copy.deepcopy(params)
        elif hasattr(params, "model_json_schema"):
            self.model = params
            self.schema = params.model_json_schema()
        else:
            raise ToolSpecError(
                f"tool {self.name or '?'}: parameters must be a pydantic model class or a JSON-schema dict, "
                f"got {type(params).__name__}"
            )
        if self.schema.get("type", "object") != "object":
            raise ToolSpecError(
                f"tool {self.name or '?'}: the parameters schema must describe a JSON object "
                f"(got type {self.schema.get('type')!r}); wrap the value in an object property"
            )

    def invoke(self, parameters: Any) -> Any:
        """Call the tool with the parsed ``parameters`` (validated by the pydantic model when there is one)."""
        if self.model is not None:
            instance = self.model.model_validate(parameters)
            sig = inspect.signature(self.fn)
            hints = _hints(self.fn)
            params = list(sig.parameters.values())
            if len(params) == 1 and hints.get(params[0].name) is self.model:
                return self.fn(instance)
            return self.fn(**instance.model_dump())
        if isinstance(parameters, dict):
            return self.fn(**parameters)
        return self.fn(parameters)


def normalize_tools(tools: Mapping[str, Callable[..., Any] | Tool] | None) -> dict[str, Tool]:
    """``{name: callable | Tool}`` -> ``{name: Tool}`` with checked names."""
    out: dict[str, Tool] = {}
    for name, spec in (tools or {}).items():
        if not isinstance(name, str) or not _NAME.match(name):
            raise ToolSpecError(
                f"tool name {name!r} is not usable: use letters, digits, '_', '.', '-' (1-64 characters, "
                "starting with a letter or '_')"
            )
        tool = spec if isinstance(spec, Tool) else Tool(spec, name=name)
        tool.name = name
        out[name] = tool
    return out


def response_schema(tools: Mapping[str, Tool] | None = None) -> dict[str, Any]:
    """The JSON schema of a Response whose tasks may call `tools` (no ``tooluse`` field without tools)."""
    defs: dict[str, Any] = {"JSON": _ANY_JSON_DEF}
    task_props: dict[str, Any] = {"thought": {"type": "string"}}
    alternatives = []
    for name, tool in (tools or {}).items():
        params = _hoist_defs(tool.schema, name, defs)
        alternatives.append(
            {
                "type": "object",
                "properties": {"tool_name": {"const": name}, "parameters": params, "tool_result": ANY_JSON_REF},
                "required": list(TOOLUSE_FIELDS),
                "additionalProperties": False,
            }
        )
    if alternatives:
        task_props["tooluse"] = alternatives[0] if len(alternatives) == 1 else {"anyOf": alternatives}
    task_props["subtasks"] = {"type": "array", "items": {"$ref": "#/$defs/Task"}}
    task_props["conclusion"] = {"type": "string"}
    defs["Task"] = {
        "type": "object",
        "properties": task_props,
        "required": ["thought", "conclusion"],
        "additionalProperties": False,
    }
    return {
        "type": "object",
        "properties": {"reasoning": {"type": "array", "items": {"$ref": "#/$defs/Task"}}, "answer": {"type": "string"}},
        "required": ["reasoning", "answer"],
        "additionalProperties": False,
        "$defs": defs,
    }


DEFAULT_INSTRUCTIONS = (
    "Solve the problem by writing one JSON object, a reasoning tree:\n"
    '{"reasoning":[Task,...],"answer":"..."} where Task = {"thought":"...","tooluse":{...},'
    '"subtasks":[Task,...],"conclusion":"..."} (tooluse and subtasks are optional).\n'
    "thought: check the earlier steps and plan. tooluse: call a tool; its result appears in tool_result. "
    "subtasks: solve a part of the task recursively. conclusion: what this task found, using the tool "
    "result and the subtasks' conclusions. The details of finished subtasks are forgotten: put what "
    "later steps need into conclusions."
)


def system_prompt(tools: Mapping[str, Tool] | None = None, instructions: str = DEFAULT_INSTRUCTIONS) -> str:
    """The default system prompt: the format, then one line per tool (name, description, parameters)."""
    lines = [instructions]
    if tools:
        lines.append('Tools (tooluse = {"tool_name":...,"parameters":{...}}):')
        for name, tool in tools.items():
            params = json.dumps(tool.schema.get("properties", {}), separators=(",", ":"))
            lines.append(f"- {name}: {tool.description} parameters: {params}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# signature -> schema
def signature_schema(fn: Callable[..., Any]) -> dict[str, Any]:
    """A JSON schema of the keyword arguments of ``fn`` (from its annotations and defaults)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError) as exc:
        raise ToolSpecError(f"cannot read the signature of {fn!r} ({exc}); pass Tool(fn, parameters=...)") from None
    hints = _hints(fn)
    props: dict[str, Any] = {}
    required: list[str] = []
    extra = False
    for p in sig.parameters.values():
        if p.kind is p.VAR_KEYWORD:
            extra = True
            continue
        if p.kind is p.VAR_POSITIONAL or p.kind is p.POSITIONAL_ONLY:
            continue
        props[p.name] = _type_schema(hints.get(p.name, p.annotation))
        if p.default is p.empty:
            required.append(p.name)
    schema: dict[str, Any] = {"type": "object", "properties": props, "required": required}
    schema["additionalProperties"] = ANY_JSON_REF if extra else False
    return schema


def _hints(fn: Callable[..., Any]) -> dict[str, Any]:
    try:
        return typing.get_type_hints(fn)
    except Exception:  # unresolvable forward references: fall back to "any value"
        return {}


_SIMPLE = {str: "string", int: "integer", float: "number", bool: "boolean"}


def _type_schema(tp: Any) -> dict[str, Any]:
    if tp in _SIMPLE:
        return {"type": _SIMPLE[tp]}
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is list or origin is list:
        return {"type": "array", "items": _type_schema(args[0]) if args else ANY_JSON_REF}
    if tp is dict or origin is dict:
        return {"type": "object", "additionalProperties": _type_schema(args[1]) if len(args) == 2 else ANY_JSON_REF}
    if origin is typing.Literal:
        return {"enum": list(args)}
    if hasattr(tp, "model_json_schema"):
        return tp.model_json_schema()
    return dict(ANY_JSON_REF)


def _hoist_defs(schema: dict[str, Any], prefix: str, defs: dict[str, Any]) -> dict[str, Any]:
    """Move a tool schema's own ``$defs`` into the response's, renamed ``<tool>__<name>``; make
    "any value" schemas explicit (see `ANY_JSON_REF`)."""
    schema = copy.deepcopy(schema)
    own = schema.pop("$defs", None) or schema.pop("definitions", None) or {}
    renames = {name: f"{prefix}__{name}" for name in own}

    def fix(node: Any) -> Any:
        if node is True or node == {}:
            return dict(ANY_JSON_REF)
        if isinstance(node, list):
            return [fix(n) for n in node]
        if not isinstance(node, dict):
            return node
        out = {}
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                name = value.rsplit("/", 1)[-1]
                out[key] = f"#/$defs/{renames[name]}" if name in renames else value
            elif key in ("properties", "$defs", "patternProperties"):
                out[key] = {k: fix(v) for k, v in value.items()}
            elif key in ("title", "description", "examples", "default", "const", "enum"):
                out[key] = value
            else:
                out[key] = fix(value)
        return out

    for name, sub in own.items():
        defs[renames[name]] = fix(sub)
    return fix(schema)


__all__ = [
    "ANY_JSON_REF",
    "DEFAULT_INSTRUCTIONS",
    "TASK_FIELDS",
    "TOOLUSE_FIELDS",
    "Tool",
    "normalize_tools",
    "response_schema",
    "signature_schema",
    "system_prompt",
]
