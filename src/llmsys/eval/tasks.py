"""Synthetic long-context tasks with exact-match scoring: needle, multi-query recall, variable tracking.

Every task speaks one small synthetic vocabulary (`SyntheticVocab`): a few markers, `keys`, `values`
and `filler` tokens. A fact is the three tokens ``<kv> k v`` ("k is v"); a question is ``<q> k`` and
its answer is ``v``. Contexts are filler with facts inserted at chosen depths, so a model can only
answer by finding the fact whose key matches the question (several facts with *different* keys are
always present: "emit the value that follows a marker" scores 1/number-of-facts, not 100%).

A task is a callable ``task(length, depth, seed) -> Sample``: `length` is the exact prompt length in
tokens, `depth` in [0, 1] is where the asked fact sits (0: right after <s>; 1: right before the
question), and the same arguments always give the same sample.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

# --------------------------------------------------------------------------------------------------
# vocabulary


@dataclass(frozen=True)
class SyntheticVocab:
    """Token ids of the synthetic task language. Ids 0-3 match the tiny models' pad/bos/eos/unk."""

    n_keys: int = 64
    n_values: int = 64
    n_filler: int = 64

    PAD: int = 0
    BOS: int = 1
    EOS: int = 2
    UNK: int = 3
    KV: int = 4  # "<kv> k v": a fact
    Q: int = 5  # "<q> k": a question, answered by v
    SEP: int = 6  # reserved
    N_SPECIAL: int = 8

    @property
    def key_ids(self) -> np.ndarray:
        return np.arange(self.N_SPECIAL, self.N_SPECIAL + self.n_keys)

    @property
    def value_ids(self) -> np.ndarray:
        start = self.N_SPECIAL + self.n_keys
        return np.arange(start, start + self.n_values)

    @property
    def filler_ids(self) -> np.ndarray:
        start = self.N_SPECIAL + self.n_keys + self.n_values
        return np.arange(start, start + self.n_filler)

    @property
    def size(self) -> int:
        """Number of ids used; a model's vocab_size must be at least this."""
        return self.N_SPECIAL + self.n_keys + self.n_values + self.n_filler

    def token_strings(self) -> list[str]:
        names = ["<pad>", "<s>", "</s>", "<unk>", "<kv>", "<q>", "<sep>", "<unused7>"]
        names += [f"k{i}" for i in range(self.n_keys)]
        names += [f"v{i}" for i in range(self.n_values)]
        names += [f"f{i}" for i in range(self.n_filler)]
        return names

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        names = self.token_strings()
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return " ".join(names[i] if 0 <= i < len(names) else f"<{i}>" for i in ids)

    def encode(self, text: str) -> list[int]:
        index = {s: i for i, s in enumerate(self.token_strings())}
        try:
            return [index[t] for t in text.split()]
        except KeyError as exc:
            raise ValueError(f"unknown synthetic token {exc.args[0]!r}") from None


#: the vocabulary of the reference model
REFERENCE_VOCAB = SyntheticVocab()


