"""Importance of each cached key as seen by the last W queries (GemFilter / SnapKV scoring).

:func:`last_query_scores` takes q ``[B, Hq, W, D]`` (the last W queries, post-RoPE) and k ``[B, Hkv, T, D]``
(post-RoPE, GQA: query head h reads kv head h // (Hq // Hkv)); the W queries sit at positions
``T-W .. T-1``. Per (head, key) it sums over the W queries either

* ``softmax=False`` (GemFilter): the raw dot product ``q·k`` (times ``scale``, default 1, no mask), or
* ``softmax=True`` (SnapKV): the attention probability ``softmax_t(q·k * scale)`` with a causal mask
  (query i, at position T-W+i, sees keys t <= T-W+i); ``scale`` defaults to ``D**-0.5``;

then reduces over heads (``"sum"``/``"mean"`` -> ``[B, T]``, ``"none"`` -> ``[B, Hq, T]``) and
average-pools over tokens like ``F.avg_pool1d(kernel, stride=1, padding=kernel//2)`` (zero padding
counted; an even kernel yields T+1 values and the first T are kept), or with ``pool="max"`` takes
the maximum over the same zero-padded window. Scores are float32.

The Triton path computes the per-head scores ``[B, Hq, T]``; the head reduction and the pooling are
cheap O(B·Hq·T) torch ops done after it (:func:`_reduce_and_pool`, shared with the reference).
The softmax needs each query's max and normaliser over *all* keys before any probability can be
summed, so it takes two passes over K, each parallel over (row, kv head, key block): pass 1 writes
per-block (max, sum) pairs that torch merges; pass 2 recomputes the logits and sums probabilities.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

from llmsys.kernels._checks import check_dim, check_float, check_gqa, check_same_device, check_tensor
from llmsys.kernels._dispatch import Backend, dot_dtype, next_pow2, resolve_backend, tl, triton

__all__ = ["last_query_scores", "last_query_scores_reference"]

HeadReduction = Literal["sum", "mean", "none"]
Pooling = Literal["avg", "max"]
_LOG2E = math.log2(math.e)


def _reduce_and_pool(
    scores: torch.Tensor, reduce_heads: HeadReduction, pool_kernel: int, pool: Pooling = "avg"
) -> torch.Tensor:
    """scores [B, Hq, T] -> head reduction, then a stride-1 average (or max) pool over tokens."""
    if reduce_heads == "sum":
        scores = scores.sum(dim=1)
    elif reduce_heads == "mean":
        scores = scores.mean(dim=1)
    if pool_kernel > 1:
        T = scores.shape[-1]
        flat = scores.reshape(-1, 1, T)
        if pool == "max":  # the same zero-padded window as the average pool, so both treat the ends alike
            pad = pool_kernel // 2
            pooled = F.max_pool1d(F.pad(flat, (pad, pad), value=0.0), pool_kernel, stride=1)
        else:
            pooled = F.avg_pool1d(flat, pool_kernel, stride=1, padding=pool_kernel // 2)  # count_include_pad
        scores = pooled[..., :T].reshape(scores.shape)
    return scores


# --------------------------------------------------------------------------------------------------
# Reference (the spec)
# --------------------------------------------------------------------------------------------------


def last_query_scores_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    softmax: bool,
    scale: float | None = None,
    pool_kernel: int = 1,
    reduce_heads: HeadReduction = "sum",
    pool: Pooling = "avg",
) -> torch.Tensor:
    """Key scores from the last W queries. q [B,Hq,W,D], k [B,Hkv,T,D] -> [B,T] or [B,Hq,T] float32."""
    B, Hq, W, D = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    logits = torch.einsum("bhgwd,bhtd->bhgwt", q.float().view(B, Hkv, Hq // Hkv, W, D), k.float())
    if softmax:
        scale = D**-0.5 if scale is None else scale
        query_pos = torch.arange(T - W, T, device=q.device)
        visible = torch.arange(T, device=q.device)[None, :] <= query_pos[:, None]  # [W, T], causal
        per_query = torch.softmax((logits * scale).masked_fill(~visible, float("-inf")), dim=-1)
    else:
        per_query = logits * (1.0 if scale is None else scale)
    scores = per_query.sum(dim=3).reshape(B, Hq, T)  # sum over the W queries
    return _reduce_and_pool(scores, reduce_heads, pool_kernel, pool)


# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------
# Program (key block, b*Hkv + kv_head): its tile of rows is every (query head of the group, query),
# so each key block is loaded once for the whole group. Row r is (g, w) = (r // BLOCK_W, r % BLOCK_W).


@triton.jit
def _block_logits(
    q_ptr, k_ptr, b, kvh, t_blk, num_queries, num_keys,
    stride_qb, stride_qh, stride_qw, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Raw logits q·k of one key block: [BLOCK_G * BLOCK_W, BLOCK_T], plus index helpers."""
    offs_r = tl.arange(0, BLOCK_G * BLOCK_W)
    g = offs_r // BLOCK_W
    w = offs_r % BLOCK_W
    row_mask = (g < GROUP) & (w < num_queries)
    offs_t = t_blk * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = offs_t < num_keys
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM

    q_ptrs = q_ptr + b * stride_qb + (kvh * GROUP + g)[:, None] * stride_qh + w[:, None] * stride_qw
    q = tl.load(q_ptrs + offs_d[None, :] * stride_qd, mask=row_mask[:, None] & d_mask[None, :], other=0.0)
    k_ptrs = k_ptr + b * stride_kb + kvh * stride_kh + offs_t.to(tl.int64)[:, None] * stride_kt
    k = tl.load(k_ptrs + offs_d[None, :] * stride_kd, mask=t_mask[:, None] & d_mask[None, :], other=0.0)
    s = tl.dot(q.to(DOT_DTYPE), tl.trans(k.to(DOT_DTYPE)), input_precision=DOT_PRECISION)
    return s, g, w, row_mask, offs_t, t_mask


