"""The training stream of the reference model: synthetic documents with retrieval targets.

A document is filler with facts (``<kv> k v``) and questions (``<q> k v``, or ``<q> x2 x1 x0 v``
for a chain of aliases) written in; the loss is taken on the answer tokens of questions only, i.e.
on tokens that can only be predicted by finding the matching fact earlier in the document. Keys
within a document are distinct, so every question has exactly one right answer and "copy the value
after some marker" scores 1/number-of-facts.

Three kinds of document, mixed:
- ``dense``: many facts with questions interleaved (multi-query associative recall, every answer
  a training signal), some filler;
- ``needle``: a few facts in a lot of filler, the questions at the end (the evaluation format);
- ``chain``: facts whose value is another key (aliases), questions answered by the whole chain.

Everything is numpy on the host and deterministic for a seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from llmsys.eval.tasks import REFERENCE_VOCAB, SyntheticVocab

IGNORE = -100


def _distinct(rng: np.random.Generator, ids: np.ndarray, n: int) -> np.ndarray:
    return ids[0] + rng.permutation(len(ids))[:n]


def _any(rng: np.random.Generator, ids: np.ndarray, n: int) -> np.ndarray:
    return rng.integers(ids[0], ids[0] + len(ids), size=n)


@dataclass(frozen=True)
class Mixture:
    """How documents are drawn. Weights need not sum to 1."""

    dense: float = 0.45
    needle: float = 0.25
    chain: float = 0.1
    skip: float = 0.2
    skip_rate: float = 0.3  # share of positions in a skip document that repeat the token two back
    max_facts: int = 48  # distinct keys per document (<= vocab.n_keys)
    max_asks: int = 4  # questions per fact at most in dense documents (long ones keep more filler)
    dense_filler: tuple[float, float] = (0.0, 0.8)  # fraction of filler in dense documents
    needle_facts: tuple[int, int] = (2, 16)
    needle_queries: tuple[int, int] = (1, 4)
    needle_edges: float = 0.2  # chance that a needle document has a fact right after <s> (and, apart, at the end)
    max_hops: int = 3


def _stars_and_bars(rng: np.random.Generator, total: int, n: int) -> np.ndarray:
    """n+1 non-negative gaps summing to `total` (the filler before each of n events, and after)."""
    cuts = np.sort(rng.integers(0, total + 1, size=n))
    edges = np.concatenate([[0], cuts, [total]])
    return np.diff(edges)


def _write_triples(
    rng: np.random.Generator,
    vocab: SyntheticVocab,
    length: int,
    markers: np.ndarray,
    keys: np.ndarray,
    values: np.ndarray,
    supervised: np.ndarray,
    trailing: bool,
    pin_first: bool = False,
    pin_last: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """One row: <s> + filler with the triples (marker, key, value) in the given order.

    `pin_first` puts the first triple right after <s>, `pin_last` the last one at the very end (the
    depths 0 and 1 of the needle task, rare under uniform gaps).
    """
    n = len(markers)
    filler = length - 1 - 3 * n
    if filler < 0:
        raise ValueError("too many events for the length")
    gaps = _stars_and_bars(rng, filler, n)
    if not trailing or pin_last:  # move the trailing filler to the front: the row ends on the last triple
        gaps[0] += gaps[-1]
        gaps[-1] = 0
    if pin_first and n > 1:
        gaps[1] += gaps[0]
        gaps[0] = 0
    starts = 1 + np.cumsum(gaps[:-1]) + 3 * np.arange(n)
    tokens = _any(rng, vocab.filler_ids, length)
    tokens[0] = vocab.BOS
    tokens[starts] = markers
    tokens[starts + 1] = keys
    tokens[starts + 2] = values
    labels = np.full(length, IGNORE)
    sel = starts[supervised] + 2
    labels[sel] = tokens[sel]
    return tokens, labels


def dense_row(rng, vocab: SyntheticVocab, length: int, mix: Mixture):
    """Many facts, each asked (possibly repeatedly) at random later points."""
    lo, hi = mix.dense_filler
    frac = rng.uniform(lo, hi)
    events = max(2, int((length - 1) * (1 - frac)) // 3)
    n_facts = int(min(mix.max_facts, vocab.n_keys, max(1, events // 2)))
    n_queries = max(1, min(events - n_facts, mix.max_asks * n_facts))  # the rest stays filler
    keys = _distinct(rng, vocab.key_ids, n_facts)
    values = _any(rng, vocab.value_ids, n_facts)
    t_fact = rng.uniform(0, 1, size=n_facts)
    asked = rng.integers(0, n_facts, size=n_queries)
    t_query = t_fact[asked] + (1 - t_fact[asked]) * rng.uniform(0, 1, size=n_queries) + 1e-9
    times = np.concatenate([t_fact, t_query])
    order = np.argsort(times, kind="stable")
    idx = np.concatenate([np.arange(n_facts), asked])[order]
    is_query = np.concatenate([np.zeros(n_facts, bool), np.ones(n_queries, bool)])[order]
    markers = np.where(is_query, vocab.Q, vocab.KV)
    return _write_triples(rng, vocab, length, markers, keys[idx], values[idx], is_query, trailing=True)


def needle_row(rng, vocab: SyntheticVocab, length: int, mix: Mixture):
    """A few facts scattered in filler; questions about some of them at the very end."""
    n_facts = int(rng.integers(mix.needle_facts[0], mix.needle_facts[1] + 1))
    n_facts = max(1, min(n_facts, vocab.n_keys, (length - 1) // 6))
    n_queries = int(rng.integers(mix.needle_queries[0], mix.needle_queries[1] + 1))
    n_queries = max(1, min(n_queries, n_facts))
    keys = _distinct(rng, vocab.key_ids, n_facts)
    values = _any(rng, vocab.value_ids, n_facts)
    asked = rng.choice(n_facts, size=n_queries, replace=False)
    is_query = np.concatenate([np.zeros(n_facts, bool), np.ones(n_queries, bool)])
    markers = np.where(is_query, vocab.Q, vocab.KV)
    # facts spread over the whole body, questions packed at the end: write facts with trailing
    # filler, then overwrite the tail with the questions
    edge = rng.uniform(size=2) < mix.needle_edges
    tokens, labels = _write_triples(
        rng, vocab, length - 3 * n_queries, markers[:n_facts], keys, values, is_query[:n_facts], trailing=True,
        pin_first=bool(edge[0]), pin_last=bool(edge[1]),
    )
    tail = np.stack([markers[n_facts:], keys[asked], values[asked]], axis=1).reshape(-1)
    tail_labels = np.full(3 * n_queries, IGNORE)
    tail_labels[2::3] = values[asked]
    return np.concatenate([tokens, tail]), np.concatenate([labels, tail_labels])


def chain_row(rng, vocab: SyntheticVocab, length: int, mix: Mixture):
    """Chains of aliases ``<kv> x1 x0`` ... ending in a value; questions answered by the chain."""
    hops = int(rng.integers(1, mix.max_hops + 1))
    n_chains = int(rng.integers(1, 5))
    n_queries = int(rng.integers(1, n_chains + 1))
    while n_chains > 1 and (n_chains * (hops + 1) * 3 + n_queries * (hops + 3) + 1 > length
                            or n_chains * (hops + 1) > vocab.n_keys):
        n_chains -= 1
        n_queries = min(n_queries, n_chains)
    names = _distinct(rng, vocab.key_ids, n_chains * (hops + 1)).reshape(n_chains, hops + 1)
    values = _any(rng, vocab.value_ids, n_chains)
    facts = []
    for c in range(n_chains):
        facts.append((names[c, 0], values[c]))
        facts += [(names[c, h], names[c, h - 1]) for h in range(1, hops + 1)]
    facts = [facts[i] for i in rng.permutation(len(facts))]
    asked = rng.choice(n_chains, size=n_queries, replace=False)
    tail, tail_labels = [], []
    for c in asked:
        answer = [*names[c, :hops][::-1].tolist(), int(values[c])]
        tail += [vocab.Q, int(names[c, hops]), *answer]
        tail_labels += [IGNORE, IGNORE, *answer]
    body = length - len(tail)
    if body < 1 + 3 * len(facts):
        raise ValueError("length too short for a chain document")
    f = np.array(facts)
    tokens, labels = _write_triples(
        rng, vocab, body, np.full(len(facts), vocab.KV), f[:, 0], f[:, 1], np.zeros(len(facts), bool), trailing=True
    )
    return np.concatenate([tokens, tail]), np.concatenate([labels, tail_labels])


def skip_row(rng, vocab: SyntheticVocab, length: int, mix: Mixture):
    """Random tokens where some repeat the token two places back (``a b a``), supervised there.

    Solving it needs an attention head that reads the previous token: the first half of an
    induction circuit, trained directly instead of waiting for it to emerge.
    """
    tokens = rng.integers(vocab.key_ids[0], vocab.filler_ids[-1] + 1, size=length)
    tokens[0] = vocab.BOS
    labels = np.full(length, IGNORE)
    repeat = rng.uniform(size=length) < mix.skip_rate
    repeat[:3] = False
    repeat[2:] &= ~repeat[:-2]  # never copy a copied token: one vectorised assignment is exact
    where = np.flatnonzero(repeat)
    tokens[where] = tokens[where - 2]
    labels[where] = tokens[where]
    return tokens, labels


ROWS = {"dense": dense_row, "needle": needle_row, "chain": chain_row, "skip": skip_row}


def make_batch(
    rng: np.random.Generator, length: int, batch: int, mix: Mixture, vocab: SyntheticVocab = REFERENCE_VOCAB
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, labels, early_labels), each [batch, length], IGNORE except on supervised tokens.

    `labels` supervise the model's output; `early_labels` (skip documents) supervise a read-out
    of the residual stream after the first decoder layer.
    """
    kinds = list(ROWS)
    weights = np.array([getattr(mix, k) for k in kinds], dtype=float)
    weights /= weights.sum()
    choice = rng.choice(len(kinds), size=batch, p=weights)
    rows = [ROWS[kinds[c]](rng, vocab, length, mix) for c in choice]
    ids = torch.from_numpy(np.stack([r[0] for r in rows]).astype(np.int64))
    labels = torch.from_numpy(np.stack([r[1] for r in rows]).astype(np.int64))
    early = torch.from_numpy(np.array([kinds[c] == "skip" for c in choice]))
    early_labels = torch.where(early[:, None], labels, IGNORE)
    labels = torch.where(early[:, None], IGNORE, labels)
    return ids, labels, early_labels
