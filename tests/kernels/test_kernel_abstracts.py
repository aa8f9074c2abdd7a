"""Chunk min/max abstracts and their query-aware upper-bound scores."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmsys.kernels import (
    abstract_scores,
    abstract_scores_reference,
    chunk_minmax,
    chunk_minmax_reference,
    fixed_chunk_bounds,
    triton_available,
    use_triton,
)

TOL = dict(atol=1e-4, rtol=1e-4)


def naive_minmax(keys, bounds):
    b = bounds.tolist()
    kmin = torch.stack([keys[:, :, s:e].amin(dim=2) for s, e in zip(b[:-1], b[1:])], dim=2)
    kmax = torch.stack([keys[:, :, s:e].amax(dim=2) for s, e in zip(b[:-1], b[1:])], dim=2)
    return kmin, kmax


def naive_scores(q, kmin, kmax):
    B, Hq, D = q.shape
    group = Hq // kmin.shape[1]
    out = torch.zeros(B, Hq, kmin.shape[2])
    for h in range(Hq):
        lo, hi = kmin[:, h // group].float(), kmax[:, h // group].float()  # [B, C, D]
        qh = q[:, h, None, :].float()
        out[:, h] = torch.where(qh >= 0, qh * hi, qh * lo).sum(-1)
    return out


def test_fixed_chunk_bounds():
    assert fixed_chunk_bounds(10, 4).tolist() == [0, 4, 8, 10]
    assert fixed_chunk_bounds(8, 4).tolist() == [0, 4, 8]
    assert fixed_chunk_bounds(1, 16).tolist() == [0, 1]
    with pytest.raises(ValueError, match="chunk_size"):
        fixed_chunk_bounds(8, 0)


# (B, Hq, Hkv, T, D, bounds); bounds None -> 16-token pages
CASES = [
    (3, 4, 1, 37, 64, None),  # partial last page
    (2, 4, 4, 1, 80, [0, 1]),  # T=1, D not a power of two
    (1, 8, 2, 50, 64, [0, 3, 4, 21, 50]),  # variable chunks, one of a single token
    (2, 2, 2, 40, 96, [5, 17, 33]),  # chunks need not cover every token
]


def _bounds(T, bounds):
    return fixed_chunk_bounds(T, 16) if bounds is None else torch.tensor(bounds, dtype=torch.int32)


@pytest.mark.parametrize("B,Hq,Hkv,T,D,bounds", CASES)
def test_reference_matches_naive(rand, B, Hq, Hkv, T, D, bounds):
    keys, q = rand(B, Hkv, T, D), rand(B, Hq, D)
    bounds = _bounds(T, bounds)
    kmin, kmax = chunk_minmax_reference(keys, bounds)
    nmin, nmax = naive_minmax(keys, bounds)
    torch.testing.assert_close(kmin, nmin, atol=0, rtol=0)
    torch.testing.assert_close(kmax, nmax, atol=0, rtol=0)
    torch.testing.assert_close(abstract_scores_reference(q, kmin, kmax), naive_scores(q, kmin, kmax), **TOL)


@pytest.mark.parametrize("B,Hq,Hkv,T,D,bounds", CASES)
def test_triton_matches_reference(triton_cpu, rand, B, Hq, Hkv, T, D, bounds):
    keys, q = rand(B, Hkv, T, D), rand(B, Hq, D)
    bounds = _bounds(T, bounds)
    ref_min, ref_max = chunk_minmax(keys, bounds, backend="reference")
    kmin, kmax = chunk_minmax(keys, bounds, backend="triton")
    torch.testing.assert_close(kmin, ref_min, atol=0, rtol=0)  # min/max are exact
    torch.testing.assert_close(kmax, ref_max, atol=0, rtol=0)
    scores = abstract_scores(q, kmin, kmax, backend="triton")
    assert scores.dtype == torch.float32 and scores.shape == (B, Hq, bounds.numel() - 1)
    torch.testing.assert_close(scores, abstract_scores(q, kmin, kmax, backend="reference"), **TOL)


def test_triton_bf16(triton_cpu, rand):
    keys, q = rand(2, 2, 33, 64, dtype=torch.bfloat16), rand(2, 4, 64, dtype=torch.bfloat16)
    bounds = fixed_chunk_bounds(33, 8)
    kmin, kmax = chunk_minmax(keys, bounds, backend="triton")
    assert kmin.dtype == torch.bfloat16
    ref_min, ref_max = chunk_minmax_reference(keys, bounds)
    assert torch.equal(kmin, ref_min) and torch.equal(kmax, ref_max)
    torch.testing.assert_close(
        abstract_scores(q, kmin, kmax, backend="triton"), abstract_scores_reference(q, kmin, kmax), **TOL
    )


@st.composite
def chunked_problem(draw):
    T = draw(st.integers(1, 40))
    cuts = draw(st.lists(st.integers(1, max(T - 1, 1)), max_size=6, unique=True)) if T > 1 else []
    bounds = sorted({0, T, *cuts})
    return dict(
        Hkv=draw(st.sampled_from([1, 2])),
        group=draw(st.sampled_from([1, 3])),
        T=T,
        D=draw(st.sampled_from([4, 16, 24])),
        bounds=bounds,
        seed=draw(st.integers(0, 2**31 - 1)),
        magnitude=draw(st.sampled_from([1e-3, 1.0, 30.0])),
    )


def _check_upper_bound(problem, backend):
    g = torch.Generator().manual_seed(problem["seed"])
    Hkv, T, D = problem["Hkv"], problem["T"], problem["D"]
    Hq = Hkv * problem["group"]
    keys = torch.randn(2, Hkv, T, D, generator=g) * problem["magnitude"]
    q = torch.randn(2, Hq, D, generator=g)
    bounds = torch.tensor(problem["bounds"])
    kmin, kmax = chunk_minmax(keys, bounds, backend=backend)
    upper = abstract_scores(q, kmin, kmax, backend=backend)  # [2, Hq, C]
    # The true best logit of each chunk: max over its tokens of q·k.
    logits = torch.einsum("bhgd,bhtd->bhgt", q.view(2, Hkv, problem["group"], D), keys).reshape(2, Hq, T)
    b = problem["bounds"]
    best = torch.stack([logits[..., s:e].amax(dim=-1) for s, e in zip(b[:-1], b[1:])], dim=-1)
    # fp32 summation-order noise scales with the terms summed, not with the result: the bound adds a
    # positive and a negative part that cancel (one-token chunks: best ~1.6 from terms of ~1000)
    terms = torch.maximum(kmin.abs(), kmax.abs())  # [2, Hkv, C, D]
    size = torch.einsum("bhgd,bhcd->bhgc", q.abs().view(2, Hkv, problem["group"], D), terms).reshape(2, Hq, -1)
    slack = 1e-5 * (1 + size)
    assert bool((upper >= best - slack).all()), (upper - best).min()


@settings(max_examples=60, deadline=None)
@given(chunked_problem())
def test_abstract_score_is_upper_bound_reference(problem):
    _check_upper_bound(problem, "reference")


@pytest.mark.skipif(not (triton_available() and use_triton("cpu")), reason="Triton interpreter unavailable")
@settings(max_examples=15, deadline=None)
@given(chunked_problem())
def test_abstract_score_is_upper_bound_triton(problem):
    _check_upper_bound(problem, "triton")


def test_errors(rand):
    keys, q = rand(1, 2, 10, 16), rand(1, 4, 16)
    with pytest.raises(ValueError, match="strictly increase"):
        chunk_minmax(keys, torch.tensor([0, 5, 5, 10]))
    with pytest.raises(ValueError, match="strictly increase"):
        chunk_minmax(keys, torch.tensor([0, 11]))
    with pytest.raises(ValueError, match="int32 or int64"):
        chunk_minmax(keys, torch.tensor([0.0, 10.0]))
    with pytest.raises(ValueError, match="keys must be 4-D"):
        chunk_minmax(keys[0], torch.tensor([0, 10]))
    kmin, kmax = chunk_minmax(keys, torch.tensor([0, 4, 10]))
    with pytest.raises(ValueError, match="multiple of kv heads"):
        abstract_scores(rand(1, 3, 16), kmin, kmax)
    with pytest.raises(ValueError, match="shapes differ"):
        abstract_scores(q, kmin, kmax[:, :, :1])
    with pytest.raises(ValueError, match="head dim"):
        abstract_scores(rand(1, 4, 8), kmin, kmax)
