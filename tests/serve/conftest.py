"""Shared helpers of the serve tests: greedy references from `model.generate`, tie-aware comparison."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

from llmsys.models import generate

# fp32 summation order (eager attention in generate vs paged attention in the engine) can only change
# a greedy choice where the top two logits are closer than this; the tiny random models have such
# near-ties now and then (gaps down to ~1e-6), real divergences show up as gaps of ~1e-2.
TIE = 1e-5


@dataclass
class Reference:
    tokens: list[int]
    gaps: list[float]  # top-1 minus top-2 logit at each generated position


def greedy_reference(model, prompt: torch.Tensor, max_new_tokens: int) -> Reference:
    with torch.no_grad():
        out = generate(
            model,
            prompt[None],
            max_new_tokens=max_new_tokens,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
        )
    tokens = out.sequences[0, prompt.numel() :].tolist()
    gaps = [float(s[0].topk(2).values.diff().abs()) for s in out.scores]
    return Reference(tokens, gaps)


def assert_same_greedy(tokens: list[int], ref: Reference, what: str = "") -> None:
    """Engine tokens equal generate's, except after a position where generate's choice was a near-tie."""
    for i, (a, b) in enumerate(zip(tokens, ref.tokens)):
        if a != b:
            assert ref.gaps[i] < TIE, (
                f"{what}: token {i} differs ({a} vs {b}) though the top-2 gap is {ref.gaps[i]:.2e}"
            )
            return
    assert len(tokens) == len(ref.tokens), f"{what}: {len(tokens)} tokens vs generate's {len(ref.tokens)}"


def random_prompts(lengths, vocab: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=gen) for n in lengths]


@pytest.fixture
def greedy():
    """The helpers above, as a fixture (test modules cannot import conftest under importlib mode)."""
    return SimpleNamespace(reference=greedy_reference, check=assert_same_greedy, prompts=random_prompts)
