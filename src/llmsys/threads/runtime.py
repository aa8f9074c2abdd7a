"""TIMRUN: the generation loop that follows the reasoning tree, prunes subtasks and calls tools.

    runner = ThreadRunner(model, tokenizer, tools={"calc": calc}, pruning_buffer=2)
    result = runner.run("What is 17 * 23 + 4?")
    result.answer, result.tree, result.stats.pruned_share, result.tool_calls

One step of one thread:

1. the model's logits for the next token (masked by the grammar) go to the policy (sampling or a
   forced script), and the chosen token is checked by the grammar and fed to the `TreeTracker`;
2. the tracker's events act: a closed ``subtasks`` list is pushed on the thread's stack and, while
   the stack is larger than ``pruning_buffer``, the earliest list is popped and its tokens leave
   the working memory (`BatchKV.drop`: the cache is cut at the span start; the kept tail goes back
   into the next forward, re-encoded at contiguous positions). A closed ``parameters`` value calls
   the tool and appends ``,"tool_result":<json>`` to the transcript (grammar and tracker included);
3. the next forward feeds what the cache lacks: the new token, tool-result tokens, re-encoded tail.

Nothing returns to the caller before every thread has its answer (or a recorded outcome).
"""

from __future__ import annotations

import bisect
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch
from tqdm.auto import tqdm

from llmsys.models import family_of
from llmsys.registry import register_method
from llmsys.threads.grammar import ResponseGrammar, token_bytes
from llmsys.threads.memory import BatchKV
from llmsys.threads.policies import Sampling, TokenPolicy
from llmsys.threads.schema import Tool, normalize_tools, response_schema, system_prompt
from llmsys.threads.tools import ToolCall, call_tool, dump_json
from llmsys.threads.tracker import Done, ListClosed, ParamsClosed, TreeTracker

logger = logging.getLogger(__name__)

# what each transcript token is
PROMPT, GENERATED, TOOL, RETOKENIZED = "prompt", "generated", "tool", "retokenized"


class Outcome(str, Enum):
    """How a thread ended."""

    ANSWERED = "answered"  # the Response JSON closed
    TRUNCATED = "truncated"  # max_new_tokens reached first
    STOPPED = "stopped"  # the policy stopped (stop token / end of script) before the JSON closed
    MALFORMED = "malformed"  # invalid JSON, or complete JSON that is not a Response (grammar off)
    GRAMMAR_REJECTED = "grammar_rejected"  # a forced token the grammar does not allow


@dataclass
class ThreadStats:
    """Counters of one thread. ``kv_*`` are of the whole batch's cache (equal for all its threads)."""

    prompt_tokens: int = 0
    tokens_generated: int = 0  # model steps: tokens chosen by the policy
    tokens_injected: int = 0  # tool-result tokens written by the runtime
    tokens_reencoded: int = 0  # kept-tail tokens fed again after a prune
    tokens_pruned: int = 0  # transcript tokens that left working memory
    prunes: int = 0
    max_position: int = 0  # largest rotary position used
    peak_working_memory: int = 0
    working_memory: list[tuple[int, int]] = field(default_factory=list)  # (tokens generated, WM tokens)
    kv_peak_bytes: int = 0  # pages in use at the fullest point (all layers)
    kv_unpruned_bytes: int = 0  # pages the same transcripts would fill without pruning
    seconds: float = 0.0

    @property
    def total_tokens(self) -> int:
        """Tokens that entered the KV cache once: prompt + generated + tool results."""
        return self.prompt_tokens + self.tokens_generated + self.tokens_injected

    @property
    def pruned_share(self) -> float:
        """Share of the thread's KV entries that pruning removed (the paper's "KV pruned")."""
        return self.tokens_pruned / max(self.total_tokens, 1)

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "working_memory"}
        out["working_memory"] = [list(p) for p in self.working_memory]
        out["total_tokens"] = self.total_tokens
        out["pruned_share"] = self.pruned_share
        return out


