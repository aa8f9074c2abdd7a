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
4. **Adaptive refinement** (`refine=True`, the default; our reconstruction of the paper's
   "importance-aware, adaptive" manager, whose exact rule is not public). The prefill's attention
   profile cannot know which region a later query needs, so a merged chunk that the selection above
   reaches is split at that step into its pages, each scored by its own page abstract (already on
   the device: no K/V is read), and the ranking is redone over the chunks not taken and the pages,
   for at most `refine_rounds` rounds (`select_refined`). Chunks no query reaches stay one abstract each.
   A unit within one page is scored by the best bound of its runs of `abstract_tokens` (4) tokens,
   whose min/max the cache's pools keep next to the page's (`_fine_page_logits`): a tighter bound.
   With `rechunk=True` (default) the boundaries also follow the decode attention: after each decode
   step, a page that drew more than a uniform share of the step's attention becomes a chunk of its
   own (`_rechunk`). ``refine=False, rechunk=False`` is the prefill-only rule (chunks taken whole,
   capped at `max_chunk_share` of the room).

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

__all__ = ["LeoAM", "LeoAMState", "chunk_stats"]


def _zero_stats() -> dict[str, float]:
    return dict.fromkeys(("steps", "rows", "abstracts", "pages", "runs", "splits"), 0)


