"""Decode attention (one query per row) over a paged or a contiguous KV cache, with GQA.

Layouts (fixed by the shared cache):

* ``q``: ``[B, Hq, D]``
* paged: ``k_pages``/``v_pages`` ``[num_pages, Hkv, page_size, D]``, ``page_table`` ``[B, max_pages]``,
  ``seq_lens`` ``[B]``
* contiguous: ``k``/``v`` ``[B, Hkv, T, D]``, optional ``lengths`` ``[B]``

Query head ``h`` reads kv head ``h // (Hq // Hkv)``. A row with length 0 attends to nothing and returns
zeros (defined here so that padded batch rows need no special casing).

The Triton kernel is flash-decoding style: program ``(b, kv_head, split)`` keeps the whole query group
of that kv head in one tile (so K/V are read once per group, not once per query head) and walks its
share of the row in steps of ``BLOCK_N`` tokens with an online softmax in fp32. In the paged case a step
looks up each token's page id (``page_table[b, t // page_size]``), so a step can span several small
pages: one 16-token page per step would leave the loads too small to keep HBM busy. With one split
the program writes the output; with several (chosen so a GPU has enough programs when ``B * Hkv`` is
small and the context long) each writes a partial output plus its log-sum-exp, and
:func:`_combine_splits_kernel` merges them.
"""

from __future__ import annotations

import math

import torch

from llmsys.kernels._checks import (
    check_dim,
    check_float,
    check_gqa,
    check_int,
    check_same_device,
    check_tensor,
)
from llmsys.kernels._dispatch import (
    Backend,
    dot_dtype,
    next_pow2,
    num_sms,
    resolve_backend,
    tl,
    triton,
)

__all__ = [
    "gathered_decode_attention",
    "gathered_decode_attention_reference",
    "paged_decode_attention",
    "paged_decode_attention_reference",
]

_LOG2E = math.log2(math.e)


# --------------------------------------------------------------------------------------------------
# Reference (the spec)
# --------------------------------------------------------------------------------------------------


def gathered_decode_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """softmax(q·k * scale)·v over a contiguous cache.

    q [B,Hq,D], k/v [B,Hkv,T,D], lengths [B] (optional) -> [B,Hq,D] in q's dtype."""
    B, Hq, D = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    group = Hq // Hkv
    scale = D**-0.5 if scale is None else scale
    qf = q.float().view(B, Hkv, group, D)  # the query heads sharing kv head h sit together
    scores = qf @ k.float().transpose(-1, -2) * scale  # [B, Hkv, group, T]
    if lengths is None:
        valid = torch.ones(B, T, dtype=torch.bool, device=q.device)
    else:
        valid = torch.arange(T, device=q.device)[None, :] < lengths.to(q.device)[:, None]  # [B, T]
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    # A row with no valid key would be 0/0 = NaN; define its output as zeros.
    probs = torch.where(valid.any(dim=1)[:, None, None, None], probs, torch.zeros_like(probs))
    # Masked slots may hold anything (a fresh pool is uninitialised memory, NaN bit patterns included):
    # 0 * NaN is NaN, so zero them rather than rely on a zero probability.
    vf = v.float().masked_fill(~valid[:, None, :, None], 0.0)
    out = probs @ vf  # [B, Hkv, group, D]
    return out.reshape(B, Hq, D).to(q.dtype)


