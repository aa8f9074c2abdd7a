"""The FlexGen-style baseline of the LeoAM speed benchmark: the whole KV of a layer crosses from host
memory to the device at every step.

`WholeKVOffloadCache` keeps every layer's K/V in a host buffer (pinned on CUDA, grown geometrically,
appended in place) and, at each forward of a layer, copies the layer's whole K/V into a preallocated
device buffer and attends over it with the model's own attention - the same attention kernel as the
full cache. Not importance-aware, no prefetch (transformers' `DynamicCache(offloading=True)`
overlaps the copy of the next layer, CUDA only; the benchmark runs it where it can).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

__all__ = ["WholeKVOffloadCache"]


class _OffloadLayer(CacheLayerMixin):
    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, offload_device: torch.device | str = "cpu"):
        super().__init__()
        self.offload_device = torch.device(offload_device)
        self.length = 0
        self.bytes_moved = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        b, h, _, d = key_states.shape
        self.host_k = self.host_v = self.dev_k = self.dev_v = torch.empty((b, h, 0, d), dtype=self.dtype)
        self.is_initialized = True

    def _grow(self, need: int) -> None:
        cap = self.host_k.shape[2]
        if need <= cap:
            return
        new = max(need, 2 * cap, 256)
        b, h, _, d = self.host_k.shape
        pin = self.device.type == "cuda"
        for name, dev in (("host_k", self.offload_device), ("host_v", self.offload_device)):
            fresh = torch.empty((b, h, new, d), dtype=self.dtype, device=dev, pin_memory=pin)
            fresh[:, :, : self.length] = getattr(self, name)[:, :, : self.length]
            setattr(self, name, fresh)
        self.dev_k = torch.empty((b, h, new, d), dtype=self.dtype, device=self.device)
        self.dev_v = torch.empty_like(self.dev_k)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        q = key_states.shape[2]
        n = self.length + q
        self._grow(n)
        self.host_k[:, :, self.length : n] = key_states.to(self.offload_device)
        self.host_v[:, :, self.length : n] = value_states.to(self.offload_device)
        self.length = n
        # the whole layer crosses to the device (on CPU: one memcpy into the "device" buffer)
        self.dev_k[:, :, :n].copy_(self.host_k[:, :, :n], non_blocking=True)
        self.dev_v[:, :, :n].copy_(self.host_v[:, :, :n], non_blocking=True)
        self.bytes_moved += 2 * self.dev_k[:, :, :n].numel() * self.dev_k.element_size()
        return self.dev_k[:, :, :n], self.dev_v[:, :, :n]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.length = 0


class WholeKVOffloadCache(Cache):
    """A transformers `Cache` that moves every layer's whole K/V host -> device at every step."""

    def __init__(self, config: Any = None, *, num_layers: int | None = None):
        if num_layers is None:
            text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
            num_layers = text.num_hidden_layers
        super().__init__(layers=[_OffloadLayer() for _ in range(num_layers)])

    def bytes_moved(self) -> int:
        return sum(layer.bytes_moved for layer in self.layers)

    def bytes_by_tier(self) -> dict[str, int]:
        kv = sum(2 * layer.length * _row_bytes(layer) for layer in self.layers if layer.is_initialized)
        return {"device": kv, "host": kv, "disk": 0}  # the device buffers hold a whole copy during the step


def _row_bytes(layer: _OffloadLayer) -> int:
    b, h, _, d = layer.host_k.shape
    return b * h * d * layer.host_k.element_size()
