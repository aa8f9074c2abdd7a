"""`LeoAMCache`: LeoAM's chunk selection over three tiers (device / host / disk).

    from llmsys.kv import LeoAMCache

    with LeoAMCache.from_model(model, device_budget=4096, host_budget=16384, disk_dir="/scratch") as cache:
        cache.prefill(model, ids)                                   # in chunks that fit the device
        out = llmsys.models.generate(model, ids, cache=cache, max_new_tokens=64)
        print(cache.report())                                       # bytes per tier, moved per token

A `PagedCache` whose policy is `LeoAM` plus placement (all budgets are tokens *per layer*):

- **device** holds at most `device_budget` tokens of pages per layer (the pool's `max_device_pages`:
  going over is a `CacheBudgetError`, never a silent overflow): the sink and window pages, the pages
  of the chunks selected at the current step, and - as a cache - chunks selected recently.
- **host** (CPU memory, pinned on CUDA) holds up to `host_budget` tokens per layer of chunks evicted
  from the device, least recently selected first out.
- **disk** holds the rest, one checksummed file per page in a directory under `disk_dir` (a
  temporary one by default), written 8-bit min/max compressed (`CompressedDiskStore`).

At a decode step of layer L the selected chunks that are not on the device are brought in
(synchronously: misses), after evicting least-recently-selected chunks to make room. Then, while
layer L computes, the chunks layer L+1 is predicted to select are prefetched on the cache's
background thread (a side stream on CUDA): the prediction scores layer L+1's abstracts with a
speculative query, layer L+1's query projection applied to layer L's attention input (InfiniGen's
idea; the residual stream changes little between adjacent layers). `report()` counts hits,
prefetch hits and misses, so whether the prediction and the overlap pay off is measured, not assumed.
"""

from __future__ import annotations

import math
import os
import weakref
from typing import Any

import torch
from torch import nn

from llmsys.cache import DEVICE, DISK, HOST, CacheBudgetError, PagedCache, PagedLayer, StepInfo
from llmsys.kv.compress import CompressedDiskStore
from llmsys.kv.leoam import LeoAM, LeoAMState
from llmsys.models import attention_modules, forward, query_key_states, read_attention_call

__all__ = ["LeoAMCache", "TieredLeoAM"]

SPEC_QUERY = "leoam_spec_query"


