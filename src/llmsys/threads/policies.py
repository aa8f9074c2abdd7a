"""How the next token is chosen: sampling (greedy, temperature, top-p) or a forced script.

A policy has ``choose(logits, thread) -> int | None``: ``logits`` is the ``[V]`` row of the thread,
already masked by the grammar (forbidden tokens at -inf); ``None`` means "stop" (the thread ends
as ``stopped`` if its JSON is not complete).

`ScriptedPolicy` forces the tokens of a target text regardless of the logits, while the runtime
still runs the model, tracks the tree, checks every token against the grammar, calls the tools and
prunes. `ScriptedPolicy.from_tree` cuts the target Response right after each ``parameters`` value:
there the runtime writes ``,"tool_result":<the real tool output>`` itself, and the script goes on
with the rest of the ``tooluse`` object (any ``tool_result`` in the target is ignored).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from llmsys.threads.errors import ScriptError
from llmsys.threads.schema import TASK_FIELDS


class TokenPolicy(Protocol):
    def choose(self, logits: torch.Tensor, thread: Any) -> int | None: ...


@dataclass
class Sampling:
    """Greedy (``temperature=0``), or temperature sampling with optional nucleus (top-p) filtering.

    Args:
        temperature: 0 for greedy; > 0 divides the logits before the softmax.
        top_p: keep the smallest set of tokens whose probability reaches ``top_p`` (1.0: all).
        seed: seed of this policy's own random generator (None: torch's global one).
    """

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = 0
    _generator: torch.Generator | None = field(init=False, repr=False, default=None)

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None:
            self._generator = torch.Generator().manual_seed(self.seed)

    def choose(self, logits: torch.Tensor, thread: Any = None) -> int:
        if self.temperature == 0:
            return int(logits.argmax())
        probs = torch.softmax(logits.double() / self.temperature, dim=-1)
        if self.top_p < 1:
            sorted_p, order = probs.sort(descending=True)
            # keep a token if the mass before it is below top_p (the top token always stays)
            drop = sorted_p.cumsum(0) - sorted_p >= self.top_p
            sorted_p[drop] = 0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
        return int(torch.multinomial(probs.cpu(), 1, generator=self._generator))


@dataclass
class ScriptedPolicy:
    """Forces ``tokens`` one by one (then stops); see the module docstring."""

    tokens: list[int]
    cursor: int = 0

    def choose(self, logits: torch.Tensor, thread: Any = None) -> int | None:
        if self.cursor >= len(self.tokens):
            return None
        token = self.tokens[self.cursor]
        self.cursor += 1
        return token

    @property
    def exhausted(self) -> bool:
        return self.cursor >= len(self.tokens)

    @classmethod
    def from_text(cls, tokenizer: Any, *pieces: str) -> ScriptedPolicy:
        """Tokenize each piece on its own (a piece boundary is a token boundary) and force them in order."""
        tokens: list[int] = []
        for piece in pieces:
            tokens += tokenizer.encode(piece, add_special_tokens=False)
        return cls(tokens)

    @classmethod
    def from_tree(cls, tokenizer: Any, response: dict[str, Any]) -> ScriptedPolicy:
        """Force the compact JSON of `response`, leaving each ``tool_result`` to the runtime."""
        return cls.from_text(tokenizer, *script_pieces(response))


def script_pieces(response: dict[str, Any]) -> list[str]:
    """The compact JSON of a Response, cut after every ``parameters`` value (where the runtime writes
    ``,"tool_result":...``). Task fields are written in the schema's order."""
    if not isinstance(response, dict) or not isinstance(response.get("reasoning"), list) or "answer" not in response:
        raise ScriptError('a scripted tree must be a Response: {"reasoning": [Task, ...], "answer": "..."}')
    pieces: list[str] = []
    buf: list[str] = []

    def task(node: Any) -> None:
        if not isinstance(node, dict) or "thought" not in node or "conclusion" not in node:
            raise ScriptError(f"a Task needs 'thought' and 'conclusion', got {node!r:.80}")
        buf.append("{")
        first = True
        for key in TASK_FIELDS:
            if key not in node:
                continue
            buf.append(("" if first else ",") + _dump(key) + ":")
            first = False
            value = node[key]
            if key == "tooluse":
                buf.append("{" + _dump("tool_name") + ":" + _dump(value["tool_name"]) + ",")
                buf.append(_dump("parameters") + ":" + _dump(value.get("parameters", {})))
                pieces.append("".join(buf))  # the runtime writes ,"tool_result":... here
                buf.clear()
                buf.append("}")
            elif key == "subtasks":
                buf.append("[")
                for i, sub in enumerate(value):
                    if i:
                        buf.append(",")
                    task(sub)
                buf.append("]")
            else:
                buf.append(_dump(value))
        buf.append("}")

    buf.append("{" + _dump("reasoning") + ":[")
    for i, node in enumerate(response["reasoning"]):
        if i:
            buf.append(",")
        task(node)
    buf.append("]," + _dump("answer") + ":" + _dump(response["answer"]) + "}")
    pieces.append("".join(buf))
    return pieces


def _dump(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def scripted_policies(tokenizer: Any, trees: Sequence[dict[str, Any]]) -> list[ScriptedPolicy]:
    """One `ScriptedPolicy` per tree (for `ThreadRunner.run_batch`)."""
    return [ScriptedPolicy.from_tree(tokenizer, tree) for tree in trees]


__all__ = ["Sampling", "ScriptedPolicy", "TokenPolicy", "script_pieces", "scripted_policies"]