@dataclass
class ThreadResult:
    """The full reasoning tree (pruned parts included: the transcript keeps everything), the answer,
    how the thread ended, its tool calls and statistics."""

    question: str
    outcome: Outcome
    answer: str | None
    tree: Any
    text: str  # the whole emitted output (JSON), tool results included
    message: str | None  # why it ended, when it is not ANSWERED
    tool_calls: list[ToolCall]
    stats: ThreadStats
    pruned_spans: list[tuple[int, int]]  # transcript token ranges [first, last] that were pruned
    pruned_lists: list[tuple[int, ...]] = field(default_factory=list)  # tasks whose subtask list was pruned
    token_ids: list[int] = field(repr=False, default_factory=list)
    token_kinds: list[str] = field(repr=False, default_factory=list)
    token_tasks: list[tuple[int, ...] | None] = field(repr=False, default_factory=list)  # task of each token

    @property
    def ok(self) -> bool:
        return self.outcome is Outcome.ANSWERED

    def pruned_tasks(self) -> set[tuple[int, ...]]:
        """Paths of the tasks whose tokens left working memory (the subtasks of pruned lists)."""
        out: set[tuple[int, ...]] = set()

        def walk(node: Any, path: tuple[int, ...], pruned: bool) -> None:
            if pruned:
                out.add(path)
            if isinstance(node, dict):
                inside = pruned or path in owners
                for i, sub in enumerate(node.get("subtasks") or []):
                    walk(sub, (*path, i), inside)

        owners = set(self.pruned_lists)
        if isinstance(self.tree, dict):
            for i, node in enumerate(self.tree.get("reasoning") or []):
                walk(node, (i,), False)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "question": self.question,
            "outcome": self.outcome.value,
            "answer": self.answer,
            "message": self.message,
            "tree": self.tree,
            "tool_calls": [
                {"name": c.name, "parameters": c.parameters, "result": c.result, "error": c.error, "seconds": c.seconds}
                for c in self.tool_calls
            ],
            "stats": self.stats.to_dict(),
            "pruned_spans": [list(s) for s in self.pruned_spans],
            "pruned_lists": [list(p) for p in self.pruned_lists],
        }


@dataclass
class StepView:
    """What an observer sees after each forward: the thread, its raw (unmasked) next-token logits
    and the batch's working memory in the cache (`BatchKV`: ``kv_bytes()``, ``reserved_bytes()``)."""

    thread: Thread
    logits: torch.Tensor
    kv: BatchKV


class Thread:
    """One question being answered: transcript, working memory, pruning stack, tracker, grammar."""

    def __init__(self, index: int, question: str, prompt: list[int], policy: TokenPolicy, matcher: Any):
        self.index = index
        self.question = question
        self.policy = policy
        self.matcher = matcher
        self.tracker = TreeTracker()
        self.ids: list[int] = list(prompt)
        self.kinds: list[str] = [PROMPT] * len(prompt)
        self.ends: list[int] = [0] * len(prompt)  # output byte offset after each token
        self.tasks: list[tuple[int, ...] | None] = [None] * len(prompt)
        self.out = bytearray()
        self.wm: list[int] = list(range(len(prompt)))  # transcript indices in working memory
        self.stack: deque[tuple[int, int, tuple[int, ...]]] = deque()  # (first, last, owner task)
        self.fed_upto = -1  # largest transcript index ever fed to the model
        self.outcome: Outcome | None = None
        self.message: str | None = None
        self.tool_calls: list[ToolCall] = []
        self.pruned: list[tuple[int, int]] = []
        self.pruned_lists: list[tuple[int, ...]] = []
        self.stats = ThreadStats(prompt_tokens=len(prompt))

    @property
    def finished(self) -> bool:
        return self.outcome is not None

    def working_memory_ids(self) -> list[int]:
        """The token ids the model attends to now, in order (their positions are 0 .. W-1)."""
        return [self.ids[i] for i in self.wm]

    def text(self) -> str:
        return self.out.decode("utf-8", errors="replace")

    def append(self, token: int, data: bytes, kind: str, task: tuple[int, ...] | None) -> None:
        self.tasks.append(task)
        self.ids.append(token)
        self.kinds.append(kind)
        self.out += data
        self.ends.append(len(self.out))
        self.wm.append(len(self.ids) - 1)

    def finish(self, outcome: Outcome, message: str | None = None) -> None:
        self.outcome = outcome
        self.message = message
        if message:
            logger.info("thread %d ended %s: %s", self.index, outcome.value, message)

    def span_tokens(self, open_byte: int, close_byte: int) -> tuple[int, int] | None:
        """Transcript tokens lying entirely inside the brackets ``[ .. ]`` of a list (a token that
        also holds a bracket stays, so the kept text still opens and closes the list)."""
        first = bisect.bisect_left(self.ends, open_byte + 1) + 1  # first token starting after '['
        last = bisect.bisect_right(self.ends, close_byte) - 1  # last token ending before ']'
        first = max(first, self.stats.prompt_tokens)
        return (first, last) if first <= last else None

    def result(self) -> ThreadResult:
        tree = self.tracker.tree()
        answer = tree.get("answer") if isinstance(tree, dict) and isinstance(tree.get("answer"), str) else None
        return ThreadResult(
            question=self.question,
            outcome=self.outcome or Outcome.TRUNCATED,
            answer=answer if self.outcome is Outcome.ANSWERED else None,
            tree=tree,
            text=self.text(),
            message=self.message,
            tool_calls=self.tool_calls,
            stats=self.stats,
            pruned_spans=list(self.pruned),
            pruned_lists=list(self.pruned_lists),
            token_ids=self.ids,
            token_kinds=self.kinds,
            token_tasks=self.tasks,
        )


