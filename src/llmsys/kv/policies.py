"""KV-eviction policies for `llmsys.cache.PagedCache`: the SnapKV and H2O baselines.

Every method here is a `CachePolicy` dataclass whose fields are its hyper-parameters; the cache
executes what it decides (`docs/cache.md`):

    from llmsys.cache import PagedCache
    from llmsys.kv import SnapKV
    from llmsys.models import generate

    with PagedCache.from_model(model, policy=SnapKV(budget=1024)) as cache:   # query hooks installed
        generate(model, ids, cache=cache, max_new_tokens=32)

Shared conventions, so that the methods of the LeoAM issue (Full = `llmsys.cache.KeepAll`,
StreamingLLM, Quest, LeoAM) sit next to these as further dataclasses in this module (or sibling
modules re-exported by `llmsys.kv`):

- `BudgetPolicy` is the base of every method that bounds the KV of a layer: its field `budget` is
  the number of tokens a layer keeps (or attends to, for Quest-like methods), validated once in
  `__post_init__`; `BudgetPolicy.keep_top` performs "keep the `budget` best-scored tokens, in stream
  order" on a layer, which SnapKV, H2O and a score-based StreamingLLM / LeoAM eviction all need.
- Scores are per token and shared by all heads of a layer (`PagedCache` stores one token set per
  layer). Original SnapKV and H2O choose per KV head; docs/filter.md measures the difference.
- Policies that score keys against queries set ``needs_queries = True`` and are used through
  `PagedCache.from_model(model, policy=...)` or `cache.attach(model)`.
- Per-token state lives in token fields (`layer.add_token_field`), never in the policy object, so one
  instance serves every layer, every row and every sequence.
- Each method is registered by name (`llmsys.registry.register_method(name, plugin="kv")`).

Known limitation (needs a change in `llmsys.cache`): a policy does not see the 2-D padding mask, so
in a left-padded batch the padding tokens take part in the scores and may occupy budget slots.
They stay masked in attention (`attach` rebuilds the mask from the stored tokens' stream indices).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F

from llmsys.cache import CachePolicy, StepInfo
from llmsys.kernels import last_query_scores
from llmsys.registry import register_method

if TYPE_CHECKING:
    from llmsys.cache import PagedLayer

__all__ = ["H2O", "BudgetPolicy", "SnapKV", "accumulated_attention", "snapkv_scores"]


@dataclass
class BudgetPolicy(CachePolicy):
    """Base of the policies that keep at most `budget` tokens per layer."""

    budget: int = 1024

    def __post_init__(self) -> None:
        if isinstance(self.budget, bool) or not isinstance(self.budget, int) or self.budget < 1:
            raise ValueError(f"{type(self).__name__}: budget must be an int >= 1, got {self.budget!r}")

    def keep_top(self, layer: PagedLayer, scores: torch.Tensor, protect_last: int = 0) -> None:
        """Keep the `budget` highest `scores` ``[B, N]`` (the last `protect_last` tokens always), in order."""
        if layer.length <= self.budget:
            return
        scores = scores.float().clone()
        if protect_last > 0:
            scores[:, -protect_last:] = float("inf")
        keep = scores.topk(self.budget, dim=-1).indices.sort(dim=-1).values
        layer.keep(keep)


@register_method("snapkv", plugin="kv")
@dataclass
class SnapKV(BudgetPolicy):
    """SnapKV (Li et al., 2024): after the prefill, keep the tokens the last queries attend to.

    At a prefill step whose layer then stores more than `budget` tokens, the last `window` queries
    score every stored key with their causal attention probabilities (summed over the window,
    averaged over heads: `kernels.last_query_scores(softmax=True)`); the scores of the tokens before
    the window are smoothed by an average pool of `kernel` (zero padding counted, as the SnapKV and
    kvpress code pool the prefix only); the window is always kept, and the `budget - window`
    best-scored earlier tokens with it. Decoding appends without evicting (SnapKV compresses the
    prompt once). The selection is shared by the heads of a layer (kvpress chooses per KV head).
    """

    budget: int = 1024
    window: int = 32
    kernel: int = 5

    needs_queries: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.window < 1 or self.kernel < 1:
            raise ValueError(f"SnapKV: window and kernel must be >= 1, got {self.window}, {self.kernel}")

    def compact(self, layer: PagedLayer, step: StepInfo) -> None:
        if not step.is_prefill or layer.length <= self.budget:
            return
        window = min(self.window, step.query_length, self.budget)
        keys, _ = layer.to_dense()
        queries = step.queries[:, :, -window:]  # the new tokens are the last stored ones
        scores = snapkv_scores(queries, keys, self.kernel)
        self.keep_top(layer, scores, protect_last=window)


def snapkv_scores(queries: torch.Tensor, keys: torch.Tensor, kernel: int) -> torch.Tensor:
    """SnapKV's token scores ``[B, T]``: window queries ``[B, Hq, W, D]`` against keys ``[B, Hkv, T, D]``.

    The W window tokens (the last ones) get +inf; the pooled prefix is ``mean_heads(sum_w p)``.
    """
    window, total = queries.shape[2], keys.shape[2]
    probs = last_query_scores(queries, keys, softmax=True, pool_kernel=1, reduce_heads="mean")
    prefix = probs[:, : total - window]
    if kernel > 1 and prefix.shape[-1] > 0:
        # pooled over the prefix only: the window's own (large) scores must not leak into its neighbours
        pooled = F.avg_pool1d(prefix[:, None], kernel, stride=1, padding=kernel // 2)[:, 0, : prefix.shape[-1]]
        prefix = pooled
    return torch.cat([prefix, torch.full_like(probs[:, :window], float("inf"))], dim=1)


@register_method("h2o", plugin="kv")
@dataclass
class H2O(BudgetPolicy):
    """H2O (Zhang et al., 2023): keep the heavy hitters (largest accumulated attention) and recent tokens.

    Every step (prefill and decode) adds, to each stored token, the attention probability it receives
    from each of the step's queries (causal, summed over queries and heads; a token field carries the
    running sum through evictions). While a layer stores more than `budget` tokens it keeps the last
    `recent` tokens (default `budget // 2`, H2O's equal split) and the `budget - recent` other tokens
    with the largest accumulated score. The prefill is scored in blocks of `chunk` queries, so its
    memory is O(chunk x tokens), but its time is O(tokens^2): H2O cannot skip the attention matrix.
    """

    budget: int = 1024
    recent: int | None = None
    chunk: int = 256

    needs_queries: ClassVar[bool] = True
    FIELD: ClassVar[str] = "h2o_score"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.recent is not None and not 0 <= self.recent <= self.budget:
            raise ValueError(f"H2O: recent must be in [0, budget={self.budget}], got {self.recent}")
        if self.chunk < 1:
            raise ValueError(f"H2O: chunk must be >= 1, got {self.chunk}")

    @property
    def recent_tokens(self) -> int:
        return self.budget // 2 if self.recent is None else self.recent

    def compact(self, layer: PagedLayer, step: StepInfo) -> None:
        layer.add_token_field(self.FIELD, 0.0, torch.float32)  # a no-op once registered
        keys, _ = layer.to_dense()
        received = accumulated_attention(step.queries, keys, layer.token_index, step.seen, self.chunk)
        layer.set_token_field(self.FIELD, layer.token_field(self.FIELD) + received)
        self.keep_top(layer, layer.token_field(self.FIELD), protect_last=self.recent_tokens)


def accumulated_attention(
    queries: torch.Tensor, keys: torch.Tensor, token_index: torch.Tensor, first_query: int, chunk: int = 256
) -> torch.Tensor:
    """Attention each key receives from the queries, summed over queries and heads: ``[B, N]`` float32.

    queries ``[B, Hq, q, D]`` sit at stream indices ``first_query .. first_query + q - 1``; keys
    ``[B, Hkv, N, D]`` at `token_index` ``[B, N]``; a query sees the keys at or before its index.
    """
    batch, heads, q, dim = queries.shape
    kv_heads = keys.shape[1]
    k = keys.float().repeat_interleave(heads // kv_heads, dim=1)  # [B, Hq, N, D]
    total = torch.zeros(token_index.shape, dtype=torch.float32, device=keys.device)
    for start in range(0, q, chunk):
        block = queries[:, :, start : start + chunk].float()
        logits = torch.einsum("bhqd,bhnd->bhqn", block, k) * dim**-0.5
        where = first_query + start + torch.arange(block.shape[2], device=keys.device)
        visible = token_index[:, None, None, :] <= where[None, None, :, None]  # [B, 1, q, N]
        probs = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)
        total += probs.sum(dim=(1, 2))
    return total