def chunk_stats(cache: Any) -> dict[str, float]:
    """LeoAM's selection cost over a cache's layers (policies made with ``count_cost=True``):
    decode selections (``steps``, per layer and row: ``rows``), ``abstracts_per_step`` (chunk + page
    abstracts scored per layer, row and step), ``pages_per_step`` (pages chosen outside sinks and
    window), ``transfer_pages`` (mean run of consecutive chosen pages: what one transfer moves when
    they are not on the device) and ``splits`` (boundaries `rechunk` added)."""
    total = _zero_stats()
    for layer in getattr(cache, "layers", []):
        st = layer.policy_state.get(LeoAM.STATE)
        for key, value in (st.extra.get("chunk_stats", {}) if st is not None else {}).items():
            total[key] += value
    rows = max(total["rows"], 1)
    return {
        "steps": total["steps"],
        "rows": total["rows"],
        "abstracts_per_step": total["abstracts"] / rows,
        "pages_per_step": total["pages"] / rows,
        "transfer_pages": total["pages"] / max(total["runs"], 1),
        "splits": total["splits"],
    }


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
        refine: adaptive selection at decode (default, `select_refined`): a chunk of more than one
            page that the budget reaches is split into its pages, scored by their page abstracts,
            and the ranking redone (`refine_rounds` times at most). ``False``: the prefill-only rule
            (`select_chunks`: chunks taken whole in order of importance, the last one cut).
        rechunk: after each decode step, split the pages the step's query actually attended to
            most out of their merged chunk (boundaries follow the decode attention).
        count_cost: count the selection's cost per layer (`chunk_stats`: abstracts scored, pages
            chosen, transfer runs). Off by default: counting the runs reads the chosen indices back to the
            host at every step and layer.
        refine_rounds: at most this many split rounds per selection (then merged chunks still taken
            are taken whole, the last one cut); None: until only pages are taken. Each round is a
            re-ranking: 2 gave the same accuracy as None on the full quality grid at about half the
            selection cost (docs/kv.md).
        abstract_tokens: the adaptive selection scores a page by the best of its finer abstracts, one
            per run of this many tokens (rounded up to a divisor of the page size), which the cache's
            pools keep on the device next to the per-page ones; merged chunks keep one abstract
            each. A tighter bound than the page's own min/max (16-token pages: MQAR at 1/8 of the KV
            0.93 -> 1.00, docs/kv.md) for ``page_size / abstract_tokens`` times the page abstracts'
            memory (4: a quarter of the KV's size). None: per-page abstracts only.
    """

    budget: int = 1024
    sink: int | None = None
    window: int | None = None
    min_chunk: int = 16
    max_chunk: int = 256
    profile_window: int = 32
    max_chunk_share: float = 0.25
    refine: bool = True
    rechunk: bool = True
    refine_rounds: int | None = 2
    abstract_tokens: int | None = 4
    count_cost: bool = False

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
        if self.refine_rounds is not None and (isinstance(self.refine_rounds, bool) or self.refine_rounds < 1):
            raise ValueError(f"{name}: refine_rounds must be an int >= 1 or None (no limit), got {self.refine_rounds}")
        if self.budget < self.sink + self.window:
            raise ValueError(
                f"{name}: budget={self.budget} is smaller than sink + window = {self.sink} + {self.window}: "
                "the always-kept tokens alone would not fit. Raise the budget or lower sink / window."
            )
        if not 0 < self.max_chunk_share <= 1:
            raise ValueError(f"{name}: max_chunk_share must be in (0, 1], got {self.max_chunk_share}")
        fine = self.abstract_tokens
        if fine is not None and (isinstance(fine, bool) or not isinstance(fine, int) or fine < 1):
            raise ValueError(f"{name}: abstract_tokens must be an int >= 1 or None, got {self.abstract_tokens!r}")
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
        chosen = self.select(layer, step.queries[:, :, -1])
        if self.count_cost:
            self._count(layer, chosen)
        return chosen

    def compact(self, layer: PagedLayer, step: StepInfo) -> None:
        # no eviction: only the chunking of what this step appended (and, with `rechunk`, the
        # boundaries the decode attention re-derives)
        st = self._synced(layer)
        if step.is_prefill:
            self._chunk_prefill(layer, step, st)
        else:
            if self.rechunk and step.attend is not None and step.queries is not None:
                self._rechunk(layer, step, st)
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
        hi = self._pages(layer, self.max_chunk)
        if not self.refine:  # chunks are taken whole (the last one cut): keep them below a share of the room
            hi = min(hi, int(self.max_chunk_share * (self.budget - self.sink - self.window)) // ps)
        pages = profile_chunks(page_mass, lo, max(lo, hi))
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

    def _rechunk(self, layer: PagedLayer, step: StepInfo, st: LeoAMState) -> None:
        """Boundaries that follow the decode attention (our reconstruction of "deserts vary across
        decoding steps"): the step's query attention over the tokens it attended (softmax, mean over
        heads; the same attention the step computed, recomputed here from the keys still on the
        device) is summed per page; a page that drew more than a uniform share of it (1 / attended
        pages) and sits inside a closed chunk of several pages becomes a chunk of its own. Chunks
        nobody attended stay merged."""
        ps, closed = layer.page_size, st.bounds[-1]
        chosen = step.attend.to(layer.device)  # [B, A] stored indices, past tokens only
        keys, _ = layer.gather(chosen)  # [B, Hkv, A, D]
        q = step.queries[:, :, -1].float()  # [B, Hq, D]
        group = q.shape[1] // keys.shape[1]
        k = keys.float().repeat_interleave(group, dim=1)
        probs = torch.softmax(torch.einsum("bhd,bhad->bha", q, k) * q.shape[-1] ** -0.5, dim=-1).mean(dim=1)
        page = chosen // ps  # [B, A] page columns
        mass = torch.zeros(chosen.shape[0], layer.num_pages, dtype=probs.dtype, device=probs.device)
        mass.scatter_add_(1, page, probs)
        attended = (mass > 0).sum(dim=1, keepdim=True).clamp(min=1)
        hot = ((mass * attended > 1).any(dim=0)).nonzero().flatten().tolist()  # pages, union over rows
        cuts = set()
        pos = 0
        for p in hot:
            a, e = p * ps, (p + 1) * ps
            if e > closed:
                break
            while st.bounds[pos + 1] <= a:
                pos += 1
            lo, hi = st.bounds[pos], st.bounds[pos + 1]
            if hi - lo > ps:  # a merged chunk: cut the hot page out of it
                cuts.update(b for b in (a, e) if lo < b < hi)
        if cuts:
            st.bounds = sorted(set(st.bounds) | cuts)
            st.extra.setdefault("chunk_stats", _zero_stats())["splits"] += len(cuts)

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

    def _fine_page_logits(self, layer: PagedLayer, query: torch.Tensor) -> torch.Tensor | None:
        """Scaled best run bound ``[B, Hq, pages]`` of every page column of every row for `query`
        ``[B, Hq, D]``, or None when the pool keeps no fine abstracts (`abstract_tokens`).

        One pass over the rows' fine abstracts per step: re-chunking makes every attended page a unit
        of its own, so after some steps most pages are scored at every step anyway, and one pass
        reads each abstract once instead of gathering copies per round. With one row the pool's
        storage is scored in place (no gather)."""
        pool = layer.pool
        if pool.sub_kmin is None:
            return None
        batch, runs = query.shape[0], pool.sub_pages
        if batch == 1:  # every page of the pool is this row's (or free: masked below)
            smin, smax, cols = pool.sub_kmin[None], pool.sub_kmax[None], layer.page_table[0].to(layer.device)
        else:
            table = layer.page_table.to(layer.device)
            smin, smax, cols = pool.sub_kmin[table], pool.sub_kmax[table], None  # [B, pages, runs, Hkv, D]
        flat = (batch, -1, *smin.shape[-2:])  # -> [B, Hkv, pages * runs, D]
        scores = abstract_scores(query, smin.view(flat).transpose(1, 2), smax.view(flat).transpose(1, 2))
        # a run no token was written to (a partial or free page) keeps min=+inf, max=-inf: masked
        empty = smin[..., 0, 0] > smax[..., 0, 0]  # [B, pages, runs]
        scores = scores.view(batch, query.shape[1], -1, runs).masked_fill(empty[:, None], float("-inf"))
        best = scores.amax(dim=-1) * query.shape[-1] ** -0.5
        return best if cols is None else best[:, :, cols]

    def _page_logits(
        self, layer: PagedLayer, row: int, pages: list[int], query: torch.Tensor, fine: torch.Tensor | None
    ) -> torch.Tensor:
        """Scaled upper bounds ``[Hq, P]`` of row `row`'s pages `pages` (page columns) for `query`
        ``[1, Hq, D]``: the best of each page's fine abstracts when the pool keeps them (`fine`, from
        `_fine_page_logits`), else the page's own min/max."""
        if fine is not None:
            return fine[row][:, pages]
        table = layer.page_table[row, pages].to(layer.device)
        kmin = layer.pool.kmin[table].permute(1, 0, 2)[None]  # [1, Hkv, P, D]
        kmax = layer.pool.kmax[table].permute(1, 0, 2)[None]
        return abstract_scores(query, kmin, kmax)[0] * query.shape[-1] ** -0.5

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
        """Stored indices ``[B, budget]`` (sorted) of the past tokens to attend for `query` ``[B, Hq, D]``
        (`refine`: `select_refined`, else `select_chunks`)."""
        return self.select_refined(layer, query) if self.refine else self.select_chunks(layer, query)

    def select_refined(self, layer: PagedLayer, query: torch.Tensor) -> torch.Tensor:
        """Adaptive selection: chunks are split where the query needs them (our reconstruction).

        Round 1 is `select_chunks`'s ranking: every chunk scored by its abstract (bound scaled by
        ``1/sqrt(D)``, softmax over the chunks per query head, max over heads), chunks taken in order
        of importance until the room is full. Every chunk of more than one page taken this way is
        split into its pages, each scored by its own page abstract (the cache keeps them on the
        device: no K/V is read), and the ranking is redone over the new set of units (the chunks not
        taken, one abstract each, and the pages) - until the units taken are all single pages (or
        the open tail), or after `refine_rounds` rounds (merged chunks still reached are then taken
        whole). So the pages a query needs are chosen by their own, tighter bounds, while
        chunks that no query reaches ("deserts") stay one abstract each. The last unit taken may be
        cut to fit; sinks and window as in `select_chunks`.
        """
        n, device, ps = layer.length, layer.device, layer.page_size
        st = self._synced(layer)
        bounds = list(st.bounds)
        if n > bounds[-1]:
            bounds.append(n)
        kmin, kmax = self._abstracts(layer, bounds)
        scale = query.shape[-1] ** -0.5
        logits = abstract_scores(query, kmin, kmax) * scale  # [B, Hq, C]
        lo_t, hi_t = self.sink, n - self.window
        room = self.budget - self.sink - self.window
        rows, scored = [], 0
        fine = self._fine_page_logits(layer, query)  # None without fine abstracts
        if fine is not None:  # the runs it scored: every row's pages (one row: the whole pool, free pages too)
            pages = query.shape[0] * fine.shape[-1] if query.shape[0] > 1 else layer.pool.sub_kmin.shape[0]
            scored += pages * layer.pool.sub_pages
        for b in range(query.shape[0]):
            units = list(zip(bounds[:-1], bounds[1:]))
            unit_logits = logits[b]  # [Hq, U]
            scored += len(units)
            if fine is not None:  # units within one page: scored by their fine abstracts (computed above)
                single = [u for u, (a, e) in enumerate(units) if a // ps == (e - 1) // ps]
                if single:
                    unit_logits = unit_logits.clone()
                    pages = [units[u][0] // ps for u in single]
                    unit_logits[:, single] = self._page_logits(layer, b, pages, query[b : b + 1], fine)
            rounds = 0
            while True:
                importance = torch.softmax(unit_logits, dim=-1).amax(dim=0)
                order = torch.argsort(importance, descending=True, stable=True).tolist()
                left, taken, split = room, [], []
                for u in order:
                    if left <= 0:
                        break
                    a, e = units[u]
                    cost = min(e, hi_t) - max(a, lo_t)
                    if cost <= 0:
                        continue
                    if math.ceil(e / ps) - a // ps > 1:
                        split.append(u)
                    taken.append((max(a, lo_t), max(a, lo_t) + min(cost, left)))
                    left -= min(cost, left)
                if not split or (self.refine_rounds is not None and rounds >= self.refine_rounds):
                    break
                rounds += 1
                new_units, columns = [], []
                for u in split:  # the pages of the taken merged chunks, scored in one call
                    a, e = units[u]
                    p0, p1 = a // ps, math.ceil(e / ps)
                    columns += range(p0, p1)
                    new_units += [(max(p * ps, a), min((p + 1) * ps, e)) for p in range(p0, p1)]
                new_logits = self._page_logits(layer, b, columns, query[b : b + 1], fine)
                scored += 0 if fine is not None else len(columns)
                gone = set(split)
                keep = [u for u in range(len(units)) if u not in gone]
                units = [units[u] for u in keep] + new_units
                unit_logits = torch.cat([unit_logits[:, keep], new_logits], dim=1)
            taken.sort()
            rows.append(torch.cat([torch.arange(s, t, device=device) for s, t in [(0, 0), *taken]]))
        st.extra["last_scored"] = scored / max(query.shape[0], 1)
        batch = query.shape[0]
        sinks = torch.arange(self.sink, device=device).expand(batch, -1)
        window = torch.arange(n - self.window, n, device=device).expand(batch, -1)
        return torch.cat([sinks, torch.stack(rows), window], dim=1)

    def _count(self, layer: PagedLayer, chosen: torch.Tensor) -> None:
        """Per-layer cost counters of the selection (`chunk_stats`): abstracts scored per row, and the
        transfers the chosen pages outside sinks and window make (runs of consecutive pages)."""
        st = self.state(layer)
        stats = st.extra.setdefault("chunk_stats", _zero_stats())
        ps = layer.page_size
        middle = chosen[:, self.sink : chosen.shape[1] - self.window] if self.window else chosen[:, self.sink :]
        for row in middle.cpu():
            pages = torch.unique(row // ps)
            runs = 1 + int((pages.diff() != 1).sum()) if pages.numel() else 0
            stats["rows"] += 1
            stats["pages"] += int(pages.numel())
            stats["runs"] += runs
        stats["steps"] += 1
        stats["abstracts"] += st.extra.pop("last_scored", 0) * chosen.shape[0]

    def select_chunks(self, layer: PagedLayer, query: torch.Tensor) -> torch.Tensor:
        """Stored indices ``[B, budget]`` (sorted) of the past tokens to attend for `query` ``[B, Hq, D]``,
        whole chunks in order of importance (the prefill-only rule, ``refine=False``).

        Works on chunks, not tokens (O(chunks + budget)): a chunk's candidates - its tokens outside
        the sinks and the window - are one contiguous range, and chunks in order of importance take
        whole ranges until the budget is full; the last one taken gives its first tokens.
        """
        n, device = layer.length, layer.device
        bounds, importance = self.chunk_importance(layer, query)
        self.state(layer).extra["last_scored"] = len(bounds) - 1
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
