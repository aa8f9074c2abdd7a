"""Where pages live when they are not on the device: pinned host memory and checksummed disk files.

Three tiers, named by strings:

- ``"device"``: the layer's page pool tensor, on the device the model runs on;
- ``"host"``: a second pool tensor in CPU memory (pinned when the model runs on CUDA, so copies to
  the device can be asynchronous);
- ``"disk"``: one file per page in a directory (a fresh temporary one by default), read back through
  a memory map and verified against a checksum stored in the file header.

`DiskStore` is the extension point for plug-ins that need more on disk (LeoAM: compression, lock
files that mark a crashed run): override `encode` / `decode` to transform the page bytes, and
`open` / `close` to set up and tear down the directory. `TierContext` holds what all the layers of
one cache share: the disk store, the background prefetch thread and the CUDA side streams.
"""

from __future__ import annotations

import logging
import mmap
import os
import shutil
import struct
import tempfile
import threading
import weakref
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from llmsys.cache.errors import CacheClosedError, CorruptPageError

if TYPE_CHECKING:
    from llmsys.cache.pool import PagePool

logger = logging.getLogger(__name__)

Tier = Literal["device", "host", "disk"]
DEVICE: Tier = "device"
HOST: Tier = "host"
DISK: Tier = "disk"
TIERS: tuple[Tier, ...] = (DEVICE, HOST, DISK)


def check_tier(tier: str) -> Tier:
    if tier not in TIERS:
        raise ValueError(f"unknown tier {tier!r}; choose one of {TIERS}")
    return tier  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------------
# Disk


