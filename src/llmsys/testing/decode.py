"""Greedy decoding that keeps every step's logits: what the cache tests compare bit for bit."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from llmsys.models import forward


@torch.no_grad()
def greedy_logits(
    model: Any, out: Any, cache: Any, new: int, on_step: Callable[[], None] | None = None
) -> torch.Tensor:
    """Continue from a forward's output `out` with `new` greedy steps through `cache`; returns the
    last-position logits of `out` and of every step, stacked: ``[new + 1, B, vocab]``. `on_step` runs
    before each step (e.g. to change a policy's setting mid-stream)."""
    steps = [out.logits[:, -1]]
    for _ in range(new):
        if on_step is not None:
            on_step()
        out = forward(model, out.logits[:, -1:].argmax(-1), cache=cache)
        steps.append(out.logits[:, -1])
    return torch.stack(steps)
