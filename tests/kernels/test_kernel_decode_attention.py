"""Paged / gathered decode attention: Triton (interpreter) vs reference vs a naive per-row loop."""

from __future__ import annotations

import pytest
import torch

from llmsys.kernels import (
    KernelUnavailableError,
    gathered_decode_attention,
    gathered_decode_attention_reference,
    paged_decode_attention,
    paged_decode_attention_reference,
)

TOL = dict(atol=1e-4, rtol=1e-4)


def naive_decode(q, k_rows, v_rows, scale=None):
    """Per row, per query head: dense softmax over that row's keys (list of [Hkv, L, D] tensors)."""
    B, Hq, D = q.shape
    scale = D**-0.5 if scale is None else scale
    out = torch.zeros(B, Hq, D)
    for b in range(B):
        k, v = k_rows[b].float(), v_rows[b].float()
        group = Hq // k.shape[0]
        if k.shape[1] == 0:
            continue  # an empty row attends to nothing: zeros
        for h in range(Hq):
            p = torch.softmax(k[h // group] @ q[b, h].float() * scale, dim=0)
            out[b, h] = p @ v[h // group]
    return out


def make_paged(rand, gen, B, Hkv, page_size, D, seq_lens, dtype=torch.float32, spare_pages=3):
    """A shuffled page pool; page_table entries past each row's length are -1."""
    pages_per_row = [-(-int(n) // page_size) for n in seq_lens]
    max_pages = max(max(pages_per_row), 1) + 1  # one extra column, always unused
    num_pages = sum(pages_per_row) + spare_pages
    k_pages = rand(num_pages, Hkv, page_size, D, dtype=dtype)
    v_pages = rand(num_pages, Hkv, page_size, D, dtype=dtype)
    perm = torch.randperm(num_pages, generator=gen)
    table = torch.full((B, max_pages), -1, dtype=torch.int32)
    used = 0
    for b, n in enumerate(pages_per_row):
        table[b, :n] = perm[used : used + n].to(torch.int32)
        used += n
    return k_pages, v_pages, table, torch.tensor(seq_lens, dtype=torch.int64)


def gather_rows(k_pages, table, seq_lens):
    """Row b's keys [Hkv, L_b, D], built token by token by indexing the pool."""
    page_size = k_pages.shape[2]
    rows = []
    for b, n in enumerate(seq_lens.tolist()):
        toks = [k_pages[int(table[b, t // page_size]), :, t % page_size] for t in range(n)]
        empty = k_pages.new_zeros(k_pages.shape[1], 0, k_pages.shape[3])
        rows.append(torch.stack(toks, dim=1) if toks else empty)
    return rows


# (B, Hq, Hkv, D, page_size, seq_lens)
PAGED_CASES = [
    (3, 4, 1, 64, 16, [37, 1, 16]),  # GQA 4:1, partial last page, T=1, exactly one page
    (2, 4, 4, 80, 5, [13, 20]),  # MHA, D not a power of two, page size not a power of two
    (3, 8, 2, 64, 8, [0, 9, 24]),  # an empty row
]


@pytest.mark.parametrize("B,Hq,Hkv,D,page_size,seq_lens", PAGED_CASES)
def test_paged_reference_matches_naive(rand, gen, B, Hq, Hkv, D, page_size, seq_lens):
    k_pages, v_pages, table, lens = make_paged(rand, gen, B, Hkv, page_size, D, seq_lens)
    q = rand(B, Hq, D)
    ref = paged_decode_attention_reference(q, k_pages, v_pages, table, lens)
    naive = naive_decode(q, gather_rows(k_pages, table, lens), gather_rows(v_pages, table, lens))
    torch.testing.assert_close(ref, naive, **TOL)


@pytest.mark.parametrize("num_splits", [None, 3])
@pytest.mark.parametrize("B,Hq,Hkv,D,page_size,seq_lens", PAGED_CASES)
def test_paged_triton_matches_reference(
    triton_cpu, rand, gen, B, Hq, Hkv, D, page_size, seq_lens, num_splits
):
    k_pages, v_pages, table, lens = make_paged(rand, gen, B, Hkv, page_size, D, seq_lens)
    q = rand(B, Hq, D)
    ref = paged_decode_attention(q, k_pages, v_pages, table, lens, backend="reference")
    out = paged_decode_attention(q, k_pages, v_pages, table, lens, num_splits=num_splits, backend="triton")
    assert out.dtype == q.dtype and out.shape == q.shape
    torch.testing.assert_close(out, ref, **TOL)
    if 0 in seq_lens:
        assert out[seq_lens.index(0)].abs().max() == 0  # empty row -> zeros, not NaN


@pytest.mark.parametrize("block_n", [16, 64])
def test_paged_many_splits(triton_cpu, rand, gen, monkeypatch, block_n):
    # Long-enough rows that each split gets several loop steps; some splits of the short row are empty.
    from llmsys.kernels import decode_attention

    monkeypatch.setitem(decode_attention.TUNING, "block_n", block_n)
    k_pages, v_pages, table, lens = make_paged(rand, gen, 2, 2, 16, 64, [300, 40])
    q = rand(2, 4, 64)
    ref = paged_decode_attention_reference(q, k_pages, v_pages, table, lens)
    for splits in (1, 3, 7):
        out = paged_decode_attention(q, k_pages, v_pages, table, lens, num_splits=splits, backend="triton")
        torch.testing.assert_close(out, ref, **TOL)


def test_paged_custom_scale_and_int64_table(triton_cpu, rand, gen):
    k_pages, v_pages, table, lens = make_paged(rand, gen, 2, 2, 4, 64, [7, 11])
    q = rand(2, 4, 64)
    ref = paged_decode_attention_reference(q, k_pages, v_pages, table, lens, scale=0.3)
    out = paged_decode_attention(q, k_pages, v_pages, table.long(), lens.int(), scale=0.3, backend="triton")
    torch.testing.assert_close(out, ref, **TOL)


def test_paged_bf16(triton_cpu, rand, gen):
    k_pages, v_pages, table, lens = make_paged(rand, gen, 2, 2, 16, 64, [21, 40], dtype=torch.bfloat16)
    q = rand(2, 8, 64, dtype=torch.bfloat16)
    ref = paged_decode_attention(q, k_pages, v_pages, table, lens, backend="reference")
    out = paged_decode_attention(q, k_pages, v_pages, table, lens, num_splits=2, backend="triton")
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)


# (B, Hq, Hkv, T, D, lengths)
GATHERED_CASES = [
    (3, 4, 1, 70, 64, [70, 1, 33]),  # T not a multiple of the 64-token block
    (2, 4, 4, 1, 80, None),  # T=1
    (1, 8, 2, 9, 96, [9]),
]


@pytest.mark.parametrize("B,Hq,Hkv,T,D,lengths", GATHERED_CASES)
def test_gathered_reference_matches_naive(rand, B, Hq, Hkv, T, D, lengths):
    q, k, v = rand(B, Hq, D), rand(B, Hkv, T, D), rand(B, Hkv, T, D)
    lens = None if lengths is None else torch.tensor(lengths)
    ref = gathered_decode_attention_reference(q, k, v, lens)
    n = [T] * B if lengths is None else lengths
    naive = naive_decode(q, [k[b, :, : n[b]] for b in range(B)], [v[b, :, : n[b]] for b in range(B)])
    torch.testing.assert_close(ref, naive, **TOL)


@pytest.mark.parametrize("num_splits", [None, 2])
@pytest.mark.parametrize("B,Hq,Hkv,T,D,lengths", GATHERED_CASES)
def test_gathered_triton_matches_reference(triton_cpu, rand, B, Hq, Hkv, T, D, lengths, num_splits):
    q, k, v = rand(B, Hq, D), rand(B, Hkv, T, D), rand(B, Hkv, T, D)
    lens = None if lengths is None else torch.tensor(lengths, dtype=torch.int32)
    ref = gathered_decode_attention(q, k, v, lens, backend="reference")
    out = gathered_decode_attention(q, k, v, lens, num_splits=num_splits, backend="triton")
    torch.testing.assert_close(out, ref, **TOL)


def test_gathered_non_contiguous_kv(triton_cpu, rand):
    # A [B, T, Hkv, D] cache viewed as [B, Hkv, T, D]: the kernel must follow the strides.
    q = rand(2, 4, 64)
    k = rand(2, 19, 2, 64).transpose(1, 2)
    v = rand(2, 19, 2, 64).transpose(1, 2)
    ref = gathered_decode_attention_reference(q, k.contiguous(), v.contiguous())
    torch.testing.assert_close(gathered_decode_attention(q, k, v, backend="triton"), ref, **TOL)


def test_paged_equals_gathered(rand, gen):
    # The same tokens laid out paged and contiguous give the same answer.
    k_pages, v_pages, table, lens = make_paged(rand, gen, 2, 2, 4, 64, [10, 10])
    q = rand(2, 4, 64)
    k = torch.stack(gather_rows(k_pages, table, lens))
    v = torch.stack(gather_rows(v_pages, table, lens))
    torch.testing.assert_close(
        paged_decode_attention(q, k_pages, v_pages, table, lens),
        gathered_decode_attention(q, k, v),
        **TOL,
    )


# --- errors ---------------------------------------------------------------------------------------


def test_errors(rand):
    q, kp = rand(2, 4, 64), rand(5, 2, 4, 64)
    table, lens = torch.zeros(2, 3, dtype=torch.int32), torch.tensor([3, 4])
    with pytest.raises(ValueError, match="multiple of kv heads"):
        paged_decode_attention(rand(2, 3, 64), kp, kp, table, lens)
    with pytest.raises(ValueError, match=r"q must be 3-D"):
        paged_decode_attention(q[None], kp, kp, table, lens)
    with pytest.raises(ValueError, match="head dim"):
        paged_decode_attention(rand(2, 4, 32), kp, kp, table, lens)
    with pytest.raises(ValueError, match="page_table must be int32 or int64"):
        paged_decode_attention(q, kp, kp, table.float(), lens)
    with pytest.raises(ValueError, match=r"page_table.shape\[0\]"):
        paged_decode_attention(q, kp, kp, table[:1], lens)
    with pytest.raises(ValueError, match=r"seq_lens must lie in \[0, 12\]"):
        paged_decode_attention(q, kp, kp, table, torch.tensor([3, 13]))
    with pytest.raises(ValueError, match="share a dtype"):
        paged_decode_attention(q.half(), kp, kp, table, lens)
    with pytest.raises(ValueError, match="float32/float16/bfloat16"):
        gathered_decode_attention(q.double(), rand(2, 2, 5, 64).double(), rand(2, 2, 5, 64).double())
    with pytest.raises(ValueError, match="same shape"):
        gathered_decode_attention(q, rand(2, 2, 5, 64), rand(2, 2, 6, 64))
    with pytest.raises(ValueError, match="backend must be one of"):
        gathered_decode_attention(q, rand(2, 2, 5, 64), rand(2, 2, 5, 64), backend="cuda")
    with pytest.raises(ValueError, match="num_splits"):
        gathered_decode_attention(q, rand(2, 2, 5, 64), rand(2, 2, 5, 64), num_splits=0)


def test_forcing_triton_without_interpreter_raises(rand, monkeypatch):
    from llmsys.kernels import _dispatch

    monkeypatch.setattr(_dispatch, "_INTERPRET_AT_IMPORT", False)
    q, k = rand(1, 2, 16), rand(1, 2, 3, 16)
    with pytest.raises(KernelUnavailableError, match="TRITON_INTERPRET=1"):
        gathered_decode_attention(q, k, k, backend="triton")
    # auto falls back to the reference instead
    ref = gathered_decode_attention_reference(q, k, k)
    torch.testing.assert_close(gathered_decode_attention(q, k, k), ref)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_garbage_in_unused_slots_never_leaks(request, rand, gen, backend):
    """Slots past a row's length (a fresh pool: uninitialised memory) may hold NaN or inf: ignored."""
    if backend == "triton":
        request.getfixturevalue("triton_cpu")
    q = rand(2, 4, 64)
    k_pages, v_pages, table, seq_lens = make_paged(rand, gen, 2, 2, 8, 64, [11, 5])
    clean = paged_decode_attention(q, k_pages, v_pages, table, seq_lens, backend=backend)
    for b, n in enumerate(seq_lens.tolist()):  # poison the tail of each row's last page
        last = int(table[b, (n - 1) // 8])
        k_pages[last, :, n % 8 or 8 :] = float("nan")
        v_pages[last, :, n % 8 or 8 :] = float("inf")
    poisoned = paged_decode_attention(q, k_pages, v_pages, table, seq_lens, backend=backend)
    assert torch.isfinite(poisoned).all()
    torch.testing.assert_close(poisoned, clean, **TOL)