class DiskStore:
    """Page files with a checksummed header, one directory per cache.

    File layout: a 24-byte header ``<8s magic, u16 version, u16 flags, u32 crc32, u64 length>``
    followed by `length` payload bytes, the output of `encode(raw)` where `raw` is the key page
    bytes followed by the value page bytes. The checksum covers the payload as stored, so a flipped
    byte anywhere after the header, a truncated file or a missing file raise `CorruptPageError`.

    `directory=None` makes a temporary directory; a given directory gets a fresh sub-directory made
    inside it. Either way the store removes what it made on `close()`, when it is garbage collected
    and at interpreter exit (`weakref.finalize`).
    """

    MAGIC = b"LLMSYSKV"
    VERSION = 1
    HEADER = struct.Struct("<8sHHIQ")

    def __init__(self, directory: str | os.PathLike | None = None, prefix: str = "llmsys-kv-"):
        parent = None if directory is None else Path(directory)
        if parent is not None:
            parent.mkdir(parents=True, exist_ok=True)
        self.root = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        self._finalizer = weakref.finalize(self, shutil.rmtree, str(self.root), True)
        self.closed = False
        self.last_read_nbytes = 0
        self.open()

    # -- extension points ------------------------------------------------------------------------
    def open(self) -> None:
        """Called once the directory exists (a subclass may write a lock file here)."""

    def encode(self, raw: bytes) -> tuple[bytes, int]:
        """Page bytes -> (stored bytes, flags). A subclass may compress; flags go into the header."""
        return raw, 0

    def decode(self, stored: memoryview, flags: int, raw_nbytes: int) -> bytes | memoryview:
        """Inverse of `encode` (`raw_nbytes` is the size the result must have)."""
        return stored

    # -- files -----------------------------------------------------------------------------------
    def path(self, layer_idx: int, page_id: int) -> Path:
        return self.root / f"layer{layer_idx:03d}-page{page_id:07d}.kv"

    def write(self, layer_idx: int, page_id: int, keys: torch.Tensor, values: torch.Tensor) -> int:
        """Write one page (keys and values [Hkv, page_size, D]); returns the bytes written."""
        self._check_open()
        raw = _tensor_bytes(keys) + _tensor_bytes(values)
        stored, flags = self.encode(raw)
        header = self.HEADER.pack(self.MAGIC, self.VERSION, flags, zlib.crc32(stored), len(stored))
        path = self.path(layer_idx, page_id)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(header)
            f.write(stored)
        os.replace(tmp, path)  # a reader never sees a half-written page
        return len(header) + len(stored)

    def read(
        self, layer_idx: int, page_id: int, shape: tuple[int, ...], dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Read one page back as CPU tensors (keys, values) of `shape`; verify the checksum."""
        self._check_open()
        path = self.path(layer_idx, page_id)
        itemsize = torch.empty((), dtype=dtype).element_size()
        raw_nbytes = 2 * itemsize * _numel(shape)

        def corrupt(reason: str) -> CorruptPageError:
            return CorruptPageError(path, layer_idx, page_id, reason)

        try:
            f = open(path, "rb")
        except FileNotFoundError:
            raise corrupt("the file is missing") from None
        with f:
            size = os.fstat(f.fileno()).st_size
            if size < self.HEADER.size:
                raise corrupt(f"the file is truncated ({size} bytes, shorter than its header)")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                magic, version, flags, crc, length = self.HEADER.unpack_from(mm, 0)
                if magic != self.MAGIC or version != self.VERSION:
                    raise corrupt("the header is not an llmsys page header")
                if size != self.HEADER.size + length:
                    payload = size - self.HEADER.size
                    raise corrupt(f"the file has {payload} payload bytes, the header says {length}")
                view = memoryview(mm)[self.HEADER.size :]
                try:
                    if zlib.crc32(view) != crc:
                        raise corrupt("the checksum does not match (the bytes changed after they were written)")
                    raw = self.decode(view, flags, raw_nbytes)
                    if len(raw) != raw_nbytes:
                        raise corrupt(f"decoded {len(raw)} bytes, expected {raw_nbytes}")
                    # one copy out of the map, so the map can close
                    data = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
                    del raw
                finally:
                    view.release()
        self.last_read_nbytes = size  # file bytes of this read, header included (byte accounting)
        half = raw_nbytes // 2
        keys = data[:half].view(dtype).view(shape)
        values = data[half:].view(dtype).view(shape)
        return keys, values

    def delete(self, layer_idx: int, page_id: int) -> None:
        try:
            self.path(layer_idx, page_id).unlink()
        except FileNotFoundError:
            pass

    def close(self) -> None:
        """Remove the directory and every page file in it (idempotent)."""
        if not self.closed:
            self.closed = True
            self._finalizer()

    def _check_open(self) -> None:
        if self.closed:
            raise CacheClosedError(f"the disk store {self.root} was closed; create a new cache")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.root)!r})"


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()


# --------------------------------------------------------------------------------------------------
# Prefetch


class PrefetchHandle:
    """A started prefetch: pages on their way to the device (a future).

    `done()` says whether the copies finished, `wait()` blocks until they did (re-raising a
    `CorruptPageError` from the background thread) and finishes the bookkeeping. `update`, `gather`
    and every other read of those pages wait on their own, so calling `wait()` is optional.
    """

    def __init__(self, pool: PagePool | None, page_ids: list[int], future: Future | None):
        self.pool = pool
        self.page_ids = page_ids
        self._future = future
        self._finished = future is None
        self._error: BaseException | None = None

    def done(self) -> bool:
        return self._finished or self._future.done()

    def wait(self) -> None:
        if self._finished:
            if self._error is not None:
                raise self._error
            return
        self._finished = True
        try:
            self._future.result()
        except BaseException as error:  # noqa: BLE001 - handed back to the caller below
            self._error = error
            self.pool._prefetch_failed(self)
            raise
        self.pool._prefetch_done(self)

    def __repr__(self) -> str:
        state = "done" if self.done() else "in flight"
        return f"PrefetchHandle({len(self.page_ids)} pages, {state})"


class PrefetchGroup:
    """Several `PrefetchHandle`s (one per layer) behind the same `done()` / `wait()`."""

    def __init__(self, handles: list[PrefetchHandle]):
        self.handles = handles

    @property
    def page_ids(self) -> list[int]:
        return [p for h in self.handles for p in h.page_ids]

    def done(self) -> bool:
        return all(h.done() for h in self.handles)

    def wait(self) -> None:
        for h in self.handles:
            h.wait()


# --------------------------------------------------------------------------------------------------
# What the layers of one cache share


class TierContext:
    """Disk store, prefetch thread and CUDA side streams shared by the layers of one cache."""

    def __init__(
        self,
        disk_dir: str | os.PathLike | None = None,
        disk_store: DiskStore | None = None,
        pin_memory: bool | None = None,
        compress_host: bool | None = False,
    ):
        self._disk_dir = disk_dir
        self._disk = disk_store
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        #: host-tier pages as 8-bit codes (`llmsys.cache.codec`); None: when the pool's device is CUDA
        self.compress_host = compress_host
        self._executor: ThreadPoolExecutor | None = None
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._lock = threading.Lock()
        self.closed = False

    @property
    def disk(self) -> DiskStore:
        """The disk store (created on first use, so caches that never spill make no directory)."""
        if self.closed:
            raise CacheClosedError("this cache was closed; create a new cache")
        if self._disk is None:
            self._disk = DiskStore(self._disk_dir)
            logger.debug("disk tier at %s", self._disk.root)
        return self._disk

    @property
    def has_disk(self) -> bool:
        return self._disk is not None

    def submit(self, fn, *args) -> Future:
        if self.closed:
            raise CacheClosedError("this cache was closed; create a new cache")
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llmsys-prefetch")
        return self._executor.submit(fn, *args)

    def side_stream(self, device: torch.device) -> torch.cuda.Stream | None:
        """A CUDA stream for prefetch copies on `device` (None off CUDA)."""
        if device.type != "cuda":
            return None
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device=device)
        return self._streams[device]

    def pin(self, device: torch.device) -> bool:
        return self.pin_memory and device.type == "cuda"

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        if self._disk is not None:
            self._disk.close()


__all__ = [
    "DEVICE",
    "DISK",
    "HOST",
    "TIERS",
    "DiskStore",
    "PrefetchGroup",
    "PrefetchHandle",
    "Tier",
    "TierContext",
    "check_tier",
]
