"""Tiers: moves, prefetch, byte accounting, checksummed disk pages, cleanup, budgets."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

from llmsys.cache import (
    CacheBudgetError,
    CacheClosedError,
    CorruptPageError,
    DiskStore,
    PagedCache,
    PagedLayer,
    PagePool,
    TierContext,
)
from llmsys.cache.codec import minmax_error_bound
from llmsys.models import forward
from llmsys.testing import tiny_model

HEADS, DIM = 2, 8


def _layer(tmp_path, page_size=4, batch=2, length=13, **kwargs):
    layer = PagedLayer(page_size, layer_idx=1, tiers=TierContext(disk_dir=tmp_path), **kwargs)
    k = torch.randn(batch, HEADS, length, DIM)
    v = torch.randn(batch, HEADS, length, DIM)
    layer.update(k, v)
    return layer, k, v


def test_move_round_trip_and_byte_accounting(tmp_path):
    layer, k, v = _layer(tmp_path)
    pages = layer.page_table.reshape(-1).tolist()  # 2 rows x 4 pages
    page_bytes = 2 * HEADS * 4 * DIM * 4
    assert layer.bytes_by_tier() == {"device": 8 * page_bytes, "host": 0, "disk": 0}
    assert layer.move(pages[:3], "host") == 3 * page_bytes
    assert layer.move(pages[3:5], "disk") == 2 * page_bytes
    assert layer.placement(pages) == ["host"] * 3 + ["disk"] * 2 + ["device"] * 3
    assert layer.bytes_by_tier() == {"device": 3 * page_bytes, "host": 3 * page_bytes, "disk": 2 * page_bytes}
    assert len(list(layer.tiers.disk.root.iterdir())) == 2
    # reads go through every tier without moving anything
    dk, dv = layer.to_dense()
    assert torch.equal(dk, k) and torch.equal(dv, v)
    assert torch.equal(layer.gather(torch.tensor([0, 5, 12]))[1], v[:, :, [0, 5, 12]])
    assert layer.placement(pages)[:5] == ["host"] * 3 + ["disk"] * 2
    read_traffic = layer.pool.bytes_moved["disk->device"]  # reads count as traffic too
    assert read_traffic > 0
    # host -> disk -> device
    layer.move(pages[:3], "disk")
    assert layer.move(pages, "device") == 5 * page_bytes
    assert layer.bytes_by_tier()["device"] == 8 * page_bytes
    assert list(layer.tiers.disk.root.iterdir()) == []  # files of pages that left the disk are gone
    dk, dv = layer.to_dense()
    assert torch.equal(dk, k) and torch.equal(dv, v)
    moved = layer.pool.bytes_moved
    assert moved["device->host"] == 3 * page_bytes and moved["device->disk"] == 2 * page_bytes
    assert moved["host->disk"] == 3 * page_bytes
    assert moved["disk->device"] == read_traffic + 5 * page_bytes
    layer.check()
    layer.tiers.close()


def test_append_and_keep_work_with_pages_elsewhere(tmp_path):
    layer, k, v = _layer(tmp_path, length=10)  # the last page is partly filled
    layer.move(layer.page_table.reshape(-1), "disk")
    k2, v2 = torch.randn(2, HEADS, 3, DIM), torch.randn(2, HEADS, 3, DIM)
    keys, _ = layer.update(k2, v2)  # the tail page comes back to the device to be written
    assert torch.equal(keys, torch.cat([k, k2], dim=2))
    layer.keep(torch.tensor([0, 1, 2, 3, 9, 12]))  # page 0 stays on disk, the rest is rewritten
    assert layer.placement() == ["disk", "device"] * 2
    assert torch.equal(layer.to_dense()[1], torch.cat([v, v2], dim=2)[:, :, [0, 1, 2, 3, 9, 12]])
    layer.check()
    layer.tiers.close()


def test_prefetch_then_update(tmp_path):
    layer, k, v = _layer(tmp_path)
    pages = layer.page_table.reshape(-1)
    layer.move(pages[:4], "host")
    layer.move(pages[4:], "disk")
    handle = layer.prefetch()
    assert sorted(handle.page_ids) == sorted(pages.tolist())
    # update waits for the in-flight pages it reads; no explicit wait
    k2, v2 = torch.randn(2, HEADS, 1, DIM), torch.randn(2, HEADS, 1, DIM)
    keys, values = layer.update(k2, v2)
    assert handle.done()
    assert torch.equal(keys, torch.cat([k, k2], dim=2)) and torch.equal(values, torch.cat([v, v2], dim=2))
    assert set(layer.placement()) == {"device"}
    assert layer.pool.in_flight() == []
    assert layer.bytes_by_tier()["host"] == 0 and list(layer.tiers.disk.root.iterdir()) == []
    page_bytes = layer.pool.page_bytes
    assert layer.pool.bytes_moved["host->device"] == 4 * page_bytes
    assert layer.pool.bytes_moved["disk->device"] == 4 * page_bytes
    handle.wait()  # idempotent
    layer.check()
    layer.tiers.close()


def _disk_layer(tmp_path):
    layer, k, v = _layer(tmp_path)
    page = int(layer.page_table[1, 2])
    layer.move([page], "disk")
    return layer, page, layer.tiers.disk.path(1, page)


def test_corrupt_page_names_the_file(tmp_path):
    layer, page, path = _disk_layer(tmp_path)
    data = bytearray(path.read_bytes())
    data[40] ^= 0x01  # one flipped bit in the payload
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptPageError, match="checksum") as info:
        layer.to_dense()
    assert info.value.path == path and str(path) in str(info.value)
    assert info.value.layer_idx == 1 and info.value.page_id == page
    assert "layer 1" in str(info.value) and f"page {page}" in str(info.value)
    # a prefetch surfaces it at wait/update time and leaves the page where it was
    handle = layer.prefetch([page])
    with pytest.raises(CorruptPageError):
        handle.wait()
    assert layer.placement([page]) == ["disk"]
    layer.check()
    layer.tiers.close()


@pytest.mark.parametrize("damage", ["missing", "truncated", "header"])
def test_missing_or_truncated_page(tmp_path, damage):
    layer, page, path = _disk_layer(tmp_path)
    if damage == "missing":
        path.unlink()
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:-7])
    else:
        path.write_bytes(b"NOTAPAGE" + path.read_bytes()[8:])
    with pytest.raises(CorruptPageError, match=str(path.name)):
        layer.move([page], "device")
    layer.tiers.close()


def test_files_removed_on_close_and_context_exit(tmp_path):
    model = tiny_model("llama")
    ids = torch.randint(3, 500, (1, 12))
    with PagedCache(config=model.config, page_size=4, disk_dir=tmp_path) as cache:
        forward(model, ids, cache=cache)
        cache.move("disk")
        root = cache.tiers.disk.root
        assert root.parent == tmp_path and len(list(root.iterdir())) == 2 * 3
    assert not root.exists() and list(tmp_path.iterdir()) == []
    assert cache.bytes_by_tier() == {"device": 0, "host": 0, "disk": 0}
    with pytest.raises(CacheClosedError):
        forward(model, ids, cache=cache)


def test_disk_store_removed_when_garbage_collected(tmp_path):
    store = DiskStore(tmp_path)
    store.write(0, 0, torch.ones(2, 4, 8), torch.zeros(2, 4, 8))
    root = store.root
    del store
    gc.collect()
    assert not root.exists()


def test_disk_files_removed_at_interpreter_exit(tmp_path):
    script = textwrap.dedent(
        f"""
        import torch
        from llmsys.cache import PagedLayer, TierContext
        layer = PagedLayer(4, tiers=TierContext(disk_dir={str(tmp_path)!r}))
        layer.update(torch.randn(1, 2, 9, 8), torch.randn(1, 2, 9, 8))
        layer.move(layer.page_table.reshape(-1), "disk")
        print(layer.tiers.disk.root)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, env=env)
    root = Path(out.stdout.strip())
    assert root.parent == tmp_path
    assert not root.exists()


