"""PagePool.keep_clean_copies: a page brought up keeps its lower-tier copy until it is written."""

from __future__ import annotations

import pytest
import torch

from llmsys.cache import PagedLayer, TierContext

HEADS, DIM, PAGE = 2, 8, 4


def _layer(tmp_path, clean: bool = True, length: int = 13):
    layer = PagedLayer(PAGE, layer_idx=0, tiers=TierContext(disk_dir=tmp_path))
    k, v = torch.randn(2, HEADS, length, DIM), torch.randn(2, HEADS, length, DIM)
    layer.update(k, v)
    layer.pool.keep_clean_copies = clean
    return layer, k, v


@pytest.mark.parametrize("tier", ["host", "disk"])
def test_moving_back_down_copies_nothing(tmp_path, tier):
    layer, k, v = _layer(tmp_path)
    pool = layer.pool
    pages = layer.page_table[:, :2].reshape(-1).tolist()
    layer.move(pages, tier)
    layer.move(pages, "device")
    assert pool.clean_tier_of(pages) == [tier] * 4
    assert pool.pages_held(tier) == 4 and pool.pages_on(tier) == 0
    before = dict(pool.bytes_moved)
    assert layer.move(pages, tier) == 0  # nothing copied
    assert dict(pool.bytes_moved) == before
    assert pool.clean_tier_of(pages) == [None] * 4 and pool.pages_held(tier) == 4
    dk, dv = layer.to_dense()
    assert torch.equal(dk, k) and torch.equal(dv, v)
    layer.check()


def test_a_write_drops_the_clean_copy(tmp_path):
    layer, k, v = _layer(tmp_path, length=14)  # the last page has room for 2 more tokens
    tail = layer.page_table[:, -1].tolist()
    layer.move(tail, "host")
    layer.move(tail, "device")
    assert layer.pool.clean_tier_of(tail) == ["host", "host"]
    k2, v2 = torch.randn(2, HEADS, 1, DIM), torch.randn(2, HEADS, 1, DIM)
    layer.update(k2, v2)  # written: the host copy is stale and released
    assert layer.pool.clean_tier_of(tail) == [None, None] and layer.pool.pages_held("host") == 0
    layer.move(tail, "host")
    dk, dv = layer.to_dense()
    assert torch.equal(dk, torch.cat([k, k2], dim=2)) and torch.equal(dv, torch.cat([v, v2], dim=2))
    layer.check()


def test_prefetch_keeps_the_clean_copy_and_free_releases_it(tmp_path):
    layer, k, _ = _layer(tmp_path)
    pool = layer.pool
    pages = layer.page_table[:, :2].reshape(-1).tolist()
    layer.move(pages[:2], "disk")
    layer.move(pages[2:], "host")
    layer.prefetch(pages).wait()
    assert pool.clean_tier_of(pages) == ["disk", "disk", "host", "host"]
    assert len(list(layer.tiers.disk.root.glob("*.kv"))) == 2
    layer.check()
    layer.keep(torch.arange(8, 13))  # frees the first two pages of each row, clean copies included
    assert pool.pages_held("disk") == pool.pages_held("host") == 0
    assert list(layer.tiers.disk.root.glob("*.kv")) == []
    assert torch.equal(layer.to_dense()[0], k[:, :, 8:])
    layer.check()


def test_off_by_default(tmp_path):
    layer, _, _ = _layer(tmp_path, clean=False)
    pages = layer.page_table[:, 0].tolist()
    layer.move(pages, "disk")
    layer.move(pages, "device")
    assert layer.pool.clean_tier_of(pages) == [None, None]
    assert list(layer.tiers.disk.root.glob("*.kv")) == []
    assert layer.move(pages, "disk") > 0
