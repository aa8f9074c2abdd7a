"""Exceptions raised by `llmsys.cache`. Each message says what went wrong and how to fix it."""

from __future__ import annotations

from pathlib import Path


class CacheError(RuntimeError):
    """Base class of every error raised by `llmsys.cache`."""


class CorruptPageError(CacheError):
    """A page file of the disk tier is missing, truncated or fails its checksum."""

    def __init__(self, path: str | Path, layer_idx: int, page_id: int, reason: str):
        self.path = Path(path)
        self.layer_idx = layer_idx
        self.page_id = page_id
        self.reason = reason
        super().__init__(
            f"disk page file {self.path} (layer {layer_idx}, page {page_id}) is unusable: {reason}. "
            "The cache cannot recover these tokens: something outside llmsys changed or removed files in the "
            "cache's disk directory, or the disk is failing. Give each cache its own directory (the default "
            "temporary one), keep other processes out of it, and re-run the prefill."
        )


class CacheBudgetError(CacheError):
    """An operation needs more device pages than the cache's `max_device_pages` allows."""


class PolicyError(CacheError):
    """A `CachePolicy` asked for something the cache cannot do (or lacks an input it needs)."""


class MaskMismatchError(CacheError):
    """`update` returned a different number of keys than the attention mask was built for."""


class CacheClosedError(CacheError):
    """The cache was closed (its pages and disk files are gone) and cannot be used any more."""


__all__ = [
    "CacheBudgetError",
    "CacheClosedError",
    "CacheError",
    "CorruptPageError",
    "MaskMismatchError",
    "PolicyError",
]