class TieredLeoAM(LeoAM):
    """`LeoAM` plus tier placement; built by `LeoAMCache` (which sets the budgets)."""

    def __init__(self, *, device_pages: int, host_pages: int | None, prefetch: bool, **kwargs: Any):
        super().__init__(**kwargs)
        self.device_pages = device_pages
        self.host_pages = host_pages
        self.prefetch = prefetch
        self.cache_ref: weakref.ReferenceType[LeoAMCache] | None = None

    # -- per-layer counters ------------------------------------------------------------------------
    def stats(self, layer: PagedLayer) -> dict[str, Any]:
        extra = self.state(layer).extra
        if "stats" not in extra:
            extra["stats"] = dict.fromkeys(
                ("decode_steps", "selected_pages", "resident_hits", "prefetch_hits", "misses", "prefetched"), 0
            )
            extra["clock"] = 0
            extra["last_used"] = torch.zeros(0, dtype=torch.long)
            extra["prefetched_ids"] = set()
        return extra["stats"]

    def _touch(self, layer: PagedLayer, st: LeoAMState, ids: list[int]) -> None:
        last = st.extra["last_used"]
        if layer.pool.capacity > last.numel():
            st.extra["last_used"] = last = torch.cat(
                [last, torch.zeros(layer.pool.capacity - last.numel(), dtype=torch.long)]
            )
        if ids:
            last[ids] = st.extra["clock"]

    # -- hooks -------------------------------------------------------------------------------------
    def attend(self, layer: PagedLayer, step: StepInfo) -> torch.Tensor | None:
        chosen = super().attend(layer, step)
        if step.query_length == 1:
            stats = self.stats(layer)
            st = self.state(layer)
            if chosen is None:
                ids = layer.page_table.reshape(-1).tolist()
            else:
                ids = torch.unique(layer.pages_of(chosen)).tolist()
            stats["decode_steps"] += 1
            stats["selected_pages"] += len(ids)
            prefetched = st.extra["prefetched_ids"]
            codes = layer.pool.tier_of(ids)
            missing = [p for p, tier in zip(ids, codes) if tier != DEVICE]
            stats["misses"] += len(missing)
            hits = [p for p, tier in zip(ids, codes) if tier == DEVICE]
            pre = sum(1 for p in hits if p in prefetched)
            stats["prefetch_hits"] += pre
            stats["resident_hits"] += len(hits) - pre
            prefetched.clear()
            self._touch(layer, st, ids)
            rows = layer._batch or 1
            self._make_room(layer, len(missing) + rows, exclude=set(ids))  # + the new token's page per row
            if missing:
                layer.pool.move(missing, DEVICE)
        return chosen

    def place(self, layer: PagedLayer, step: StepInfo) -> None:
        st = self.state(layer)
        self.stats(layer)
        st.extra["clock"] += 1
        self._touch(layer, st, [])
        if step.is_prefill:  # the next prefill chunk needs the room: keep only sinks and window
            self._evict_device(layer, self._protected(layer), keep_all_but=True)
        if self.prefetch and not step.is_prefill:
            self._prefetch_next(layer)

    # -- placement ---------------------------------------------------------------------------------
    def _protected(self, layer: PagedLayer) -> set[int]:
        """Pages of the sinks, the window and the tail (the tail page is written next)."""
        ps, n = layer.page_size, layer.length
        if n == 0:
            return set()
        cols = set(range(math.ceil(min(self.sink, n) / ps)))
        cols |= set(range(max(0, n - max(self.window, 1)) // ps, layer.num_pages))
        return set(layer.page_table[:, sorted(cols)].reshape(-1).tolist())

    def _device_pages(self, layer: PagedLayer) -> list[int]:
        table = layer.page_table.reshape(-1).tolist()
        return [p for p, tier in zip(table, layer.pool.tier_of(table)) if tier == DEVICE]

    def device_cap(self, layer: PagedLayer) -> int:
        """Device pages this layer may hold (budgets are per sequence: times the batch rows)."""
        return self.device_pages * (layer._batch or 1)

    def _make_room(self, layer: PagedLayer, needed: int, exclude: set[int]) -> None:
        free = self.device_cap(layer) - layer.pool.pages_on(DEVICE)
        if needed > free:
            self._evict_device(layer, exclude | self._protected(layer), count=needed - free)

    def _evict_device(
        self, layer: PagedLayer, exclude: set[int], count: int | None = None, keep_all_but: bool = False
    ) -> None:
        """Move `count` least recently selected device pages not in `exclude` (all of them with
        `keep_all_but`) off the device: back to their clean copy if they have one (no copy), else to
        the host, spilling the host's least recently selected pages to disk when it is full."""
        st, pool = self.state(layer), layer.pool
        last = st.extra["last_used"]

        def age(p: int) -> int:
            return int(last[p]) if p < last.numel() else 0

        victims = [p for p in self._device_pages(layer) if p not in exclude]
        if not keep_all_but:
            if count is not None and count > len(victims):
                raise CacheBudgetError(
                    f"layer {layer.layer_idx}: {count} device pages must be freed but only {len(victims)} can "
                    f"leave the device (device_budget holds {self.device_cap(layer)} pages). Raise device_budget "
                    "or lower the attention budget."
                )
            victims = sorted(victims, key=age)[:count]
        if not victims:
            return
        fresh, back = [], {}
        for p, tier in zip(victims, pool.clean_tier_of(victims)):
            if tier is None:
                fresh.append(p)
            else:
                back.setdefault(tier, []).append(p)
        for tier, pages in back.items():
            pool.move(pages, tier)  # unchanged since they came up: only the device copies go
        if not fresh:
            return
        if self.host_pages is None:
            pool.move(fresh, HOST)
            return
        room = self.host_pages * (layer._batch or 1) - pool.pages_held(HOST)
        if len(fresh) > room:
            table = layer.page_table.reshape(-1).tolist()
            on_host = sorted((p for p, t in zip(table, pool.tier_of(table)) if t == HOST), key=age)
            spill = on_host[: len(fresh) - room]
            if spill:
                pool.move(spill, DISK)
                room += len(spill)
        fresh.sort(key=age)
        direct = fresh[: max(len(fresh) - room, 0)]  # the host is full of more recent pages
        if direct:
            pool.move(direct, DISK)
        if len(direct) < len(fresh):
            pool.move(fresh[len(direct) :], HOST)

    def _prefetch_next(self, layer: PagedLayer) -> None:
        cache = self.cache_ref() if self.cache_ref is not None else None
        if cache is None or layer.layer_idx + 1 >= len(cache.layers):
            return
        nxt = cache.layers[layer.layer_idx + 1]
        query = nxt.policy_state.pop(SPEC_QUERY, None)
        if query is None or nxt.pool is None or nxt.length <= self.budget or query.shape[0] != nxt._batch:
            return
        ids = torch.unique(nxt.pages_of(self.select(nxt, query))).tolist()
        missing = [p for p, tier in zip(ids, nxt.pool.tier_of(ids)) if tier != DEVICE]
        rows = nxt._batch or 1
        # a guess only fills free device room: evicting chunks that are resident (and were selected
        # recently) for a misprediction costs more than a miss
        room = self.device_cap(nxt) - nxt.pool.pages_on(DEVICE) - rows  # keep a page per row for the new token
        missing = missing[: max(room, 0)]
        if missing:
            nxt.pool.prefetch(missing)
            st = self.state(nxt)
            self.stats(nxt)["prefetched"] += len(missing)
            st.extra["prefetched_ids"].update(missing)


class _SpeculativeQueryHook:
    """Pre-hook on attention module L: layer L+1's query projection applied to layer L's input."""

    def __init__(self, cache_ref: weakref.ReferenceType[LeoAMCache], layer_idx: int, next_attention: nn.Module):
        self.cache_ref = cache_ref
        self.layer_idx = layer_idx
        self.next_attention = next_attention

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        cache = self.cache_ref()
        if cache is None or cache.closed or not cache.policy.prefetch:  # type: ignore[attr-defined]
            return None
        call = read_attention_call(args, kwargs)
        if call.cache is not cache or call.hidden_states.shape[1] != 1 or call.position_embeddings is None:
            return None
        with torch.no_grad():
            q, _ = query_key_states(self.next_attention, call.hidden_states, call.position_embeddings)
        cache._layer_for(self.layer_idx + 1).policy_state[SPEC_QUERY] = q[:, :, -1]
        return None


class LeoAMCache(PagedCache):
    """LeoAM over device / host / disk tiers (module docstring). Budgets are tokens per layer.

    Args:
        config: the model config (layers, head_dim).
        device_budget: tokens of pages per layer on the device, at most. Must hold the attention
            budget plus a few pages (sinks, window edges, the new token's page).
        host_budget: tokens per layer in host memory (None: unbounded, nothing goes to disk).
        disk_dir: where the disk tier makes its directory (None: the system temporary directory).
        budget: past tokens attended per decode step (default: half the device budget).
        sink, window, min_chunk, max_chunk, profile_window, refine, rechunk, refine_rounds,
        abstract_tokens, count_cost: as in `LeoAM` (`refine`: adaptive selection, merged chunks split
            into pages where the query needs them; False: the prefill-only chunks, taken whole).
        page_size: tokens per page (the granularity of chunks and transfers).
        compress: 8-bit min/max compression of what leaves the device: disk pages always, host pages
            as `compress_host` says (False: everything raw, lossless).
        compress_host: host pages as 8-bit codes too, so host <-> device copies move codes. None
            (default): when the KV lives on a CUDA device; on a CPU "device" and "host" are the same
            memory, and coding every move only costs time.
        prefetch: speculative prefetch of the next layer's chunks on the background thread. None
            (default): on when the KV lives on a CUDA device. On a CPU "device" and "host" are the
            same memory and the thread only competes with the decode for the cores (measured slower,
            docs/kv-leoam.md).
        pin_memory: pin the host tier (default: when CUDA is available).
    """

    def __init__(
        self,
        config: Any,
        *,
        device_budget: int,
        host_budget: int | None = None,
        disk_dir: str | os.PathLike | None = None,
        budget: int | None = None,
        sink: int = 4,
        window: int = 64,  # explicit here: the device budget is sized from them
        min_chunk: int = 16,
        max_chunk: int = 256,
        profile_window: int = 32,
        refine: bool = True,
        rechunk: bool = True,
        refine_rounds: int | None = 2,
        abstract_tokens: int | None = 4,
        count_cost: bool = False,
        page_size: int = 16,
        compress: bool = True,
        compress_host: bool | None = None,
        prefetch: bool | None = None,
        num_layers: int | None = None,
        pin_memory: bool | None = None,
    ):
        if config is None:
            raise ValueError("LeoAMCache needs the model config (for head_dim); use LeoAMCache.from_model(model, ...)")
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        if budget is None:
            budget = max(device_budget // 2, sink + window)
        slack = 5 * page_size  # sink page edge, window page edges, a cut chunk, the new token's page
        if device_budget < budget + slack:
            raise ValueError(
                f"LeoAMCache: device_budget={device_budget} tokens cannot hold the attention budget {budget} "
                f"(>= sink + window = {sink + window}) plus {slack} tokens of page slack. Use device_budget >= "
                f"{budget + slack}, or lower budget / sink / window."
            )
        if host_budget is not None and host_budget < 0:
            raise ValueError(f"LeoAMCache: host_budget must be >= 0 or None, got {host_budget}")
        policy = TieredLeoAM(
            device_pages=device_budget // page_size,
            host_pages=None if host_budget is None else host_budget // page_size,
            prefetch=bool(prefetch),
            budget=budget,
            sink=sink,
            window=window,
            min_chunk=min_chunk,
            max_chunk=max_chunk,
            profile_window=profile_window,
            refine=refine,
            rechunk=rechunk,
            refine_rounds=refine_rounds,
            abstract_tokens=abstract_tokens,
            count_cost=count_cost,
        )
        store = CompressedDiskStore(disk_dir, group=head_dim, compress=compress)
        super().__init__(
            config,
            page_size=page_size,
            policy=policy,
            num_layers=num_layers,
            disk_store=store,
            pin_memory=pin_memory,
            compress_host=compress_host if compress else False,
        )
        policy.cache_ref = weakref.ref(self)
        self.device_budget, self.host_budget, self.budget = device_budget, host_budget, budget
        self.disk_store = store
        self._prefetch_auto = prefetch is None
        self._decode_mark: dict[str, int] | None = None

    @property
    def max_prefill_chunk(self) -> int:
        """Longest prefill step that fits the device next to the sink and window pages."""
        pol: TieredLeoAM = self.policy  # type: ignore[assignment]
        protected = math.ceil(pol.sink / self.page_size) + math.ceil(pol.window / self.page_size) + 2
        return (pol.device_pages - protected) * self.page_size

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        q = key_states.shape[-2]
        if q > self.max_prefill_chunk:
            raise CacheBudgetError(
                f"LeoAMCache: a forward of {q} tokens does not fit device_budget={self.device_budget} "
                f"(at most {self.max_prefill_chunk} new tokens per forward). Prefill with "
                "`cache.prefill(model, input_ids)`, which feeds the prompt in chunks that fit, or raise device_budget."
            )
        if self.disk_store.dtype is None:
            self.disk_store.dtype = key_states.dtype
        if self._prefetch_auto:
            self.policy.prefetch = key_states.is_cuda  # type: ignore[attr-defined]
            self._prefetch_auto = False
        self._check_open()
        layer = self._layer_for(layer_idx)
        if not layer.is_initialized:
            layer.lazy_initialization(key_states, value_states)
            layer.pool.keep_clean_copies = True  # chunks travel up and down unchanged
        # the device budget is per sequence: the pool enforces it for all rows together
        layer.pool.max_device_pages = (
            self.policy.device_cap(layer)
            if layer.length
            # type: ignore[attr-defined]
            else (
                self.policy.device_pages * key_states.shape[0]  # type: ignore[attr-defined]
            )
        )
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    # -- hooks ---------------------------------------------------------------------------------------
    def _install_hooks(self, model: nn.Module) -> None:
        super()._install_hooks(model)
        ref = weakref.ref(self)
        modules = attention_modules(model)
        handles = self._hooks[id(model)]
        for i, (attn, nxt) in enumerate(zip(modules[:-1], modules[1:])):
            layer_idx = getattr(attn, "layer_idx", i)
            hook = _SpeculativeQueryHook(ref, layer_idx, nxt)
            handles.append(attn.register_forward_pre_hook(hook, with_kwargs=True))

    # -- prefill -------------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, model: nn.Module, input_ids: torch.Tensor, chunk: int | None = None, **kwargs: Any) -> None:
        """Feed ``input_ids[:, :-1]`` in chunks that fit the device, so that
        ``generate(model, input_ids, cache=cache)`` continues from here (rows must not be padded)."""
        chunk = min(chunk or self.max_prefill_chunk, self.max_prefill_chunk)
        body = input_ids[:, :-1]
        with self.attach(model):
            for start in range(self.get_seq_length(), body.shape[1], chunk):
                piece = body[:, start : start + chunk]
                positions = torch.arange(start, start + piece.shape[1], device=piece.device)[None]
                forward(model, piece, cache=self, position_ids=positions, **kwargs)

    # -- reporting -----------------------------------------------------------------------------------
    def mark_decode_start(self) -> None:
        """Start counting the bytes `report()` attributes to decoding (e.g. after the prefill)."""
        self._decode_mark = {
            "moved": sum(self.bytes_moved().values()),
            "disk_read": self.disk_store.bytes_read,
            "steps": self._decode_steps(),
        }

    def _decode_steps(self) -> int:
        if not self.layers:
            return 0
        return int(self.policy.stats(self.layers[0])["decode_steps"])  # type: ignore[attr-defined]

    def report(self) -> dict[str, Any]:
        """Bytes per tier, bytes moved (total and per decoded token since `mark_decode_start`), hits."""
        totals: dict[str, int] = {}
        for layer in self.layers:
            if layer.pool is None:
                continue
            for key, value in self.policy.stats(layer).items():  # type: ignore[attr-defined]
                totals[key] = totals.get(key, 0) + int(value)
        mark = self._decode_mark or {"moved": 0, "disk_read": 0, "steps": 0}
        batch = self.layers[0]._batch if self.layers and self.layers[0]._batch else 1
        tokens = max(self._decode_steps() - mark["steps"], 0) * batch
        moved = sum(self.bytes_moved().values()) - mark["moved"]
        disk_read = self.disk_store.bytes_read - mark["disk_read"]
        selected = max(totals.get("selected_pages", 0), 1)
        return {
            "bytes_by_tier": self.bytes_by_tier(),
            "abstract_bytes": self.abstract_bytes(),  # on the device, beside the device tier's pages
            "disk_file_bytes": self.disk_store.stored_bytes() if not self.disk_store.closed else 0,
            "bytes_moved": self.bytes_moved(),
            "decode_tokens": tokens,
            "bytes_moved_per_token": moved / tokens if tokens else None,
            "disk_bytes_read_per_token": disk_read / tokens if tokens else None,
            "pages": totals,
            "hit_rate": (totals.get("resident_hits", 0) + totals.get("prefetch_hits", 0)) / selected,
            "prefetch_hit_rate": totals.get("prefetch_hits", 0) / max(totals.get("prefetched", 0), 1),
        }
