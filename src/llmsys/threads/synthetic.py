"""Scripted reasoning trees (tests, benchmark, demo), a safe calculator tool, and a tree printout."""

from __future__ import annotations

import ast
import itertools
import json
import operator
import random
from typing import Any

from llmsys.threads.policies import script_pieces

_WORDS = (
    "check the plan first then split each part into steps and add numbers carry the result to "
    "compare both sides find what is left keep track of all totals before writing an answer because "
    "every value must match again later so note it"
).split()


def synthetic_tree(
    depth: int = 3,
    branching: int = 2,
    *,
    top_tasks: int = 2,
    tool_name: str | None = "calc",
    tool_every: int = 3,
    thought_words: int = 6,
    conclusion_words: int = 4,
    seed: int = 0,
) -> dict[str, Any]:
    """A deterministic Response: ``top_tasks`` tasks, each with ``branching`` subtasks per level down
    to ``depth`` levels; every ``tool_every``-th task calls ``tool_name`` with an addition."""
    rng = random.Random(seed)
    counter = itertools.count()

    def sentence(n: int) -> str:
        return " ".join(rng.choice(_WORDS) for _ in range(n))

    def task(level: int) -> dict[str, Any]:
        k = next(counter)
        node: dict[str, Any] = {"thought": sentence(thought_words)}
        if tool_name and tool_every and k % tool_every == tool_every - 1:
            node["tooluse"] = {
                "tool_name": tool_name,
                "parameters": {"expression": f"{rng.randint(2, 99)}+{rng.randint(2, 99)}"},
            }
        if level < depth:
            node["subtasks"] = [task(level + 1) for _ in range(branching)]
        node["conclusion"] = sentence(conclusion_words)
        return node

    return {"reasoning": [task(1) for _ in range(top_tasks)], "answer": sentence(3)}


def script_tokens(tokenizer: Any, tree: dict[str, Any]) -> int:
    """Tokens a `ScriptedPolicy` will force for `tree` (tool results not included)."""
    return sum(len(tokenizer.encode(p, add_special_tokens=False)) for p in script_pieces(tree))


def synthetic_tree_of_size(tokenizer: Any, tokens: int, *, branching: int = 3, **kwargs: Any) -> dict[str, Any]:
    """The shallowest `synthetic_tree` (growing ``depth``, then ``top_tasks``) whose script has at
    least ``tokens`` tokens: the tree grows in depth, so its working memory stays small."""
    depth = 1
    while True:
        tree = synthetic_tree(depth, branching, **kwargs)
        if script_tokens(tokenizer, tree) >= tokens:
            return tree
        if depth >= 12:
            kwargs["top_tasks"] = kwargs.get("top_tasks", 2) * 2
        else:
            depth += 1


_OPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Mod: operator.mod,
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
}


def calculator(expression: str) -> dict[str, Any]:
    """Evaluate an arithmetic expression (+ - * / % and parentheses)."""

    def ev(node: ast.AST) -> float | int:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.operand))
        raise ValueError(f"unsupported expression element {type(node).__name__}")

    if len(expression) > 200:
        raise ValueError("expression longer than 200 characters")
    return {"value": ev(ast.parse(expression, mode="eval"))}


def format_tree(tree: Any, pruned: set[tuple[int, ...]] | None = None, width: int = 100) -> str:
    """An indented printout of a (possibly partial) Response; tasks in ``pruned`` are marked."""
    pruned = pruned or set()
    lines: list[str] = []

    def clip(text: Any) -> str:
        s = text if isinstance(text, str) else json.dumps(text, separators=(",", ":"))
        return s if len(s) <= width else s[: width - 3] + "..."

    def task(node: Any, path: tuple[int, ...]) -> None:
        pad = "  " * (len(path) - 1)
        label = ".".join(str(i) for i in path)
        mark = "  [KV pruned]" if path in pruned else ""
        if not isinstance(node, dict):
            lines.append(f"{pad}[{label}] {clip(node)}")
            return
        lines.append(f"{pad}[{label}] thought: {clip(node.get('thought', ''))}{mark}")
        use = node.get("tooluse")
        if isinstance(use, dict):
            result = clip(use["tool_result"]) if "tool_result" in use else "..."
            lines.append(f"{pad}    tool {use.get('tool_name')}({clip(use.get('parameters'))}) -> {result}")
        for i, sub in enumerate(node.get("subtasks") or []):
            task(sub, (*path, i))
        if "conclusion" in node:
            lines.append(f"{pad}    conclusion: {clip(node['conclusion'])}")

    if not isinstance(tree, dict):
        return clip(tree)
    for i, node in enumerate(tree.get("reasoning") or []):
        task(node, (i,))
    if "answer" in tree:
        lines.append(f"answer: {clip(tree['answer'])}")
    return "\n".join(lines)


__all__ = ["calculator", "format_tree", "script_tokens", "synthetic_tree", "synthetic_tree_of_size"]
