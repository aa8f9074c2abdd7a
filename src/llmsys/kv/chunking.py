"""LeoAM's variable-size chunks: boundaries that follow the attention profile of the prefill.

Reconstruction (the paper's exact rule is not public): the attention mass each page of a region
receives from the last queries of the prefill step (SnapKV's observation window, causal softmax,
averaged over heads and summed over rows) is walked left to right; a chunk grows page by page while
it is smaller than `min_pages`, or while it is smaller than `max_pages` and its mass stays within a
target of ``mean page mass x sqrt(min_pages x max_pages)``. So pages that receive much attention end
up in small chunks (fine-grained selection where it matters) and "attention deserts" merge into
large ones (few abstracts to score and few transfers to issue), every chunk within
``[min_pages, max_pages]`` pages except possibly the last.
"""

from __future__ import annotations

import math

import torch

from llmsys.kernels import last_query_scores

__all__ = ["attention_profile", "profile_chunks"]


def attention_profile(queries: torch.Tensor, keys: torch.Tensor, window: int) -> torch.Tensor:
    """Attention mass ``[T]`` each key receives from the last `window` queries (causal softmax, mean
    over heads, summed over the window and the batch rows). queries ``[B, Hq, W', D]`` are the last
    queries of the keys ``[B, Hkv, T, D]`` (post-RoPE)."""
    window = max(1, min(window, queries.shape[2], keys.shape[2]))
    probs = last_query_scores(queries[:, :, -window:], keys, softmax=True, reduce_heads="mean")
    return probs.sum(dim=0)


def profile_chunks(page_mass: torch.Tensor, min_pages: int, max_pages: int) -> list[int]:
    """Chunk boundaries in pages ``[0, ..., P]`` for per-page attention mass ``[P]`` (see module doc)."""
    if not 1 <= min_pages <= max_pages:
        raise ValueError(f"need 1 <= min_pages <= max_pages, got {min_pages}, {max_pages}")
    mass = page_mass.double().clamp_min(0).tolist()
    total = len(mass)
    if total == 0:
        return [0]
    target = (sum(mass) / total) * math.sqrt(min_pages * max_pages)
    bounds, size, acc = [0], 0, 0.0
    for p, m in enumerate(mass):
        if size >= min_pages and (size >= max_pages or acc + m > target):
            bounds.append(p)
            size, acc = 0, 0.0
        size += 1
        acc += m
    bounds.append(total)
    return bounds