def test_model_decode_with_pages_on_host_and_disk(tmp_path):
    """Pages pushed off the device every step (and prefetched back for some): logits unchanged."""
    model = tiny_model("qwen2")
    ids = torch.randint(3, 500, (2, 17), generator=torch.Generator().manual_seed(0))
    ref = DynamicCache(config=model.config)
    cache = PagedCache(config=model.config, page_size=4, disk_dir=tmp_path)
    with torch.no_grad():
        out_r = forward(model, ids, cache=ref)
        out_p = forward(model, ids, cache=cache)
        for step in range(8):
            assert (out_r.logits - out_p.logits).abs().max().item() <= 1e-5
            tier = ["host", "disk"][step % 2]
            for layer in cache.layers:
                full = layer.page_table[:, :-1].reshape(-1)  # leave the tail page to the device
                layer.move(full, tier)
                if step % 3 == 0:
                    layer.prefetch(full[::2])
            nxt = out_r.logits[:, -1:].argmax(-1)
            out_r = forward(model, nxt, cache=ref)
            out_p = forward(model, nxt, cache=cache)
    moved = cache.bytes_moved()
    assert moved["device->host"] > 0 and moved["host->disk"] > 0 and moved["disk->device"] > 0
    total = cache.bytes_by_tier()
    assert sum(total.values()) == sum(len(layer.page_table.reshape(-1)) for layer in cache.layers) * (
        cache.layers[0].pool.page_bytes
    )
    cache.check()
    cache.close()


