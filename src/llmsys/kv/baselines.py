"""The baseline KV policies of the LeoAM issue: Full, StreamingLLM and Quest.

They sit next to SnapKV and H2O (`llmsys.kv.policies`) and follow the same conventions (see that
module's docstring): `@dataclass` policies on `llmsys.cache.CachePolicy`, `budget` in tokens per
layer (`BudgetPolicy`), one token set per layer shared by its heads, registered by name.

    from llmsys.cache import PagedCache
    from llmsys.kv import Quest, StreamingLLM

    with PagedCache.from_model(model, policy=Quest(budget=512), page_size=16) as cache:
        generate(model, ids, cache=cache, max_new_tokens=32)

- `Full` is `llmsys.cache.KeepAll` (registered as "full"): every token, attended every step.
- `StreamingLLM` (Xiao et al., 2024): the first `sinks` tokens (attention sinks) and the last
  `window` tokens; everything in between is evicted, at every step (prefill and decode). Keys keep
  the rotary positions they were written with (the paper re-rotates them into the cache's own
  positions; kvpress's `StreamingLLMPress` does not either, unless wrapped in its re-rotation press).
- `Quest` (Tang et al., 2024): nothing is evicted; at every decode step each layer attends only to the
  `budget // page_size` pages whose key min/max abstracts give the highest upper bound on the
  attention logit of the current query (the last, partly filled page always among them). Prefill
  steps attend to everything, as in the paper.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from llmsys.cache import KeepAll, StepInfo
from llmsys.kernels import abstract_scores
from llmsys.kv.policies import BudgetPolicy
from llmsys.registry import register_method

if TYPE_CHECKING:
    from llmsys.cache import PagedLayer

__all__ = ["Full", "Quest", "StreamingLLM", "quest_page_scores"]

#: Full attention over an uncompressed cache: the same class as `llmsys.cache.KeepAll`, not a copy.
Full = register_method("full", plugin="kv")(KeepAll)


@register_method("streamingllm", plugin="kv")
@dataclass
class StreamingLLM(BudgetPolicy):
    """StreamingLLM: keep `sinks` first tokens and the last `window` (default `budget - sinks`) tokens.

    Eviction runs after every step, so a layer never stores more than `sinks + window` tokens once a
    step has finished (the step itself attends to everything stored before it plus its own tokens).
    """

    budget: int = 1024
    sinks: int = 4
    window: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.sinks, bool) or not isinstance(self.sinks, int) or self.sinks < 0:
            raise ValueError(f"StreamingLLM: sinks must be an int >= 0, got {self.sinks!r}")
        if self.window is None:
            if self.sinks >= self.budget:
                raise ValueError(
                    f"StreamingLLM: budget={self.budget} leaves no room for a recent window after "
                    f"sinks={self.sinks}; raise the budget above the sinks or lower sinks"
                )
        elif isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"StreamingLLM: window must be an int >= 1 or None, got {self.window!r}")
        elif self.sinks + self.window > self.budget:
            raise ValueError(
                f"StreamingLLM: budget={self.budget} < sinks + window = {self.sinks} + {self.window}; "
                "raise the budget or lower sinks / window (window=None uses budget - sinks)"
            )

    @property
    def recent_tokens(self) -> int:
        return self.budget - self.sinks if self.window is None else self.window

    def compact(self, layer: PagedLayer, step: StepInfo) -> None:
        excess = layer.length - self.sinks - self.recent_tokens
        if excess > 0:
            # stored tokens are in stream order: the sinks are the first ones, the window the last ones
            layer.drop_span(self.sinks, self.sinks + excess)


@register_method("quest", plugin="kv")
@dataclass
class Quest(BudgetPolicy):
    """Quest: per decode step, attend to the top pages by their key min/max bound; evict nothing.

    `budget` is the number of past tokens a decode step attends to: all of them while a layer stores
    at most `budget` tokens, else `budget // page_size` whole pages of the cache (the last stored page
    included; a budget below one page raises).
    Page scores are `quest_page_scores`: Quest's bound ``sum_d max(q_d * kmin_d, q_d * kmax_d)`` per
    query head against its KV head's abstracts (GQA: every query head of a group uses the group's
    abstracts), turned into a softmax over pages per head, then the max over the heads of the layer,
    since `PagedCache` attends to one token set per layer (Quest chooses pages per head).
    """

    budget: int = 1024

    needs_queries: ClassVar[bool] = True

    def pages(self, layer: PagedLayer) -> int:
        """Pages attended per decode step on this layer's page size."""
        if self.budget < layer.page_size:
            raise ValueError(
                f"Quest: budget={self.budget} tokens is less than one page (the cache's page_size="
                f"{layer.page_size}); raise the budget or build the PagedCache with page_size <= budget"
            )
        return self.budget // layer.page_size

    def _selects(self, layer: PagedLayer, query_length: int) -> bool:
        # a budget that covers every stored token attends to all of them (= Full), whatever the
        # page rounding; beyond it, budget // page_size pages < the stored pages
        return query_length == 1 and layer.length > self.budget

    def compact(self, layer: PagedLayer, step: StepInfo) -> None:
        self.pages(layer)  # nothing to evict: only checks the budget against the page size at the prefill

    def attend_length(self, layer: PagedLayer, query_length: int) -> int | None:
        if not self._selects(layer, query_length):
            return None
        last_page = layer.length - (layer.num_pages - 1) * layer.page_size
        return (self.pages(layer) - 1) * layer.page_size + last_page

    def attend(self, layer: PagedLayer, step: StepInfo) -> torch.Tensor | None:
        if not self._selects(layer, step.query_length):
            return None
        kmin, kmax = layer.page_abstracts()
        scores = quest_page_scores(step.queries[:, :, -1], kmin, kmax)
        scores[:, -1] = float("inf")  # the current (last) page is always attended
        pages = scores.topk(self.pages(layer), dim=-1).indices.sort(dim=-1).values  # [B, k]
        offsets = torch.arange(layer.page_size, device=pages.device)
        tokens = (pages[..., None] * layer.page_size + offsets).flatten(1)  # [B, k * page_size]
        # the last page sorts last and is the only partial one: cut its unused slots
        return tokens[:, : self.attend_length(layer, 1)]


def quest_page_scores(query: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    """Quest page scores shared by the heads of a layer: ``[B, pages]`` float32.

    query ``[B, Hq, D]`` (post-RoPE), kmin / kmax ``[B, Hkv, pages, D]``. Per query head the bound
    ``sum_d max(q_d kmin_d, q_d kmax_d)`` (`kernels.abstract_scores`) scaled like attention logits
    (``1/sqrt(D)``) is softmaxed over pages, an estimate of how much attention each page can draw in
    that head; a page's score is its largest over the heads, so a page that one head needs is kept
    even when the other heads ignore it.
    """
    bound = abstract_scores(query, kmin, kmax) * query.shape[-1] ** -0.5  # [B, Hq, pages]
    return torch.softmax(bound, dim=-1).amax(dim=1)
