"""LeoAMCache: tiers, device accounting, compression error bound, checksums, crash cleanup, errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import DynamicCache

from llmsys.cache import DEVICE, CacheBudgetError, CorruptPageError, PagedCache
from llmsys.kv import (
    CompressedDiskStore,
    LeoAM,
    LeoAMCache,
    WholeKVOffloadCache,
    dequantize_minmax,
    minmax_error_bound,
    quantize_minmax,
)
from llmsys.models import forward, generate
from llmsys.testing import greedy_logits, tiny_model

SETUP = dict(budget=48, sink=4, window=8, min_chunk=8, max_chunk=32, page_size=8)


def _ids(batch: int = 2, length: int = 160, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 500, (batch, length), generator=torch.Generator().manual_seed(seed))


def _decode(model, cache, ids: torch.Tensor, new: int, on_step=None) -> torch.Tensor:
    """Greedy decode `new` tokens after `cache.prefill` (or a plain prefill): [new, B, vocab] logits."""
    with torch.no_grad():
        if isinstance(cache, LeoAMCache):
            cache.prefill(model, ids)
            out = forward(model, ids[:, -1:], cache=cache)
        else:
            out = forward(model, ids, cache=cache)
        return greedy_logits(model, out, cache, new - 1, on_step)


# --------------------------------------------------------------------------------------------------
# tiers do not change the method


def test_lossless_tiers_give_the_on_device_policy_exactly(tmp_path):
    model = tiny_model("llama")
    ids = _ids()
    policy = LeoAM(**{k: v for k, v in SETUP.items() if k != "page_size"})
    with PagedCache.from_model(model, policy=policy, page_size=SETUP["page_size"]) as ref_cache:
        with ref_cache.attach(model):
            reference = _decode_plain_chunks(model, ref_cache, ids, new=6, chunk=80)
    with LeoAMCache.from_model(
        model, device_budget=112, host_budget=32, disk_dir=tmp_path, compress=False, prefetch=True, **SETUP
    ) as cache:
        tiered = _decode(model, cache, ids, new=6)
        tiers = cache.bytes_by_tier()
        report = cache.report()
        owned = sum(len(layer.pool.owned()) for layer in cache.layers)
        pool = cache.layers[0].pool
    assert torch.equal(tiered, reference)
    assert tiers["device"] and tiers["host"] and tiers["disk"]  # every tier was used
    assert report["pages"]["misses"] > 0 and report["pages"]["prefetched"] > 0
    # the abstracts of every page, whatever its tier: min and max per page and per 4-token run, fp32
    runs = SETUP["page_size"] // 4
    assert report["abstract_bytes"] == owned * (1 + runs) * 2 * pool.num_heads * pool.head_dim * 4


def _decode_plain_chunks(model, cache, ids, new, chunk):
    """The same token stream as `LeoAMCache.prefill` (chunks of `chunk`) + decode, on a plain PagedCache."""
    with torch.no_grad():
        body = ids[:, :-1]
        for start in range(0, body.shape[1], chunk):
            piece = body[:, start : start + chunk]
            forward(model, piece, cache=cache, position_ids=torch.arange(start, start + piece.shape[1])[None])
        return greedy_logits(model, forward(model, ids[:, -1:], cache=cache), cache, new - 1)


def test_max_prefill_chunk_used_by_the_reference_above():
    cache = LeoAMCache(tiny_model("llama").config, device_budget=112, **SETUP)
    # 14 device pages - (1 sink page + 1 window page + 2 edge pages) = 10 pages of 8 tokens
    assert cache.max_prefill_chunk == 80
    cache.close()


def test_device_never_exceeds_its_budget_and_bytes_add_up(tmp_path):
    model = tiny_model("qwen3")
    ids = _ids(batch=2, length=200)
    device_budget, host_budget = 112, 40
    cache = LeoAMCache.from_model(
        model, device_budget=device_budget, host_budget=host_budget, disk_dir=tmp_path, **SETUP
    )
    peaks: list[int] = []

    def record():
        for layer in cache.layers:
            peaks.append(layer.pool.pages_on(DEVICE))
            # the host also stays within its budget (clean copies of pages on the device included)
            assert layer.pool.pages_held("host") <= host_budget // SETUP["page_size"] * 2

    with cache:
        _decode(model, cache, ids, new=8, on_step=record)
        record()
        cap = device_budget // SETUP["page_size"] * 2  # pages per layer for 2 rows
        assert max(peaks) <= cap
        assert all(layer.pool.max_device_pages == cap for layer in cache.layers)
        page_bytes = cache.layers[0].pool.page_bytes
        pages = sum(layer.page_table.numel() for layer in cache.layers)
        assert sum(cache.bytes_by_tier().values()) == pages * page_bytes
        report = cache.report()
        assert report["bytes_by_tier"]["device"] <= len(cache.layers) * cap * page_bytes
        assert report["pages"]["decode_steps"] == 8 * len(cache.layers)


def test_a_full_device_leaves_a_page_per_row_for_the_new_tokens(tmp_path):
    # every row starts a new page at the same decode step: the device must have room for all of them
    model = tiny_model("llama")
    ids = _ids(batch=4, length=89)  # 88 tokens prefilled; decoding crosses the page boundary at 96
    with LeoAMCache.from_model(model, device_budget=88, host_budget=16, disk_dir=tmp_path, **SETUP) as cache:
        _decode(model, cache, ids, new=10)
        cache.check()
        assert all(layer.pool.pages_on(DEVICE) <= 11 * 4 for layer in cache.layers)


def test_compressed_disk_pages_stay_close(tmp_path):
    model = tiny_model("llama")
    ids = _ids()
    full = _decode(model, DynamicCache(config=model.config), ids, new=1)
    # the prompt goes to disk after the prefill; the decode step attends to all of it, read back
    kw = dict(device_budget=240, host_budget=0, disk_dir=tmp_path, **{**SETUP, "budget": 160})
    with LeoAMCache.from_model(model, **kw) as cache, torch.no_grad():
        cache.prefill(model, ids)
        on_disk = cache.bytes_by_tier()["disk"]
        assert on_disk > 0 and cache.disk_store.stored_bytes() < 0.4 * on_disk  # fp32 -> 8 bit + scales
        logits = forward(model, ids[:, -1:], cache=cache).logits[:, -1][None]
        assert cache.bytes_moved()["disk->device"] == on_disk
    assert not torch.equal(logits, full)  # lossy ...
    torch.testing.assert_close(logits, full, atol=0.05, rtol=0)  # ... within a small error


def test_choosing_chunks_reads_nothing_from_disk(tmp_path):
    model = tiny_model("llama")
    ids = _ids(batch=1)
    with LeoAMCache.from_model(model, device_budget=112, host_budget=0, disk_dir=tmp_path, **SETUP) as cache:
        with torch.no_grad():
            cache.prefill(model, ids)
        layer = cache.layers[1]
        assert layer.bytes_by_tier()["disk"] > layer.bytes_by_tier()["device"]
        read, moved = cache.disk_store.bytes_read, cache.bytes_moved()
        query = torch.randn(1, model.config.num_attention_heads, layer.pool.head_dim)
        chosen = cache.policy.select(layer, query)
        assert chosen.shape == (1, SETUP["budget"])
        assert cache.disk_store.bytes_read == read and cache.bytes_moved() == moved


# --------------------------------------------------------------------------------------------------
# compression


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 6),
    group=st.sampled_from([1, 3, 16, 64]),
    scale=st.floats(1e-3, 1e4),
    offset=st.floats(-1e3, 1e3),
    seed=st.integers(0, 1000),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
)
def test_minmax_code_error_bound(rows, group, scale, offset, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, group, generator=g) * scale + offset).to(dtype)
    x[0, 0] = x[0, -1]  # a repeated extreme
    codes, mins, steps = quantize_minmax(x, group)
    back = dequantize_minmax(codes, mins, steps)
    err = (back - x.float().reshape(-1, group)).abs()
    assert bool((err <= minmax_error_bound(x, group)).all())
    # decoding to the storage dtype adds at most one rounding of that dtype
    stored = back.to(dtype).float()
    ulp = torch.finfo(dtype).eps * x.float().abs().reshape(-1, group).amax(dim=1, keepdim=True)
    assert bool(((stored - x.float().reshape(-1, group)).abs() <= minmax_error_bound(x, group) + ulp).all())


def test_constant_groups_are_exact():
    x = torch.full((4, 8), 3.25)
    codes, mins, steps = quantize_minmax(x, 8)
    assert torch.equal(dequantize_minmax(codes, mins, steps), x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_store_round_trip_and_non_finite_pages_stay_raw(tmp_path, dtype):
    store = CompressedDiskStore(tmp_path, group=16)
    store.dtype = dtype
    k, v = torch.randn(2, 8, 16).to(dtype), torch.randn(2, 8, 16).to(dtype)
    store.write(0, 1, k, v)
    rk, rv = store.read(0, 1, (2, 8, 16), dtype)
    bound = minmax_error_bound(k, 16).reshape(k.shape) + torch.finfo(dtype).eps * k.float().abs().max()
    assert bool(((rk.float() - k.float()).abs() <= bound).all())
    assert store.path(0, 1).stat().st_size < 2 * k.numel() * k.element_size()
    k[0, 0, 0] = float("inf")
    store.write(0, 2, k, v)
    rk, rv = store.read(0, 2, (2, 8, 16), dtype)
    assert torch.equal(rk, k) and torch.equal(rv, v)  # lossless fallback, not a silent corruption
    store.close()


# --------------------------------------------------------------------------------------------------
# reliability


def test_corrupt_page_raises(tmp_path):
    model = tiny_model("llama")
    ids = _ids(batch=1)
    with LeoAMCache.from_model(model, device_budget=112, host_budget=0, disk_dir=tmp_path, **SETUP) as cache:
        with torch.no_grad():
            cache.prefill(model, ids)
        files = sorted(cache.disk_store.root.glob("*.kv"))
        assert files
        for f in files:  # flip one payload byte in every page file
            data = bytearray(f.read_bytes())
            data[-1] ^= 0xFF
            f.write_bytes(bytes(data))
        with pytest.raises(CorruptPageError, match="checksum"):
            with torch.no_grad():
                forward(model, ids[:, -1:], cache=cache)


_CRASH = """
import os, sys
from llmsys.kv import CompressedDiskStore
store = CompressedDiskStore(sys.argv[1], group=4)
(store.root / "layer000-page0000001.kv").write_bytes(b"x")
print(store.root, flush=True)
os._exit(0)  # no finalizer: the directory stays behind, as after a crash
"""


def test_crashed_runs_directory_is_removed_on_next_start(tmp_path):
    left = subprocess.run([sys.executable, "-c", _CRASH, str(tmp_path)], capture_output=True, text=True, check=True)
    leftover = Path(left.stdout.strip())
    assert leftover.is_dir()
    alive = CompressedDiskStore(tmp_path, group=4)  # a live store next to it: must survive
    assert not leftover.exists() and leftover in alive.removed_leftovers
    other = CompressedDiskStore(tmp_path, group=4)
    assert alive.root.is_dir() and other.root.is_dir() and other.removed_leftovers == []
    unrelated = tmp_path / "my-data"
    unrelated.mkdir()
    other.close()
    alive.close()
    assert not alive.root.exists() and unrelated.exists()


def test_unwritable_disk_dir_is_a_clear_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ValueError, match="not a writable directory"):
        LeoAMCache(tiny_model("llama").config, device_budget=112, disk_dir=blocker / "sub", **SETUP)


def test_budget_errors_name_the_fix():
    config = tiny_model("llama").config
    with pytest.raises(ValueError, match="device_budget"):
        LeoAMCache(config, device_budget=40, **SETUP)
    with pytest.raises(ValueError, match="sink \\+ window"):
        LeoAMCache(config, device_budget=400, budget=10, sink=4, window=16)
    model = tiny_model("llama")
    with LeoAMCache.from_model(model, device_budget=112, **SETUP) as cache:
        with pytest.raises(CacheBudgetError, match="cache.prefill"):
            forward(model, _ids(batch=1), cache=cache)


def test_generate_after_prefill_and_close_removes_files(tmp_path):
    model = tiny_model("mistral")
    ids = _ids(batch=1)
    cache = LeoAMCache.from_model(model, device_budget=112, host_budget=16, disk_dir=tmp_path, **SETUP)
    cache.prefill(model, ids)
    out = generate(model, ids, cache=cache, max_new_tokens=5, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 5)
    assert cache.policy.prefetch is False  # prefetch=None: only with the KV on CUDA
    root = cache.disk_store.root
    assert any(root.glob("*.kv"))
    cache.close()
    assert not root.exists() and os.listdir(tmp_path) == []


def test_whole_kv_offload_baseline_is_the_full_cache():
    model = tiny_model("qwen2")
    ids = _ids(batch=2, length=30)
    plain = generate(model, ids, cache=DynamicCache(config=model.config), max_new_tokens=5, do_sample=False)
    cache = WholeKVOffloadCache(model.config)
    out = generate(model, ids, cache=cache, max_new_tokens=5, do_sample=False)
    assert torch.equal(out, plain) and cache.bytes_moved() > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tiers_pinned_host_and_side_stream_prefetch(tmp_path):
    model = tiny_model("llama").cuda()
    ids = _ids().cuda()
    policy = LeoAM(**{k: v for k, v in SETUP.items() if k != "page_size"})
    with PagedCache.from_model(model, policy=policy, page_size=SETUP["page_size"]) as ref_cache:
        reference = _decode_plain_chunks(model, ref_cache, ids, new=6, chunk=80)
    with LeoAMCache.from_model(
        model, device_budget=112, host_budget=32, disk_dir=tmp_path, compress=False, prefetch=True, **SETUP
    ) as cache:
        tiered = _decode(model, cache, ids, new=6)
        assert cache.layers[0].pool.host_store.keys.is_pinned()
        assert cache.report()["pages"]["prefetched"] > 0
    torch.testing.assert_close(tiered, reference, atol=1e-4, rtol=1e-4)


def test_compressed_host_tier(tmp_path):
    # compress_host=True (the default on CUDA): host pages are 8-bit codes too. The selection is
    # unchanged (abstracts never leave the device); only attended K/V carry the code's error, so the
    # logits stay close to the run with a raw host tier (disk pages are coded in both)
    model = tiny_model("llama")
    ids = _ids()
    logits = {}
    for coded in (False, True):
        with LeoAMCache.from_model(
            model, device_budget=112, host_budget=64, disk_dir=tmp_path, compress_host=coded, **SETUP
        ) as cache:
            logits[coded] = _decode(model, cache, ids, new=6)
            host = cache.layers[0].pool.host_store
            assert host.keys.dtype == (torch.uint8 if coded else model.dtype)
            assert cache.report()["bytes_moved"].get("host->device", 0) > 0  # the host tier was read back
    diff = (logits[True] - logits[False]).abs().max().item()
    assert 0 < diff < 0.01 * logits[False].abs().max().item()
