"""What LeoAM moves to disk: 8-bit min/max quantised pages, in checksummed, lock-protected files.

- `quantize_minmax` / `dequantize_minmax` (from `llmsys.cache.codec`, shared with the host tier):
  each group of `group` consecutive elements (one key or value row of one head and token, i.e.
  ``group = head_dim``) is stored as uint8 codes with its own float32 minimum and step
  ``(max - min) / 255``. Every element comes back within half a step of its original value
  (`minmax_error_bound`), a bound the tests check on random and adversarial inputs.
- `CompressedDiskStore`: a `llmsys.cache.DiskStore` whose page payload is that code (so the
  cache's checksum covers the compressed bytes, and a flipped byte still raises
  `CorruptPageError`), and whose directory holds a lock file for the life of the store. When a
  store starts it removes sibling directories left by crashed runs: those whose lock nobody holds
  any more (an `flock` dies with its process), never one a live process still locks.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import struct
import time
from pathlib import Path

import torch

from llmsys.cache import DiskStore
from llmsys.cache.codec import dequantize_minmax, minmax_error_bound, quantize_minmax

logger = logging.getLogger(__name__)

__all__ = [
    "CompressedDiskStore",
    "dequantize_minmax",
    "minmax_error_bound",
    "quantize_minmax",
]

# --------------------------------------------------------------------------------------------------


_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_FROM_CODE = {v: k for k, v in _DTYPES.items()}
_PAYLOAD = struct.Struct("<BxxxII")  # dtype code, group, groups
FLAG_RAW, FLAG_MINMAX8 = 0, 1
LOCK_NAME = "LOCK"
#: a sibling directory without a lock file is only treated as crashed once it is this old (a live
#: run creates its directory, then its lock file, a moment later)
UNLOCKED_GRACE_S = 60.0


class CompressedDiskStore(DiskStore):
    """A `DiskStore` that stores pages as 8-bit min/max codes and marks its directory with a lock.

    Args:
        directory: parent directory (None: the system temporary directory); the store makes a fresh
            sub-directory ``llmsys-leoam-*`` inside it and removes it on `close()`.
        group: elements per quantisation group (the model's head_dim: one group per head and token).
        compress: False stores raw bytes (lossless) but keeps the lock file and crash cleanup.

    Pages holding non-finite values are stored raw (lossless) rather than quantised. `bytes_written` /
    `bytes_read` count file bytes (header included) for the byte accounting of `LeoAMCache`.
    """

    PREFIX = "llmsys-leoam-"

    def __init__(self, directory: str | os.PathLike | None = None, *, group: int, compress: bool = True):
        if group < 1:
            raise ValueError(f"CompressedDiskStore: group must be >= 1, got {group}")
        self.group = group
        self.compress = compress
        self.dtype: torch.dtype | None = None  # set by the cache from the model's K/V
        self.bytes_written = 0
        self.bytes_read = 0
        self.removed_leftovers: list[Path] = []
        self._lock_fd: int | None = None
        if directory is not None:
            parent = Path(directory)
            try:
                parent.mkdir(parents=True, exist_ok=True)
                probe = parent / f".llmsys-write-test-{os.getpid()}"
                probe.write_bytes(b"")
                probe.unlink()
            except OSError as error:
                raise ValueError(
                    f"disk_dir={str(parent)!r} is not a writable directory ({error.strerror or error}). "
                    "Pass a directory this process can create files in, or disk_dir=None for a temporary one."
                ) from None
        super().__init__(directory, prefix=self.PREFIX)

    # -- lock file and crashed runs ----------------------------------------------------------------
    def open(self) -> None:
        fd = os.open(self.root / LOCK_NAME, os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a fresh mkdtemp directory: nobody else holds it
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd
        self.removed_leftovers = self._remove_crashed_siblings()

    def _remove_crashed_siblings(self) -> list[Path]:
        removed = []
        for sibling in self.root.parent.glob(self.PREFIX + "*"):
            if sibling == self.root or not sibling.is_dir():
                continue
            if _abandoned(sibling):
                shutil.rmtree(sibling, ignore_errors=True)
                logger.warning("removed %s, left behind by a crashed llmsys run", sibling)
                removed.append(sibling)
        return removed

    def close(self) -> None:
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None
        super().close()

    # -- compression -------------------------------------------------------------------------------
    def encode(self, raw: bytes) -> tuple[bytes, int]:
        if not self.compress:
            return raw, FLAG_RAW
        if self.dtype is None:
            raise RuntimeError("CompressedDiskStore.dtype is unset; the cache sets it at its first update")
        x = torch.frombuffer(bytearray(raw), dtype=self.dtype)
        if not bool(torch.isfinite(x).all()):
            return raw, FLAG_RAW
        codes, mins, steps = quantize_minmax(x, self.group)
        header = _PAYLOAD.pack(_DTYPES[self.dtype], self.group, mins.numel())
        body = mins.numpy().tobytes() + steps.numpy().tobytes() + codes.numpy().tobytes()
        return header + body, FLAG_MINMAX8

    def decode(self, stored: memoryview, flags: int, raw_nbytes: int) -> bytes | memoryview:
        if flags == FLAG_RAW:
            return stored
        if flags != FLAG_MINMAX8:
            raise ValueError(f"unknown page encoding flags {flags}")
        code, group, groups = _PAYLOAD.unpack_from(stored, 0)
        off = _PAYLOAD.size
        buf = bytes(stored[off:])
        mins = torch.frombuffer(bytearray(buf[: 4 * groups]), dtype=torch.float32)
        steps = torch.frombuffer(bytearray(buf[4 * groups : 8 * groups]), dtype=torch.float32)
        codes = torch.frombuffer(bytearray(buf[8 * groups :]), dtype=torch.uint8).view(groups, group)
        x = dequantize_minmax(codes, mins, steps).to(_FROM_CODE[code])
        return x.reshape(-1).view(torch.uint8).numpy().tobytes()

    # -- byte accounting ---------------------------------------------------------------------------
    def write(self, layer_idx: int, page_id: int, keys: torch.Tensor, values: torch.Tensor) -> int:
        n = super().write(layer_idx, page_id, keys, values)
        self.bytes_written += n
        return n

    def read(self, layer_idx, page_id, shape, dtype):  # type: ignore[override]
        out = super().read(layer_idx, page_id, shape, dtype)
        self.bytes_read += self.last_read_nbytes
        return out

    def stored_bytes(self) -> int:
        """Bytes of every page file now in the directory."""
        return sum(p.stat().st_size for p in self.root.glob("*.kv"))


def _abandoned(directory: Path) -> bool:
    lock = directory / LOCK_NAME
    if not lock.exists():
        try:
            return time.time() - directory.stat().st_mtime > UNLOCKED_GRACE_S
        except OSError:
            return False
    try:
        fd = os.open(lock, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False  # a live process holds it
    finally:
        os.close(fd)  # also drops the lock we may have taken
    return True
