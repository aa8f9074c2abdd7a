"""int4_matmul: group-wise int4 dequantisation with live scales, Triton vs reference vs a naive loop."""

from __future__ import annotations

import pytest
import torch

from llmsys.kernels import KernelUnavailableError, int4_dequantize_reference, int4_matmul, int4_matmul_reference

TOL = dict(atol=1e-4, rtol=1e-4)


def make(gen, n, k, group, dtype=torch.float32):
    codes = torch.randint(0, 256, (n, k // 2), generator=gen, dtype=torch.uint8)
    scales = (torch.rand(n, k // group, generator=gen) + 0.05).to(dtype)
    zeros = torch.randint(0, 17, (n, k // group), generator=gen, dtype=torch.uint8)
    return codes, scales, zeros


def naive_dequant(codes, scales, zeros):
    """Element by element, straight from the layout's definition."""
    n, half = codes.shape
    k = 2 * half
    group = k // scales.shape[1]
    w = torch.empty(n, k)
    for i in range(n):
        for j in range(k):
            byte = int(codes[i, j // 2])
            code = byte & 0xF if j % 2 == 0 else byte >> 4
            w[i, j] = float(scales[i, j // group]) * (code - int(zeros[i, j // group]))
    return w


@pytest.mark.parametrize("group", [32, 64])
def test_reference_matches_naive_layout(gen, group):
    codes, scales, zeros = make(gen, 5, 128, group)
    torch.testing.assert_close(int4_dequantize_reference(codes, scales, zeros), naive_dequant(codes, scales, zeros))


def test_output_follows_live_scales(gen, rand):
    codes, scales, zeros = make(gen, 6, 64, 32)
    x = rand(3, 64)
    before = int4_matmul(x, codes, scales, zeros, backend="reference")
    scales[2] *= 1.5  # one output row's scales, in place
    after = int4_matmul(x, codes, scales, zeros, backend="reference")
    torch.testing.assert_close(after[:, 2], 1.5 * before[:, 2], **TOL)
    others = [i for i in range(6) if i != 2]
    torch.testing.assert_close(after[:, others], before[:, others])


# (M, N, K, group): odd M and N, N below the 64-wide block, every group size, K spanning several groups
SHAPES = [(1, 16, 32, 32), (7, 37, 96, 32), (33, 70, 128, 64), (5, 130, 256, 128)]


@pytest.mark.parametrize("M,N,K,group", SHAPES)
def test_triton_matches_reference(triton_cpu, gen, rand, M, N, K, group):
    codes, scales, zeros = make(gen, N, K, group)
    x = rand(M, K)
    got = int4_matmul(x, codes, scales, zeros, backend="triton")
    torch.testing.assert_close(got, int4_matmul_reference(x, codes, scales, zeros), **TOL)


def test_triton_non_contiguous_and_bf16(triton_cpu, gen, rand):
    codes, scales, zeros = make(gen, 40, 64, 32)
    x = rand(64, 9).T  # [9, 64], non-contiguous
    torch.testing.assert_close(
        int4_matmul(x, codes, scales, zeros, backend="triton"), int4_matmul_reference(x, codes, scales, zeros), **TOL
    )
    xb, sb = x.contiguous().to(torch.bfloat16), scales.to(torch.bfloat16)
    got = int4_matmul(xb, codes, sb, zeros, backend="triton")
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), int4_matmul_reference(xb, codes, sb, zeros).float(), atol=0.1, rtol=2e-2)


def test_triton_reads_live_scales(triton_cpu, gen, rand):
    codes, scales, zeros = make(gen, 20, 64, 32)
    x = rand(4, 64)
    int4_matmul(x, codes, scales, zeros, backend="triton")
    scales.mul_(0.5)
    torch.testing.assert_close(
        int4_matmul(x, codes, scales, zeros, backend="triton"), int4_matmul_reference(x, codes, scales, zeros), **TOL
    )


def test_errors(gen, rand):
    codes, scales, zeros = make(gen, 8, 64, 32)
    x = rand(2, 64)
    with pytest.raises(ValueError, match="group size must be one of"):
        int4_matmul(rand(2, 32), codes[:, :16], scales[:, :2], zeros[:, :2])  # G = 16
    with pytest.raises(ValueError, match="codes and zeros must be uint8"):
        int4_matmul(x, codes.to(torch.int32), scales, zeros)
    with pytest.raises(ValueError, match="K/2"):
        int4_matmul(rand(2, 48), codes, scales, zeros)
    with pytest.raises(ValueError, match="scales and zeros must both be"):
        int4_matmul(x, codes, scales, zeros[:, :1])
    with pytest.raises(ValueError, match="backend must be one of"):
        int4_matmul(x, codes, scales, zeros, backend="cuda")


def test_triton_unavailable_names_the_fix(gen, rand):
    from llmsys.kernels import use_triton

    if use_triton("cpu"):
        pytest.skip("the Triton interpreter is on: CPU tensors can use the kernel")
    codes, scales, zeros = make(gen, 8, 64, 32)
    with pytest.raises(KernelUnavailableError, match="backend='reference'"):
        int4_matmul(rand(2, 64), codes, scales, zeros, backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_realistic_size(cuda_triton, gen, dtype):
    codes, scales, zeros = make(gen, 4096, 4096, 128, dtype)
    x = torch.randn(64, 4096, generator=gen).to(dtype)
    args = [t.to(cuda_triton) for t in (x, codes, scales, zeros)]
    got = int4_matmul(*args, backend="triton").float()
    ref = int4_matmul_reference(*args).float()
    tol = 1e-3 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(got, ref, atol=tol * ref.abs().max().item(), rtol=tol)
