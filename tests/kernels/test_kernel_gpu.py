"""Compiled Triton kernels on a real CUDA device: realistic sizes, bf16, auto dispatch.

Run with ``pytest -m gpu tests/kernels`` on a GPU machine (skipped elsewhere, and skipped when
``TRITON_INTERPRET=1`` is set, since these need compiled kernels).
"""

from __future__ import annotations

import pytest
import torch

from llmsys.kernels import (
    abstract_scores,
    chunk_minmax,
    fixed_chunk_bounds,
    gathered_decode_attention,
    last_query_scores,
    paged_decode_attention,
    rerotate_keys,
    use_triton,
)

pytestmark = pytest.mark.gpu

FP32 = dict(atol=1e-4, rtol=1e-4)
BF16 = dict(atol=2e-2, rtol=2e-2)


def _paged(gen, device, dtype, B, Hkv, page_size, D, seq_lens):
    pages = [-(-n // page_size) for n in seq_lens]
    num_pages = sum(pages) + 7
    k_pages = torch.randn(num_pages, Hkv, page_size, D, generator=gen).to(device, dtype)
    v_pages = torch.randn(num_pages, Hkv, page_size, D, generator=gen).to(device, dtype)
    perm = torch.randperm(num_pages, generator=gen)
    table = torch.full((B, max(pages)), -1, dtype=torch.int32)
    used = 0
    for b, n in enumerate(pages):
        table[b, :n] = perm[used : used + n].int()
        used += n
    return k_pages, v_pages, table.to(device), torch.tensor(seq_lens, device=device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_splits", [None, 1])
def test_paged_decode_large(cuda_triton, gen, dtype, num_splits):
    dev = cuda_triton
    B, Hq, Hkv, D, page = 6, 32, 8, 128, 16
    k_pages, v_pages, table, lens = _paged(gen, dev, dtype, B, Hkv, page, D, [4000, 1, 17, 2048, 0, 3333])
    q = torch.randn(B, Hq, D, generator=gen).to(dev, dtype)
    ref = paged_decode_attention(q, k_pages, v_pages, table, lens, backend="reference")
    out = paged_decode_attention(q, k_pages, v_pages, table, lens, num_splits=num_splits)  # auto -> triton
    torch.testing.assert_close(out.float(), ref.float(), **(FP32 if dtype == torch.float32 else BF16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gathered_decode_odd_head_dim(cuda_triton, gen, dtype):
    dev = cuda_triton
    q = torch.randn(3, 16, 80, generator=gen).to(dev, dtype)
    k = torch.randn(3, 4, 1000, 80, generator=gen).to(dev, dtype)
    v = torch.randn(3, 4, 1000, 80, generator=gen).to(dev, dtype)
    lens = torch.tensor([1000, 1, 517], device=dev)
    ref = gathered_decode_attention(q, k, v, lens, backend="reference")
    out = gathered_decode_attention(q, k, v, lens, backend="triton")
    torch.testing.assert_close(out.float(), ref.float(), **(FP32 if dtype == torch.float32 else BF16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_abstracts_large(cuda_triton, gen, dtype):
    dev = cuda_triton
    keys = torch.randn(2, 8, 8190, 128, generator=gen).to(dev, dtype)
    q = torch.randn(2, 32, 128, generator=gen).to(dev, dtype)
    bounds = fixed_chunk_bounds(8190, 16, device=dev)
    kmin, kmax = chunk_minmax(keys, bounds)
    ref_min, ref_max = chunk_minmax(keys, bounds, backend="reference")
    assert torch.equal(kmin, ref_min) and torch.equal(kmax, ref_max)
    out = abstract_scores(q, kmin, kmax)
    torch.testing.assert_close(out, abstract_scores(q, kmin, kmax, backend="reference"), atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("softmax,W", [(False, 1), (True, 32)])
def test_last_query_large(cuda_triton, gen, dtype, softmax, W):
    dev = cuda_triton
    q = torch.randn(2, 32, W, 128, generator=gen).to(dev, dtype)
    k = torch.randn(2, 8, 8000, 128, generator=gen).to(dev, dtype)
    out = last_query_scores(q, k, softmax=softmax, pool_kernel=7, reduce_heads="none")
    ref = last_query_scores(q, k, softmax=softmax, pool_kernel=7, reduce_heads="none", backend="reference")
    # bf16 dot products round their inputs the same way in both paths (products are exact in fp32).
    torch.testing.assert_close(out, ref, atol=1e-4 if softmax else 1e-3, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rerotate_large_deltas(cuda_triton, gen, dtype):
    dev = cuda_triton
    keys = torch.randn(2, 8, 4096, 128, generator=gen).to(dev, dtype)
    inv_freq = (1.0 / 500000.0 ** (torch.arange(0, 128, 2).float() / 128)).to(dev)
    delta = torch.randint(-32768, 32768, (2, 4096), generator=gen).to(dev)
    out = rerotate_keys(keys, delta, inv_freq)
    ref = rerotate_keys(keys, delta, inv_freq, backend="reference")
    torch.testing.assert_close(out.float(), ref.float(), **(FP32 if dtype == torch.float32 else BF16))


def test_auto_dispatch_uses_triton_on_cuda(cuda_triton):
    assert use_triton(cuda_triton)
