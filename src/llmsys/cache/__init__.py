"""The shared KV cache of llmsys: a paged, tiered transformers `Cache` driven by policies.

- `PagedCache` - the `Cache` to pass as ``cache=`` / ``past_key_values=`` (one `PagedLayer` per layer);
- `PagedLayer` - pages + page table of one layer: ``append`` / ``keep`` / ``drop_span`` / ``gather``
  / ``rewrite_keys``, per-page key abstracts, tier placement (``move`` / ``prefetch``);
- `PagePool` - the page storage of one layer (device / host / disk tiers, free list, abstracts);
- `CachePolicy` / `KeepAll` / `StepInfo` - the decision interface (attend / compact / place);
- `DiskStore` / `TierContext` / `PrefetchHandle` - tiers and asynchronous prefetch;
- errors: `CorruptPageError`, `CacheBudgetError`, `PolicyError`, `MaskMismatchError`, ...

See docs/cache.md.
"""

from llmsys.cache.cache import PagedCache, step_attention_mask
from llmsys.cache.errors import (
    CacheBudgetError,
    CacheClosedError,
    CacheError,
    CorruptPageError,
    MaskMismatchError,
    PolicyError,
)
from llmsys.cache.layer import PagedLayer
from llmsys.cache.policy import CachePolicy, KeepAll, StepInfo
from llmsys.cache.pool import PagePool
from llmsys.cache.tiers import (
    DEVICE,
    DISK,
    HOST,
    TIERS,
    DiskStore,
    PrefetchGroup,
    PrefetchHandle,
    Tier,
    TierContext,
)

__all__ = [
    "DEVICE",
    "DISK",
    "HOST",
    "TIERS",
    "CacheBudgetError",
    "CacheClosedError",
    "CacheError",
    "CachePolicy",
    "CorruptPageError",
    "DiskStore",
    "KeepAll",
    "MaskMismatchError",
    "PagePool",
    "PagedCache",
    "PagedLayer",
    "PolicyError",
    "PrefetchGroup",
    "PrefetchHandle",
    "StepInfo",
    "Tier",
    "TierContext",
    "step_attention_mask",
]