def paged_decode_attention_reference(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Paged decode attention, by gathering each row's pages into a contiguous cache. -> [B, Hq, D]."""
    B, max_pages = page_table.shape
    _, Hkv, page_size, D = k_pages.shape
    seq_lens = seq_lens.to(q.device).long().clamp(max=max_pages * page_size)
    # Entries past a row's length may be -1 or garbage: point them at page 0 (their tokens are masked).
    page_used = torch.arange(max_pages, device=q.device)[None, :] * page_size < seq_lens[:, None]
    ids = torch.where(page_used, page_table.long(), torch.zeros_like(page_table, dtype=torch.long))

    def gather(pages: torch.Tensor) -> torch.Tensor:
        # pages[ids]: [B, max_pages, Hkv, page_size, D] -> [B, Hkv, max_pages * page_size, D]
        return pages[ids].permute(0, 2, 1, 3, 4).reshape(B, Hkv, max_pages * page_size, D)

    return gathered_decode_attention_reference(q, gather(k_pages), gather(v_pages), seq_lens, scale)


# --------------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------------


@triton.jit
def _decode_attn_kernel(
    q_ptr, k_ptr, v_ptr, pt_ptr, len_ptr, out_ptr, lse_ptr,
    stride_qb, stride_qh, stride_qd,
    stride_kp, stride_kh, stride_kt, stride_kd,  # paged: (page, head, token, d); else (b, head, t, d)
    stride_vp, stride_vh, stride_vt, stride_vd,
    stride_ptb, stride_ptp,
    stride_ob, stride_oh, stride_os, stride_od,  # out [B, Hq, splits, D] (splits == 1: the output)
    stride_lb, stride_lh, stride_ls,
    qk_scale,  # scale * log2(e): the softmax runs in base 2 (exp2 is the cheap instruction)
    max_tokens,  # cache capacity of a row; lengths beyond it are clamped so no load goes out of bounds
    blocks_per_split,
    GROUP: tl.constexpr,  # Hq // Hkv
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,  # tokens per page (paged only)
    BLOCK_H: tl.constexpr,  # GROUP padded to a power of two >= 16 (tl.dot needs M >= 16)
    BLOCK_N: tl.constexpr,  # tokens per loop step (may span several pages)
    BLOCK_D: tl.constexpr,  # HEAD_DIM padded to a power of two >= 16
    PAGED: tl.constexpr,
    SPLIT: tl.constexpr,  # write fp32 partial output + log-sum-exp instead of the final output
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)  # int64: offsets into big caches overflow int32
    kvh = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)

    seq_len = tl.minimum(tl.load(len_ptr + b), max_tokens)
    first = split * blocks_per_split
    last = tl.minimum(first + blocks_per_split, tl.cdiv(seq_len, BLOCK_N))

    offs_h = tl.arange(0, BLOCK_H)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    h_mask = offs_h < GROUP
    d_mask = offs_d < HEAD_DIM
    heads = kvh * GROUP + offs_h  # query heads of this kv head's group

    q = tl.load(
        q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
        mask=h_mask[:, None] & d_mask[None, :],
        other=0.0,
    ).to(DOT_DTYPE)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)  # running max (base-2 logits)
    l_i = tl.zeros([BLOCK_H], tl.float32)  # running sum of exp2(logit - m_i)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)

    for blk in range(first, last):
        tok = blk * BLOCK_N + offs_n  # token positions within the row
        n_mask = tok < seq_len
        if PAGED:
            # Each token's page id (a BLOCK_N-token step may span several pages), then its slot.
            page = tl.load(pt_ptr + b * stride_ptb + (tok // PAGE_SIZE) * stride_ptp, mask=n_mask, other=0)
            page = page.to(tl.int64)
            slot = (tok % PAGE_SIZE).to(tl.int64)
            k_rows = k_ptr + kvh * stride_kh + page * stride_kp + slot * stride_kt
            v_rows = v_ptr + kvh * stride_vh + page * stride_vp + slot * stride_vt
        else:
            k_rows = k_ptr + b * stride_kp + kvh * stride_kh + tok.to(tl.int64) * stride_kt
            v_rows = v_ptr + b * stride_vp + kvh * stride_vh + tok.to(tl.int64) * stride_vt
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_rows[:, None] + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k.to(DOT_DTYPE)), input_precision=DOT_PRECISION) * qk_scale  # [H, N]
        s = tl.where(n_mask[None, :], s, float("-inf"))

        # Online softmax: every processed block has >= 1 valid token, so m_new is finite.
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_rows[:, None] + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE), input_precision=DOT_PRECISION)
        m_i = m_new

    has_keys = l_i > 0.0  # false for an empty row or an empty split
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    o_ptrs = out_ptr + b * stride_ob + split * stride_os
    o_ptrs += heads[:, None] * stride_oh + offs_d[None, :] * stride_od
    o_mask = h_mask[:, None] & d_mask[None, :]
    if SPLIT:
        tl.store(o_ptrs, out, mask=o_mask)
        lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptr + b * stride_lb + heads * stride_lh + split * stride_ls, lse, mask=h_mask)
    else:
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=o_mask)


@triton.jit
def _combine_splits_kernel(
    o_ptr, lse_ptr, out_ptr,
    num_heads, num_splits,
    stride_ob, stride_oh, stride_os, stride_od,  # partial outputs [B, Hq, S, D] fp32
    stride_lb, stride_lh, stride_ls,  # base-2 log-sum-exp [B, Hq, S], -inf for an empty split
    stride_outb, stride_outh, stride_outd,
    HEAD_DIM: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out = sum_s w_s o_s / sum_s w_s with w_s = 2^(lse_s - max lse): each split's output was
    normalised by its own sum, so its weight is that sum relative to the others'."""
    pid = tl.program_id(0).to(tl.int64)  # one program per (row, query head)
    b = pid // num_heads
    h = pid % num_heads
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < num_splits
    d_mask = offs_d < HEAD_DIM
    lse_ptrs = lse_ptr + b * stride_lb + h * stride_lh + offs_s * stride_ls
    lse = tl.load(lse_ptrs, mask=s_mask, other=float("-inf"))
    lse_max = tl.max(lse, axis=0)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)  # empty row: all weights 0
    w = tl.exp2(lse - lse_max)
    o_ptrs = o_ptr + b * stride_ob + h * stride_oh + offs_s[:, None] * stride_os + offs_d[None, :] * stride_od
    o = tl.load(o_ptrs, mask=s_mask[:, None] & d_mask[None, :], other=0.0)
    out = tl.sum(w[:, None] * o, axis=0) / tl.maximum(tl.sum(w, axis=0), 1e-30)
    out_ptrs = out_ptr + b * stride_outb + h * stride_outh + offs_d * stride_outd
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=d_mask)