@functools.lru_cache(maxsize=4)
def _tokenizer_json(vocab: SyntheticVocab) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({s: i for i, s in enumerate(vocab.token_strings())}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok.to_str()


def synthetic_tokenizer(vocab: SyntheticVocab = REFERENCE_VOCAB):
    """A `PreTrainedTokenizerFast` over the synthetic vocabulary ("<s> f3 <kv> k5 v9 <q> k5")."""
    from tokenizers import Tokenizer, decoders
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_str(_tokenizer_json(vocab))
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins tokens with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


# --------------------------------------------------------------------------------------------------
# samples


@dataclass
class Sample:
    """One prompt and its expected continuation.

    `positions[i]` is where fact i starts in `prompt` (its <kv> marker); fact 0 is the one asked.
    """

    prompt: list[int]
    answer: list[int]
    task: str
    length: int
    depth: float
    seed: int
    positions: list[int] = field(default_factory=list)
    keys: list[int] = field(default_factory=list)
    values: list[int] = field(default_factory=list)

    def prompt_tensor(self) -> torch.Tensor:
        return torch.tensor([self.prompt], dtype=torch.long)


def exact_match(predicted: Sequence[int] | torch.Tensor, answer: Sequence[int]) -> bool:
    """True when the first len(answer) predicted tokens are exactly the answer."""
    pred = predicted.tolist() if isinstance(predicted, torch.Tensor) else list(predicted)
    answer = list(answer)
    return pred[: len(answer)] == answer


def _rng(task: str, length: int, depth: float, seed: int) -> np.random.Generator:
    # a stable, order-independent seed per (task, length, depth, seed)
    tag = sum((i + 1) * ord(c) for i, c in enumerate(task))
    return np.random.default_rng([seed, length, int(round(depth * 1_000_000)), tag])


def _check(length: int, depth: float, minimum: int) -> None:
    # `minimum` leaves room for the blocks whatever the depth: the asked fact splits the free space
    # in two, and each part may waste up to 2 tokens
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    if length < minimum:
        raise ValueError(f"length {length} is too short for this task (at least {minimum} tokens)")


def _scatter(
    rng: np.random.Generator, body: int, fixed: list[tuple[int, int]], sizes: list[int]
) -> list[int]:
    """Start offsets for blocks of `sizes` in a body of `body` tokens, overlapping nothing.

    `fixed` lists (start, size) blocks already placed. Each other block goes into one of the free
    intervals (chosen in proportion to the room left there), at a uniformly random spot.
    """
    fixed = sorted(fixed)
    intervals, cursor = [], 0
    for start, size in fixed:
        intervals.append([cursor, start])
        cursor = start + size
    intervals.append([cursor, body])
    room = [end - begin for begin, end in intervals]
    if sum(sizes) > sum(room):
        raise ValueError("context too short for the requested facts")
    members: list[list[int]] = [[] for _ in intervals]
    for i in rng.permutation(len(sizes)):
        weights = np.array([max(r, 0) if r >= sizes[i] else 0 for r in room], dtype=float)
        if weights.sum() == 0:
            raise ValueError("context too short for the requested facts")
        j = int(rng.choice(len(intervals), p=weights / weights.sum()))
        members[j].append(int(i))
        room[j] -= sizes[i]
    starts = [0] * len(sizes)
    for (begin, _end), blocks, spare in zip(intervals, members, room):
        order = rng.permutation(blocks) if blocks else []
        gaps = np.sort(rng.integers(0, spare + 1, size=len(order)))
        used = 0
        for gap, i in zip(gaps, order):
            starts[int(i)] = begin + int(gap) + used
            used += sizes[int(i)]
    return starts


def _assemble(
    rng: np.random.Generator, vocab: SyntheticVocab, body: int, blocks: list[tuple[int, list[int]]]
) -> list[int]:
    """<s> + `body` tokens of filler with each (start, tokens) block written in."""
    tokens = rng.choice(vocab.filler_ids, size=body)
    for start, block in blocks:
        tokens[start : start + len(block)] = block
    return [vocab.BOS, *tokens.tolist()]


def _draw(rng: np.random.Generator, ids: np.ndarray, n: int) -> list[int]:
    if n > len(ids):
        raise ValueError(f"{n} distinct symbols asked for but the vocabulary has {len(ids)}")
    return rng.choice(ids, size=n, replace=False).tolist()


# --------------------------------------------------------------------------------------------------
# tasks


@dataclass(frozen=True)
class NeedleTask:
    """Needle in a haystack: `needles` facts with distinct keys and values in filler; one is asked.

    The asked fact starts at `depth` of the context; the others are scattered at random. A model
    that ignores the key scores about 1/needles.
    """

    needles: int = 4
    vocab: SyntheticVocab = REFERENCE_VOCAB
    name: str = "needle"

    def __call__(self, length: int, depth: float, seed: int = 0) -> Sample:
        if self.needles < 1:
            raise ValueError("needles must be >= 1")
        _check(length, depth, 3 * self.needles + 7)
        rng = _rng(self.name, length, depth, seed)
        v = self.vocab
        keys = _draw(rng, v.key_ids, self.needles)
        values = _draw(rng, v.value_ids, self.needles)
        suffix = [v.Q, keys[0]]
        body = length - 1 - len(suffix)
        target = int(round(depth * (body - 3)))
        others = _scatter(rng, body, [(target, 3)], [3] * (self.needles - 1))
        starts = [target, *others]
        blocks = [(s, [v.KV, k, val]) for s, k, val in zip(starts, keys, values)]
        prompt = _assemble(rng, v, body, blocks) + suffix
        return Sample(
            prompt=prompt, answer=[values[0]], task=self.name, length=length, depth=depth, seed=seed,
            positions=[s + 1 for s in starts], keys=keys, values=values,
        )


@dataclass(frozen=True)
class MQARTask:
    """Multi-query associative recall: many facts, then several questions; the last one is scored.

    `pairs` facts (distinct keys) are scattered in the context (with filler between them, or packed
    when `pairs` is None: one fact per `spacing` tokens); the prompt ends with `queries` - 1
    answered questions about other facts and the scored question about the fact at `depth`.
    """

    pairs: int | None = None
    queries: int = 4
    spacing: int = 16
    vocab: SyntheticVocab = REFERENCE_VOCAB
    name: str = "mqar"

    def __call__(self, length: int, depth: float, seed: int = 0) -> Sample:
        v = self.vocab
        rng = _rng(self.name, length, depth, seed)
        suffix_len = 3 * (self.queries - 1) + 2
        body = length - 1 - suffix_len
        pairs = self.pairs if self.pairs is not None else max(self.queries, min(v.n_keys, body // self.spacing))
        pairs = min(pairs, v.n_keys)
        if self.queries < 1 or pairs < self.queries:
            raise ValueError("need queries >= 1 and pairs >= queries")
        _check(length, depth, 3 * pairs + suffix_len + 5)
        keys = _draw(rng, v.key_ids, pairs)
        values = rng.choice(v.value_ids, size=pairs).tolist()
        target = int(round(depth * (body - 3)))
        others = _scatter(rng, body, [(target, 3)], [3] * (pairs - 1))
        starts = [target, *others]
        blocks = [(s, [v.KV, k, val]) for s, k, val in zip(starts, keys, values)]
        asked = rng.choice(np.arange(1, pairs), size=self.queries - 1, replace=False).tolist()
        suffix = [t for i in asked for t in (v.Q, keys[i], values[i])] + [v.Q, keys[0]]
        prompt = _assemble(rng, v, body, blocks) + suffix
        return Sample(
            prompt=prompt, answer=[values[0]], task=self.name, length=length, depth=depth, seed=seed,
            positions=[s + 1 for s in starts], keys=keys, values=values,
        )


@dataclass(frozen=True)
class VariableTrackingTask:
    """Multi-hop variable tracking: ``<kv> x0 v``, ``<kv> x1 x0``, ... ``<kv> xh x(h-1)``; asked ``<q> xh``.

    The answer is the whole chain ``x(h-1) ... x0 v`` (one retrieval per generated token), exact
    match. The fact holding the value sits at `depth`; the links and `distractors` other chains
    of the same shape are scattered at random.
    """

    hops: int = 2
    distractors: int = 2
    vocab: SyntheticVocab = REFERENCE_VOCAB
    name: str = "vt"

    def __call__(self, length: int, depth: float, seed: int = 0) -> Sample:
        if self.hops < 1:
            raise ValueError("hops must be >= 1")
        v = self.vocab
        chains = 1 + self.distractors
        n_facts = chains * (self.hops + 1)
        _check(length, depth, 3 * n_facts + 7)
        rng = _rng(self.name, length, depth, seed)
        names = _draw(rng, v.key_ids, n_facts)
        values = _draw(rng, v.value_ids, chains)
        facts, keys, vals = [], [], []
        for c in range(chains):
            chain = names[c * (self.hops + 1) : (c + 1) * (self.hops + 1)]
            facts.append([v.KV, chain[0], values[c]])
            keys.append(chain[0])
            vals.append(values[c])
            for h in range(1, self.hops + 1):
                facts.append([v.KV, chain[h], chain[h - 1]])
                keys.append(chain[h])
                vals.append(chain[h - 1])
        head = names[self.hops]
        suffix = [v.Q, head]
        body = length - 1 - len(suffix)
        target = int(round(depth * (body - 3)))
        others = _scatter(rng, body, [(target, 3)], [3] * (n_facts - 1))
        starts = [target, *others]
        prompt = _assemble(rng, v, body, list(zip(starts, facts))) + suffix
        answer = [*reversed(names[: self.hops]), values[0]]
        return Sample(
            prompt=prompt, answer=answer, task=self.name, length=length, depth=depth, seed=seed,
            positions=[s + 1 for s in starts], keys=keys, values=vals,
        )


TASKS = {"needle": NeedleTask, "mqar": MQARTask, "vt": VariableTrackingTask}


def get_task(name: str, **kwargs) -> NeedleTask | MQARTask | VariableTrackingTask:
    """A task by name ("needle", "mqar", "vt"), with its fields as keyword arguments."""
    try:
        return TASKS[name](**kwargs)
    except KeyError:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)}") from None


def make_samples(task, length: int, depth: float, samples: int, seed: int = 0) -> list[Sample]:
    """`samples` samples of one (length, depth) cell: seeds seed, seed+1, ..."""
    return [task(length, depth, seed + i) for i in range(samples)]
