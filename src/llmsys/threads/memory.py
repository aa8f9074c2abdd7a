"""Working memory in the llmsys `PagedCache`: which cached slot holds which working-memory token.

Each thread (one batch row) has a working memory, a list of transcript tokens; the first
``cached[row]`` of them are in the KV cache, at the stored slots ``slots[row]`` (same order), and
always rotated at positions ``0 .. cached-1``: position = index in working memory, so the largest
position is bounded by the working memory, not by the output length.

Pruning a span of a thread means that every working-memory token from the span's start on leaves
the cache (`drop`); the runtime then re-feeds the kept tail at new contiguous positions. Only
re-encoding is exact: the tail's keys and values were computed while attending to the pruned span.

- One thread (the common case): `drop` truncates the cache to the span start (`truncate`: pages
  after it go back to the pool and are reused by the next appends), the tail is re-encoded on top,
  and the cache always holds exactly the working memory at slots ``0 .. W-1``. Nothing is masked:
  the logits are those of a from-scratch forward over the working memory, to the last bit in float64.
- Several threads in one batch share one cache with one stored length N, so a thread's dropped
  slots become holes that an explicit 4-D attention mask hides (rows also left-pad ragged feeds
  with masked tokens). Once every row has at least a page of holes, `compact` moves the live
  tokens together with `PagedCache.keep` (freed pages return to the pool). Attention over a
  different number of (masked) keys sums in another order, so batched rows agree with the
  from-scratch forward to float rounding (as any padded batch does), not to the bit.

`PagedCache` keeps the transformers positions rule (``get_seq_length()`` = tokens seen); this
module keeps ``seen == stored`` after every operation (`rebase`), so the default causal mask
transformers builds for a hole-free batch is right, and passes ``position_ids`` explicitly anyway.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from llmsys.cache import PagedCache, PagedLayer
from llmsys.models import forward

logger = logging.getLogger(__name__)


def rebase(layer: PagedLayer) -> None:
    """Make ``layer`` look freshly filled with its stored tokens: stream indices ``0 .. N-1`` and
    ``seen = N`` (after `keep`, ``seen`` still counts evicted tokens). Uses the public
    ``set_token_field`` and ``crop``: crop(-(seen - N)) keeps every token whose stream index is < N."""
    if not layer.is_initialized:
        return
    n, batch = layer.length, layer.token_index.shape[0]
    layer.set_token_field("token_index", torch.arange(n, device=layer.device).expand(batch, n).contiguous())
    if layer.seen > n:
        layer.crop(n - layer.seen)


def truncate(cache: PagedCache, n: int) -> None:
    """Keep the first ``n`` stored tokens of every layer and set ``seen = n`` (pages after them are
    freed for reuse). Needs ``seen == stored`` (kept by `rebase`)."""
    for layer in cache.layers:
        if not layer.is_initialized or layer.length <= n:
            continue
        if layer.seen != layer.length:
            rebase(layer)
        layer.crop(n - layer.length)


@dataclass(eq=False)
class BatchKV:
    """The cache of a batch of threads and the slot bookkeeping described in the module docstring."""

    model: Any
    batch: int
    page_size: int = 16
    pad_id: int = 0
    cache: PagedCache = field(init=False)
    stored: int = field(init=False, default=0)  # N: slots per row
    slots: list[list[int]] = field(init=False)  # per row: slot of each cached working-memory token
    valid: torch.Tensor = field(init=False)  # [B, N] bool: slot holds a live token (batches > 1)
    holes: int = field(init=False, default=0)  # dead slots, all rows together
    peak_page_rows: int = field(init=False, default=0)  # max over time of batch x pages per row

    def __post_init__(self) -> None:
        self.cache = PagedCache(config=self.model.config, page_size=self.page_size)
        self.slots = [[] for _ in range(self.batch)]
        self.valid = torch.ones(self.batch, 0, dtype=torch.bool)

    # ------------------------------------------------------------------------------------------
    def cached(self, row: int) -> int:
        return len(self.slots[row])

    def drop(self, row: int, keep: int) -> None:
        """Working-memory tokens ``keep ..`` of ``row`` leave the cache (they will be re-fed)."""
        slots = self.slots[row]
        if keep >= len(slots):
            return
        if self.batch == 1 and self.holes == 0:
            truncate(self.cache, keep)  # slots are 0 .. W-1: the dropped ones are the stored suffix
            self.stored = keep
            del slots[keep:]
            return
        dead = torch.as_tensor(slots[keep:], dtype=torch.long)
        self.valid[row, dead] = False
        self.holes += len(dead)
        del slots[keep:]

    def forward(self, feeds: list[list[int]], positions: list[int]) -> torch.Tensor:
        """Append ``feeds[row]`` (token ids at positions ``positions[row] ..``) and return the logits
        ``[B, V]`` after each row's last token. Rows are left-padded to the longest feed with masked
        tokens; a 4-D mask is passed only when some slot is masked."""
        batch = self.batch
        lengths = [len(f) for f in feeds]
        q = max(lengths)
        device = self.model.device
        ids = torch.full((batch, q), self.pad_id, dtype=torch.long)
        pos = torch.zeros((batch, q), dtype=torch.long)
        for row, (feed, start) in enumerate(zip(feeds, positions)):
            n = len(feed)
            if n:
                ids[row, q - n :] = torch.as_tensor(feed, dtype=torch.long)
                pos[row, q - n :] = torch.arange(start, start + n)
        ragged = min(lengths) != q
        mask = None
        if self.holes or ragged:
            live_new = torch.arange(q)[None, :] >= (q - torch.as_tensor(lengths))[:, None]  # [B, q]
            mask = self._mask(live_new, self.model.dtype).to(device)
        kwargs: dict[str, Any] = {"position_ids": pos.to(device), "logits_to_keep": 1}
        if mask is not None:
            kwargs["attention_mask"] = mask
        with torch.no_grad():
            out = forward(self.model, ids.to(device), cache=self.cache, **kwargs)
        base = self.stored
        for row, n in enumerate(lengths):
            self.slots[row].extend(range(base + q - n, base + q))
        if batch > 1 or ragged:
            if ragged:
                self.valid = torch.cat([self.valid, live_new], dim=1)
                self.holes += sum(q - n for n in lengths)
            else:
                self.valid = torch.cat([self.valid, torch.ones(batch, q, dtype=torch.bool)], dim=1)
        self.stored += q
        self.peak_page_rows = max(self.peak_page_rows, batch * math.ceil(self.stored / self.page_size))
        return out.logits[:, -1]

    def _mask(self, live_new: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Additive ``[B, 1, q, N+q]`` mask: live past slots, causal live new tokens; every token also
        sees itself, so a padding row is never all-masked (no NaN in its stored K/V)."""
        batch, q = live_new.shape
        valid = self.valid if self.valid.shape[1] == self.stored else torch.ones(batch, self.stored, dtype=torch.bool)
        past = valid[:, None, :].expand(batch, q, self.stored)
        eye = torch.eye(q, dtype=torch.bool)
        new = torch.ones(q, q, dtype=torch.bool).tril() & (live_new[:, None, :] | eye)
        allowed = torch.cat([past, new], dim=2)[:, None]
        return torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)

    def compact(self, force: bool = False) -> None:
        """Remove holes once every row has a page of them (or all of them with ``force``)."""
        if not self.holes:
            return
        live = self.valid.sum(dim=1)
        n = int(live.max())
        if not force and self.stored - n < self.page_size:
            return
        # per row: live slots in order, then the first holes as padding up to n
        order = torch.argsort((~self.valid).to(torch.int8), dim=1, stable=True)
        keep = order[:, :n].sort(dim=1).values
        self.cache.keep(keep)
        for layer in self.cache.layers:
            rebase(layer)
        remap = torch.full((self.batch, self.stored), -1, dtype=torch.long)
        remap.scatter_(1, keep, torch.arange(n).expand(self.batch, n).contiguous())
        self.slots = [remap[row, torch.as_tensor(s, dtype=torch.long)].tolist() for row, s in enumerate(self.slots)]
        self.valid = self.valid.gather(1, keep)
        self.stored = n
        self.holes = int((~self.valid).sum())

    def remove_rows(self, rows: list[int]) -> None:
        """Finished threads leave the batch (their pages are freed)."""
        if not rows:
            return
        keep_rows = [r for r in range(self.batch) if r not in set(rows)]
        index = torch.as_tensor(keep_rows, dtype=torch.long)
        for layer in self.cache.layers:
            layer.batch_select_indices(index)
        self.slots = [self.slots[r] for r in keep_rows]
        if self.valid.shape[1] == self.stored:
            self.valid = self.valid[index]
        self.batch = len(keep_rows)
        self.holes = int((~self.valid).sum()) if self.valid.shape[1] == self.stored else 0
        if self.batch == 1:
            self.compact(force=True)  # back to the exact single-thread path

    # ------------------------------------------------------------------------------------------
    def kv_bytes(self) -> int:
        """Bytes of the KV pages in use now (all layers, all rows)."""
        return int(self.cache.bytes_by_tier()["device"])

    def reserved_bytes(self) -> int:
        """Bytes of every page the pools ever created (in use + free for reuse): the memory held."""
        return sum(layer.pool.capacity * layer.pool.page_bytes for layer in self.cache.layers if layer.pool is not None)

    def peak_bytes(self) -> int:
        """Bytes of the pages in use at the fullest point so far."""
        return self.peak_page_rows * self.page_bytes()

    def page_bytes(self) -> int:
        """Bytes of one page of one row over all layers (keys + values)."""
        total = 0
        for layer in self.cache.layers:
            if layer.pool is not None:
                total += layer.pool.page_bytes
        return total

    def close(self) -> None:
        self.cache.close()


__all__ = ["BatchKV", "rebase", "truncate"]