@register_method("timrun", plugin="threads")
@dataclass(eq=False)  # holds a model: compared by identity
class ThreadRunner:
    """TIMRUN over a transformers causal LM (a supported dense family) and its tokenizer.

    Args:
        model, tokenizer: the model (e.g. TIM-8b from a local path, or a tiny test model) and its tokenizer.
        tools: ``{name: callable or Tool}``; see `llmsys.threads.schema.Tool`.
        pruning_buffer: completed subtask lists kept before the earliest is pruned (0, 1 or 2 in the
            paper; 2 gave the best throughput); None disables pruning (the baseline).
        sampling: the default policy (greedy unless a temperature is given).
        max_new_tokens: model steps per thread before it ends as ``truncated``.
        grammar: constrain decoding to the Response schema with xgrammar.
        tool_timeout: seconds a tool may run (None: no limit).
        page_size: tokens per KV page.
        system: the system prompt (default: `schema.system_prompt(tools)`); "" for none.
        record_every: working-memory size is recorded every this many tokens (and at every prune).
        progress: show a tqdm bar of the tokens generated (all threads).
    """

    model: Any = field(repr=False)
    tokenizer: Any = field(repr=False)
    tools: Mapping[str, Callable[..., Any] | Tool] | None = None
    pruning_buffer: int | None = 2
    sampling: Sampling = field(default_factory=Sampling)
    max_new_tokens: int = 4096
    grammar: bool = True
    tool_timeout: float | None = 30.0
    page_size: int = 16
    system: str | None = None
    record_every: int = 64
    progress: bool = False

    def __post_init__(self) -> None:
        family_of(self.model, moe=False)
        if self.pruning_buffer is not None and (not isinstance(self.pruning_buffer, int) or self.pruning_buffer < 0):
            raise ValueError(
                f"pruning_buffer must be an int >= 0 (or None to disable pruning), got {self.pruning_buffer!r}"
            )
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.tool_timeout is not None and not self.tool_timeout > 0:
            raise ValueError(f"tool_timeout must be > 0 seconds (or None for no limit), got {self.tool_timeout}")
        self.vocab_size = int(self.model.config.vocab_size)
        if len(self.tokenizer) > self.vocab_size:
            raise ValueError(
                f"the tokenizer has {len(self.tokenizer)} tokens but the model's vocabulary is {self.vocab_size}: "
                "pass the tokenizer that belongs to this model"
            )
        self._tools = normalize_tools(self.tools)
        self._schema = response_schema(self._tools)
        self._grammar = ResponseGrammar(self.tokenizer, self.vocab_size, self._schema) if self.grammar else None
        self._bytes = token_bytes(self.tokenizer, self.vocab_size)
        self._greedy_map: dict[bytes, int] | None = None
        stop = {self.tokenizer.eos_token_id}
        eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        stop.update(eos if isinstance(eos, (list, tuple)) else [eos])
        self._stop_ids = {int(s) for s in stop if s is not None}
        pad = self.tokenizer.pad_token_id
        self._pad_id = int(pad if pad is not None else self.tokenizer.eos_token_id or 0)

    # ------------------------------------------------------------------------------------------
    def run(
        self, question: str, policy: TokenPolicy | None = None, observer: Callable[[StepView], None] | None = None
    ) -> ThreadResult:
        """Answer one question; returns when the thread has ended (see `Outcome`)."""
        return self.run_batch([question], None if policy is None else [policy], observer)[0]

    def run_batch(
        self,
        questions: Sequence[str],
        policies: Sequence[TokenPolicy] | None = None,
        observer: Callable[[StepView], None] | None = None,
    ) -> list[ThreadResult]:
        """Answer several questions in one batch (one forward per step for all unfinished threads)."""
        if not questions:
            return []
        if policies is not None and len(policies) != len(questions):
            raise ValueError(f"got {len(policies)} policies for {len(questions)} questions: give one per question")
        start = time.perf_counter()
        threads = [
            Thread(
                i,
                q,
                self.prompt_ids(q),
                self.sampling if policies is None else policies[i],
                self._grammar.matcher() if self._grammar is not None else None,
            )
            for i, q in enumerate(questions)
        ]
        kv = BatchKV(self.model, len(threads), page_size=self.page_size, pad_id=self._pad_id)
        rows = list(threads)  # batch row -> thread
        bitmask = self._grammar.bitmask(len(rows)) if self._grammar is not None else None
        bar = tqdm(total=self.max_new_tokens * len(rows), unit="tok", desc="TIMRUN", disable=not self.progress)
        try:
            while rows:
                logits = self._forward(kv, rows)
                if observer is not None:
                    for row, th in enumerate(rows):
                        observer(StepView(th, logits[row], kv))
                masked = logits.to(torch.float32, copy=True)  # the observer keeps the raw logits
                if bitmask is not None:
                    for row, th in enumerate(rows):
                        self._grammar.fill(th.matcher, bitmask, row)
                    self._grammar.apply(masked, bitmask[: len(rows)])
                for row, th in enumerate(rows):
                    self._advance(th, masked[row], kv, row)
                bar.update(len(rows))
                done = [row for row, th in enumerate(rows) if th.finished]
                if done:
                    kv.remove_rows(done)
                    rows = [th for th in rows if not th.finished]
                kv.compact()
            page_bytes = kv.page_bytes()
            kv_peak = kv.peak_page_rows * page_bytes
        finally:
            kv.close()
            bar.close()
        seconds = time.perf_counter() - start
        for th in threads:
            th.stats.seconds = seconds
            th.stats.kv_peak_bytes = kv_peak
            th.stats.kv_unpruned_bytes = sum(math.ceil(len(t.ids) / self.page_size) for t in threads) * page_bytes
            th.stats.working_memory.append((th.stats.tokens_generated, len(th.wm)))
        return [th.result() for th in threads]

    # ------------------------------------------------------------------------------------------
    def prompt_ids(self, question: str) -> list[int]:
        """The prompt tokens: the chat template when the tokenizer has one, else a plain format."""
        system = system_prompt(self._tools) if self.system is None else self.system
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": question}
            ]
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return list(tok.encode(text, add_special_tokens=False))
        text = (f"{system}\n\n" if system else "") + f"Question: {question}\nAnswer:\n"
        return list(tok.encode(text))

    def _forward(self, kv: BatchKV, rows: list[Thread]) -> torch.Tensor:
        feeds, positions = [], []
        for row, th in enumerate(rows):
            cached = kv.cached(row)
            pending = th.wm[cached:]
            th.stats.tokens_reencoded += sum(1 for i in pending if i <= th.fed_upto)
            th.fed_upto = max(th.fed_upto, pending[-1])
            feeds.append([th.ids[i] for i in pending])
            positions.append(cached)
        logits = kv.forward(feeds, positions)
        for th in rows:
            w = len(th.wm)
            th.stats.max_position = max(th.stats.max_position, w - 1)
            th.stats.peak_working_memory = max(th.stats.peak_working_memory, w)
        return logits

    def _advance(self, th: Thread, logits: torch.Tensor, kv: BatchKV, row: int) -> None:
        """Choose, check and apply one token of one thread (see the module docstring)."""
        token = th.policy.choose(logits, th)
        if token is None or token in self._stop_ids:
            th.finish(Outcome.STOPPED, "the policy stopped before the JSON was complete")
            return
        th.stats.tokens_generated += 1
        data = self._bytes[token] if 0 <= token < self.vocab_size else b""
        if th.matcher is not None and not th.matcher.accept_token(token):
            th.finish(
                Outcome.GRAMMAR_REJECTED,
                f"token {token} ({data!r}) does not continue the schema after ...{th.text()[-60:]!r}",
            )
            return
        task = th.tracker.location()[0]  # where the token starts
        consumed, events = th.tracker.feed(data)
        if th.tracker.error is not None:
            th.append(token, data, GENERATED, task)
            th.finish(Outcome.MALFORMED, f"invalid JSON: {th.tracker.error}")
            return
        if consumed < len(data) and any(isinstance(e, ParamsClosed) for e in events):
            # the token ran past the end of "parameters": keep its bytes up to there (re-tokenized),
            # the runtime writes what follows
            if th.matcher is not None:
                th.matcher.rollback(1)
            pieces = self._encode_bytes(data[:consumed])
            for i, piece in enumerate(pieces):
                if th.matcher is not None and not th.matcher.accept_token(piece):
                    th.finish(Outcome.GRAMMAR_REJECTED, "re-tokenized text before a tool call was refused")
                    return
                th.append(piece, self._bytes[piece], GENERATED if i == 0 else RETOKENIZED, task)
        else:
            th.append(token, data, GENERATED, task)
        for event in events:
            if isinstance(event, ListClosed):
                self._list_closed(th, event, kv, row)
            elif isinstance(event, ParamsClosed):
                self._call_tool(th, event)
            elif isinstance(event, Done):
                tree = th.tracker.tree()
                if (
                    isinstance(tree, dict)
                    and isinstance(tree.get("answer"), str)
                    and isinstance(tree.get("reasoning"), list)
                ):
                    th.finish(Outcome.ANSWERED)
                else:
                    th.finish(Outcome.MALFORMED, "the JSON is complete but is not a Response (reasoning + answer)")
        if not th.finished and th.stats.tokens_generated >= self.max_new_tokens:
            th.finish(Outcome.TRUNCATED, f"max_new_tokens={self.max_new_tokens} reached before the answer")
        if th.stats.tokens_generated % self.record_every == 0:
            th.stats.working_memory.append((th.stats.tokens_generated, len(th.wm)))

    def _list_closed(self, th: Thread, event: ListClosed, kv: BatchKV, row: int) -> None:
        if self.pruning_buffer is None:
            return
        span = th.span_tokens(event.open, event.close)
        if span is None:
            return
        th.stack.append((*span, event.task))
        while len(th.stack) > self.pruning_buffer:
            self._prune(th, th.stack.popleft(), kv, row)

    def _prune(self, th: Thread, entry: tuple[int, int, tuple[int, ...]], kv: BatchKV, row: int) -> None:
        first, last, owner = entry
        k0 = bisect.bisect_left(th.wm, first)
        k1 = bisect.bisect_right(th.wm, last)
        if k1 <= k0:
            return  # already pruned with an enclosing list
        th.stats.working_memory.append((th.stats.tokens_generated, len(th.wm)))
        del th.wm[k0:k1]
        kv.drop(row, k0)  # the cache keeps working memory [0, k0); the tail is re-encoded next forward
        th.stats.prunes += 1
        th.stats.tokens_pruned += k1 - k0
        th.pruned.append((first, last))
        th.pruned_lists.append(owner)
        th.stats.working_memory.append((th.stats.tokens_generated, len(th.wm)))

    def _call_tool(self, th: Thread, event: ParamsClosed) -> None:
        result, error, seconds = call_tool(self._tools, event.tool_name, event.parameters, self.tool_timeout)
        text = ',"tool_result":' + dump_json(result)
        data = text.encode("utf-8")
        if th.matcher is not None and not th.matcher.accept_string(text):
            th.finish(Outcome.GRAMMAR_REJECTED, f"the grammar refused the tool result {text[:80]!r}")
            return
        consumed, _ = th.tracker.feed(data)
        if th.tracker.error is not None or consumed < len(data):
            th.finish(Outcome.MALFORMED, f"the tool result broke the JSON: {th.tracker.error}")
            return
        tokens = self._encode_bytes(data)
        th.tool_calls.append(
            ToolCall(event.tool_name, event.parameters, result, error, seconds, event.task, len(th.ids))
        )
        for token in tokens:
            th.append(token, self._bytes[token], TOOL, event.task)
        th.stats.tokens_injected += len(tokens)

    def _encode_bytes(self, data: bytes) -> list[int]:
        """Tokens that write exactly ``data``: the tokenizer's own encoding when it round-trips, else a
        greedy longest match over the token byte strings (always possible for byte-level vocabularies)."""
        try:
            ids = self.tokenizer.encode(data.decode("utf-8"), add_special_tokens=False)
            if b"".join(self._bytes[i] for i in ids) == data:
                return list(ids)
        except UnicodeDecodeError:
            pass
        if self._greedy_map is None:
            special = set(getattr(self.tokenizer, "all_special_ids", []) or [])
            self._greedy_map = {}
            for i, b in enumerate(self._bytes):
                if b and i not in special:
                    self._greedy_map.setdefault(b, i)
        longest = max(len(b) for b in self._greedy_map)
        out, pos = [], 0
        while pos < len(data):
            for size in range(min(longest, len(data) - pos), 0, -1):
                token = self._greedy_map.get(data[pos : pos + size])
                if token is not None:
                    out.append(token)
                    pos += size
                    break
            else:
                raise ValueError(f"no token writes the byte {data[pos : pos + 1]!r}: the vocabulary is not byte-level")
        return out


__all__ = [
    "GENERATED",
    "PROMPT",
    "RETOKENIZED",
    "TOOL",
    "Outcome",
    "StepView",
    "Thread",
    "ThreadResult",
    "ThreadRunner",
    "ThreadStats",
]
