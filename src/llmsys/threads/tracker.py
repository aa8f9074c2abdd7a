"""An incremental JSON parser that follows the reasoning tree as the model writes it, byte by byte.

`TreeTracker.feed(data)` consumes output bytes and reports the structural events the runtime acts
on, with byte offsets into the output text:

- `ListClosed`: a ``subtasks`` list of a task just closed (``[`` at ``open``, ``]`` at ``close``);
  the runtime pushes it on the pruning stack.
- `ParamsClosed`: the ``parameters`` value of a ``tooluse`` just ended; the runtime calls the tool
  and writes ``,"tool_result":...`` itself. `feed` stops right after that byte, so that the rest
  of a token that ran past it can be discarded.
- `Done`: the top-level value closed (`feed` stops there too).

It also builds the Python tree as it goes (``tree()`` is valid at any point, open strings
included, so a truncated or malformed output still returns the tree so far) and knows where the
writer is (`location()`: the task path and field). It accepts any JSON whitespace, but only the
Response/Task roles produce events. A byte that cannot continue valid JSON sets ``error``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

# parser states
_VALUE, _FIRST_IN_ARRAY, _FIRST_IN_OBJECT, _KEY, _COLON, _AFTER, _STRING, _KEY_STRING, _LITERAL, _DONE, _ERROR = range(
    11
)
_STOP_BEFORE = 2  # `_byte` result: stop, and this byte was not consumed (also: invalid byte)
_WS = b" \t\n\r"
_LITERAL_START = b"-0123456789tfn"
_LITERAL_CHARS = frozenset(b"-+.eE0123456789truefalsn")


@dataclass(frozen=True)
class ListClosed:
    """A task's ``subtasks`` list closed: ``[`` at byte ``open``, ``]`` at byte ``close``."""

    open: int
    close: int
    task: tuple[int, ...]  # the task that owns the list


@dataclass(frozen=True)
class ParamsClosed:
    """The ``parameters`` value of a task's ``tooluse`` ended at byte ``end`` (exclusive)."""

    end: int
    task: tuple[int, ...]
    tool_name: Any
    parameters: Any


@dataclass(frozen=True)
class Done:
    end: int


Event = ListClosed | ParamsClosed | Done


@dataclass
class _Frame:
    kind: str  # "obj" | "arr"
    role: str  # "root" | "tasks" | "subtasks" | "task" | "tooluse" | "other"
    container: Any
    start: int
    task: tuple[int, ...]  # path of the innermost task at or above this frame
    key: str | None = None  # current key (objects)


