"""`PagedLayer`: one layer of a `PagedCache` - a page table over a `PagePool`, plus token bookkeeping.

Layout. Every row b of the batch stores the same number of tokens ``length`` (N); stored token t of
row b lives in page ``page_table[b, t // page_size]`` at offset ``t % page_size``. Rows own disjoint
pages. Stored tokens are always in stream order.

Positions rule. Two counters differ as soon as a policy evicts tokens:

- ``seen``: tokens the layer has been fed (the stream length). `get_seq_length()` returns ``seen``,
  because transformers uses it for everything that is about *positions*: the default
  ``position_ids`` of the next tokens (``arange(q) + get_seq_length()``), the query offset of the
  causal mask (``get_query_offset``), and `generate`'s slicing of ``input_ids`` that are already in
  the cache. Eviction never decreases it (only `crop` and `reset` do), so after ``keep()`` compacts
  to N tokens the next token still gets rotary position ``seen``, not N.
- ``length``: tokens stored (N). `get_mask_sizes(q)` returns ``(A + q, seen - A)`` where A is the
  number of past tokens `update` will return (``length``, or the policy's ``attend_length``). So the
  key axis of the mask is exactly as long as what `update` returns, the q new tokens sit at mask
  coordinates ``seen .. seen+q-1`` (causal among themselves), and the A past tokens at coordinates
  below ``seen`` (visible to every query). Nothing else about the past tokens' coordinates is exact
  in that mask: with left padding and evicted tokens, the 2-D padding mask would be read at the
  wrong columns, and the mask is built once from layer 0 for all layers. `PagedCache.attach(model)`
  fixes both: it rebuilds each layer's mask from the stored tokens' real stream indices. Without
  it, a layer whose `update` returns another length than the mask was built for raises
  `MaskMismatchError` instead of failing deep inside attention.

Per token the layer keeps token fields ``[B, N, ...]`` that follow every keep / drop / crop / row
selection: ``token_index`` (stream index = mask coordinate), ``positions`` (the rotary position the
stored key was rotated with: the model's ``position_ids`` when the layer sees them, else the stream
index; `rewrite_keys` updates it) and any field a policy adds with `add_token_field`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch
from transformers.cache_utils import CacheLayerMixin

from llmsys.cache.errors import CacheError, MaskMismatchError, PolicyError
from llmsys.cache.policy import CachePolicy, KeepAll, StepInfo
from llmsys.cache.pool import PagePool
from llmsys.cache.tiers import HOST, PrefetchHandle, Tier, TierContext

logger = logging.getLogger(__name__)

_BUILTIN_FIELDS = ("token_index", "positions")


class PagedLayer(CacheLayerMixin):
    """One layer's K/V in fixed-size pages (a transformers `CacheLayerMixin`).

    Args:
        page_size: tokens per page.
        policy: the `CachePolicy` consulted at every step (default `KeepAll`).
        layer_idx: the model layer this caches (names disk files, errors, `StepInfo.layer_idx`).
        tiers: shared disk store / prefetch thread (a `PagedCache` passes its own).
        max_device_pages: most pages this layer may hold on the device (None: unbounded).
    """

    is_sliding = False
    is_compileable = False
    is_croppable = True

    def __init__(
        self,
        page_size: int = 16,
        policy: CachePolicy | None = None,
        *,
        layer_idx: int = 0,
        tiers: TierContext | None = None,
        max_device_pages: int | None = None,
        **kwargs: Any,
    ):
        super().__init__()
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.page_size = page_size
        self.policy: CachePolicy = policy if policy is not None else KeepAll()
        self.layer_idx = layer_idx
        self.tiers = tiers if tiers is not None else TierContext()
        self.max_device_pages = max_device_pages
        self.pool: PagePool | None = None
        self.device: torch.device | None = None
        self.dtype: torch.dtype | None = None
        self.page_table = torch.empty((0, 0), dtype=torch.long)
        self.length = 0
        self.seen = 0
        self._batch: int | None = None
        self.fields: dict[str, torch.Tensor] = {}
        self._field_specs: dict[str, tuple[float | int, torch.dtype, tuple[int, ...]]] = {
            "token_index": (0, torch.long, ()),
            "positions": (0, torch.long, ()),
        }
        #: free-form per-layer state for policies (reset with the layer)
        self.policy_state: dict[str, Any] = {}
        self._step: StepInfo | None = None
        self._mask_plan: tuple[int, int, int] | None = None  # (q, kv_length, kv_offset) of this forward

    # The transformers base class names the dense K/V `keys` / `values`; here they are the device
    # pools [slots, Hkv, page_size, D] (read-only views of storage; use `to_dense()` for [B,H,N,D]).
    @property
    def keys(self) -> torch.Tensor | None:  # type: ignore[override]
        return None if self.pool is None else self.pool.device_keys

    @keys.setter
    def keys(self, value: Any) -> None:
        if value is not None:
            raise AttributeError("PagedLayer.keys is the page pool; write through update / append")

    @property
    def values(self) -> torch.Tensor | None:  # type: ignore[override]
        return None if self.pool is None else self.pool.device_values

    @values.setter
    def values(self, value: Any) -> None:
        if value is not None:
            raise AttributeError("PagedLayer.values is the page pool; write through update / append")

    @property
    def batch_size(self) -> int:
        # transformers' Cache.batch_size reads this from layers that have it (hasattr)
        if self._batch is None:
            raise AttributeError("batch_size is unknown before the first update")
        return self._batch

    @property
    def num_pages(self) -> int:
        """Pages per row."""
        return self.page_table.shape[1]

    def __repr__(self) -> str:
        return (
            f"PagedLayer(layer={self.layer_idx}, page_size={self.page_size}, batch={self._batch}, "
            f"stored={self.length}, seen={self.seen}, policy={type(self.policy).__name__})"
        )

    # ------------------------------------------------------------------------------------------
    # transformers layer API
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, _, head_dim = key_states.shape
        self.device, self.dtype = key_states.device, key_states.dtype
        self.pool = PagePool(
            heads,
            head_dim,
            self.page_size,
            key_states.dtype,
            key_states.device,
            layer_idx=self.layer_idx,
            tiers=self.tiers,
            max_device_pages=self.max_device_pages,
            abstract_tokens=getattr(self.policy, "abstract_tokens", None),
        )
        self._start_batch(batch)
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this step's K/V, return the K/V to attend to as contiguous ``[B, Hkv, A+q, D]``.

        The returned tokens are the past tokens the policy attends to (all by default), in stored
        order, followed by the q new tokens. Afterwards the policy may compact and move pages.
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        q = key_states.shape[-2]
        step = self._step
        if step is None or step.query_length != q:
            step = self.begin_step(q, position_ids=_position_ids_from(kwargs))
        self._step = None
        self.append(key_states, value_states, position_ids=step.position_ids)
        if step.attend is None:
            keys, values = self.to_dense()
        else:
            new = torch.arange(self.length - q, self.length, device=step.attend.device)
            idx = torch.cat([step.attend, new.expand(step.attend.shape[0], q)], dim=1)
            keys, values = self.gather(idx)
        self._check_mask(q, keys.shape[-2], step)
        self.policy.compact(self, step)
        self.policy.place(self, step)
        return keys, values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """``(kv_length, kv_offset) = (A + q, seen - A)``, A = past tokens `update` will return."""
        past = self._planned_past(query_length)
        return past + query_length, self.seen - past

    def get_seq_length(self) -> int:
        """Tokens seen (positions), not tokens stored: see the module docstring."""
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last ``-tokens_to_remove`` tokens of the stream (a negative int, as transformers)."""
        if tokens_to_remove > 0:
            raise ValueError(
                f"Calling `crop` with a positive value (`{tokens_to_remove}`) is not supported. "
                "Please use a negative integer to remove that number of tokens from the cache instead."
            )
        if tokens_to_remove == 0 or self._batch is None:
            return
        new_seen = max(self.seen + tokens_to_remove, 0)
        survive = self.fields["token_index"] < new_seen
        counts = survive.sum(dim=1)
        n = int(counts[0]) if counts.numel() else 0
        if bool((counts != n).any()) or not bool(survive[:, :n].all()):
            raise CacheError(
                f"layer {self.layer_idx}: cannot crop {-tokens_to_remove} tokens: the rows evicted different "
                "recent tokens, so they would be left with different lengths. Crop before evicting."
            )
        self.keep(torch.arange(n))
        self.seen = new_seen

    def reset(self) -> None:
        if self.pool is not None:
            self.pool.reset()
        self.length = 0
        self.seen = 0
        self._batch = None
        self.page_table = torch.empty((0, 0), dtype=torch.long)
        self.fields = {}
        self._step = None
        self._mask_plan = None
        self.policy_state.clear()
        self.policy.reset(self)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select_rows(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self._batch is not None:
            self._select_rows(torch.arange(self._batch).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self._batch is not None:
            if indices.dtype == torch.bool:
                indices = indices.nonzero().flatten()
            self._select_rows(indices)

    def offload(self) -> None:
        """Move every page of this layer to the host tier."""
        if self.is_initialized and self.length:
            self.move(self.page_table.reshape(-1), HOST)

    def prefetch(self, page_ids: torch.Tensor | list[int] | None = None) -> PrefetchHandle:  # type: ignore[override]
        """Start bringing pages (default: all of this layer's) to the device; returns a handle."""
        if self.pool is None:
            return PrefetchHandle(None, [], None)
        if page_ids is None:
            page_ids = self.page_table.reshape(-1)
        return self.pool.prefetch(page_ids)

    # ------------------------------------------------------------------------------------------
    # steps
    def begin_step(
        self,
        query_length: int,
        queries: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> StepInfo:
        """Open a step: ask the policy which past tokens it attends to (called once per forward)."""
        if self.policy.needs_queries and queries is None:
            raise PolicyError(
                f"{type(self.policy).__name__} scores keys against the current queries, but layer "
                f"{self.layer_idx} got none. Run the model inside `with cache.attach(model):`, or build the "
                "cache with `PagedCache.from_model(model, policy=...)`."
            )
        step = StepInfo(
            layer_idx=self.layer_idx,
            query_length=query_length,
            past_length=self.length,
            seen=self.seen,
            queries=queries,
            position_ids=position_ids,
        )
        if self.length > 0:
            chosen = self.policy.attend(self, step)
            if chosen is not None:
                step.attend = self._rows_indices(chosen, "attend")
        self._step = step
        return step

    def _planned_past(self, query_length: int) -> int:
        if self.length == 0:
            return 0
        announced = self.policy.attend_length(self, query_length)
        return self.length if announced is None else min(int(announced), self.length)

    def _check_mask(self, q: int, kv_length: int, step: StepInfo) -> None:
        plan, self._mask_plan = self._mask_plan, None
        if plan is None or plan[0] != q or plan[1] == kv_length:
            return
        raise MaskMismatchError(
            f"layer {self.layer_idx} returns {kv_length} keys ({kv_length - q} past + {q} new) but the "
            f"attention mask of this forward was built for {plan[1]} (from layer 0 and "
            f"{type(self.policy).__name__}.attend_length). Make attend() return as many past tokens as "
            "attend_length() announces and keep every layer at the same length, or run the model inside "
            "`with cache.attach(model):`, which builds each layer's mask from its own tokens."
        )

    # ------------------------------------------------------------------------------------------
    # token operations
    def append(
        self, key_states: torch.Tensor, value_states: torch.Tensor, position_ids: torch.Tensor | None = None
    ) -> None:
        """Store new tokens ``[B, Hkv, q, D]`` after the stored ones (``seen`` and ``length`` grow by q)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        batch, heads, q, head_dim = key_states.shape
        if self.length == 0 and self.seen == 0 and batch != self._batch:
            self._start_batch(batch)  # a new sequence may come with a new batch size
        if batch != self._batch:
            raise ValueError(f"layer {self.layer_idx}: got a batch of {batch} rows, the cache holds {self._batch}")
        if q == 0:
            return
        ps = self.page_size
        total = self.length + q
        need = math.ceil(total / ps) - self.num_pages
        if need > 0:
            new = torch.tensor(self.pool.allocate(batch * need), dtype=torch.long).view(batch, need)
            self.page_table = torch.cat([self.page_table, new], dim=1)
        t = torch.arange(self.length, total)
        pids = self.page_table[:, t // ps]  # [B, q]
        offs = (t % ps).expand(batch, q)
        flat_k = key_states.transpose(1, 2).reshape(batch * q, heads, head_dim)
        flat_v = value_states.transpose(1, 2).reshape(batch * q, heads, head_dim)
        self.pool.write(pids.reshape(-1), offs.reshape(-1), flat_k, flat_v)
        stream = (torch.arange(q, device=self.device) + self.seen).expand(batch, q)
        positions = stream
        if position_ids is not None and position_ids.dim() == 2 and position_ids.shape[-1] == q:
            positions = position_ids.to(self.device, torch.long).expand(batch, q)
        new_fields = {"token_index": stream, "positions": positions}
        for name, (fill, dtype, trailing) in self._field_specs.items():
            if name not in new_fields:
                new_fields[name] = torch.full((batch, q, *trailing), fill, dtype=dtype, device=self.device)
            self.fields[name] = torch.cat([self.fields[name], new_fields[name]], dim=1)
        self.length = total
        self.seen += q

    def to_dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All stored K/V as contiguous ``[B, Hkv, N, D]`` (read through every tier, placement unchanged)."""
        if self.pool is None:
            raise CacheError(f"layer {self.layer_idx} is empty (no update yet)")
        batch, n_pages, ps = self._batch, self.num_pages, self.page_size
        heads, head_dim = self.pool.num_heads, self.pool.head_dim
        if self.length == 0:
            empty = torch.empty((batch, heads, 0, head_dim), dtype=self.dtype, device=self.device)
            return empty, empty.clone()
        k, v = self.pool.read_pages(self.page_table.reshape(-1))  # [B*P, H, ps, D]

        def dense(pages: torch.Tensor) -> torch.Tensor:
            x = pages.view(batch, n_pages, heads, ps, head_dim).transpose(1, 2)
            x = x.reshape(batch, heads, n_pages * ps, head_dim)
            return x if x.shape[2] == self.length else x[:, :, : self.length].contiguous()

        return dense(k), dense(v)

    def gather(self, token_indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stored tokens at `token_indices` (``[B, n]`` or ``[n]``) as ``[B, Hkv, n, D]``; nothing changes."""
        idx = self._rows_indices(token_indices, "gather").cpu()
        batch, n = idx.shape
        pids = self.page_table.gather(1, idx // self.page_size)
        k, v = self.pool.read(pids.reshape(-1), (idx % self.page_size).reshape(-1))
        heads, head_dim = self.pool.num_heads, self.pool.head_dim
        k = k.view(batch, n, heads, head_dim).transpose(1, 2).contiguous()
        v = v.view(batch, n, heads, head_dim).transpose(1, 2).contiguous()
        return k, v

    def keep(self, token_indices: torch.Tensor) -> list[int]:
        """Keep only the stored tokens at `token_indices` (``[B, n]`` or ``[n]``); return the freed pages.

        Indices are sorted (the cache stays in stream order) and must be unique per row. Pages whose
        tokens do not move (fully kept, still page-aligned) stay as they are, with their tier and
        abstracts; the other kept tokens are copied into fresh device pages. Every other old page goes
        back to the free list and is in the returned ids (pages whose tokens were copied included).
        ``seen`` does not change: positions continue where they were.
        """
        idx = self._rows_indices(token_indices, "keep").cpu()
        idx, _ = idx.sort(dim=1)
        if idx.shape[1] > 1 and bool((idx[:, 1:] == idx[:, :-1]).any()):
            raise ValueError(f"layer {self.layer_idx}: keep() got repeated token indices")
        batch, n = idx.shape
        total, ps = self.length, self.page_size
        if n == total:
            return []
        old_table, old_pages = self.page_table, self.num_pages
        keep_mask = torch.zeros(batch, old_pages * ps, dtype=torch.bool)
        keep_mask.scatter_(1, idx, True)
        new_index = keep_mask.cumsum(1) - 1  # where each kept token lands
        # an old page survives unchanged if every token it holds is kept and it stays page-aligned
        fill = torch.clamp(total - torch.arange(old_pages) * ps, max=ps)  # tokens held per old page
        in_page = torch.arange(ps)[None, :] < fill[:, None]  # [P, ps]
        pages_mask = keep_mask.view(batch, old_pages, ps)
        whole = (pages_mask | ~in_page).all(dim=2)  # [B, P]
        first_new = new_index.view(batch, old_pages, ps)[:, :, 0]
        reuse = whole & (first_new % ps == 0)
        new_pages = math.ceil(n / ps)
        new_table = torch.full((batch, new_pages), -1, dtype=torch.long)
        rb, rp = reuse.nonzero(as_tuple=True)
        new_table[rb, first_new[rb, rp] // ps] = old_table[rb, rp]
        freed = old_table[~reuse].tolist()
        # tokens whose new page is not a reused one are copied
        to_write = new_table.gather(1, torch.arange(n).expand(batch, n) // ps) < 0  # [B, n]
        wb, wt = to_write.nonzero(as_tuple=True)
        src = idx[wb, wt]
        k, v = self.pool.read(old_table[wb, src // ps], src % ps)
        self.pool.free(freed)
        missing = new_table < 0
        fresh = self.pool.allocate(int(missing.sum()))
        new_table[missing] = torch.tensor(fresh, dtype=torch.long)
        self.pool.write(new_table[wb, wt // ps], wt % ps, k, v)
        self.page_table = new_table
        self.length = n
        rows = torch.arange(batch, device=self.device)[:, None]
        dev_idx = idx.to(self.device)
        self.fields = {name: f[rows, dev_idx] for name, f in self.fields.items()}
        return freed

    def drop_span(self, start: int, end: int) -> list[int]:
        """Drop stored tokens ``start .. end-1`` of every row; return the freed pages."""
        if not 0 <= start <= end <= self.length:
            raise ValueError(f"drop_span({start}, {end}) outside the {self.length} stored tokens")
        if start == end:
            return []
        kept = torch.cat([torch.arange(start), torch.arange(end, self.length)])
        return self.keep(kept)

    def rewrite_keys(
        self,
        fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor],
        new_positions: torch.Tensor | None = None,
    ) -> None:
        """Replace every stored key by ``fn(keys [B,H,N,D], positions [B,N], new_positions)``.

        For re-rotating kept keys to new positions (TIM): e.g.
        ``layer.rewrite_keys(lambda k, old, new: rerotate_keys(k, new - old, inv_freq), new_positions)``.
        Pages stay on their tiers, abstracts are recomputed and the ``positions`` field becomes
        `new_positions` ([B, N] or [N]) when given. ``seen`` does not change.
        """
        if self.length == 0:
            return
        if new_positions is not None:
            new_positions = new_positions.to(self.device, torch.long)
            if new_positions.dim() == 1:
                new_positions = new_positions.expand(self._batch, -1)
            if tuple(new_positions.shape) != (self._batch, self.length):
                raise ValueError(f"new_positions must be [{self._batch}, {self.length}] or [{self.length}]")
        keys, values = self.to_dense()
        new_keys = fn(keys, self.fields["positions"], new_positions)
        if tuple(new_keys.shape) != tuple(keys.shape):
            raise ValueError(f"rewrite_keys: fn returned shape {tuple(new_keys.shape)}, expected {tuple(keys.shape)}")
        batch, heads, n, head_dim = keys.shape
        pad = self.num_pages * self.page_size - n

        def pages(x: torch.Tensor) -> torch.Tensor:
            x = torch.nn.functional.pad(x, (0, 0, 0, pad))
            return (
                x.view(batch, heads, self.num_pages, self.page_size, head_dim)
                .transpose(1, 2)
                .reshape(batch * self.num_pages, heads, self.page_size, head_dim)
            )

        fills = [min(self.page_size, n - j * self.page_size) for j in range(self.num_pages)] * batch
        self.pool.store_pages(self.page_table.reshape(-1).tolist(), pages(new_keys), pages(values), fills)
        if new_positions is not None:
            self.fields["positions"] = new_positions.clone()

    # ------------------------------------------------------------------------------------------
    # per-token fields and per-page metadata
    def add_token_field(
        self,
        name: str,
        fill: float | int = 0,
        dtype: torch.dtype = torch.float32,
        shape: tuple[int, ...] = (),
    ) -> torch.Tensor:
        """Register per-token state ``[B, N, *shape]`` kept aligned by the cache (new tokens get `fill`)."""
        if name not in self._field_specs:
            self._field_specs[name] = (fill, dtype, tuple(shape))
            if self._batch is not None:
                self.fields[name] = torch.full(
                    (self._batch, self.length, *shape), fill, dtype=dtype, device=self.device
                )
        return self.fields.get(name)

    def token_field(self, name: str) -> torch.Tensor:
        return self.fields[name]

    def set_token_field(self, name: str, value: torch.Tensor) -> None:
        old = self.fields[name]
        if value.shape != old.shape:
            raise ValueError(f"token field {name!r} must keep shape {tuple(old.shape)}, got {tuple(value.shape)}")
        self.fields[name] = value.to(old.device, old.dtype)

    @property
    def token_index(self) -> torch.Tensor:
        """Stream index of every stored token ``[B, N]`` (= its attention-mask coordinate)."""
        return self.fields["token_index"]

    @property
    def positions(self) -> torch.Tensor:
        """Rotary position every stored key was rotated with ``[B, N]``."""
        return self.fields["positions"]

    def page_abstracts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Key min / max of every page of every row, ``[B, Hkv, pages, D]`` each (on the device)."""
        table = self.page_table.to(self.device)
        kmin = self.pool.kmin[table].permute(0, 2, 1, 3)
        kmax = self.pool.kmax[table].permute(0, 2, 1, 3)
        return kmin, kmax

    def page_bounds(self) -> torch.Tensor:
        """Stored-token boundaries of the pages ``[pages + 1]`` (as `kernels.chunk_minmax` takes them)."""
        bounds = torch.arange(self.num_pages + 1) * self.page_size
        bounds[-1] = self.length
        return bounds

    def pages_of(self, token_indices: torch.Tensor) -> torch.Tensor:
        """Page ids holding stored tokens ``[B, n]`` / ``[n]`` (``[B, n]``)."""
        idx = self._rows_indices(token_indices, "pages_of").cpu()
        return self.page_table.gather(1, idx // self.page_size)

    def kernel_view(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(key_pool, value_pool, page_table, seq_lens)`` for paged decode attention kernels.

        Pools are ``[slots, Hkv, page_size, D]``, the page table ``[B, pages]`` holds device slots;
        every page is brought to the device first.
        """
        self.pool.ensure_device(self.page_table.reshape(-1))
        slots = self.pool.device_slots(self.page_table)
        lens = torch.full((self._batch,), self.length, dtype=torch.int32, device=self.device)
        return self.pool.device_keys, self.pool.device_values, slots, lens

    # ------------------------------------------------------------------------------------------
    # tiers
    def move(self, page_ids: torch.Tensor | list[int], tier: Tier | str) -> int:
        """Place pages of this layer on `tier` ("device", "host" or "disk"); returns the bytes moved."""
        return self.pool.move(page_ids, tier)

    def placement(self, page_ids: torch.Tensor | list[int] | None = None) -> list[str]:
        """The tier of each page (default: the page table, row-major)."""
        ids = self.page_table.reshape(-1) if page_ids is None else page_ids
        return self.pool.tier_of(ids)

    def bytes_by_tier(self) -> dict[str, int]:
        if self.pool is None:
            return {"device": 0, "host": 0, "disk": 0}
        return self.pool.bytes_by_tier()

    def wait(self) -> None:
        """Wait for this layer's in-flight prefetches."""
        if self.pool is not None:
            self.pool.wait()

    def check(self) -> None:
        """Assert the invariants (tests): table and pool agree, no page leaked or owned twice."""
        if self.pool is None:
            return
        self.pool.check()
        table = self.page_table.reshape(-1).tolist()
        assert len(set(table)) == len(table), "a page is in the page table twice"
        assert set(table) == set(self.pool.owned()), "owned pages and the page table differ"
        assert self.num_pages == math.ceil(self.length / self.page_size)
        for name, f in self.fields.items():
            assert f.shape[:2] == (self._batch, self.length), f"token field {name} is misaligned"

    # ------------------------------------------------------------------------------------------
    def _start_batch(self, batch: int) -> None:
        self._batch = batch
        self.page_table = torch.empty((batch, 0), dtype=torch.long)
        self.fields = {
            name: torch.full((batch, 0, *trailing), fill, dtype=dtype, device=self.device)
            for name, (fill, dtype, trailing) in self._field_specs.items()
        }

    def _rows_indices(self, indices: torch.Tensor, what: str) -> torch.Tensor:
        if not isinstance(indices, torch.Tensor):
            indices = torch.as_tensor(indices)
        idx = indices.long()
        if idx.dim() == 1:
            idx = idx.unsqueeze(0).expand(self._batch, -1)
        if idx.dim() != 2 or idx.shape[0] != self._batch:
            raise ValueError(f"{what}: indices must be [n] or [{self._batch}, n], got {tuple(indices.shape)}")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.length):
            raise ValueError(f"{what}: indices must lie in [0, {self.length}) (the stored tokens)")
        return idx

    def _select_rows(self, index: torch.Tensor) -> None:
        index = index.reshape(-1).cpu().long()
        old_batch = self._batch
        if old_batch is None:
            return
        self.pool.wait()
        taken: set[int] = set()
        rows = []
        for src in index.tolist():
            row = self.page_table[src]
            if src in taken:  # a duplicated row gets its own copy of the pages
                row = torch.tensor(self.pool.copy_pages(row.tolist()), dtype=torch.long)
            taken.add(src)
            rows.append(row)
        dropped = [r for r in range(old_batch) if r not in taken]
        self.pool.free(self.page_table[dropped].reshape(-1))
        width = self.num_pages
        self.page_table = torch.stack(rows) if rows else torch.empty((0, width), dtype=torch.long)
        dev_index = index.to(self.device)
        self.fields = {name: f[dev_index] for name, f in self.fields.items()}
        self._batch = len(rows)

    def _release_storage(self) -> None:
        self.reset()
        self.pool = None
        self.is_initialized = False


def _position_ids_from(kwargs: dict[str, Any]) -> torch.Tensor | None:
    # transformers >= 5.2x passes the attention module's kwargs along: update(k, v, kwargs={...})
    inner = kwargs.get("kwargs")
    source = inner if isinstance(inner, dict) else kwargs
    pos = source.get("position_ids")
    return pos if isinstance(pos, torch.Tensor) else None


__all__ = ["PagedLayer"]
