"""Group-wise int4 matmul that dequantises with *live* scales (QZO perturbs and trains the scales).

Layout (llmsys's own int4 format, ``llmsys.qzo.Int4Linear``): a weight ``W [N, K]`` is stored as

* ``codes [N, K/2]`` uint8: two 4-bit codes per byte, the even column ``k`` in the low nibble, ``k+1``
  in the high nibble;
* ``scales [N, K/G]`` float (fp32/fp16/bf16): one scale per output row and group of ``G`` inputs;
* ``zeros [N, K/G]`` uint8: the integer zero-point of each group (0..16: GPTQ checkpoints store
  ``zero - 1`` and can give 16 after the +1);

and ``W[n, k] = scales[n, k // G] * (code[n, k] - zeros[n, k // G])``. :func:`int4_matmul` computes
``x @ W.T`` for ``x [M, K]`` without materialising ``W`` (Triton) or by dequantising it (reference).
Both read ``scales`` at call time, so an in-place change to the scales changes the next output.
"""

from __future__ import annotations

import torch

from llmsys.kernels._checks import check_dim, check_float, check_same_device, check_tensor
from llmsys.kernels._dispatch import Backend, dot_dtype, resolve_backend, tl, triton

__all__ = ["GROUP_SIZES", "int4_dequantize_reference", "int4_matmul", "int4_matmul_reference"]

#: supported group sizes (multiples of the kernel's 32-wide K block, so a block never straddles groups)
GROUP_SIZES = (32, 64, 128)


# --------------------------------------------------------------------------------------------------
# Reference (the spec)
# --------------------------------------------------------------------------------------------------


def int4_dequantize_reference(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """codes [N, K/2] uint8, scales/zeros [N, K/G] -> W [N, K] in fp32 (G = K / scales.shape[1])."""
    low = (codes & 0xF).to(torch.int16)
    high = (codes >> 4).to(torch.int16)
    q = torch.stack((low, high), dim=-1).reshape(codes.shape[0], -1)  # [N, K]: low nibble = even column
    group = q.shape[1] // scales.shape[1]
    zero = zeros.to(torch.int16).repeat_interleave(group, dim=1)
    return (q - zero).float() * scales.float().repeat_interleave(group, dim=1)


def int4_matmul_reference(
    x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor
) -> torch.Tensor:
    """x [M, K] @ dequantised W[N, K].T -> [M, N] in x's dtype (computed in fp32)."""
    return (x.float() @ int4_dequantize_reference(codes, scales, zeros).T).to(x.dtype)


# --------------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------------

# Launch tunables. BLOCK_K is fixed at 32 (it must divide every group size). Not tuned on a GPU yet.
TUNING: dict[str, int] = {"block_m": 32, "block_n": 64, "num_warps": 4}
BLOCK_K = 32


@triton.jit
def _int4_matmul_kernel(
    x_ptr, codes_ptr, scales_ptr, zeros_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_xk,
    stride_cn, stride_ck,
    stride_sn, stride_sg,
    stride_zn, stride_zg,
    stride_om, stride_on,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # One program per (BLOCK_M rows of x, BLOCK_N output features); K is walked in 32-wide blocks, each
    # inside one quantisation group, so a block needs one scale and one zero per output row.
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + ks[None, :] * stride_xk, mask=m_mask[:, None], other=0.0)
        # Both nibbles of a byte are loaded by two neighbouring columns: simple, and the byte is cached.
        byte = tl.load(
            codes_ptr + offs_n[:, None] * stride_cn + (ks // 2)[None, :] * stride_ck, mask=n_mask[:, None], other=0
        ).to(tl.int32)
        code = (byte >> ((ks % 2) * 4)[None, :]) & 0xF
        g = k0 // GROUP
        scale = tl.load(scales_ptr + offs_n * stride_sn + g * stride_sg, mask=n_mask, other=0.0).to(tl.float32)
        zero = tl.load(zeros_ptr + offs_n * stride_zn + g * stride_zg, mask=n_mask, other=0).to(tl.int32)
        w = (code - zero[:, None]).to(tl.float32) * scale[:, None]  # [BLOCK_N, BLOCK_K], live scales
        acc += tl.dot(x.to(DOT_DTYPE), tl.trans(w.to(DOT_DTYPE)), input_precision=DOT_PRECISION)
    out = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def _int4_matmul_triton(
    x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor
) -> torch.Tensor:
    M, K = x.shape
    N = codes.shape[0]
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return out
    operand = dot_dtype(x.dtype)
    bm, bn = TUNING["block_m"], TUNING["block_n"]
    _int4_matmul_kernel[(triton.cdiv(M, bm), triton.cdiv(N, bn))](
        x, codes, scales, zeros, out, M, N, K,
        *x.stride(), *codes.stride(), *scales.stride(), *zeros.stride(), *out.stride(),
        GROUP=K // scales.shape[1], BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=BLOCK_K,
        DOT_DTYPE=operand, DOT_PRECISION="ieee" if operand == tl.float32 else "tf32",
        num_warps=TUNING["num_warps"],
    )
    return out


# --------------------------------------------------------------------------------------------------
# Public op
# --------------------------------------------------------------------------------------------------


def int4_matmul(
    x: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    *,
    backend: Backend = "auto",
) -> torch.Tensor:
    """``x [M, K] @ W.T -> [M, N]`` (x's dtype) with ``W`` dequantised from int4 ``codes [N, K/2]``,
    ``scales [N, K/G]`` and ``zeros [N, K/G]`` (see the module docstring; G in 32/64/128)."""
    op = "int4_matmul"
    check_tensor(op, "x", x, 2, "[M, K]")
    check_float(op, "x", x)
    check_tensor(op, "codes", codes, 2, "[N, K/2]")
    check_tensor(op, "scales", scales, 2, "[N, K/G]")
    check_tensor(op, "zeros", zeros, 2, "[N, K/G]")
    check_float(op, "scales", scales)
    if codes.dtype != torch.uint8 or zeros.dtype != torch.uint8:
        raise ValueError(f"{op}: codes and zeros must be uint8, got {codes.dtype} and {zeros.dtype}")
    M, K = x.shape
    N = codes.shape[0]
    check_dim(op, "codes.shape[1] (K/2)", codes.shape[1] * 2, K)
    if scales.shape[0] != N or zeros.shape != scales.shape or scales.shape[1] == 0 or K % scales.shape[1]:
        raise ValueError(
            f"{op}: scales and zeros must both be [N={N}, K/G] with G dividing K={K}, "
            f"got {tuple(scales.shape)} and {tuple(zeros.shape)}"
        )
    group = K // scales.shape[1]
    if group not in GROUP_SIZES:
        raise ValueError(
            f"{op}: group size must be one of {GROUP_SIZES}, got {group} (K={K}, groups={scales.shape[1]})"
        )
    check_same_device(op, x=x, codes=codes, scales=scales, zeros=zeros)
    if not resolve_backend(backend, x.device, op):
        return int4_matmul_reference(x, codes, scales, zeros)
    return _int4_matmul_triton(x, codes, scales, zeros)