@dataclass
class TreeTracker:
    """Follows one output stream; see the module docstring."""

    pos: int = 0
    error: str | None = None
    _stack: list[_Frame] = field(default_factory=list)
    _state: int = _VALUE
    _root: Any = None
    _buf: bytearray = field(default_factory=bytearray)  # the string / key / literal being read
    _escape: bool = False
    _value_start: int = 0

    @property
    def done(self) -> bool:
        return self._state == _DONE

    def feed(self, data: bytes) -> tuple[int, list[Event]]:
        """Consume bytes; return ``(consumed, events)``. Stops early after `ParamsClosed` / `Done`
        and at the first invalid byte (``error`` is then set)."""
        events: list[Event] = []
        for i, b in enumerate(data):
            if self._state in (_DONE, _ERROR):
                return i, events
            stop = self._byte(b, events)
            if stop == _STOP_BEFORE:  # an event or an error before this byte: it stays unread
                return i, events
            self.pos += 1
            if stop:
                return i + 1, events
        return len(data), events

    # ------------------------------------------------------------------------------------------
    def _byte(self, b: int, events: list[Event]) -> bool | int:
        state = self._state
        if state == _STRING or state == _KEY_STRING:
            if self._escape:
                self._escape = False
            elif b == 0x5C:  # backslash
                self._escape = True
            elif b == 0x22:  # closing quote
                text = _decode_string(bytes(self._buf))
                if text is None:
                    return self._fail("invalid escape sequence in a string")
                self._buf.clear()
                if state == _KEY_STRING:
                    self._stack[-1].key = text
                    self._state = _COLON
                    return False
                return self._value_end(text, self.pos + 1, events)
            elif b < 0x20:
                return self._fail("control character inside a string")
            self._buf.append(b)
            return False
        if state == _LITERAL:
            if b in _LITERAL_CHARS:
                self._buf.append(b)
                return False
            # the literal ended just before this byte: finish it, then read the byte normally
            value = _parse_literal(bytes(self._buf))
            if value is _INVALID:
                return self._fail(f"invalid literal {bytes(self._buf)!r}")
            self._buf.clear()
            if self._value_end(value, self.pos, events):
                return _STOP_BEFORE
            return self._byte(b, events)
        if b in _WS:
            return False
        if state == _VALUE or state == _FIRST_IN_ARRAY:
            if state == _FIRST_IN_ARRAY and b == 0x5D:  # ]
                return self._close(b, events)
            return self._value_start_byte(b)
        if state == _FIRST_IN_OBJECT or state == _KEY:
            if b == 0x22:
                self._state = _KEY_STRING
                return False
            if state == _FIRST_IN_OBJECT and b == 0x7D:  # }
                return self._close(b, events)
            return self._fail("expected a key string")
        if state == _COLON:
            if b == 0x3A:
                self._state = _VALUE
                return False
            return self._fail("expected ':'")
        if state == _AFTER:
            top = self._stack[-1]
            if b == 0x2C:  # ,
                self._state = _KEY if top.kind == "obj" else _VALUE
                return False
            if (b == 0x7D and top.kind == "obj") or (b == 0x5D and top.kind == "arr"):
                return self._close(b, events)
            return self._fail("expected ',' or the end of the container")
        return self._fail("unexpected byte")

    def _value_start_byte(self, b: int) -> bool | int:
        self._value_start = self.pos
        if b == 0x7B or b == 0x5B:  # { [
            kind = "obj" if b == 0x7B else "arr"
            container: Any = {} if kind == "obj" else []
            role, task = self._child_role(kind)
            self._attach(container)
            self._stack.append(_Frame(kind, role, container, self.pos, task))
            self._state = _FIRST_IN_OBJECT if kind == "obj" else _FIRST_IN_ARRAY
            return False
        if b == 0x22:
            self._state = _STRING
            return False
        if b in _LITERAL_START:
            self._buf.append(b)
            self._state = _LITERAL
            return False
        return self._fail("expected a JSON value")

    def _child_role(self, kind: str) -> tuple[str, tuple[int, ...]]:
        if not self._stack:
            return ("root" if kind == "obj" else "other"), ()
        parent = self._stack[-1]
        if parent.kind == "arr":
            if kind == "obj" and parent.role in ("tasks", "subtasks"):
                return "task", (*parent.task, len(parent.container))
            return "other", parent.task
        key = parent.key
        if kind == "arr" and parent.role == "root" and key == "reasoning":
            return "tasks", ()
        if kind == "arr" and parent.role == "task" and key == "subtasks":
            return "subtasks", parent.task
        if kind == "obj" and parent.role == "task" and key == "tooluse":
            return "tooluse", parent.task
        return "other", parent.task

    def _attach(self, value: Any) -> None:
        if not self._stack:
            self._root = value
            return
        parent = self._stack[-1]
        if parent.kind == "arr":
            parent.container.append(value)
        else:
            parent.container[parent.key] = value

    def _value_end(self, value: Any, end: int, events: list[Event]) -> bool:
        """A scalar value ended (containers end in `_close`)."""
        self._attach(value)
        return self._after_value(end, events)

    def _after_value(self, end: int, events: list[Event]) -> bool:
        if not self._stack:
            self._state = _DONE
            events.append(Done(end))
            return True
        self._state = _AFTER
        parent = self._stack[-1]
        if parent.role == "tooluse" and parent.key == "parameters":
            c = parent.container
            events.append(ParamsClosed(end, parent.task, c.get("tool_name"), c.get("parameters")))
            return True
        return False

    def _close(self, b: int, events: list[Event]) -> bool:
        frame = self._stack.pop()
        if frame.role == "subtasks":
            events.append(ListClosed(frame.start, self.pos, frame.task))
        return self._after_value(self.pos + 1, events)

    def _fail(self, why: str) -> int:
        self.error = f"{why} at output byte {self.pos}"
        self._state = _ERROR
        return _STOP_BEFORE  # the offending byte is not consumed

    # ------------------------------------------------------------------------------------------
    def tree(self) -> Any:
        """The tree so far (a partial string being written is included, decoded leniently)."""
        if self._state in (_STRING,) and self._stack:
            partial = bytes(self._buf).decode("utf-8", errors="replace")
            parent = self._stack[-1]
            # shown as it is now, without changing the parser's state
            if parent.kind == "arr":
                return _with_partial(self._root, parent.container, None, partial)
            return _with_partial(self._root, parent.container, parent.key, partial)
        return self._root

    def location(self) -> tuple[tuple[int, ...], str | None]:
        """``(task path, field)`` of the byte being written: e.g. ``((0, 2), "thought")`` is the thought of
        ``reasoning[0].subtasks[2]``; ``((), "answer")`` is the answer."""
        field_name = None
        for frame in reversed(self._stack):
            if frame.role in ("task", "root"):
                field_name = frame.key
                return frame.task, field_name
        return (), field_name


_INVALID = object()


def _parse_literal(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return _INVALID


def _decode_string(raw: bytes) -> str | None:
    if b"\\" not in raw:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw.decode("utf-8", errors="replace")
    try:
        return json.loads(b'"' + raw + b'"')
    except ValueError:
        return None


def _with_partial(root: Any, container: Any, key: str | None, partial: str) -> Any:
    """A copy of `root` in which `container` also holds the partial string (at `key`, or appended)."""

    def copy(node: Any) -> Any:
        if node is container:
            out = dict(node) if isinstance(node, dict) else list(node)
            if key is None:
                out.append(partial)  # type: ignore[union-attr]
            else:
                out[key] = partial  # type: ignore[index]
            return {k: copy(v) for k, v in out.items()} if isinstance(out, dict) else [copy(v) for v in out]
        if isinstance(node, dict):
            return {k: copy(v) for k, v in node.items()}
        if isinstance(node, list):
            return [copy(v) for v in node]
        return node

    return copy(root)


__all__ = ["Done", "Event", "ListClosed", "ParamsClosed", "TreeTracker"]
