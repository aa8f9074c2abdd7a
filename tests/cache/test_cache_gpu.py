"""CUDA: pinned host pages, side-stream prefetch, logits on the GPU (skipped without a CUDA device)."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from llmsys.cache import PagedCache
from llmsys.models import forward, generate
from llmsys.testing import tiny_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(autouse=True)
def _exact_fp32():
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
def test_cuda_pages_on_every_tier_with_prefetch(family, tmp_path):
    model = tiny_model(family).cuda()
    ids = torch.randint(3, 500, (2, 37), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    ref = DynamicCache(config=model.config)
    cache = PagedCache(config=model.config, page_size=8, disk_dir=tmp_path)
    with torch.no_grad():
        out_r = forward(model, ids, cache=ref)
        out_p = forward(model, ids, cache=cache)
        for step in range(10):
            assert (out_r.logits - out_p.logits).abs().max().item() <= 1e-5, step
            for layer in cache.layers:
                full = layer.page_table[:, :-1].reshape(-1)
                half = full.numel() // 2
                layer.move(full[:half], "host")
                layer.move(full[half:], "disk")
                assert layer.pool.host_store.keys.is_pinned()
                if step % 2:
                    handle = layer.prefetch(full)  # side stream; update waits for it
                    assert handle.page_ids
            nxt = out_r.logits[:, -1:].argmax(-1)
            out_r = forward(model, nxt, cache=ref)
            out_p = forward(model, nxt, cache=cache)
    assert cache.tiers.side_stream(torch.device("cuda", torch.cuda.current_device())) is not None
    moved = cache.bytes_moved()
    assert moved["host->device"] > 0 and moved["disk->device"] > 0 and moved["device->host"] > 0
    cache.check()
    cache.close()


def test_cuda_prefetch_many_pages_is_correct():
    model = tiny_model("llama").cuda()
    cache = PagedCache(config=model.config, page_size=16)
    ids = torch.randint(3, 500, (1, 2048), device="cuda")
    with torch.no_grad():
        forward(model, ids, cache=cache)
    layer = cache.layers[0]
    before = layer.to_dense()
    layer.move(layer.page_table.reshape(-1), "host")
    handle = layer.prefetch()
    handle.wait()
    assert handle.done() and set(layer.placement()) == {"device"}
    after = layer.to_dense()
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    cache.check()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_generate_matches_default_cache(dtype):
    model = tiny_model("qwen2", dtype=dtype, attn_implementation="sdpa").cuda()
    ids = torch.randint(3, 500, (2, 21), device="cuda")
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    kwargs = dict(attention_mask=mask, max_new_tokens=16, do_sample=False)
    cache = PagedCache(config=model.config, page_size=5)
    assert torch.equal(generate(model, ids, cache=cache, **kwargs), generate(model, ids, **kwargs))