def test_budget_error_names_the_fix(tmp_path):
    layer = PagedLayer(4, max_device_pages=3, tiers=TierContext(disk_dir=tmp_path))
    layer.update(torch.randn(1, HEADS, 12, DIM), torch.randn(1, HEADS, 12, DIM))
    with pytest.raises(CacheBudgetError, match="max_device_pages=3.*keep.*move"):
        layer.update(torch.randn(1, HEADS, 1, DIM), torch.randn(1, HEADS, 1, DIM))
    layer.check()
    layer.move(layer.page_table[:, :2].reshape(-1), "host")  # make room, then go on
    layer.update(torch.randn(1, HEADS, 1, DIM), torch.randn(1, HEADS, 1, DIM))
    assert layer.length == 13
    with pytest.raises(CacheBudgetError):
        layer.move(layer.page_table.reshape(-1), "device")
    layer.tiers.close()


class CompressedStore(DiskStore):
    """The extension point LeoAM uses: transform page bytes on their way to and from disk."""

    def encode(self, raw):
        return zlib.compress(raw), 1

    def decode(self, stored, flags, raw_nbytes):
        assert flags == 1
        return zlib.decompress(stored)


def test_disk_store_subclass_can_compress(tmp_path):
    store = CompressedStore(tmp_path)
    layer = PagedLayer(4, tiers=TierContext(disk_store=store))
    k = torch.zeros(1, HEADS, 8, DIM)
    layer.update(k, k + 1)
    layer.move(layer.page_table.reshape(-1), "disk")
    assert all(p.stat().st_size < 100 for p in store.root.iterdir())
    assert torch.equal(layer.to_dense()[1], k + 1)
    layer.tiers.close()
    assert not store.root.exists()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compressed_host_tier_keeps_pages_within_the_code_bound(dtype):
    # compress_host=True: host pages are 8-bit min/max codes (one group per head and token); every
    # way back to the device (read, move, prefetch) returns the same pages within the code's bound
    # (plus one rounding to bf16), and a page holding a non-finite value is kept raw (exact)
    tiers = TierContext(compress_host=True)
    pool = PagePool(2, 8, 4, dtype, "cpu", tiers=tiers)
    ids = pool.allocate(3)
    scale = torch.tensor([1.0, 30.0, 0.01])[:, None, None, None]
    keys, values = (torch.randn(3, 2, 4, 8) * scale).to(dtype), torch.randn(3, 2, 4, 8).to(dtype)
    keys[2, 1, 3, 5] = float("inf")
    pool.store_pages(ids, keys, values, [4, 4, 4])
    try:
        pool.move(ids, "host")
        assert pool.host_store.keys.dtype == torch.uint8 and pool.host_store.keys.shape[-1] == 8 + 8
        pool.check()
        k, v = pool.read_pages(ids)  # read from the host, placement unchanged
        for got, want in ((k[:2], keys[:2]), (v[:2], values[:2])):
            err = (got.float() - want.float()).reshape(-1, 8).abs()
            bound = minmax_error_bound(want, 8)
            if dtype == torch.bfloat16:
                bound = bound + want.float().reshape(-1, 8).abs() * 2**-8 + bound * 2**-8
            assert bool((err <= bound).all())
        if dtype == torch.float32:
            assert not torch.equal(k[:2], keys[:2])  # coded, not stored raw
        assert torch.equal(k[2], keys[2]) and torch.equal(v[2], values[2])  # the non-finite page: raw
        pool.prefetch(ids[:1]).wait()
        pool.move(ids[1:], "device")
        back, _ = pool.read_pages(ids)
        assert torch.equal(back, k)  # the same decoded pages, whichever way they came up
        pool.move(ids, "host")
        pool.free(ids)
        assert pool.host_store.raw == {}  # released with its slot
        pool.check()
    finally:
        tiers.close()
