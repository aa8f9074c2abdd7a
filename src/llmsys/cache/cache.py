"""`PagedCache`: a transformers `Cache` whose layers keep K/V in pages, driven by a `CachePolicy`.

    cache = PagedCache(config=model.config, page_size=16)          # KeepAll: same logits as DynamicCache
    out = llmsys.models.generate(model, ids, cache=cache, max_new_tokens=32)

    with PagedCache.from_model(model, policy=MyPolicy(...)) as cache:   # hooks for queries installed
        llmsys.models.generate(model, ids, cache=cache)             # files / hooks gone on exit

`attach(model)` registers forward pre-hooks (with ``with_kwargs=True``) on the model's attention
modules. For each forward that uses this cache they (1) compute the step's post-RoPE queries with
`llmsys.models.query_key_states` - only when the policy sets ``needs_queries`` - and open the layer's
step with them, so the policy's ``attend`` can score keys before ``update`` runs, and (2) rebuild the
layer's attention mask from the real stream indices of the tokens ``update`` will return, when the
mask transformers built (once, from layer 0, assuming the past is a contiguous tail) would be wrong:
another length, or left padding under evicted tokens. A pre-hook on the decoder stack records the
2-D padding mask for that.
"""

from __future__ import annotations

import contextlib
import logging
import os
import weakref
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache

from llmsys.cache.errors import CacheClosedError
from llmsys.cache.layer import PagedLayer
from llmsys.cache.policy import CachePolicy, KeepAll
from llmsys.cache.tiers import TIERS, DiskStore, PrefetchGroup, Tier, TierContext
from llmsys.models import (
    CACHE_KWARG,
    attention_modules,
    base_model,
    query_key_states,
    read_attention_call,
)

logger = logging.getLogger(__name__)


