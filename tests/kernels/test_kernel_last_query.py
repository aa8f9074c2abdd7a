"""Last-query key scores (GemFilter raw / SnapKV softmax), head reduction and pooling."""

from __future__ import annotations

import pytest
import torch

from llmsys.kernels import last_query_scores, last_query_scores_reference

TOL = dict(atol=1e-4, rtol=1e-4)


def naive_scores(q, k, softmax, scale=None, pool_kernel=1, reduce_heads="sum", pool="avg"):
    """Loops over heads and queries; pooling by explicit zero-padded windows."""
    B, Hq, W, D = q.shape
    T = k.shape[2]
    group = Hq // k.shape[1]
    per_head = torch.zeros(B, Hq, T)
    for h in range(Hq):
        for i in range(W):
            logits = k[:, h // group].float() @ q[:, h, i].float()[:, :, None]  # [B, T, 1]
            logits = logits[..., 0]
            if softmax:
                pos = T - W + i  # query i sits at position T-W+i and sees keys 0..pos
                s = D**-0.5 if scale is None else scale
                per_head[:, h, : pos + 1] += torch.softmax(logits[:, : pos + 1] * s, dim=-1)
            else:
                per_head[:, h] += logits * (1.0 if scale is None else scale)
    x = {"sum": per_head.sum(1), "mean": per_head.mean(1), "none": per_head}[reduce_heads]
    if pool_kernel > 1:
        pad = pool_kernel // 2
        padded = torch.nn.functional.pad(x, (pad, pad))
        if pool == "max":
            x = torch.stack([padded[..., t : t + pool_kernel].amax(-1) for t in range(T)], dim=-1)
        else:
            x = torch.stack([padded[..., t : t + pool_kernel].sum(-1) / pool_kernel for t in range(T)], dim=-1)
    return x


# (B, Hq, Hkv, W, T, D)
SHAPES = [
    (3, 4, 1, 1, 37, 64),  # GemFilter-style single query, GQA 4:1
    (2, 4, 4, 3, 5, 80),  # MHA, odd W, D not a power of two
    (1, 8, 2, 8, 50, 64),  # SnapKV-style window
    (2, 2, 2, 1, 1, 64),  # T=1
]
# (softmax, reduce_heads, pool_kernel, scale, pool)
MODES = [
    (False, "sum", 1, None, "avg"),
    (True, "sum", 7, None, "avg"),
    (True, "none", 4, 0.2, "avg"),
    (False, "mean", 3, 0.5, "avg"),
    (False, "sum", 5, None, "max"),
    (True, "none", 4, 0.2, "max"),
]


@pytest.mark.parametrize("softmax,reduce_heads,pool_kernel,scale,pool", MODES)
@pytest.mark.parametrize("B,Hq,Hkv,W,T,D", SHAPES)
def test_reference_matches_naive(rand, B, Hq, Hkv, W, T, D, softmax, reduce_heads, pool_kernel, scale, pool):
    q, k = rand(B, Hq, W, D), rand(B, Hkv, T, D)
    kw = dict(softmax=softmax, scale=scale, pool_kernel=pool_kernel, reduce_heads=reduce_heads, pool=pool)
    torch.testing.assert_close(last_query_scores_reference(q, k, **kw), naive_scores(q, k, **kw), **TOL)


@pytest.mark.parametrize("softmax,reduce_heads,pool_kernel,scale,pool", MODES)
@pytest.mark.parametrize("B,Hq,Hkv,W,T,D", SHAPES)
def test_triton_matches_reference(
    triton_cpu, rand, B, Hq, Hkv, W, T, D, softmax, reduce_heads, pool_kernel, scale, pool
):
    q, k = rand(B, Hq, W, D), rand(B, Hkv, T, D)
    kw = dict(softmax=softmax, scale=scale, pool_kernel=pool_kernel, reduce_heads=reduce_heads, pool=pool)
    out = last_query_scores(q, k, backend="triton", **kw)
    ref = last_query_scores(q, k, backend="reference", **kw)
    assert out.dtype == torch.float32
    assert out.shape == ((B, Hq, T) if reduce_heads == "none" else (B, T))
    torch.testing.assert_close(out, ref, **TOL)


def test_softmax_rows_sum_to_window(rand):
    # Each of the W queries contributes a distribution over keys: per head the scores sum to W.
    q, k = rand(2, 4, 5, 32), rand(2, 2, 12, 32)
    per_head = last_query_scores(q, k, softmax=True, reduce_heads="none")
    torch.testing.assert_close(per_head.sum(-1), torch.full((2, 4), 5.0), **TOL)


def test_triton_non_contiguous_and_bf16(triton_cpu, rand):
    q = rand(1, 4, 2, 64).to(torch.bfloat16)
    k = rand(1, 21, 2, 64).to(torch.bfloat16).transpose(1, 2)  # [B, T, Hkv, D] storage
    for softmax in (False, True):
        out = last_query_scores(q, k, softmax=softmax, pool_kernel=5, backend="triton")
        ref = last_query_scores_reference(q, k.contiguous(), softmax=softmax, pool_kernel=5)
        torch.testing.assert_close(out, ref, atol=1e-3, rtol=1e-3)


def test_errors(rand):
    q, k = rand(1, 4, 2, 16), rand(1, 2, 8, 16)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        last_query_scores(rand(1, 3, 2, 16), k, softmax=True)
    with pytest.raises(ValueError, match="W <= T"):
        last_query_scores(rand(1, 4, 9, 16), k, softmax=True)
    with pytest.raises(ValueError, match="q must be 4-D"):
        last_query_scores(q[:, :, 0], k, softmax=True)
    with pytest.raises(ValueError, match="reduce_heads"):
        last_query_scores(q, k, softmax=True, reduce_heads="max")
    with pytest.raises(ValueError, match="pool_kernel"):
        last_query_scores(q, k, softmax=True, pool_kernel=0)
    with pytest.raises(ValueError, match="pool must be 'avg' or 'max'"):
        last_query_scores(q, k, softmax=True, pool_kernel=3, pool="min")
    with pytest.raises(ValueError, match="head dim"):
        last_query_scores(q, rand(1, 2, 8, 8), softmax=True)
    with pytest.raises(ValueError, match="share a dtype"):
        last_query_scores(q, k.half(), softmax=True)
