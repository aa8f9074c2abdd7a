"""``GemFilter(layer="auto")``: choose the filter layer of a model on synthetic needle prompts.

The paper fixes the filter layer per model by hand (13 of 32 for Llama-3.1-8B-Instruct, 19 of 40
for Mistral-Nemo, 19 of 32 for Phi-3.5-mini) and gives no method. The rule used here:

1. Build needle prompts (`lengths` x `depths`): by default random token ids from the middle of the
   vocabulary with a "needle" of 16 random tokens at the given depth, the prompt ending with the
   needle's first 8 tokens as a cue; the *targets* are the 8 tokens that follow the cue's match
   (what the model would have to copy next). With ``task=`` (an `llmsys.eval` task such as
   `NeedleTask`, ``task(length, depth, seed) -> Sample``) the prompts are the task's and the targets
   are the three tokens of the asked fact (``<kv> k v``).
2. One forward per length, hooked at every layer (nothing after the last layer's attention scores
   runs, nothing is cached): each layer's GemFilter selection of ``budget = length // 16`` tokens.
3. ``recall[r]`` = the fraction of target tokens layer r keeps, averaged over prompts; ``chance`` =
   ``budget / length``, what a random selection keeps.
4. The filter layer is the EARLIEST r with ``recall[r] >= tolerance * max(recall)`` (tolerance 0.9):
   the first pass costs about (r + 1) / L of a prefill, so the earliest layer that finds the needle
   almost as well as the best one is the fastest good choice.
5. If no layer beats chance clearly (``max(recall) - chance < 0.25``: the model does not retrieve
   the calibration needle at all, e.g. random weights, or prompts unlike its training data), the
   paper's ratio is used instead, ``round(L * 13 / 32)``, and a warning is logged.

The result is cached per model object (and calibration arguments); ``refresh=True`` recomputes it
(after fine-tuning, say).
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from llmsys.filter.selection import layer_scores, select_from_scores
from llmsys.models import attention_modules, family_of

logger = logging.getLogger(__name__)

__all__ = ["Calibration", "calibrate_layer", "choose_layer", "needle_prompts", "PAPER_RATIO"]

#: the paper's filter layer for Llama-3.1-8B-Instruct, as a fraction of the depth (the fallback)
PAPER_RATIO = 13 / 32
#: how far above chance the best layer's recall must be for the calibration to be trusted
MIN_MARGIN = 0.25

_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[tuple, Calibration]] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class Calibration:
    """The outcome of `calibrate_layer`: the chosen layer and the evidence for it."""

    layer: int
    recall: tuple[float, ...]  # mean target recall per layer
    chance: float  # recall of a random selection of the same size
    tolerance: float
    prompts: int
    fallback: bool  # True: no layer beat chance clearly, the paper's ratio was used

    def summary(self) -> str:
        curve = " ".join(f"{r:.2f}" for r in self.recall)
        how = "paper ratio (no layer found the needle)" if self.fallback else f"earliest >= {self.tolerance:g} x best"
        return f"filter layer {self.layer} ({how}); recall per layer: {curve}; chance {self.chance:.3f}"


def choose_layer(recall: Sequence[float], chance: float, tolerance: float = 0.9) -> tuple[int, bool]:
    """The rule of this module: ``(layer, fallback)`` from per-layer recall (see the module docstring)."""
    if not recall:
        raise ValueError("choose_layer: no layers")
    best = max(recall)
    if best - chance < MIN_MARGIN:
        return min(len(recall) - 1, round(len(recall) * PAPER_RATIO)), True
    return next(i for i, r in enumerate(recall) if r >= tolerance * best), False


def _id_range(model: nn.Module) -> tuple[int, int]:
    # the middle of the vocabulary: special and byte tokens tend to sit at either end
    vocab = model.config.vocab_size
    margin = vocab // 64
    return margin + 3, vocab - margin


def needle_prompts(
    model: nn.Module,
    length: int,
    depths: Sequence[float],
    *,
    samples: int = 1,
    seed: int = 0,
    task: Callable[..., Any] | None = None,
    needle_tokens: int = 16,
) -> tuple[torch.Tensor, list[list[int]]]:
    """Calibration prompts ``[P, length]`` and, per prompt, the target positions (see module docstring)."""
    prompts, targets = [], []
    for d, depth in enumerate(depths):
        for s in range(samples):
            if task is not None:
                sample = task(length, depth, seed + s)
                prompts.append(list(sample.prompt))
                start = sample.positions[0]
                targets.append([start, start + 1, start + 2])
                continue
            gen = torch.Generator().manual_seed((seed * 1_000_003 + length * 1009 + d * 31 + s) % (2**63))
            lo, hi = _id_range(model)
            cue = needle_tokens // 2
            bos = model.config.bos_token_id
            head = [bos] if isinstance(bos, int) else []
            body = length - len(head) - cue
            if body < needle_tokens + 1:
                raise ValueError(f"calibration length {length} is too short for a {needle_tokens}-token needle")
            tokens = torch.randint(lo, hi, (body,), generator=gen)
            needle = torch.randint(lo, hi, (needle_tokens,), generator=gen)
            start = round(depth * (body - needle_tokens))
            tokens[start : start + needle_tokens] = needle
            prompts.append(head + tokens.tolist() + needle[:cue].tolist())
            first = len(head) + start
            targets.append(list(range(first + cue, first + needle_tokens)))
    return torch.tensor(prompts, dtype=torch.long), targets


def calibrate_layer(
    model: nn.Module,
    *,
    lengths: Sequence[int] = (1024,),
    depths: Sequence[float] = (0.1, 0.3, 0.5, 0.7, 0.9),
    samples: int = 1,
    pool_kernel: int = 5,
    tolerance: float = 0.9,
    task: Callable[..., Any] | None = None,
    seed: int = 0,
    refresh: bool = False,
) -> Calibration:
    """Choose GemFilter's filter layer for `model` (the rule is in the module docstring); cached per model."""
    family_of(model, moe=False)
    if not 0 < tolerance <= 1:
        raise ValueError(f"tolerance must be in (0, 1], got {tolerance}")
    key = (tuple(lengths), tuple(depths), samples, pool_kernel, tolerance, repr(task), seed)
    per_model = _CACHE.setdefault(model, {})
    if not refresh and key in per_model:
        return per_model[key]
    num_layers = len(attention_modules(model))
    device = next(model.parameters()).device
    hits = torch.zeros(num_layers, dtype=torch.float64)
    chance, prompts = 0.0, 0
    for length in lengths:
        ids, targets = needle_prompts(model, length, depths, samples=samples, seed=seed, task=task)
        ids = ids.to(device)
        budget = max(1, length // 16)
        scores = layer_scores(model, ids, range(num_layers), pool_kernel=pool_kernel)
        mask = torch.ones_like(ids)
        for layer, layer_score in scores.items():
            chosen = select_from_scores(layer_score, mask, budget).indices.cpu()
            for row, wanted in enumerate(targets):
                hits[layer] += torch.isin(torch.tensor(wanted), chosen[row]).double().mean().item()
        chance += budget / length * len(targets)
        prompts += len(targets)
    recall = tuple((hits / prompts).tolist())
    chance /= prompts
    layer, fallback = choose_layer(recall, chance, tolerance)
    result = Calibration(layer, recall, chance, tolerance, prompts, fallback)
    if fallback:
        logger.warning(
            "GemFilter calibration: no layer of %s keeps the needle clearly more often than chance "
            "(best recall %.2f, chance %.2f); using the paper's ratio: layer %d of %d. Pass task= with "
            "prompts the model can solve, or choose the layer yourself.",
            type(model).__name__,
            max(recall),
            chance,
            layer,
            num_layers,
        )
    else:
        logger.info("GemFilter calibration: %s", result.summary())
    per_model[key] = result
    return result
