"""The page pool of one layer: fixed-size K/V pages, a free list, tiers and per-page key abstracts.

A page is named by a stable logical id. Where its bytes are is the page's placement: a slot of the
device pool tensor ``device_keys/device_values [slots, Hkv, page_size, D]``, a slot of the host pool
tensor (same shape, CPU, pinned on CUDA), or a file of the disk store. Moving a page changes its
placement, never its id, so page tables stay valid while pages travel.

Per-page metadata is kept for every owned page on the device, whatever the page's placement: the
element-wise min and max of the keys stored in it, ``kmin/kmax [ids, Hkv, D]`` (the "abstracts"
that Quest and LeoAM score against queries). They are updated incrementally on every write
(``index_reduce_`` with amin/amax) and reset when a page is allocated. With ``abstract_tokens`` below
the page size the pool also keeps finer abstracts, one per run of `abstract_tokens` tokens of a page,
``sub_kmin/sub_kmax [ids, sub_pages, Hkv, D]`` (LeoAM scores a page by the best of them: a tighter
upper bound of the page's best ``q·k`` than the page's own min/max), maintained at the same points.

Clean copies (``keep_clean_copies = True``, off by default): a page brought to the device from the
host or disk keeps its lower-tier copy until the page is written, so moving it back down to that
tier copies nothing (read-mostly KV that travels up and down, e.g. LeoAM's chunks). `pages_held`
counts the slots and files those copies occupy; `tier_of` / `bytes_by_tier` report placement only.

The pool knows nothing about sequences: `PagedLayer` keeps the page table and the token order, and
a serving engine can drive a `PagePool` directly with its own per-sequence tables.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import Iterable, Sequence

import torch

from llmsys.cache.codec import dequantize_minmax, quantize_minmax
from llmsys.cache.errors import CacheBudgetError
from llmsys.cache.tiers import DEVICE, DISK, HOST, TIERS, PrefetchHandle, Tier, TierContext, check_tier

logger = logging.getLogger(__name__)

FREE = -1
_CODE: dict[str, int] = {DEVICE: 0, HOST: 1, DISK: 2}
_NAME: dict[int, Tier] = {0: DEVICE, 1: HOST, 2: DISK}


def fine_abstract_tokens(page_size: int, abstract_tokens: int | None) -> int:
    """Tokens per fine abstract of a page: the smallest divisor of `page_size` that is at least
    `abstract_tokens` (None: the page size, i.e. one abstract per page)."""
    if abstract_tokens is None:
        return page_size
    if isinstance(abstract_tokens, bool) or not isinstance(abstract_tokens, int) or abstract_tokens < 1:
        raise ValueError(f"abstract_tokens must be an int >= 1 or None, got {abstract_tokens!r}")
    return next(d for d in range(min(abstract_tokens, page_size), page_size + 1) if page_size % d == 0)


def _reduce_minmax(kmin: torch.Tensor, kmax: torch.Tensor, ids: torch.Tensor, keys: torch.Tensor) -> None:
    """kmin/kmax[ids] = min/max(kmin/kmax[ids], keys) in place, with repeated ids (a segmented reduction)."""
    uniq, inverse, counts = torch.unique(ids, return_inverse=True, return_counts=True)
    if uniq.numel() == ids.numel():  # decode: one new token per page
        kmin[ids] = torch.minimum(kmin[ids], keys)
        kmax[ids] = torch.maximum(kmax[ids], keys)
        return
    # (scatter_reduce is ~1000x slower on CPU; index_reduce is still beta): group the tokens of
    # each page into a padded [pages, width, H, D] buffer and reduce over the width
    order = torch.argsort(inverse, stable=True)
    group = inverse[order]
    rank = torch.arange(ids.numel(), device=ids.device) - (torch.cumsum(counts, 0) - counts)[group]
    buf = keys.new_full((uniq.numel(), int(counts.max()), *keys.shape[1:]), float("inf"))
    buf[group, rank] = keys[order]
    kmin[uniq] = torch.minimum(kmin[uniq], buf.amin(dim=1))
    buf.fill_(float("-inf"))
    buf[group, rank] = keys[order]
    kmax[uniq] = torch.maximum(kmax[uniq], buf.amax(dim=1))


def _as_id_list(page_ids: torch.Tensor | Iterable[int] | int) -> list[int]:
    if isinstance(page_ids, torch.Tensor):
        return [int(p) for p in page_ids.reshape(-1).tolist()]
    if isinstance(page_ids, int):
        return [page_ids]
    return [int(p) for p in page_ids]


class _SlotStore:
    """K/V page storage ``[capacity, Hkv, page_size, D]`` with a free list of slots."""

    def __init__(self, page_shape: tuple[int, int, int], dtype: torch.dtype, device: torch.device, pin: bool):
        self.page_shape = page_shape
        self.dtype = dtype
        self.device = device
        self.pin = pin and device.type == "cpu"
        self.keys = self._empty(0)
        self.values = self._empty(0)
        self.free: list[int] = []

    def _empty(self, n: int) -> torch.Tensor:
        return torch.empty((n, *self.page_shape), dtype=self.dtype, device=self.device, pin_memory=self.pin)

    @property
    def capacity(self) -> int:
        return self.keys.shape[0]

    @property
    def used(self) -> int:
        return self.capacity - len(self.free)

    def needs_growth(self, n: int) -> bool:
        return len(self.free) < n

    def alloc(self, n: int) -> list[int]:
        if self.needs_growth(n):
            self.grow(n - len(self.free))
        return [self.free.pop() for _ in range(n)]

    def grow(self, extra: int) -> None:
        old = self.capacity
        new = max(old + extra, old + old // 2, 4)
        for name in ("keys", "values"):
            fresh = self._empty(new)
            fresh[:old].copy_(getattr(self, name))
            setattr(self, name, fresh)
        # pushed high to low so that pop() hands out the lowest slot first
        self.free.extend(range(new - 1, old - 1, -1))

    def release(self, slots: Iterable[int]) -> None:
        self.free.extend(slots)

    def put(self, slots: list[int], keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store pages ``[n, Hkv, page_size, D]`` (on any device) in `slots`."""
        self.keys[slots] = keys.to(self.device, self.dtype)
        self.values[slots] = values.to(self.device, self.dtype)

    def get(self, slots: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Pages in `slots` as ``[n, Hkv, page_size, D]`` tensors on `device`."""
        return self.keys[slots].to(device), self.values[slots].to(device)

    def page(self, slot: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """One page to copy to `device` (here: views of the storage, pinned if the store is)."""
        return self.keys[slot], self.values[slot]


class _CodedSlotStore(_SlotStore):
    """Host pages kept as 8-bit min/max codes (`llmsys.cache.codec`, one group per head and token):
    each row of a page is its `D` codes followed by its float32 minimum and step as 8 bytes, so the
    storage is a plain ``uint8 [capacity, Hkv, page_size, D + 8]`` tensor (a quarter of fp32 pages,
    about half of 16-bit ones). `put` quantises where the pages are (on the GPU before a device ->
    host copy), `get` / `page` dequantise on the device asked for (after the copy): what crosses the
    tiers is the codes. Pages holding non-finite values are kept raw, beside the codes."""

    def __init__(self, page_shape: tuple[int, int, int], dtype: torch.dtype, device: torch.device, pin: bool):
        self.page_dtype = dtype
        self.raw: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        heads, page_size, dim = page_shape
        super().__init__((heads, page_size, dim + 8), torch.uint8, device, pin)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        codes, mins, steps = quantize_minmax(x, x.shape[-1])
        side = torch.stack([mins, steps], dim=1).view(torch.uint8)  # [rows, 8]
        return torch.cat([codes, side], dim=1).view(*x.shape[:-1], x.shape[-1] + 8)

    def _decode(self, stored: torch.Tensor) -> torch.Tensor:
        flat = stored.reshape(-1, stored.shape[-1])
        side = flat[:, -8:].contiguous().view(torch.float32)  # [rows, 2]
        out = dequantize_minmax(flat[:, :-8], side[:, 0], side[:, 1])
        return out.view(*stored.shape[:-1], stored.shape[-1] - 8).to(self.page_dtype)

    def put(self, slots: list[int], keys: torch.Tensor, values: torch.Tensor) -> None:
        finite = torch.isfinite(keys).flatten(1).all(dim=1) & torch.isfinite(values).flatten(1).all(dim=1)
        for i, slot in enumerate(slots):
            self.raw.pop(slot, None)
            if not bool(finite[i]):  # a code cannot hold inf / nan: keep this page as it is
                self.raw[slot] = (keys[i].to(self.device, self.page_dtype), values[i].to(self.device, self.page_dtype))
        self.keys[slots] = self._encode(keys).to(self.device)
        self.values[slots] = self._encode(values).to(self.device)

    def get(self, slots: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        keys = self._decode(self.keys[slots].to(device))
        values = self._decode(self.values[slots].to(device))
        for i, slot in enumerate(slots):
            if slot in self.raw:
                keys[i], values[i] = (t.to(device) for t in self.raw[slot])
        return keys, values

    def page(self, slot: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.get([slot], device)
        return keys[0], values[0]

    def release(self, slots: Iterable[int]) -> None:
        slots = list(slots)
        for slot in slots:
            self.raw.pop(slot, None)
        super().release(slots)


class PagePool:
    """Pages of one layer: allocation, reads and writes through every tier, moves and prefetch.

    Args:
        num_heads, head_dim: KV heads and head size of the layer.
        page_size: tokens per page.
        dtype, device: of the device pool (the model's K/V dtype and the layer's device).
        layer_idx: used to name disk files and in error messages.
        tiers: what the layers of a cache share (disk store, prefetch thread); a private one if None.
        max_device_pages: most pages allowed on the device tier at once (None: unbounded); going
            over raises `CacheBudgetError`.
    """

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        page_size: int,
        dtype: torch.dtype,
        device: torch.device | str,
        *,
        layer_idx: int = 0,
        tiers: TierContext | None = None,
        max_device_pages: int | None = None,
        abstract_tokens: int | None = None,
    ):
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.num_heads, self.head_dim, self.page_size = num_heads, head_dim, page_size
        #: tokens per fine abstract: the smallest divisor of the page size >= the one asked for
        self.abstract_tokens = fine_abstract_tokens(page_size, abstract_tokens)
        self.sub_pages = page_size // self.abstract_tokens
        self.page_shape = (num_heads, page_size, head_dim)
        self.dtype = dtype
        self.device = torch.device(device)
        self.layer_idx = layer_idx
        self.tiers = tiers if tiers is not None else TierContext()
        self.max_device_pages = max_device_pages
        self.device_store = _SlotStore(self.page_shape, dtype, self.device, pin=False)
        self.host_store: _SlotStore | None = None
        # logical page ids: placement code (FREE / tier) and slot in that tier, on the CPU
        self.codes = torch.empty(0, dtype=torch.int8)
        self.slots = torch.empty(0, dtype=torch.long)
        self.free_ids: list[int] = []
        self.kmin = torch.empty((0, num_heads, head_dim), dtype=dtype, device=self.device)
        self.kmax = torch.empty((0, num_heads, head_dim), dtype=dtype, device=self.device)
        self.sub_kmin: torch.Tensor | None = None  # [ids, sub_pages, Hkv, D] when sub_pages > 1
        self.sub_kmax: torch.Tensor | None = None
        if self.sub_pages > 1:
            self.sub_kmin = torch.empty((0, self.sub_pages, num_heads, head_dim), dtype=dtype, device=self.device)
            self.sub_kmax = torch.empty_like(self.sub_kmin)
        self._inflight: dict[int, PrefetchHandle] = {}
        #: keep a page's host/disk copy when it moves to the device, until it is written (see module doc)
        self.keep_clean_copies = False
        self.clean_codes = torch.empty(0, dtype=torch.int8)  # tier code of the clean copy, FREE if none
        self.clean_slots = torch.empty(0, dtype=torch.long)
        #: bytes copied between tiers, keyed "src->dst" (e.g. "host->device")
        self.bytes_moved: Counter[str] = Counter()

    # ------------------------------------------------------------------------------------------
    # sizes and accounting
    @property
    def page_bytes(self) -> int:
        """Bytes of one page, keys and values together."""
        return 2 * self.num_heads * self.page_size * self.head_dim * self.dtype.itemsize

    @property
    def capacity(self) -> int:
        """Logical page ids in existence (owned + free)."""
        return self.codes.shape[0]

    @property
    def device_keys(self) -> torch.Tensor:
        """The device pool of keys ``[slots, Hkv, page_size, D]`` (index it with `device_slots`)."""
        return self.device_store.keys

    @property
    def device_values(self) -> torch.Tensor:
        return self.device_store.values

    def owned(self) -> list[int]:
        return (self.codes != FREE).nonzero().flatten().tolist()

    def pages_on(self, tier: str) -> int:
        return int((self.codes == _CODE[check_tier(tier)]).sum())

    def tier_of(self, page_ids: torch.Tensor | Iterable[int] | int) -> list[Tier]:
        """The placement of each page (`"device"`, `"host"` or `"disk"`)."""
        ids = _as_id_list(page_ids)
        self._check_owned(ids)
        return [_NAME[int(c)] for c in self.codes[ids].tolist()]

    def clean_tier_of(self, page_ids: torch.Tensor | Iterable[int] | int) -> list[Tier | None]:
        """The tier of each page's clean copy (None: no copy; see ``keep_clean_copies``)."""
        ids = _as_id_list(page_ids)
        return [None if c == FREE else _NAME[c] for c in self.clean_codes[ids].tolist()] if ids else []

    def pages_held(self, tier: str) -> int:
        """Pages whose bytes occupy `tier`: the pages placed there, clean copies kept there and the
        sources of prefetches still in flight."""
        code = _CODE[check_tier(tier)]
        held = int((self.codes == code).sum()) + int((self.clean_codes == code).sum())
        handles = {id(h): h for h in self._inflight.values()}.values()  # sources of in-flight prefetches
        return held + sum(1 for h in handles for pid, c, _, _ in h._jobs if c == code and pid in self._inflight)

    def bytes_by_tier(self) -> dict[str, int]:
        """Bytes held by the pages placed on each tier (whole pages, keys and values)."""
        return {tier: self.pages_on(tier) * self.page_bytes for tier in TIERS}

    def abstract_bytes(self) -> int:
        """Bytes of the key abstracts (per page, and fine ones when kept) of the owned pages: device
        memory beside the pages, whatever their tier."""
        per_page = (1 + (self.sub_pages if self.sub_kmin is not None else 0)) * 2 * self.num_heads * self.head_dim
        return len(self.owned()) * per_page * self.kmin.element_size()

    def device_slots(self, page_ids: torch.Tensor) -> torch.Tensor:
        """Device-pool slots of pages (any shape) that are on the device, as a tensor on the device."""
        flat = page_ids.reshape(-1).cpu()
        self._await(flat.tolist())
        codes = self.codes[flat]
        if bool((codes != _CODE[DEVICE]).any()):
            raise ValueError("device_slots: some pages are not on the device; move or prefetch them first")
        return self.slots[flat].view(page_ids.shape).to(self.device)

    # ------------------------------------------------------------------------------------------
    # allocation
    def reserve(self, num_pages: int) -> None:
        """Pre-size the id space and the device pool for `num_pages` pages (avoids regrowth)."""
        if self.capacity < num_pages:
            self._grow_ids(num_pages - self.capacity)
        if self.device_store.capacity < num_pages:
            self._sync_before_growth()
            self.device_store.grow(num_pages - self.device_store.capacity)

    def _grow_ids(self, extra: int) -> None:
        old = self.capacity
        new = max(old + extra, old + old // 2, 4)
        self.codes = torch.cat([self.codes, torch.full((new - old,), FREE, dtype=torch.int8)])
        self.slots = torch.cat([self.slots, torch.zeros(new - old, dtype=torch.long)])
        self.clean_codes = torch.cat([self.clean_codes, torch.full((new - old,), FREE, dtype=torch.int8)])
        self.clean_slots = torch.cat([self.clean_slots, torch.zeros(new - old, dtype=torch.long)])
        pad = torch.empty((new - old, self.num_heads, self.head_dim), dtype=self.dtype, device=self.device)
        self.kmin = torch.cat([self.kmin, pad.fill_(float("inf"))])
        self.kmax = torch.cat([self.kmax, pad.fill_(float("-inf"))])
        if self.sub_kmin is not None:
            sub = pad[:, None].expand(-1, self.sub_pages, -1, -1)
            self.sub_kmin = torch.cat([self.sub_kmin, sub.clone().fill_(float("inf"))])
            self.sub_kmax = torch.cat([self.sub_kmax, sub.clone().fill_(float("-inf"))])
        self.free_ids.extend(range(new - 1, old - 1, -1))

    def _check_budget(self, extra_device_pages: int) -> None:
        if self.max_device_pages is None:
            return
        on_device = self.pages_on(DEVICE)
        if on_device + extra_device_pages > self.max_device_pages:
            raise CacheBudgetError(
                f"layer {self.layer_idx} needs {on_device + extra_device_pages} device pages but "
                f"max_device_pages={self.max_device_pages}. Raise max_device_pages, evict tokens (a policy "
                "calling layer.keep / layer.drop_span), or place pages on 'host' / 'disk' (layer.move)."
            )

    def _sync_before_growth(self) -> None:
        # growing the device pool reallocates it: in-flight prefetches write into the old tensor
        if self._inflight:
            self.wait()

    def _alloc_device_slots(self, n: int) -> list[int]:
        self._check_budget(n)
        if self.device_store.needs_growth(n):
            self._sync_before_growth()
        return self.device_store.alloc(n)

    def allocate(self, n: int) -> list[int]:
        """`n` fresh pages on the device tier, their abstracts reset (min=+inf, max=-inf)."""
        if n <= 0:
            return []
        slots = self._alloc_device_slots(n)
        if len(self.free_ids) < n:
            self._grow_ids(n - len(self.free_ids))
        ids = [self.free_ids.pop() for _ in range(n)]
        self.codes[ids] = _CODE[DEVICE]
        self.slots[ids] = torch.tensor(slots, dtype=torch.long)
        idx = torch.tensor(ids, device=self.device)
        self.kmin[idx] = float("inf")
        self.kmax[idx] = float("-inf")
        if self.sub_kmin is not None:
            self.sub_kmin[idx] = float("inf")
            self.sub_kmax[idx] = float("-inf")
        return ids

    def free(self, page_ids: torch.Tensor | Iterable[int]) -> None:
        """Return pages to the pool (their slots and files too)."""
        ids = _as_id_list(page_ids)
        if not ids:
            return
        self._await(ids)
        self._check_owned(ids)
        if len(set(ids)) != len(ids):
            raise RuntimeError(f"layer {self.layer_idx}: page ids freed twice in one call: {sorted(ids)}")
        self._drop_clean_copies(ids)
        for code, id_slots in self._group_by_tier(ids).items():
            self._release(code, id_slots)
        self.codes[ids] = FREE
        self.free_ids.extend(ids)

    def reset(self) -> None:
        """Free every owned page (storage stays allocated for reuse)."""
        self.wait()
        self.free(self.owned())

    def _group_by_tier(self, ids: Sequence[int]) -> dict[int, list[tuple[int, int]]]:
        groups: dict[int, list[tuple[int, int]]] = {}
        for pid, code, slot in zip(ids, self.codes[ids].tolist(), self.slots[ids].tolist()):
            groups.setdefault(code, []).append((pid, slot))
        return groups

    def _release(self, code: int, id_slots: list[tuple[int, int]]) -> None:
        if code == _CODE[DEVICE]:
            self.device_store.release(s for _, s in id_slots)
        elif code == _CODE[HOST]:
            self.host_store.release(s for _, s in id_slots)
        elif code == _CODE[DISK]:
            for pid, _ in id_slots:
                self.tiers.disk.delete(self.layer_idx, pid)

    def _drop_clean_copies(self, ids: Sequence[int]) -> None:
        """Release the clean lower-tier copies of pages (they are written to, freed or re-placed)."""
        if not ids or not bool((self.clean_codes != FREE).any()):
            return
        t = torch.tensor(list(ids), dtype=torch.long)
        has = t[self.clean_codes[t] != FREE].tolist()
        for pid, code, slot in zip(has, self.clean_codes[has].tolist(), self.clean_slots[has].tolist()):
            self._release(code, [(pid, slot)])
        self.clean_codes[has] = FREE

    def _check_owned(self, ids: Sequence[int]) -> None:
        if not ids:
            return
        t = torch.tensor(ids, dtype=torch.long)
        if bool(((t < 0) | (t >= self.capacity)).any()) or bool((self.codes[t] == FREE).any()):
            bad = [p for p in ids if p < 0 or p >= self.capacity or int(self.codes[p]) == FREE]
            raise ValueError(f"layer {self.layer_idx}: pages {bad[:8]} are not owned (free or unknown ids)")

    # ------------------------------------------------------------------------------------------
    # reads and writes
    def write(self, page_ids: torch.Tensor, offsets: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store tokens: token i goes to page `page_ids[i]` at `offsets[i]`; keys/values are [M, Hkv, D].

        Pages not on the device are brought back first (writes happen on the device tier). The
        abstracts of the written pages are updated incrementally.
        """
        if page_ids.numel() == 0:
            return
        ids_cpu = page_ids.reshape(-1).cpu()
        unique = torch.unique(ids_cpu).tolist()
        self._await(unique)
        self.ensure_device(unique)
        self._drop_clean_copies(unique)
        slots = self.slots[ids_cpu].to(self.device)
        offs = offsets.reshape(-1).to(self.device)
        keys = keys.to(self.device, self.dtype)
        self.device_store.keys[slots, :, offs] = keys
        self.device_store.values[slots, :, offs] = values.to(self.device, self.dtype)
        ids = ids_cpu.to(self.device)
        _reduce_minmax(self.kmin, self.kmax, ids, keys)
        if self.sub_kmin is not None:  # the same reduction over the [ids * sub_pages + run] rows
            flat = (-1, self.num_heads, self.head_dim)
            runs = ids * self.sub_pages + torch.div(offs, self.abstract_tokens, rounding_mode="floor")
            _reduce_minmax(self.sub_kmin.view(flat), self.sub_kmax.view(flat), runs, keys)

    def read(self, page_ids: torch.Tensor, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens at (page, offset) pairs as [M, Hkv, D] on the device, from whatever tier holds them.

        Placement does not change: a page on the host or disk is copied for this read only.
        """
        ids_cpu = page_ids.reshape(-1).cpu()
        offs_cpu = offsets.reshape(-1).cpu()
        m = ids_cpu.numel()
        if m == 0:
            empty = torch.empty((0, self.num_heads, self.head_dim), dtype=self.dtype, device=self.device)
            return empty, empty.clone()
        self._await(torch.unique(ids_cpu).tolist())
        codes = self.codes[ids_cpu]
        if bool((codes == FREE).any()):
            raise ValueError(f"layer {self.layer_idx}: read from a free page")
        on_device = codes == _CODE[DEVICE]
        if bool(on_device.all()):  # the common case: one gather
            slots = self.slots[ids_cpu].to(self.device)
            offs = offs_cpu.to(self.device)
            return self.device_store.keys[slots, :, offs], self.device_store.values[slots, :, offs]
        out_k = torch.empty((m, self.num_heads, self.head_dim), dtype=self.dtype, device=self.device)
        out_v = torch.empty_like(out_k)
        if bool(on_device.any()):
            pos = on_device.nonzero().flatten()
            slots = self.slots[ids_cpu[pos]].to(self.device)
            offs = offs_cpu[pos].to(self.device)
            pos = pos.to(self.device)
            out_k[pos] = self.device_store.keys[slots, :, offs]
            out_v[pos] = self.device_store.values[slots, :, offs]
        elsewhere = (~on_device).nonzero().flatten()
        pages = torch.unique(ids_cpu[elsewhere]).tolist()
        pk, pv = self.read_pages(pages)  # [n, H, ps, D] on the device
        row = {pid: i for i, pid in enumerate(pages)}
        which = torch.tensor([row[int(p)] for p in ids_cpu[elsewhere].tolist()], device=self.device)
        offs = offs_cpu[elsewhere].to(self.device)
        dst = elsewhere.to(self.device)
        out_k[dst] = pk[which, :, offs]
        out_v[dst] = pv[which, :, offs]
        return out_k, out_v

    def read_pages(self, page_ids: torch.Tensor | Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Whole pages as [n, Hkv, page_size, D] on the device, from whatever tier holds them."""
        ids = _as_id_list(page_ids)
        n = len(ids)
        if n == 0:
            empty = torch.empty((0, *self.page_shape), dtype=self.dtype, device=self.device)
            return empty, empty.clone()
        self._await(ids)
        self._check_owned(ids)
        codes = self.codes[ids]
        if bool((codes == _CODE[DEVICE]).all()):
            slots = self.slots[ids].to(self.device)
            return self.device_store.keys[slots], self.device_store.values[slots]
        out_k = torch.empty((n, *self.page_shape), dtype=self.dtype, device=self.device)
        out_v = torch.empty_like(out_k)
        for code, members in self._group_positions(ids).items():
            k, v = self._load(code, [ids[i] for i in members])
            dst = torch.tensor(members, device=self.device)
            out_k[dst] = k.to(self.device, non_blocking=True)
            out_v[dst] = v.to(self.device, non_blocking=True)
            if code != _CODE[DEVICE]:
                self.bytes_moved[f"{_NAME[code]}->{DEVICE}"] += len(members) * self.page_bytes
        return out_k, out_v

    def store_pages(
        self, page_ids: Sequence[int], keys: torch.Tensor, values: torch.Tensor, fills: Sequence[int]
    ) -> None:
        """Overwrite whole pages in place (on whatever tier each is) and recompute their abstracts.

        `fills[i]` is how many leading tokens of page i are valid (the rest do not enter the abstracts).
        """
        ids = _as_id_list(page_ids)
        if not ids:
            return
        self._await(ids)
        self._check_owned(ids)
        self._drop_clean_copies(ids)
        keys = keys.to(self.device, self.dtype)
        values = values.to(self.device, self.dtype)
        for code, members in self._group_positions(ids).items():
            pids = [ids[i] for i in members]
            src = torch.tensor(members, device=self.device)
            slots = self.slots[pids].tolist()
            if code == _CODE[DEVICE]:
                dst = torch.tensor(slots, device=self.device)
                self.device_store.keys[dst] = keys[src]
                self.device_store.values[dst] = values[src]
            elif code == _CODE[HOST]:
                self.host_store.put(slots, keys[src], values[src])
            else:
                for i, pid in zip(members, pids):
                    self.tiers.disk.write(self.layer_idx, pid, keys[i], values[i])
        self._recompute_abstracts(ids, keys, fills)

    def _recompute_abstracts(self, ids: Sequence[int], keys: torch.Tensor, fills: Sequence[int]) -> None:
        valid = (
            torch.arange(self.page_size, device=self.device)[None, :]
            < torch.tensor(list(fills), device=self.device)[:, None]
        )
        valid = valid[:, None, :, None]  # [n, 1, ps, 1]
        idx = torch.tensor(list(ids), device=self.device)
        low, high = keys.masked_fill(~valid, float("inf")), keys.masked_fill(~valid, float("-inf"))
        self.kmin[idx] = low.amin(dim=2)
        self.kmax[idx] = high.amax(dim=2)
        if self.sub_kmin is not None:  # [n, Hkv, sub_pages, abstract_tokens, D] -> [n, sub_pages, Hkv, D]
            runs = (keys.shape[0], keys.shape[1], self.sub_pages, self.abstract_tokens, keys.shape[-1])
            self.sub_kmin[idx] = low.view(runs).amin(dim=3).transpose(1, 2)
            self.sub_kmax[idx] = high.view(runs).amax(dim=3).transpose(1, 2)

    def copy_pages(self, page_ids: Sequence[int]) -> list[int]:
        """New device pages holding the same tokens and abstracts as `page_ids` (for duplicated rows)."""
        ids = _as_id_list(page_ids)
        if not ids:
            return []
        k, v = self.read_pages(ids)
        new = self.allocate(len(ids))
        dst = self.slots[new].to(self.device)
        self.device_store.keys[dst] = k
        self.device_store.values[dst] = v
        src = torch.tensor(ids, device=self.device)
        new_t = torch.tensor(new, device=self.device)
        self.kmin[new_t] = self.kmin[src]
        self.kmax[new_t] = self.kmax[src]
        if self.sub_kmin is not None:
            self.sub_kmin[new_t] = self.sub_kmin[src]
            self.sub_kmax[new_t] = self.sub_kmax[src]
        return new

    def _group_positions(self, ids: Sequence[int]) -> dict[int, list[int]]:
        groups: dict[int, list[int]] = {}
        for i, code in enumerate(self.codes[list(ids)].tolist()):
            groups.setdefault(code, []).append(i)
        return groups

    def _load(self, code: int, ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Page data where it lies (device tensors, host tensors, or CPU tensors read from disk)."""
        slots = self.slots[list(ids)].tolist()
        if code == _CODE[DEVICE]:
            idx = torch.tensor(slots, device=self.device)
            return self.device_store.keys[idx], self.device_store.values[idx]
        if code == _CODE[HOST]:
            return self.host_store.get(slots, self.device)
        pages = [self.tiers.disk.read(self.layer_idx, pid, self.page_shape, self.dtype) for pid in ids]
        return torch.stack([k for k, _ in pages]), torch.stack([v for _, v in pages])

    # ------------------------------------------------------------------------------------------
    # placement
    def _host(self) -> _SlotStore:
        if self.host_store is None:
            pin = self.tiers.pin(self.device)
            coded = self.tiers.compress_host
            if coded is None:  # default: only where host <-> device copies cross a bus (CUDA)
                coded = self.device.type == "cuda"
            store = _CodedSlotStore if coded else _SlotStore
            self.host_store = store(self.page_shape, self.dtype, torch.device("cpu"), pin=pin)
        return self.host_store

    def ensure_device(self, page_ids: torch.Tensor | Iterable[int]) -> None:
        """Bring pages to the device tier (synchronously) if they are elsewhere."""
        ids = _as_id_list(page_ids)
        if ids and bool((self.codes[ids] != _CODE[DEVICE]).any()):
            self.move(ids, DEVICE)

    def move(self, page_ids: torch.Tensor | Iterable[int], tier: str) -> int:
        """Place pages on `tier` (synchronous copies); returns the number of bytes moved."""
        tier = check_tier(tier)
        ids = list(dict.fromkeys(_as_id_list(page_ids)))
        self._await(ids)
        self._check_owned(ids)
        dst_code = _CODE[tier]
        todo = [p for p, c in zip(ids, self.codes[ids].tolist()) if c != dst_code] if ids else []
        if not todo:
            return 0
        moved = 0
        if tier != DEVICE and self.keep_clean_copies:
            # pages with a clean copy on `tier` go back to it without a copy
            back = [p for p in todo if int(self.clean_codes[p]) == dst_code]
            if back:
                self._release(_CODE[DEVICE], list(zip(back, self.slots[back].tolist())))
                self.codes[back] = dst_code
                self.slots[back] = self.clean_slots[back]
                self.clean_codes[back] = FREE
                todo = [p for p in todo if int(self.codes[p]) != dst_code]
            self._drop_clean_copies(todo)
        if not todo:
            return 0
        if tier == DEVICE:
            self._check_budget(len(todo))
        for code, members in self._group_positions(todo).items():
            pids = [todo[i] for i in members]
            k, v = self._load(code, pids)
            old_slots = self.slots[pids].tolist()
            if tier == DEVICE:
                new_slots = self._alloc_device_slots(len(pids))
                dst = torch.tensor(new_slots, device=self.device)
                self.device_store.keys[dst] = k.to(self.device)
                self.device_store.values[dst] = v.to(self.device)
            elif tier == HOST:
                host = self._host()
                new_slots = host.alloc(len(pids))
                host.put(new_slots, k, v)
            else:
                disk = self.tiers.disk
                k, v = k.cpu(), v.cpu()
                for i, pid in enumerate(pids):
                    disk.write(self.layer_idx, pid, k[i], v[i])
                new_slots = [0] * len(pids)
            if tier == DEVICE and self.keep_clean_copies and code != _CODE[DEVICE]:
                self.clean_codes[pids] = code  # keep the source as the page's clean copy
                self.clean_slots[pids] = torch.tensor(old_slots, dtype=torch.long)
            else:
                self._release(code, list(zip(pids, old_slots)))
            self.codes[pids] = dst_code
            self.slots[pids] = torch.tensor(new_slots, dtype=torch.long)
            nbytes = len(pids) * self.page_bytes
            self.bytes_moved[f"{_NAME[code]}->{tier}"] += nbytes
            moved += nbytes
        return moved

    def prefetch(self, page_ids: torch.Tensor | Iterable[int]) -> PrefetchHandle:
        """Start bringing pages to the device on the background thread (side stream on CUDA).

        Device slots are reserved now and the pages count as on the device from now on; every read
        of them waits for the copy. Returns a handle (`done()`, `wait()`).
        """
        ids = list(dict.fromkeys(_as_id_list(page_ids)))
        self._check_owned(ids)
        todo = [p for p, c in zip(ids, self.codes[ids].tolist() if ids else []) if c != _CODE[DEVICE]]
        todo = [p for p in todo if p not in self._inflight]
        if not todo:
            return PrefetchHandle(self, [], None)
        dslots = self._alloc_device_slots(len(todo))
        jobs = [(pid, int(self.codes[pid]), int(self.slots[pid]), dslot) for pid, dslot in zip(todo, dslots)]
        host = self.host_store
        stream = self.tiers.side_stream(self.device)
        start = None
        if stream is not None:  # the copies must not overtake work already queued on the slots
            start = torch.cuda.Event()
            start.record(torch.cuda.current_stream(self.device))
        future = self.tiers.submit(
            _copy_in,
            self.tiers.disk if any(j[1] == _CODE[DISK] for j in jobs) else None,
            self.layer_idx,
            self.page_shape,
            self.dtype,
            jobs,
            self.device_store.keys,
            self.device_store.values,
            host,
            stream,
            start,
            self.tiers.pin(self.device),
        )
        handle = PrefetchHandle(self, todo, future)
        handle._jobs = jobs  # type: ignore[attr-defined]
        self.codes[todo] = _CODE[DEVICE]
        self.slots[todo] = torch.tensor(dslots, dtype=torch.long)
        for pid in todo:
            self._inflight[pid] = handle
        return handle

    def _prefetch_done(self, handle: PrefetchHandle) -> None:
        for pid, code, slot, _ in handle._jobs:  # type: ignore[attr-defined]
            self._inflight.pop(pid, None)
            if self.keep_clean_copies and int(self.codes[pid]) == _CODE[DEVICE]:
                self.clean_codes[pid] = code
                self.clean_slots[pid] = slot
            else:
                self._release(code, [(pid, slot)])
            self.bytes_moved[f"{_NAME[code]}->{DEVICE}"] += self.page_bytes

    def _prefetch_failed(self, handle: PrefetchHandle) -> None:
        # the sources are intact: put every page back where it was
        for pid, code, slot, dslot in handle._jobs:  # type: ignore[attr-defined]
            self._inflight.pop(pid, None)
            self.device_store.release([dslot])
            self.codes[pid] = code
            self.slots[pid] = slot

    def in_flight(self) -> list[int]:
        return list(self._inflight)

    def _await(self, ids: Iterable[int]) -> None:
        if not self._inflight:
            return
        handles = {id(h): h for p in ids if (h := self._inflight.get(p)) is not None}
        for h in handles.values():
            h.wait()

    def wait(self, page_ids: Iterable[int] | None = None) -> None:
        """Wait for in-flight prefetches (of `page_ids`, or all)."""
        self._await(list(self._inflight) if page_ids is None else _as_id_list(page_ids))

    # ------------------------------------------------------------------------------------------
    def check(self) -> None:
        """Assert the pool's invariants (tests): ids and slots partitioned, nothing owned twice."""
        n = self.capacity
        free = self.free_ids
        assert len(set(free)) == len(free), "a page id is on the free list twice"
        owned = set(self.owned())
        assert owned.isdisjoint(free), "a page is both owned and free"
        assert owned | set(free) == set(range(n)), "page ids leaked (neither owned nor free)"
        clean = self.clean_codes[: self.capacity]
        stray = (clean != FREE) & (self.codes != _CODE[DEVICE])
        assert not bool(stray.any()), "a page off the device has a clean copy"
        handles = {id(h): h for h in self._inflight.values()}.values()
        sources = [(c, slot) for h in handles for pid, c, slot, _ in h._jobs if pid in self._inflight]
        for code, store in ((_CODE[DEVICE], self.device_store), (_CODE[HOST], self.host_store)):
            used = self.slots[self.codes == code].tolist() + self.clean_slots[clean == code].tolist()
            used += [slot for c, slot in sources if c == code]  # read by a prefetch still in flight
            if store is None:
                assert not used
                continue
            assert len(set(used)) == len(used), "two pages share a slot"
            assert set(used).isdisjoint(store.free), "a used slot is on the free list"
            assert len(set(store.free)) == len(store.free), "a slot is on the free list twice"
            assert set(used) | set(store.free) == set(range(store.capacity)), "slots leaked"


def _copy_in(disk, layer_idx, page_shape, dtype, jobs, dkeys, dvalues, host, stream, start, pin):
    """Background half of `prefetch`: copy pages into their reserved device slots."""
    ctx = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
    staged = []  # keep pinned staging buffers alive until the stream is done with them
    with ctx:
        if start is not None:
            stream.wait_event(start)
        for pid, code, slot, dslot in jobs:
            if code == _CODE[HOST]:
                k, v = host.page(slot, dkeys.device)
            else:
                k, v = disk.read(layer_idx, pid, page_shape, dtype)
                if pin:
                    k, v = k.pin_memory(), v.pin_memory()
                staged.append((k, v))
            dkeys[dslot].copy_(k, non_blocking=True)
            dvalues[dslot].copy_(v, non_blocking=True)
        if stream is not None:
            stream.synchronize()
    staged.clear()


__all__ = ["FREE", "PagePool"]
