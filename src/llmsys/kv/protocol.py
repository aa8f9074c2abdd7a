"""The evaluation protocol of the KV policies: compress the context, then ask the question.

A prompt's answer token is predicted from its last position, whose attention ran over the whole
prompt during the prefill - so a policy that only evicts *after* the prefill cannot change it. To
measure what a KV budget costs, the context (the prompt up to its first question token, `<q>` in
the synthetic tasks) is prefilled into the policy's cache, and the question is fed one token at a
time through the compressed cache (decode steps: Quest and LeoAM select per step, H2O and
StreamingLLM keep evicting), then the answer is decoded greedily. This is kvpress's protocol for
RULER-style runs (question-agnostic compression); `benchmarks/kv.py` and the `llmsys demo` row use it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from llmsys.eval import REFERENCE_VOCAB, kv_bytes
from llmsys.models import forward

__all__ = ["context_then_question"]


def context_then_question(
    cache_factory: Callable[[Any], Any], question_token: int = REFERENCE_VOCAB.Q
) -> Callable[[Any, torch.Tensor, int], tuple[torch.Tensor, dict[str, Any]]]:
    """An `llmsys.eval` generate function ``f(model, ids, new_tokens) -> (tokens, {"kv_bytes": n})``.

    `cache_factory(model)` gives a fresh cache per batch (closed afterwards); a cache with a
    ``prefill(model, ids)`` method that feeds all but the last of `ids` (`LeoAMCache`) prefills the
    context through it. Every row of `ids` must contain `question_token`, at the same offset (the
    tasks of `llmsys.eval` put it there).
    """

    def run(model: Any, ids: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, dict[str, Any]]:
        rows = ids.cpu().tolist()
        if any(question_token not in row for row in rows):
            raise ValueError(f"context_then_question: a row has no question token {question_token}")
        splits = {row.index(question_token) for row in rows}
        if len(splits) != 1:
            raise ValueError(f"context_then_question: rows start their question at different offsets {sorted(splits)}")
        split = splits.pop()
        cache = cache_factory(model)
        try:
            with torch.no_grad():
                if callable(getattr(cache, "prefill", None)):
                    # a cache that must prefill in pieces (LeoAMCache: the device holds only its budget)
                    # feeds all but the last token it is given: give it the context and the `<q>`
                    cache.prefill(model, ids[:, : split + 1])
                else:
                    forward(model, ids[:, :split], cache=cache)
                for t in range(split, ids.shape[1]):
                    out = forward(model, ids[:, t : t + 1], cache=cache)
                tokens = [out.logits[:, -1:].argmax(-1)]
                for _ in range(new_tokens - 1):
                    out = forward(model, tokens[-1], cache=cache)
                    tokens.append(out.logits[:, -1:].argmax(-1))
            size = kv_bytes(cache)
            return torch.cat(tokens, dim=1), {"kv_bytes": None if size is None else size // ids.shape[0]}
        finally:
            close = getattr(cache, "close", None)
            if callable(close):
                close()

    return run
