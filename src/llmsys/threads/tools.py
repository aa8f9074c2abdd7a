"""Calling a tool inside the generation loop: never a crash, always a JSON result.

An unknown tool name, parameters that do not validate, an exception and a timeout each become a
JSON error object ``{"error": "..."}`` that the model reads as the ``tool_result``; the `ToolCall`
record keeps the same message. A tool that times out keeps running in a daemon thread (Python
cannot stop a thread), so it does not block the interpreter from exiting.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from llmsys.threads.schema import Tool

logger = logging.getLogger(__name__)


@dataclass
class ToolCall:
    """One tool call of a thread: what was asked, what came back (or the error), how long it took."""

    name: Any
    parameters: Any
    result: Any
    error: str | None
    seconds: float
    task: tuple[int, ...]  # the task whose tooluse this is
    at_token: int  # transcript index of the first token of the injected result

    @property
    def ok(self) -> bool:
        return self.error is None


def call_tool(
    tools: Mapping[str, Tool], name: Any, parameters: Any, timeout: float | None
) -> tuple[Any, str | None, float]:
    """``(json-able result, error message or None, seconds)``; the result is ``{"error": msg}`` on error."""
    start = time.perf_counter()
    tool = tools.get(name) if isinstance(name, str) else None
    if tool is None:
        error = f"unknown tool {name!r}; available tools: {sorted(tools) or 'none'}"
        return {"error": error}, error, 0.0
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = tool.invoke(parameters)
        except BaseException as exc:  # the tool's failure becomes the model's information
            box["exc"] = exc

    worker = threading.Thread(target=target, name=f"llmsys-tool-{name}", daemon=True)
    worker.start()
    worker.join(timeout)
    seconds = time.perf_counter() - start
    if worker.is_alive():
        error = f"tool {name!r} timed out after {timeout:g} s"
        logger.warning("%s (it keeps running in a daemon thread)", error)
        return {"error": error}, error, seconds
    if "exc" in box:
        exc = box["exc"]
        error = f"{type(exc).__name__}: {exc}"
        return {"error": error}, error, seconds
    try:
        return to_json_value(box.get("value")), None, seconds
    except Exception as exc:  # e.g. a __str__ that raises: still never a crash
        error = f"tool {name!r} returned a value that cannot be written as JSON: {exc}"
        return {"error": error}, error, seconds


def to_json_value(value: Any) -> Any:
    """Plain JSON data from a tool's return value (pydantic models, dataclasses, tuples; str() otherwise)."""
    if hasattr(value, "model_dump"):
        value = value.model_dump(mode="json")
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    try:
        return json.loads(json.dumps(value, allow_nan=False, ensure_ascii=False))
    except (TypeError, ValueError):
        return str(value)


def dump_json(value: Any) -> str:
    """Compact JSON, as the grammar expects it (no whitespace)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


__all__ = ["ToolCall", "call_tool", "dump_json", "to_json_value"]
