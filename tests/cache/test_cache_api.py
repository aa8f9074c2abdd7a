"""The transformers Cache / layer API of PagedCache, token fields and views for kernels."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from llmsys.cache import CacheError, PagedCache, PagedLayer
from llmsys.models import forward
from llmsys.testing import tiny_model

HEADS, DIM = 2, 4


def _kv(batch, length, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, HEADS, length, DIM, generator=gen), torch.randn(batch, HEADS, length, DIM, generator=gen)


def test_lengths_and_mask_sizes_follow_the_positions_rule():
    layer = PagedLayer(4)
    assert layer.get_mask_sizes(5) == (5, 0) and layer.get_seq_length() == 0
    layer.update(*_kv(1, 10))
    assert layer.get_mask_sizes(1) == (11, 0)
    layer.keep(torch.tensor([0, 1, 7, 8, 9]))
    assert layer.get_seq_length() == 10  # seen: the next token's position
    assert layer.length == 5
    assert layer.get_mask_sizes(1) == (6, 5)  # 5 past + 1 new; new token at mask coordinate 10
    assert layer.get_mask_sizes(3) == (8, 5)
    assert layer.get_max_length() == -1 and not layer.is_sliding and not layer.is_compileable


def test_cache_properties_used_by_generate():
    model = tiny_model("llama")
    cache = PagedCache(config=model.config)
    assert len(cache) == 2 and not cache.is_initialized and not cache.is_compileable
    assert cache.batch_size == -1 and cache.get_seq_length() == 0
    forward(model, torch.randint(3, 500, (3, 7)), cache=cache)
    assert cache.is_initialized and cache.batch_size == 3 and cache.is_croppable
    assert cache.is_sliding == [False, False] and cache.get_max_length() == -1
    assert "PagedCache" in repr(cache) and "PagedLayer" in repr(cache.layers[0])
    assert cache.layers[0].keys.shape[1:] == (2, 16, 16)  # the device pool [slots, Hkv, page_size, D]
    with pytest.raises(AttributeError):
        cache.layers[0].keys = torch.zeros(1)


def test_cache_without_config_creates_layers_on_use():
    model = tiny_model("phi3")
    ids = torch.randint(3, 500, (1, 9))
    ref = forward(model, ids, cache=DynamicCache(config=model.config)).logits
    cache = PagedCache(page_size=2)
    assert len(cache) == 0
    assert torch.allclose(forward(model, ids, cache=cache).logits, ref, atol=1e-5, rtol=0)
    assert len(cache) == 2


def test_early_initialization():
    cache = PagedCache(num_layers=2, page_size=4)
    cache.early_initialization(batch_size=2, num_heads=HEADS, head_dim=DIM, dtype=torch.float32, device="cpu")
    assert cache.is_initialized and cache.batch_size == 2 and cache.get_seq_length() == 0
    k, v = _kv(2, 3)
    keys, _ = cache.update(k, v, 1)
    assert torch.equal(keys, k)


def test_crop():
    layer = PagedLayer(4)
    k, v = _kv(2, 11)
    layer.update(k, v)
    layer.crop(-3)
    assert layer.get_seq_length() == 8 and torch.equal(layer.to_dense()[0], k[:, :, :8])
    layer.crop(0)
    with pytest.raises(ValueError, match="negative"):
        layer.crop(2)
    layer.keep(torch.tensor([[0, 1, 7], [0, 1, 6]]))  # row 0 kept token 7, row 1 did not
    with pytest.raises(CacheError, match="different"):
        layer.crop(-1)
    layer.crop(-2)  # removes stream indices 6 and 7: one in each row
    assert layer.token_index.tolist() == [[0, 1], [0, 1]] and layer.get_seq_length() == 6
    layer.check()


def test_reset_allows_a_new_batch_size():
    layer = PagedLayer(4)
    layer.update(*_kv(2, 9))
    pool = layer.pool
    layer.reset()
    assert layer.length == 0 and layer.get_seq_length() == 0 and pool.owned() == []
    k, v = _kv(3, 5)
    keys, _ = layer.update(k, v)
    assert torch.equal(keys, k) and layer.batch_size == 3 and layer.pool is pool
    layer.check()


def test_token_fields_follow_compaction_and_rows():
    layer = PagedLayer(3)
    layer.update(*_kv(2, 6))
    scores = layer.add_token_field("score", fill=-1.0)
    assert scores.shape == (2, 6)
    layer.set_token_field("score", torch.arange(12.0).view(2, 6))
    layer.update(*_kv(2, 1, seed=1))
    assert layer.token_field("score")[:, -1].tolist() == [-1.0, -1.0]
    layer.keep(torch.tensor([[1, 4, 6], [0, 2, 5]]))
    assert layer.token_field("score").tolist() == [[1.0, 4.0, -1.0], [6.0, 8.0, 11.0]]
    layer.reorder_cache(torch.tensor([1, 1]))
    assert layer.token_field("score").tolist() == [[6.0, 8.0, 11.0]] * 2
    layer.check()


def test_cache_level_helpers():
    model = tiny_model("llama")
    cache = PagedCache(config=model.config, page_size=4)
    forward(model, torch.randint(3, 500, (1, 14)), cache=cache)
    freed = cache.keep([torch.arange(10), torch.arange(6)])  # one index list per layer
    assert [cache.stored_length(i) for i in range(2)] == [10, 6]
    assert set(freed) == {0, 1} and len(freed[1]) == 3  # the partly kept page is rewritten too
    cache.drop_span(0, 4, layers=[0])
    assert cache.stored_length(0) == 6
    k, _ = cache.gather(1, torch.tensor([5]))
    assert k.shape == (1, 2, 1, 16)
    assert cache.move("host", layers=[1]) > 0
    group = cache.prefetch_pages()
    group.wait()
    assert group.done() and set(cache.layers[1].placement()) == {"device"}
    cache.check()


def test_attach_is_reentrant_and_removes_its_hooks():
    model = tiny_model("llama")
    cache = PagedCache(config=model.config)
    attn = model.model.layers[0].self_attn
    with cache.attach(model):
        with cache.attach(model):
            assert len(attn._forward_pre_hooks) == 1
        assert len(attn._forward_pre_hooks) == 1
        forward(model, torch.randint(3, 500, (1, 5)), cache=cache)
        forward(model, torch.randint(3, 500, (1, 5)), cache=DynamicCache(config=model.config))  # ignored
    assert not attn._forward_pre_hooks and not model.model._forward_pre_hooks


def test_kernel_view_and_abstracts():
    layer = PagedLayer(4)
    k, v = _kv(2, 10)
    layer.update(k, v)
    layer.move(layer.page_table[:, 1], "host")
    key_pool, value_pool, table, lens = layer.kernel_view()
    assert set(layer.placement()) == {"device"} and lens.tolist() == [10, 10]
    # a reference paged read: page j of row b is key_pool[table[b, j]]
    pages = key_pool[table]  # [B, pages, H, ps, D]
    dense = pages.permute(0, 2, 1, 3, 4).reshape(2, HEADS, -1, DIM)[:, :, :10]
    assert torch.equal(dense, k) and torch.equal(value_pool[table[1, 2], :, 1], v[1, :, 9])
    kmin, kmax = layer.page_abstracts()
    assert kmin.shape == (2, HEADS, 3, DIM)
    assert torch.equal(kmax[:, :, 2], k[:, :, 8:].amax(dim=2))
    assert layer.page_bounds().tolist() == [0, 4, 8, 10]
    assert layer.pages_of(torch.tensor([0, 9])).tolist() == layer.page_table[:, [0, 2]].tolist()


def test_from_model_hooks_go_with_the_cache():
    import gc

    from llmsys.cache import CachePolicy

    class NeedsQueries(CachePolicy):
        needs_queries = True

    model = tiny_model("llama")
    attn = model.model.layers[0].self_attn
    cache = PagedCache.from_model(model, policy=NeedsQueries())
    assert len(attn._forward_pre_hooks) == 1
    del cache
    gc.collect()
    assert not attn._forward_pre_hooks
    assert not PagedCache.from_model(model)._hooks  # KeepAll needs no hooks


def test_page_abstracts_agree_with_kernels_chunk_minmax():
    kernels = pytest.importorskip("llmsys.kernels")
    if not hasattr(kernels, "chunk_minmax"):
        pytest.skip("llmsys.kernels.chunk_minmax not available yet")
    layer = PagedLayer(4)
    k, v = _kv(2, 11)
    layer.update(k, v)
    kmin, kmax = kernels.chunk_minmax(k, layer.page_bounds())
    got_min, got_max = layer.page_abstracts()
    assert torch.equal(got_min, kmin) and torch.equal(got_max, kmax)
