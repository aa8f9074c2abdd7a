"""Property tests of the page pool and layer: any sequence of operations keeps content, order, abstracts
and page ownership right (compared against a plain tensor model)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmsys.cache import CacheError, KeepAll, PagedLayer, PagePool, TierContext

HEADS, DIM = 2, 4
SETTINGS = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)


class Reference:
    """What the layer must hold: dense K/V [B, H, N, D] and stream indices [B, N]."""

    def __init__(self, batch):
        self.keys = torch.empty(batch, HEADS, 0, DIM)
        self.values = torch.empty(batch, HEADS, 0, DIM)
        self.index = torch.empty(batch, 0, dtype=torch.long)
        self.seen = 0

    def append(self, k, v):
        q = k.shape[2]
        self.keys = torch.cat([self.keys, k], dim=2)
        self.values = torch.cat([self.values, v], dim=2)
        self.index = torch.cat([self.index, torch.arange(self.seen, self.seen + q).expand(k.shape[0], q)], dim=1)
        self.seen += q

    def keep(self, idx):  # idx [B, n] sorted
        rows = torch.arange(idx.shape[0])[:, None]
        self.keys = self.keys.permute(0, 2, 1, 3)[rows, idx].permute(0, 2, 1, 3)
        self.values = self.values.permute(0, 2, 1, 3)[rows, idx].permute(0, 2, 1, 3)
        self.index = self.index[rows, idx]


@dataclass
class FineAbstracts(KeepAll):
    """KeepAll, with pools that keep abstracts per run of `abstract_tokens` tokens too."""

    abstract_tokens: int | None = None


def _check(layer: PagedLayer, ref: Reference) -> None:
    layer.check()
    assert layer.length == ref.keys.shape[2]
    assert layer.get_seq_length() == ref.seen
    if layer.pool is None:
        return
    keys, values = layer.to_dense()
    assert torch.equal(keys, ref.keys)
    assert torch.equal(values, ref.values)
    assert torch.equal(layer.token_index, ref.index)
    # per-page abstracts == recomputation from the stored keys
    kmin, kmax = layer.page_abstracts()
    ps = layer.page_size
    for j in range(math.ceil(layer.length / ps)):
        chunk = ref.keys[:, :, j * ps : (j + 1) * ps]
        assert torch.equal(kmin[:, :, j], chunk.amin(dim=2)), f"kmin of page {j}"
        assert torch.equal(kmax[:, :, j], chunk.amax(dim=2)), f"kmax of page {j}"
    pool = layer.pool
    if pool.sub_kmin is None:
        return
    # fine abstracts (`abstract_tokens`): one per run of a page, +inf / -inf for a run holding no token
    table = layer.page_table.to(pool.device)
    sub_min, sub_max = pool.sub_kmin[table], pool.sub_kmax[table]  # [B, pages, runs, H, D]
    run = pool.abstract_tokens
    for j in range(math.ceil(layer.length / ps)):
        for r in range(pool.sub_pages):
            lo = j * ps + r * run
            if lo >= layer.length:
                assert torch.isinf(sub_min[:, j, r]).all() and torch.isinf(sub_max[:, j, r]).all()
                continue
            chunk = ref.keys[:, :, lo : min(lo + run, layer.length)]
            assert torch.equal(sub_min[:, j, r], chunk.amin(dim=2)), f"sub_kmin of page {j} run {r}"
            assert torch.equal(sub_max[:, j, r], chunk.amax(dim=2)), f"sub_kmax of page {j} run {r}"


operation = st.one_of(
    st.tuples(st.just("append"), st.integers(1, 9)),
    st.tuples(st.just("keep"), st.floats(0.0, 1.0), st.booleans()),
    st.tuples(st.just("drop"), st.floats(0.0, 1.0), st.floats(0.0, 1.0)),
    st.tuples(st.just("crop"), st.integers(1, 4)),
    st.tuples(st.just("move"), st.sampled_from(["host", "disk", "device"]), st.floats(0.0, 1.0)),
    st.tuples(st.just("prefetch"), st.floats(0.0, 1.0)),
    st.tuples(st.just("gather"), st.integers(0, 6)),
)


@SETTINGS
@given(
    batch=st.integers(1, 2),
    page_size=st.sampled_from([1, 3, 4]),
    ops=st.lists(operation, min_size=1, max_size=14),
    seed=st.integers(0, 2**16),
    fine=st.sampled_from([None, 1, 2]),
)
def test_random_operations_keep_content_order_and_ownership(batch, page_size, ops, seed, fine):
    gen = torch.Generator().manual_seed(seed)
    tiers = TierContext()
    layer = PagedLayer(page_size, policy=FineAbstracts(abstract_tokens=fine), layer_idx=3, tiers=tiers)
    ref = Reference(batch)
    try:
        for op in ops:
            n = layer.length
            if op[0] == "append":
                k = torch.randn(batch, HEADS, op[1], DIM, generator=gen)
                v = torch.randn(batch, HEADS, op[1], DIM, generator=gen)
                layer.update(k, v)
                ref.append(k, v)
            elif layer.pool is None or n == 0:
                continue
            elif op[0] == "keep":
                size = int(op[1] * n)
                if op[2]:  # one index list for every row
                    idx = torch.randperm(n, generator=gen)[:size]
                    layer.keep(idx)
                    idx = idx.sort().values.expand(batch, size)
                else:  # a different subset per row
                    idx = torch.stack([torch.randperm(n, generator=gen)[:size] for _ in range(batch)])
                    layer.keep(idx)
                    idx = idx.sort(dim=1).values
                ref.keep(idx)
            elif op[0] == "drop":
                start = int(op[1] * n)
                end = start + int(op[2] * (n - start))
                layer.drop_span(start, end)
                ref.keep(torch.cat([torch.arange(start), torch.arange(end, n)]).expand(batch, -1))
            elif op[0] == "crop":  # forget the last m tokens of the stream (not of the storage)
                m = min(op[1], ref.seen)
                survive = ref.index < ref.seen - m
                counts = survive.sum(dim=1)
                if bool((counts != counts[0]).any()):
                    with pytest.raises(CacheError, match="different"):
                        layer.crop(-m)
                    continue
                layer.crop(-m)
                ref.keep(torch.arange(int(counts[0])).expand(batch, -1))
                ref.seen -= m
            elif op[0] == "move":
                pages = layer.page_table.reshape(-1)
                chosen = pages[torch.randperm(pages.numel(), generator=gen)[: int(op[2] * pages.numel())]]
                layer.move(chosen, op[1])
                assert set(layer.pool.tier_of(chosen)) <= {op[1]}
            elif op[0] == "prefetch":
                pages = layer.page_table.reshape(-1)
                layer.prefetch(pages[: int(op[1] * pages.numel())])  # not waited for on purpose
            elif op[0] == "gather":
                idx = torch.randint(0, n, (batch, op[1]), generator=gen)
                k, v = layer.gather(idx)
                rows = torch.arange(batch)[:, None]
                assert torch.equal(k, ref.keys.permute(0, 2, 1, 3)[rows, idx].permute(0, 2, 1, 3))
                assert torch.equal(v, ref.values.permute(0, 2, 1, 3)[rows, idx].permute(0, 2, 1, 3))
            _check(layer, ref)
        layer.wait()
        _check(layer, ref)
        layer.reset()
        assert layer.pool is None or layer.pool.owned() == []
    finally:
        tiers.close()


@SETTINGS
@given(
    batch=st.integers(1, 3),
    page_size=st.sampled_from([1, 4]),
    length=st.integers(0, 11),
    selection=st.lists(st.integers(0, 5), min_size=0, max_size=6),
    kind=st.sampled_from(["reorder", "select", "repeat"]),
    seed=st.integers(0, 2**16),
)
def test_row_operations_match_index_select(batch, page_size, length, selection, kind, seed):
    gen = torch.Generator().manual_seed(seed)
    layer = PagedLayer(page_size)
    k = torch.randn(batch, HEADS, length, DIM, generator=gen)
    v = torch.randn(batch, HEADS, length, DIM, generator=gen)
    layer.update(k, v)
    if length:
        layer.move(layer.page_table[:, :1].reshape(-1), "host")  # rows copied across tiers too
    if kind == "repeat":
        repeats = 1 + len(selection) % 3
        rows = torch.arange(batch).repeat_interleave(repeats)
        layer.batch_repeat_interleave(repeats)
    else:
        rows = torch.tensor([s % batch for s in selection], dtype=torch.long)
        (layer.reorder_cache if kind == "reorder" else layer.batch_select_indices)(rows)
    layer.check()
    assert layer.batch_size == len(rows)
    if len(rows) and length:
        dk, dv = layer.to_dense()
        assert torch.equal(dk, k[rows]) and torch.equal(dv, v[rows])
        kmin, _ = layer.page_abstracts()
        assert torch.equal(kmin[:, :, 0], k[rows][:, :, :page_size].amin(dim=2))
    layer.tiers.close()


def test_keep_reuses_aligned_pages_without_copying():
    layer = PagedLayer(4)
    k = torch.randn(1, HEADS, 16, DIM)
    layer.update(k, k.clone())
    before = layer.page_table[0].tolist()
    layer.move([before[3]], "host")
    freed = layer.drop_span(4, 8)  # a whole page: the pages after it shift by exactly one page
    assert freed == [before[1]]
    assert layer.page_table[0].tolist() == [before[0], before[2], before[3]]
    assert layer.placement() == ["device", "device", "host"]  # placement survives
    assert torch.equal(layer.to_dense()[0], torch.cat([k[:, :, :4], k[:, :, 8:]], dim=2))
    layer.check()


def test_keep_rejects_bad_indices():
    layer = PagedLayer(4)
    layer.update(torch.randn(2, HEADS, 6, DIM), torch.randn(2, HEADS, 6, DIM))
    for bad in (torch.tensor([0, 0]), torch.tensor([6]), torch.tensor([[0], [1], [2]])):
        try:
            layer.keep(bad)
        except ValueError:
            continue
        raise AssertionError(f"keep({bad.tolist()}) was accepted")
    layer.check()


@pytest.mark.parametrize(("page_size", "asked", "run"), [(8, 2, 2), (8, 3, 4), (6, 4, 6), (5, None, 5)])
def test_fine_abstracts_follow_store_and_copy(page_size, asked, run):
    # rewritten pages (`store_pages`, e.g. TIM's key re-rotation) and copied pages (duplicated rows)
    # carry exact fine abstracts; a run of the page size means none are kept
    pool = PagePool(HEADS, DIM, page_size, torch.float32, "cpu", abstract_tokens=asked)
    assert pool.abstract_tokens == run and pool.sub_pages == page_size // run
    ids = pool.allocate(2)
    keys = torch.randn(2, HEADS, page_size, DIM)
    fills = [page_size, page_size - 3]
    pool.store_pages(ids, keys, torch.randn_like(keys), fills)
    copies = pool.copy_pages(ids)
    if pool.sub_pages == 1:
        assert pool.sub_kmin is None
        return
    for page, fill in enumerate(fills):
        for r in range(pool.sub_pages):
            lo, hi = r * run, min((r + 1) * run, fill)
            for pid in (ids[page], copies[page]):
                if lo >= fill:
                    assert torch.isinf(pool.sub_kmin[pid, r]).all()
                    continue
                assert torch.equal(pool.sub_kmin[pid, r], keys[page, :, lo:hi].amin(dim=1))
                assert torch.equal(pool.sub_kmax[pid, r], keys[page, :, lo:hi].amax(dim=1))


def test_fine_abstracts_reject_a_bad_size():
    with pytest.raises(ValueError, match="abstract_tokens"):
        PagePool(HEADS, DIM, 8, torch.float32, "cpu", abstract_tokens=0)


def test_abstract_bytes_count_page_and_fine_abstracts():
    for asked, per_page in ((None, 1), (2, 1 + 4)):
        pool = PagePool(HEADS, DIM, 8, torch.float32, "cpu", abstract_tokens=asked)
        pool.allocate(3)
        assert pool.abstract_bytes() == 3 * per_page * 2 * HEADS * DIM * 4  # min and max, fp32
