"""RoPE re-rotation of cached keys: R(p + delta) k == rerotate(R(p) k, delta)."""

from __future__ import annotations

import pytest
import torch

from llmsys.kernels import rerotate_keys, rerotate_keys_reference

TOL = dict(atol=1e-4, rtol=1e-4)


def inv_freq_for(D, base=10000.0):
    return 1.0 / (base ** (torch.arange(0, D, 2, dtype=torch.float32) / D))


def hf_rope(x, positions, inv_freq):
    """HF's apply_rotary_pos_emb for keys x [B, H, T, D] at positions [T] or [B, T] (written out:
    freqs = pos * inv_freq, emb = cat(freqs, freqs), x*cos + rotate_half(x)*sin)."""
    pos = positions if positions.dim() == 2 else positions[None]
    freqs = pos.float()[..., None] * inv_freq  # [B|1, T, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos()[:, None], emb.sin()[:, None]
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


# (B, Hkv, T, D)
SHAPES = [(3, 2, 37, 64), (1, 1, 1, 80), (2, 4, 5, 96)]


@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("B,H,T,D", SHAPES)
def test_rerotation_equals_direct_rope(gen, rand, B, H, T, D, per_row):
    inv_freq = inv_freq_for(D)
    raw = rand(B, H, T, D)  # keys before RoPE
    shape = (B, T) if per_row else (T,)
    old = torch.randint(0, 500, shape, generator=gen)
    delta = torch.randint(-200, 200, shape, generator=gen).clamp(min=-old)  # new positions stay >= 0
    cached = hf_rope(raw, old, inv_freq)
    expected = hf_rope(raw, old + delta, inv_freq)
    torch.testing.assert_close(rerotate_keys_reference(cached, delta, inv_freq), expected, **TOL)


def test_matches_transformers_apply_rotary_pos_emb(gen, rand):
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    B, H, T, D = 2, 2, 9, 64
    inv_freq = inv_freq_for(D)
    raw = rand(B, H, T, D)
    old = torch.arange(T)[None].expand(B, T)
    delta = torch.randint(0, 100, (B, T), generator=gen)

    def rope(x, pos):
        emb = torch.cat([pos.float()[..., None] * inv_freq] * 2, dim=-1)
        _, k = llama.apply_rotary_pos_emb(x, x, emb.cos(), emb.sin())  # unsqueeze_dim=1 -> heads
        return k

    torch.testing.assert_close(rerotate_keys(rope(raw, old), delta, inv_freq), rope(raw, old + delta), **TOL)


@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("B,H,T,D", SHAPES)
def test_triton_matches_reference(triton_cpu, gen, rand, B, H, T, D, per_row):
    keys, inv_freq = rand(B, H, T, D), inv_freq_for(D)
    delta = torch.randint(-3000, 3000, (B, T) if per_row else (T,), generator=gen).to(torch.int32)
    out = rerotate_keys(keys, delta, inv_freq, backend="triton")
    torch.testing.assert_close(out, rerotate_keys(keys, delta, inv_freq, backend="reference"), **TOL)


def test_triton_in_place_bf16_and_strided(triton_cpu, gen, rand):
    keys = rand(2, 9, 3, 64).to(torch.bfloat16).transpose(1, 2)  # [B, T, H, D] storage
    inv_freq, delta = inv_freq_for(64), torch.randint(0, 50, (9,), generator=gen)
    ref = rerotate_keys_reference(keys, delta, inv_freq)
    result = rerotate_keys(keys, delta, inv_freq, out=keys, backend="triton")
    assert result is keys
    torch.testing.assert_close(keys.float(), ref.float(), atol=1e-2, rtol=1e-2)


def test_zero_delta_is_identity(rand):
    keys = rand(1, 2, 6, 32)
    torch.testing.assert_close(rerotate_keys(keys, torch.zeros(6, dtype=torch.long), inv_freq_for(32)), keys)


def test_errors(rand):
    keys, inv = rand(1, 2, 6, 32), inv_freq_for(32)
    with pytest.raises(ValueError, match="even"):
        rerotate_keys(rand(1, 2, 6, 33), torch.zeros(6, dtype=torch.long), inv_freq_for(34)[:16])
    with pytest.raises(ValueError, match="tokens"):
        rerotate_keys(keys, torch.zeros(5, dtype=torch.long), inv)
    with pytest.raises(ValueError, match="batch"):
        rerotate_keys(keys, torch.zeros(2, 6, dtype=torch.long), inv)
    with pytest.raises(ValueError, match="int32 or int64"):
        rerotate_keys(keys, torch.zeros(6), inv)
    with pytest.raises(ValueError, match="inv_freq length"):
        rerotate_keys(keys, torch.zeros(6, dtype=torch.long), inv[:8])
    with pytest.raises(ValueError, match="out must match"):
        rerotate_keys(keys, torch.zeros(6, dtype=torch.long), inv, out=keys.half())