_MAX_SPLITS = 64  # the merge holds all splits of a head in one tile
# Launch tunables of the attention kernel: tokens per loop step and Triton's num_warps/num_stages.
# Module-level so a tuning sweep (benchmarks) can change them without touching the launcher.
# Measured on an H200 (bf16, Hq=32, Hkv=8, D=128, 16-token pages): 64 tokens per step reached ~70-90% of
# copy bandwidth; one page (16 tokens) per step only ~35-60%.
TUNING: dict[str, int] = {"block_n": 64, "num_warps": 4, "num_stages": 3}


def _default_splits(device: torch.device, programs: int, max_blocks: int) -> int:
    if device.type != "cuda":
        return 1  # the interpreter gains nothing from splitting
    # Aim for ~2 programs per SM, but keep >= 4 loop steps per split so the merge stays cheap.
    want = -(-2 * num_sms(device.index or 0) // programs)
    return max(1, min(want, max_blocks // 4))


def _decode_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    page_table: torch.Tensor | None,
    lens: torch.Tensor,
    scale: float,
    num_splits: int | None,
) -> torch.Tensor:
    B, Hq, D = q.shape
    Hkv = k.shape[1]
    group = Hq // Hkv
    if q.numel() == 0:
        return torch.empty_like(q)  # nothing to launch (a zero-size grid is an error)
    paged = page_table is not None
    block_n = TUNING["block_n"]
    if paged:
        page_size = k.shape[2]
        max_tokens = page_table.shape[1] * page_size
        pt, pt_strides = page_table, page_table.stride()
    else:
        page_size = 1  # unused
        max_tokens = k.shape[2]
        pt, pt_strides = lens, (0, 0)  # unused by the kernel; any pointer will do
    max_blocks = triton.cdiv(max_tokens, block_n)

    splits = num_splits if num_splits is not None else _default_splits(q.device, B * Hkv, max_blocks)
    splits = max(1, min(splits, max_blocks, _MAX_SPLITS))
    blocks_per_split = triton.cdiv(max(max_blocks, 1), splits)
    splits = triton.cdiv(max(max_blocks, 1), blocks_per_split)  # drop splits that would be empty

    if splits == 1:
        out = torch.empty_like(q)
        o_buf, lse = out.unsqueeze(2), out.new_empty(0, dtype=torch.float32)
        o_strides, l_strides = o_buf.stride(), (0, 0, 0)
    else:
        o_buf = torch.empty(B, Hq, splits, D, device=q.device, dtype=torch.float32)
        lse = torch.empty(B, Hq, splits, device=q.device, dtype=torch.float32)
        o_strides, l_strides = o_buf.stride(), lse.stride()

    operand_dtype = dot_dtype(q.dtype)
    _decode_attn_kernel[(B, Hkv, splits)](
        q, k, v, pt, lens, o_buf, lse,
        *q.stride(), *k.stride(), *v.stride(), *pt_strides, *o_strides, *l_strides,
        scale * _LOG2E, max_tokens, blocks_per_split,
        GROUP=group,
        HEAD_DIM=D,
        PAGE_SIZE=page_size,
        BLOCK_H=max(16, next_pow2(group)),
        BLOCK_N=block_n,
        BLOCK_D=max(16, next_pow2(D)),
        PAGED=paged,
        SPLIT=splits > 1,
        DOT_DTYPE=operand_dtype,
        DOT_PRECISION="ieee" if operand_dtype == tl.float32 else "tf32",  # fp32 stays fp32 (no tf32)
        num_warps=TUNING["num_warps"],
        num_stages=TUNING["num_stages"],
    )
    if splits == 1:
        return out
    out = torch.empty_like(q)
    _combine_splits_kernel[(B * Hq,)](
        o_buf, lse, out, Hq, splits, *o_buf.stride(), *lse.stride(), *out.stride(),
        HEAD_DIM=D, BLOCK_S=next_pow2(splits), BLOCK_D=next_pow2(D),
    )
    return out


# --------------------------------------------------------------------------------------------------
# Public ops
# --------------------------------------------------------------------------------------------------


def _check_lengths(op: str, name: str, lens: torch.Tensor, batch: int, capacity: int) -> None:
    check_tensor(op, name, lens, 1, "[B]")
    check_int(op, name, lens)
    check_dim(op, f"{name}.shape[0] (batch)", lens.shape[0], batch)
    # Bounds are only checked for CPU tensors: on CUDA the check would cost a host sync per decode
    # step, so there the kernel and the reference clamp lengths to the capacity instead.
    if lens.device.type == "cpu" and lens.numel() and (int(lens.min()) < 0 or int(lens.max()) > capacity):
        raise ValueError(f"{op}: {name} must lie in [0, {capacity}], got {lens.tolist()}")


def _check_q(op: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> int:
    check_tensor(op, "q", q, 3, "[B, Hq, D]")
    check_float(op, "q", q)
    if k.shape != v.shape:
        raise ValueError(f"{op}: k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"{op}: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    check_dim(op, "head dim D of k/v (last dim)", k.shape[-1], q.shape[-1])
    if q.shape[-1] == 0:
        raise ValueError(f"{op}: head dim D must be > 0")
    return check_gqa(op, q.shape[1], k.shape[1])


def paged_decode_attention(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float | None = None,
    *,
    num_splits: int | None = None,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Decode attention over a paged KV cache, GQA-aware.

    q ``[B, Hq, D]``; k_pages/v_pages ``[num_pages, Hkv, page_size, D]``; page_table ``[B, max_pages]``
    int32/int64 (entries past a row's length are ignored, may be -1); seq_lens ``[B]`` (tokens per row,
    last page may be partial). Returns ``[B, Hq, D]`` = softmax(q·k * scale)·v in q's dtype, accumulated
    in fp32; ``scale`` defaults to ``D**-0.5``. ``num_splits`` (Triton only) splits each row's pages
    across that many programs (default: chosen from the GPU's SM count; 1 on the interpreter).
    """
    op = "paged_decode_attention"
    check_tensor(op, "k_pages", k_pages, 4, "[num_pages, Hkv, page_size, D]")
    check_tensor(op, "v_pages", v_pages, 4, "[num_pages, Hkv, page_size, D]")
    _check_q(op, q, k_pages, v_pages)
    check_tensor(op, "page_table", page_table, 2, "[B, max_pages]")
    check_int(op, "page_table", page_table)
    check_dim(op, "page_table.shape[0] (batch)", page_table.shape[0], q.shape[0])
    if k_pages.shape[2] == 0:
        raise ValueError(f"{op}: page_size must be > 0")
    _check_lengths(op, "seq_lens", seq_lens, q.shape[0], page_table.shape[1] * k_pages.shape[2])
    check_same_device(op, q=q, k_pages=k_pages, v_pages=v_pages, page_table=page_table, seq_lens=seq_lens)
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"{op}: num_splits must be >= 1, got {num_splits}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)

    if not resolve_backend(backend, q.device, op):
        return paged_decode_attention_reference(q, k_pages, v_pages, page_table, seq_lens, scale)
    return _decode_attention_triton(q, k_pages, v_pages, page_table, seq_lens, scale, num_splits)


def gathered_decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: torch.Tensor | None = None,
    scale: float | None = None,
    *,
    num_splits: int | None = None,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Decode attention over a contiguous KV cache, GQA-aware.

    q ``[B, Hq, D]``; k/v ``[B, Hkv, T, D]``; lengths ``[B]`` optional (row b uses keys ``[0, lengths[b])``).
    Returns ``[B, Hq, D]`` in q's dtype (fp32 accumulation); ``scale`` defaults to ``D**-0.5``.
    """
    op = "gathered_decode_attention"
    check_tensor(op, "k", k, 4, "[B, Hkv, T, D]")
    check_tensor(op, "v", v, 4, "[B, Hkv, T, D]")
    _check_q(op, q, k, v)
    check_dim(op, "k.shape[0] (batch)", k.shape[0], q.shape[0])
    if lengths is not None:
        _check_lengths(op, "lengths", lengths, q.shape[0], k.shape[2])
        check_same_device(op, q=q, k=k, v=v, lengths=lengths)
    else:
        check_same_device(op, q=q, k=k, v=v)
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"{op}: num_splits must be >= 1, got {num_splits}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)

    if not resolve_backend(backend, q.device, op):
        return gathered_decode_attention_reference(q, k, v, lengths, scale)
    if lengths is None:
        lengths = torch.full((q.shape[0],), k.shape[2], dtype=torch.int32, device=q.device)
    return _decode_attention_triton(q, k, v, None, lengths, scale, num_splits)