@triton.jit
def _lq_stats_kernel(
    q_ptr, k_ptr, m_ptr, l_ptr,
    num_kv_heads, num_queries, num_keys, qk_scale,
    stride_qb, stride_qh, stride_qw, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_sb, stride_sh, stride_sw, stride_sn,  # m/l partials [B, Hq, W, num_blocks]
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Pass 1: per key block, each query's max base-2 logit and sum of exp2(logit - max)."""
    t_blk = tl.program_id(0)  # key blocks on grid axis 0 (up to 2^31 - 1; axis 1 allows 65535)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // num_kv_heads
    kvh = bh % num_kv_heads
    s, g, w, row_mask, offs_t, t_mask = _block_logits(
        q_ptr, k_ptr, b, kvh, t_blk, num_queries, num_keys,
        stride_qb, stride_qh, stride_qw, stride_qd, stride_kb, stride_kh, stride_kt, stride_kd,
        GROUP, HEAD_DIM, BLOCK_G, BLOCK_W, BLOCK_T, BLOCK_D, DOT_DTYPE, DOT_PRECISION,
    )
    visible = (offs_t[None, :] <= (num_keys - num_queries + w)[:, None]) & t_mask[None, :]  # causal
    s = tl.where(visible, s * qk_scale, float("-inf"))
    m = tl.max(s, axis=1)
    m_safe = tl.where(m == float("-inf"), 0.0, m)  # a query may see no key of this block
    l = tl.sum(tl.exp2(s - m_safe[:, None]), axis=1)
    offs = b * stride_sb + (kvh * GROUP + g) * stride_sh + w * stride_sw + t_blk * stride_sn
    tl.store(m_ptr + offs, m, mask=row_mask)
    tl.store(l_ptr + offs, l, mask=row_mask)


@triton.jit
def _lq_scores_kernel(
    q_ptr, k_ptr, m_ptr, l_ptr, out_ptr,
    num_kv_heads, num_queries, num_keys, scale,  # scale: scale*log2(e) if SOFTMAX else the raw scale
    stride_qb, stride_qh, stride_qw, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_sb, stride_sh, stride_sw,  # merged m/l [B, Hq, W]
    stride_ob, stride_oh, stride_ot,  # out [B, Hq, T]
    SOFTMAX: tl.constexpr,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Pass 2: per (query head, key), the sum over the W queries of probability (or raw logit)."""
    t_blk = tl.program_id(0)  # key blocks on grid axis 0 (up to 2^31 - 1; axis 1 allows 65535)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // num_kv_heads
    kvh = bh % num_kv_heads
    s, g, w, row_mask, offs_t, t_mask = _block_logits(
        q_ptr, k_ptr, b, kvh, t_blk, num_queries, num_keys,
        stride_qb, stride_qh, stride_qw, stride_qd, stride_kb, stride_kh, stride_kt, stride_kd,
        GROUP, HEAD_DIM, BLOCK_G, BLOCK_W, BLOCK_T, BLOCK_D, DOT_DTYPE, DOT_PRECISION,
    )
    if SOFTMAX:
        stat = b * stride_sb + (kvh * GROUP + g) * stride_sh + w * stride_sw
        m = tl.load(m_ptr + stat, mask=row_mask, other=0.0)
        l = tl.load(l_ptr + stat, mask=row_mask, other=1.0)
        visible = (offs_t[None, :] <= (num_keys - num_queries + w)[:, None]) & t_mask[None, :]
        p = tl.exp2(s * scale - m[:, None]) / l[:, None]
        p = tl.where(visible & row_mask[:, None], p, 0.0)
    else:
        p = tl.where(row_mask[:, None] & t_mask[None, :], s * scale, 0.0)

    per_head = tl.sum(tl.reshape(p, [BLOCK_G, BLOCK_W, BLOCK_T]), axis=1)  # sum over the W queries
    offs_g = tl.arange(0, BLOCK_G)
    o_ptrs = out_ptr + b * stride_ob + (kvh * GROUP + offs_g)[:, None] * stride_oh
    o_ptrs += offs_t[None, :] * stride_ot
    tl.store(o_ptrs, per_head, mask=(offs_g < GROUP)[:, None] & t_mask[None, :])


def _last_query_head_scores_triton(
    q: torch.Tensor, k: torch.Tensor, softmax: bool, scale: float
) -> torch.Tensor:
    """Per-head scores [B, Hq, T] float32 (before head reduction and pooling)."""
    B, Hq, W, D = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    group = Hq // Hkv
    block_g = next_pow2(group)
    block_w = max(next_pow2(W), 16 // block_g)  # rows = BLOCK_G * BLOCK_W >= 16 for tl.dot
    rows = block_g * block_w
    block_t = max(16, min(128, 4096 // rows))  # keep the [rows, BLOCK_T] fp32 tile within registers
    n_blocks = triton.cdiv(T, block_t)
    operand_dtype = dot_dtype(q.dtype)
    meta = dict(
        GROUP=group, HEAD_DIM=D, BLOCK_G=block_g, BLOCK_W=block_w, BLOCK_T=block_t,
        BLOCK_D=max(16, next_pow2(D)), DOT_DTYPE=operand_dtype,
        DOT_PRECISION="ieee" if operand_dtype == tl.float32 else "tf32",  # fp32 stays fp32 (no tf32)
    )
    grid = (n_blocks, B * Hkv)
    out = torch.empty(B, Hq, T, device=q.device, dtype=torch.float32)
    if out.numel() == 0:
        return out

    if softmax:
        qk_scale = scale * _LOG2E  # base-2 softmax: exp2 is the cheap instruction
        m_part = torch.empty(B, Hq, W, n_blocks, device=q.device, dtype=torch.float32)
        l_part = torch.empty_like(m_part)
        _lq_stats_kernel[grid](
            q, k, m_part, l_part, Hkv, W, T, qk_scale, *q.stride(), *k.stride(), *m_part.stride(), **meta
        )
        # Merge the per-block (max, sum) pairs; every query sees key 0, so m is finite.
        m = m_part.amax(dim=-1)
        l = (l_part * torch.exp2(m_part - m[..., None])).sum(dim=-1)
        _lq_scores_kernel[grid](
            q, k, m, l, out, Hkv, W, T, qk_scale,
            *q.stride(), *k.stride(), *m.stride(), *out.stride(), SOFTMAX=True, **meta,
        )
    else:
        _lq_scores_kernel[grid](
            q, k, out, out, out, Hkv, W, T, scale,  # m/l unused without softmax
            *q.stride(), *k.stride(), 0, 0, 0, *out.stride(), SOFTMAX=False, **meta,
        )
    return out


# --------------------------------------------------------------------------------------------------
# Public op
# --------------------------------------------------------------------------------------------------


def last_query_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    softmax: bool,
    scale: float | None = None,
    pool_kernel: int = 1,
    reduce_heads: HeadReduction = "sum",
    pool: Pooling = "avg",
    backend: Backend = "auto",
) -> torch.Tensor:
    """Key importance from the last W queries (see the module docstring for the exact definition).

    q ``[B, Hq, W, D]`` (queries at positions T-W..T-1), k ``[B, Hkv, T, D]``, both post-RoPE, W <= T.
    ``softmax=False``: summed raw ``q·k*scale`` (scale default 1, GemFilter); ``softmax=True``: summed
    causal attention probabilities (scale default ``D**-0.5``, SnapKV). Returns float32 ``[B, T]``
    (``reduce_heads`` "sum"/"mean") or ``[B, Hq, T]`` ("none"), pooled over ``pool_kernel`` tokens
    (``pool`` "avg", or "max").
    """
    op = "last_query_scores"
    check_tensor(op, "q", q, 4, "[B, Hq, W, D]")
    check_tensor(op, "k", k, 4, "[B, Hkv, T, D]")
    check_float(op, "q", q)
    if k.dtype != q.dtype:
        raise ValueError(f"{op}: q and k must share a dtype, got {q.dtype} and {k.dtype}")
    check_dim(op, "k.shape[0] (batch)", k.shape[0], q.shape[0])
    check_dim(op, "head dim D of k", k.shape[3], q.shape[3])
    check_gqa(op, q.shape[1], k.shape[1])
    W, T = q.shape[2], k.shape[2]
    if not 1 <= W <= T:
        raise ValueError(f"{op}: need 1 <= W <= T (queries are the last W of T positions), got W={W}, T={T}")
    if reduce_heads not in ("sum", "mean", "none"):
        raise ValueError(f"{op}: reduce_heads must be 'sum', 'mean' or 'none', got {reduce_heads!r}")
    if not isinstance(pool_kernel, int) or pool_kernel < 1:
        raise ValueError(f"{op}: pool_kernel must be an int >= 1, got {pool_kernel!r}")
    if pool not in ("avg", "max"):
        raise ValueError(f"{op}: pool must be 'avg' or 'max', got {pool!r}")
    check_same_device(op, q=q, k=k)

    if not resolve_backend(backend, q.device, op):
        return last_query_scores_reference(
            q, k, softmax=softmax, scale=scale, pool_kernel=pool_kernel, reduce_heads=reduce_heads, pool=pool
        )
    if scale is None:
        scale = q.shape[-1] ** -0.5 if softmax else 1.0
    scores = _last_query_head_scores_triton(q, k, softmax, float(scale))
    return _reduce_and_pool(scores, reduce_heads, pool_kernel, pool)
