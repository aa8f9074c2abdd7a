"""The policy interface: policies decide, the cache executes.

A `CachePolicy` is consulted by every `PagedLayer` at every forward step (prefill and decode):

1. ``attend(layer, step)`` - before this step's keys are appended: which *past* tokens (stored
   indices, ``[B, n]`` or ``[n]``) this step attends to; ``None`` = all of them. The step's own new
   tokens are always attended (causally) and need not be listed.
2. ``compact(layer, step)`` - after the step's attention inputs were gathered: evict tokens for the
   following steps with ``layer.keep(indices)`` / ``layer.drop_span(start, end)``.
3. ``place(layer, step)`` - then: move pages between tiers (``layer.move``) or start bringing them
   back (``layer.prefetch``) ahead of the steps that will need them.

``attend_length(layer, query_length)`` announces, before a forward runs, how many past tokens
``attend`` will return (the attention mask is built from it, see `PagedLayer.get_mask_sizes`).

Policies that score keys against the current queries (H2O, SnapKV, Quest, LeoAM) set
``needs_queries = True``; ``step.queries`` then holds the post-RoPE queries ``[B, Hq, q, D]`` of the
step, computed by the hooks that `PagedCache.attach(model)` installs (or `PagedCache.from_model`).

Policies are plain (data)classes whose fields are hyper-parameters; one instance serves every
layer, so per-layer state belongs on the layer: per-token state in a token field
(``layer.add_token_field``, kept aligned through every keep / drop / crop by the cache) and
anything else in ``layer.policy_state`` (a dict).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from llmsys.cache.layer import PagedLayer


@dataclass
class StepInfo:
    """What a policy knows about the current forward step of one layer.

    Attributes:
        layer_idx: the layer.
        query_length: new tokens in this step (> 1 for a prefill or chunked prefill, 1 for decode).
        past_length: tokens stored in the layer before this step.
        seen: tokens the layer had seen before this step; the step's tokens have stream indices
            ``seen .. seen + query_length - 1``.
        queries: post-RoPE queries ``[B, Hq, q, D]`` when the policy needs them, else None.
        position_ids: the rotary positions of the new tokens ``[B or 1, q]`` when known.
        attend: the past tokens this step attends to (``[B, n]`` stored indices), None for all.
    """

    layer_idx: int
    query_length: int
    past_length: int
    seen: int
    queries: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None
    attend: torch.Tensor | None = field(default=None, repr=False)

    @property
    def is_prefill(self) -> bool:
        return self.query_length > 1


class CachePolicy:
    """Base policy: attend to everything, keep everything, leave pages where they are.

    Subclass it (a ``@dataclass`` whose fields are the hyper-parameters) and override what the
    method changes. Set the class attribute ``needs_queries = True`` to receive ``step.queries``,
    and ``abstract_tokens`` to have each page pool keep finer key abstracts (`PagePool`).
    """

    needs_queries: bool = False
    #: tokens per fine key abstract the pools keep besides the per-page ones (None: per page only)
    abstract_tokens: int | None = None

    def attend_length(self, layer: PagedLayer, query_length: int) -> int | None:
        """Past tokens `attend` will return at the coming step (None: all stored ones)."""
        return None

    def attend(self, layer: PagedLayer, step: StepInfo) -> torch.Tensor | None:
        """Stored indices ``[B, n]`` / ``[n]`` of the past tokens to attend to this step, or None."""
        return None

    def compact(self, layer: PagedLayer, step: StepInfo) -> None:
        """Evict tokens after the step (``layer.keep`` / ``layer.drop_span``)."""

    def place(self, layer: PagedLayer, step: StepInfo) -> None:
        """Move or prefetch pages after the step (``layer.move`` / ``layer.prefetch``)."""

    def reset(self, layer: PagedLayer) -> None:
        """The layer was reset (a new sequence starts): drop per-layer state kept elsewhere."""


@dataclass
class KeepAll(CachePolicy):
    """The default: every token stays, on the device; attention sees all of them (= DynamicCache)."""


__all__ = ["CachePolicy", "KeepAll", "StepInfo"]