class PagedCache(Cache):
    """A paged, tiered KV cache usable wherever transformers takes a `Cache`.

    Args:
        config: the model config (gives the number of layers); or pass `num_layers`, or neither
            (layers are then created on first use).
        page_size: tokens per page.
        policy: the `CachePolicy` every layer consults (default `KeepAll`).
        num_layers: number of decoder layers (overrides the config).
        disk_dir: directory under which the disk tier makes its own sub-directory (default: the
            system temporary directory). Nothing is written until a page goes to disk.
        disk_store: a ready `DiskStore` (or subclass, e.g. with compression) instead of `disk_dir`.
        pin_memory: pin host-tier pages (default: when CUDA is available).
        max_device_pages: most device pages per layer (None: unbounded); see `CacheBudgetError`.
        compress_host: keep host-tier pages as 8-bit min/max codes (`llmsys.cache.codec`, error
            bound tested), so what crosses host <-> device is the codes; None: only when the KV is
            on CUDA. Off by default (the host tier is then lossless).

    The cache is a context manager: `close()` (or leaving the ``with`` block) waits for prefetches,
    removes hooks it installed, frees every page and deletes the disk files.
    """

    def __init__(
        self,
        config: Any = None,
        *,
        page_size: int = 16,
        policy: CachePolicy | None = None,
        num_layers: int | None = None,
        disk_dir: str | os.PathLike | None = None,
        disk_store: DiskStore | None = None,
        pin_memory: bool | None = None,
        max_device_pages: int | None = None,
        compress_host: bool | None = False,
    ):
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.page_size = page_size
        self.policy: CachePolicy = policy if policy is not None else KeepAll()
        self.max_device_pages = max_device_pages
        self.tiers = TierContext(
            disk_dir=disk_dir, disk_store=disk_store, pin_memory=pin_memory, compress_host=compress_host
        )
        if num_layers is None and config is not None:
            if hasattr(config, "get_text_config"):
                config = config.get_text_config(decoder=True)
            num_layers = config.num_hidden_layers
        super().__init__(layers=[self._new_layer(i) for i in range(num_layers or 0)])
        self.closed = False
        self._mask2d: torch.Tensor | None = None
        self._hooks: dict[int, list[Any]] = {}  # id(model) -> hook handles
        self._warned_unattached = False

    @classmethod
    def from_model(cls, model: nn.Module, **kwargs: Any) -> PagedCache:
        """A cache for `model`; unless the policy keeps everything (`KeepAll`), the query / mask hooks
        are installed until `close()` (a policy that evicts needs the mask rebuilt for padded rows)."""
        cache = cls(config=model.config, **kwargs)
        if cache.policy.needs_queries or type(cache.policy) is not KeepAll:
            cache._install_hooks(model)
            # removed on close(), or when the cache is garbage collected without one
            weakref.finalize(cache, _remove_handles, list(cache._hooks[id(model)]))
        return cache

    def _new_layer(self, layer_idx: int) -> PagedLayer:
        return PagedLayer(
            self.page_size,
            self.policy,
            layer_idx=layer_idx,
            tiers=self.tiers,
            max_device_pages=self.max_device_pages,
        )

    def __repr__(self) -> str:
        seen = self.get_seq_length() if self.layers else 0
        return f"PagedCache(layers={len(self.layers)}, page_size={self.page_size}, policy={self.policy!r}, seen={seen})"

    # ------------------------------------------------------------------------------------------
    # transformers Cache API
    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_open()
        while len(self.layers) <= layer_idx:
            self.layers.append(self._new_layer(len(self.layers)))
        layer = self.layers[layer_idx]
        if not self._hooks and not self._warned_unattached and key_states.shape[0] > 1 and layer.length < layer.seen:
            # transformers builds the padding mask as if the stored past were a contiguous tail; with
            # evicted tokens and left-padded rows that reads padding at the wrong columns.
            self._warned_unattached = True
            logger.warning(
                "PagedCache: tokens were evicted from a batch of %d rows but no model is attached: if the "
                "rows are left-padded, the attention mask is misaligned. Run the model inside "
                "`with cache.attach(model):` (or build the cache with PagedCache.from_model).",
                key_states.shape[0],
            )
        return layer.update(key_states, value_states, *args, **kwargs)

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        kv_length, kv_offset = super().get_mask_sizes(query_length, layer_idx)
        # The mask is built once per forward for every layer: each layer checks it against what its
        # own update returns (or attach() rebuilds it). A new forward also closes stale steps.
        for layer in self.layers:
            layer._mask_plan = (query_length, kv_length, kv_offset)
            layer._step = None
        return kv_length, kv_offset

    # ------------------------------------------------------------------------------------------
    # batched helpers
    def _layers(self, layers: Sequence[int] | None) -> list[PagedLayer]:
        chosen = range(len(self.layers)) if layers is None else layers
        return [self.layers[i] for i in chosen]

    def stored_length(self, layer_idx: int = 0) -> int:
        """Tokens stored in a layer (``get_seq_length()`` is the tokens *seen*)."""
        return self.layers[layer_idx].length if layer_idx < len(self.layers) else 0

    def keep(
        self, token_indices: torch.Tensor | Sequence[torch.Tensor], layers: Sequence[int] | None = None
    ) -> dict[int, list[int]]:
        """`PagedLayer.keep` on several layers: one index tensor for all, or a sequence of one per layer."""
        freed = {}
        chosen = self._layers(layers)
        per_layer = not isinstance(token_indices, torch.Tensor)
        for i, layer in enumerate(chosen):
            freed[layer.layer_idx] = layer.keep(token_indices[i] if per_layer else token_indices)
        return freed

    def drop_span(self, start: int, end: int, layers: Sequence[int] | None = None) -> dict[int, list[int]]:
        """`PagedLayer.drop_span` on several layers (default: all)."""
        return {layer.layer_idx: layer.drop_span(start, end) for layer in self._layers(layers)}

    def gather(self, layer_idx: int, token_indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.layers[layer_idx].gather(token_indices)

    def move(self, tier: Tier | str, layers: Sequence[int] | None = None, page_ids: Any = None) -> int:
        """Place pages on `tier` (default: every page of the chosen layers); returns bytes moved."""
        moved = 0
        for layer in self._layers(layers):
            if layer.pool is None or layer.length == 0:
                continue
            ids = layer.page_table.reshape(-1) if page_ids is None else page_ids
            moved += layer.move(ids, tier)
        return moved

    def prefetch_pages(self, layers: Sequence[int] | None = None, page_ids: Any = None) -> PrefetchGroup:
        """Start bringing pages (default: all of the chosen layers) back to the device."""
        return PrefetchGroup([layer.prefetch(page_ids) for layer in self._layers(layers)])

    def wait(self) -> None:
        """Wait for every in-flight prefetch."""
        for layer in self.layers:
            layer.wait()

    def bytes_by_tier(self) -> dict[str, int]:
        """Bytes of the pages on each tier, summed over layers."""
        total = dict.fromkeys(TIERS, 0)
        for layer in self.layers:
            for tier, nbytes in layer.bytes_by_tier().items():
                total[tier] += nbytes
        return total

    def abstract_bytes(self) -> int:
        """Bytes of the key abstracts the pools keep on the device (`PagePool.abstract_bytes`)."""
        return sum(layer.pool.abstract_bytes() for layer in self.layers if layer.pool is not None)

    def bytes_moved(self) -> dict[str, int]:
        """Bytes copied between tiers so far, keyed "src->dst", summed over layers."""
        total: Counter[str] = Counter()
        for layer in self.layers:
            if layer.pool is not None:
                total.update(layer.pool.bytes_moved)
        return dict(total)

    def check(self) -> None:
        """Assert every layer's invariants (tests)."""
        for layer in self.layers:
            layer.check()

    # ------------------------------------------------------------------------------------------
    # hooks
    @contextlib.contextmanager
    def attach(self, model: nn.Module) -> Iterator[PagedCache]:
        """Install the query / mask hooks on `model` for the ``with`` block (see the module docstring)."""
        installed = id(model) not in self._hooks
        if installed:
            self._install_hooks(model)
        try:
            yield self
        finally:
            if installed:
                self._remove_hooks(id(model))

    def _install_hooks(self, model: nn.Module) -> None:
        ref = weakref.ref(self)
        handles = [base_model(model).register_forward_pre_hook(_StackHook(ref), with_kwargs=True)]
        for i, attn in enumerate(attention_modules(model)):
            layer_idx = getattr(attn, "layer_idx", i)
            handles.append(attn.register_forward_pre_hook(_AttentionHook(ref, layer_idx), with_kwargs=True))
        self._hooks[id(model)] = handles

    def _remove_hooks(self, key: int) -> None:
        _remove_handles(self._hooks.pop(key, []))

    def _layer_for(self, layer_idx: int) -> PagedLayer:
        while len(self.layers) <= layer_idx:
            self.layers.append(self._new_layer(len(self.layers)))
        return self.layers[layer_idx]

    # ------------------------------------------------------------------------------------------
    # lifetime
    def _check_open(self) -> None:
        if self.closed:
            raise CacheClosedError("this PagedCache was closed (its pages and files are gone); create a new one")

    def close(self) -> None:
        """Wait for prefetches, remove installed hooks, free all pages, delete the disk files."""
        if self.closed:
            return
        for key in list(self._hooks):
            self._remove_hooks(key)
        for layer in self.layers:
            with contextlib.suppress(Exception):  # a failed prefetch must not keep files around
                layer.wait()
            layer._release_storage()
        self.tiers.close()
        self.closed = True

    def __enter__(self) -> PagedCache:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _remove_handles(handles: list[Any]) -> None:
    for handle in handles:
        handle.remove()  # idempotent


class _StackHook:
    """Pre-hook on the decoder stack: remember the 2-D padding mask of forwards that use the cache."""

    def __init__(self, cache_ref: weakref.ReferenceType[PagedCache]):
        self.cache_ref = cache_ref

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        cache = self.cache_ref()
        if cache is None:
            return None
        uses = kwargs.get(CACHE_KWARG, kwargs.get("past_key_values", kwargs.get("cache")))
        if uses is not cache:
            return None
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        cache._mask2d = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        return None


class _AttentionHook:
    """Pre-hook on one attention module: hand the step's queries to the layer, fix its mask."""

    def __init__(self, cache_ref: weakref.ReferenceType[PagedCache], layer_idx: int):
        self.cache_ref = cache_ref
        self.layer_idx = layer_idx

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        cache = self.cache_ref()
        if cache is None:
            return None
        call = read_attention_call(args, kwargs)
        if call.cache is not cache or cache.closed:
            return None
        layer = cache._layer_for(self.layer_idx)
        queries = None
        if layer.policy.needs_queries:
            if call.position_embeddings is None:
                raise RuntimeError("attention module got no position_embeddings; cannot compute queries")
            with torch.no_grad():
                queries, _ = query_key_states(module, call.hidden_states, call.position_embeddings)
        layer.begin_step(call.hidden_states.shape[1], queries=queries, position_ids=call.position_ids)
        mask = call.attention_mask
        new_mask = step_attention_mask(
            layer,
            mask,
            cache._mask2d,
            window=getattr(module, "sliding_window", None),
            implementation=getattr(getattr(module, "config", None), "_attn_implementation", None),
        )
        if new_mask is mask:
            return None
        if "attention_mask" in kwargs or len(args) < 3:
            kwargs["attention_mask"] = new_mask
        else:
            args = (*args[:2], new_mask, *args[3:])
        return args, kwargs


def step_attention_mask(
    layer: PagedLayer,
    mask: torch.Tensor | None,
    mask2d: torch.Tensor | None,
    window: int | None = None,
    implementation: str | None = None,
) -> torch.Tensor | None:
    """The attention mask for what `layer.update` will return at the open step (or `mask` unchanged).

    Keys are the chosen past tokens (mask coordinate = their stream index) followed by the q new
    tokens (coordinates ``seen .. seen+q-1``); a key is visible if the 2-D padding mask allows its
    coordinate, new tokens are causal among themselves, and `window` (sliding attention) applies.
    """
    plan, step = layer._mask_plan, layer._step
    if plan is None or step is None or layer.length == 0:
        return mask  # no mask was sized this forward (custom 4-D mask, or a mask-free attention)
    q, kv_length, kv_offset = plan
    if q != step.query_length:
        return mask
    past = layer.token_index
    if step.attend is not None:
        past = past.gather(1, step.attend.to(layer.device))
    n_past = past.shape[1]
    expected = torch.arange(kv_offset, kv_offset + n_past, device=past.device)
    contiguous = n_past + q == kv_length and bool((past == expected).all())
    padded = mask2d is not None and not bool(mask2d.bool().all())
    if contiguous or (n_past + q == kv_length and not padded and window is None):
        return mask
    if mask is not None and not isinstance(mask, torch.Tensor):
        return mask  # e.g. a flex-attention BlockMask: left to the MaskMismatchError check
    if mask is None and implementation not in (None, "sdpa", "eager"):
        return mask
    device = past.device
    seen = layer.seen
    coords = torch.cat([past, (torch.arange(q, device=device) + seen).expand(past.shape[0], q)], dim=1)
    if mask2d is not None:
        pad2d = mask2d.to(device).bool()
        if pad2d.shape[1] < seen + q:  # as transformers: columns missing from the 2-D mask are masked
            pad2d = torch.nn.functional.pad(pad2d, (0, seen + q - pad2d.shape[1]))
        valid = pad2d.gather(1, coords)
    else:
        valid = torch.ones_like(coords, dtype=torch.bool)
    allowed = valid[:, None, None, :].expand(-1, 1, q, -1).clone()
    allowed[..., n_past:] &= torch.ones(q, q, dtype=torch.bool, device=device).tril()
    if window is not None:
        q_coords = torch.arange(q, device=device) + seen
        allowed &= (q_coords[None, :, None] - coords[:, None, :] < window)[:, None]
    allowed |= ~allowed.any(dim=-1, keepdim=True)  # a fully masked row attends to all (no NaN)
    layer._mask_plan = None  # this layer's mask now matches what its update returns
    if mask is None or mask.dtype == torch.bool:
        return allowed
    blocked = torch.zeros(allowed.shape, dtype=mask.dtype, device=device)
    return blocked.masked_fill_(~allowed, torch.finfo(mask.dtype).min)


__all__ = ["PagedCache", "step_attention_mask"]
