"""LeoAM's selection policy: variable-size chunks, min/max key abstracts, top chunks within a budget.

    from llmsys.cache import PagedCache
    from llmsys.kv import LeoAM

    with PagedCache.from_model(model, policy=LeoAM(budget=512)) as cache:   # everything on the device
        llmsys.models.generate(model, ids, cache=cache, max_new_tokens=32)

`LeoAMCache` (`llmsys.kv.leoam_cache`) runs the same policy over device / host / disk tiers.

Per layer (state in ``layer.policy_state["leoam"]``):

1. **Chunks.** After each prefill step the tokens it appended are cut into chunks whose boundaries
   follow that step's attention profile (`llmsys.kv.chunking`); tokens appended while decoding are
   closed into chunks of `min_chunk` tokens as their pages fill. Chunk boundaries are page
   boundaries, so a chunk is a run of the cache's pages and moves between tiers as whole pages.
2. **Abstracts.** A chunk's abstract is the element-wise min and max of its keys, reduced from the
   per-page abstracts the cache keeps on the device for every page whatever its tier
   (`kernels.chunk_minmax` over the page abstracts): scoring never reads a chunk's K/V.
3. **Selection.** At every decode step (one new token) of a layer that stores more than `budget`
   tokens, each chunk's upper bound ``sum_d max(q_d kmin_d, q_d kmax_d)`` of ``max q.k``
   (`kernels.abstract_scores`) is turned into an importance (softmax over chunks per query head,
   then the max over heads, since the token set is shared by the heads of a layer); the first
   `sink` tokens and the last `window` tokens are always attended, and the best chunks fill the
   rest of the budget in order of importance (the last one taken may be cut to fit), so exactly
   `budget` past tokens are attended. Prefill steps attend to everything; a layer that stores at
   most `budget` tokens attends to everything (then LeoAM is exactly the full cache).

LeoAM never evicts: what is not selected stays in the cache (on a lower tier in `LeoAMCache`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from llmsys.cache import CachePolicy, StepInfo
from llmsys.kernels import abstract_scores, chunk_minmax
from llmsys.kv.chunking import attention_profile, profile_chunks
from llmsys.registry import register_method

if TYPE_CHECKING:
    from llmsys.cache import PagedLayer

__all__ = ["LeoAM", "LeoAMState"]


@dataclass
class LeoAMState:
    """Per-layer state of `LeoAM`: closed chunk boundaries (stored-token indices, page-aligned,
    starting at 0). Chunk abstracts are not stored: they are reduced from the cache's page abstracts
    when needed, so they stay right after any row reordering (beam search) or crop."""

    bounds: list[int] = field(default_factory=lambda: [0])
    extra: dict[str, Any] = field(default_factory=dict)

    def chunk_sizes(self) -> list[int]:
        return [b - a for a, b in zip(self.bounds[:-1], self.bounds[1:])]


@register_method("leoam", plugin="kv")
@dataclass
class LeoAM(CachePolicy):
    """LeoAM chunk selection (see the module docstring; the exact rules of the paper are not public).

    Args:
        budget: past tokens attended at each decode step (sinks and window included).
        sink: first tokens always attended (default: ``min(4, budget)``).
        window: last tokens always attended (default: ``min(64, (budget - sink) // 4)``).
        min_chunk, max_chunk: chunk size bounds in tokens (rounded to whole pages of the cache).
        max_chunk_share: no chunk is larger than this share of the tokens selection can choose
            (``budget - sink - window``): a chunk that does not fit whole is cut, and a cut chunk
            loses tokens the query may need.
        profile_window: last queries of a prefill step whose attention profile sets the chunks.
    """

    budget: int = 1024
    sink: int | None = None
    window: int | None = None
    min_chunk: int = 16
    max_chunk: int = 256
    profile_window: int = 32
    max_chunk_share: float = 0.25

    needs_queries: ClassVar[bool] = True
    STATE: ClassVar[str] = "leoam"

    def __post_init__(self) -> None:
        name = type(self).__name__
        for attr in ("budget", "min_chunk", "max_chunk", "profile_window"):
            value = getattr(self, attr)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: {attr} must be an int >= 1, got {value!r}")
        if self.sink is None:
            self.sink = min(4, self.budget)
        if self.window is None:
            self.window = min(64, (self.budget - self.sink) // 4)
        if self.sink < 0 or self.window < 0:
            raise ValueError(f"{name}: sink and window must be >= 0, got {self.sink}, {self.window}")
        if self.budget < self.sink + self.window:
            raise ValueError(
                f"{name}: budget={self.budget} is smaller than sink + window = {self.sink} + {self.window}: "
                "the always-kept tokens alone would not fit. Raise the budget or lower sink / window."
            )
        if not 0 < self.max_chunk_share <= 1:
            raise ValueError(f"{name}: max_chunk_share must be in (0, 1], got {self.max_chunk_share}")
        if self.min_chunk > self.max_chunk:
            raise ValueError(f"{name}: min_chunk={self.min_chunk} > max_chunk={self.max_chunk}")

    # ---------------------------------------------------------------------------------------------
    # hooks
    def state(self, layer: PagedLayer) -> LeoAMState:
        st = layer.policy_state.get(self.STATE)
        if st is None:
            st = layer.policy_state[self.STATE] = LeoAMState()
        return st

    def attend_length(self, layer: PagedLayer, query_length: int) -> int | None:
        if query_length == 1 and layer.length > self.budget:
            return self.budget
        return None

    def attend(self, layer: PagedLayer, step: StepInfo) -> torch.Tensor | None:
        if step.query_length != 1 or layer.length <= self.budget:
            return None
        return self.select(layer, step.queries[:, :, -1])

    def compact(self, layer: PagedLayer, step: StepInfo) -> None:
        # no eviction: only the chunking of what this step appended
        st = self._synced(layer)
        if step.is_prefill:
            self._chunk_prefill(layer, step, st)
        else:
            self._chunk_decoded(layer, st)

    # ---------------------------------------------------------------------------------------------
    # chunks and abstracts
    def _pages(self, layer: PagedLayer, tokens: int) -> int:
        return max(1, round(tokens / layer.page_size))

    def _chunk_prefill(self, layer: PagedLayer, step: StepInfo, st: LeoAMState) -> None:
        ps, n, q = layer.page_size, layer.length, step.query_length
        start, end = st.bounds[-1], (layer.length // ps) * ps  # only full pages are closed
        if end <= start:
            return
        keys, _ = layer.gather(torch.arange(n - q, n))  # this step's keys: still on the device
        profile = attention_profile(step.queries, keys, self.profile_window).cpu()
        mass = torch.full((n - start,), float(profile.mean()))  # tokens left over from earlier steps
        mass[max(0, n - q - start) :] = profile[max(0, start - (n - q)) :]
        page_mass = mass[: end - start].view(-1, ps).sum(dim=1)
        lo = self._pages(layer, self.min_chunk)
        share = int(self.max_chunk_share * (self.budget - self.sink - self.window)) // ps
        pages = profile_chunks(page_mass, lo, max(lo, min(self._pages(layer, self.max_chunk), share)))
        self._close(layer, st, [start + p * ps for p in pages[1:]])

    def _chunk_decoded(self, layer: PagedLayer, st: LeoAMState) -> None:
        ps = layer.page_size
        size = self._pages(layer, self.min_chunk) * ps
        end = (layer.length // ps) * ps
        new = list(range(st.bounds[-1] + size, end + 1, size))
        if new:
            self._close(layer, st, new)

    def _close(self, layer: PagedLayer, st: LeoAMState, new_bounds: list[int]) -> None:
        st.bounds.extend(new_bounds)

    def _synced(self, layer: PagedLayer) -> LeoAMState:
        """The layer's state, chunks past the stored tokens dropped (after a crop)."""
        st = self.state(layer)
        if st.bounds[-1] > layer.length:
            st.bounds = [b for b in st.bounds if b <= layer.length]
        return st

    def _abstracts(self, layer: PagedLayer, bounds: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Min/max keys ``[B, Hkv, C, D]`` of chunks `bounds` (page-aligned but the last), from the page
        abstracts the cache keeps on the device."""
        ps = layer.page_size
        first, last = bounds[0] // ps, math.ceil(bounds[-1] / ps)
        table = layer.page_table[:, first:last].to(layer.device)
        pmin = layer.pool.kmin[table].permute(0, 2, 1, 3)  # [B, Hkv, pages, D]
        pmax = layer.pool.kmax[table].permute(0, 2, 1, 3)
        page_bounds = torch.tensor([math.ceil(b / ps) - first for b in bounds])
        # a reduction over page abstracts (a few per chunk): one segment_reduce on any device beats a
        # kernel launch per chunk, and keeps the Triton interpreter out of every decode step in CI
        return (
            chunk_minmax(pmin, page_bounds, backend="reference")[0],
            chunk_minmax(pmax, page_bounds, backend="reference")[1],
        )

    # ---------------------------------------------------------------------------------------------
    # selection
    def chunk_importance(self, layer: PagedLayer, query: torch.Tensor) -> tuple[list[int], torch.Tensor]:
        """Chunk bounds (closed chunks, then the open tail) and each chunk's importance ``[B, C]`` for
        the decode query ``[B, Hq, D]``."""
        bounds = list(self._synced(layer).bounds)
        if layer.length > bounds[-1]:  # the open tail (recent tokens) is scored like a chunk
            bounds.append(layer.length)
        kmin, kmax = self._abstracts(layer, bounds)
        scores = abstract_scores(query, kmin, kmax) * query.shape[-1] ** -0.5  # [B, Hq, C]
        return bounds, torch.softmax(scores, dim=-1).amax(dim=1)

    def select(self, layer: PagedLayer, query: torch.Tensor) -> torch.Tensor:
        """Stored indices ``[B, budget]`` (sorted) of the past tokens to attend for `query` ``[B, Hq, D]``.

        Works on chunks, not tokens (O(chunks + budget)): a chunk's candidates - its tokens outside
        the sinks and the window - are one contiguous range, and chunks in order of importance take
        whole ranges until the budget is full; the last one taken gives its first tokens.
        """
        n, device = layer.length, layer.device
        bounds, importance = self.chunk_importance(layer, query)
        batch = importance.shape[0]
        b = torch.tensor(bounds, device=device)
        first = b[:-1].clamp(min=self.sink)  # candidates of chunk c: [first, last)
        last = b[1:].clamp(max=n - self.window)
        cost = (last - first).clamp(min=0)
        room = self.budget - self.sink - self.window  # sinks and window do not overlap: n > budget
        order = torch.argsort(importance, dim=1, descending=True, stable=True)  # [B, C]
        sorted_cost = cost[order]
        before = torch.empty_like(order).scatter_(1, order, torch.cumsum(sorted_cost, 1) - sorted_cost)
        take = torch.minimum(cost[None], (room - before).clamp(min=0))  # [B, C] tokens taken per chunk
        lengths = take.reshape(-1)
        starts = first.repeat(batch)
        offsets = torch.cumsum(lengths, 0) - lengths
        chosen = torch.repeat_interleave(starts - offsets, lengths) + torch.arange(int(lengths.sum()), device=device)
        sinks = torch.arange(self.sink, device=device).expand(batch, -1)
        window = torch.arange(n - self.window, n, device=device).expand(batch, -1)
        return torch.cat([sinks, chosen.view(batch, room), window], dim=1)
