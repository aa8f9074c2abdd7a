"""The trained reference model: a small Llama that really retrieves from long synthetic contexts.

    from llmsys.testing import reference_model, reference_tokenizer
    model = reference_model()          # loads the committed weights in well under a second
    tok = reference_tokenizer()        # the synthetic vocabulary: "<s> f3 <kv> k5 v9 ... <q> k5"

The weights (config.json, model.safetensors, recipe.json, eval.json) live next to this file. They
are produced by ``llmsys train-reference`` / ``python -m llmsys.testing.reference train`` (see
docs/reference-model.md for the recipe, the machine and the accuracy table). Without them,
`reference_model()` raises `ReferenceWeightsMissing` naming the command, or - when asked with
``train_if_missing=True`` - trains into the user cache (``~/.cache/llmsys/reference/<recipe hash>/``).
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

import torch

from llmsys.eval.tasks import REFERENCE_VOCAB, SyntheticVocab, synthetic_tokenizer
from llmsys.testing.reference.train import (
    DEFAULT_RECIPE,
    FILES,
    Recipe,
    build_model,
    gpu_recipe,
    needle_table,
    save_model,
    train_reference,
)

PACKAGE_DIR = Path(__file__).resolve().parent

TRAIN_HINT = (
    "train them with `llmsys train-reference` (or `python -m llmsys.testing.reference train --device cuda "
    "--minutes 5 --out src/llmsys/testing/reference`), or call reference_model(train_if_missing=True) to "
    "train into the user cache"
)


class ReferenceWeightsMissing(FileNotFoundError):
    """The reference model's weights are not installed (and training was not asked for)."""


def cache_root() -> Path:
    """``$LLMSYS_CACHE`` or ``$XDG_CACHE_HOME/llmsys`` or ``~/.cache/llmsys``."""
    if os.environ.get("LLMSYS_CACHE"):
        return Path(os.environ["LLMSYS_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "llmsys"


def cache_dir(recipe: Recipe = DEFAULT_RECIPE) -> Path:
    """Where `reference_model(train_if_missing=True)` keeps weights trained with `recipe`."""
    return cache_root() / "reference" / recipe.hash()


def has_weights(path: str | os.PathLike) -> bool:
    path = Path(path)
    return (path / "model.safetensors").is_file() and (path / "config.json").is_file()


def weights_path(recipe: Recipe = DEFAULT_RECIPE) -> Path | None:
    """The folder the reference weights load from: the package's, else the user cache's, else None."""
    for path in (PACKAGE_DIR, cache_dir(recipe)):
        if has_weights(path):
            return path
    return None


@functools.lru_cache(maxsize=4)
def _read_state(path: str, mtime: float) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    config = json.loads((Path(path) / "config.json").read_text())
    return config, load_file(str(Path(path) / "model.safetensors"))


def load_model(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
):
    """A `LlamaForCausalLM` (eval mode) from a folder written by `train_reference` / `save_model`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    if not has_weights(path):
        raise ReferenceWeightsMissing(f"no reference weights in {path} (config.json + model.safetensors); {TRAIN_HINT}")
    config_dict, state = _read_state(str(path), (path / "model.safetensors").stat().st_mtime)
    config = LlamaConfig.from_dict(config_dict)
    config._attn_implementation = attn_implementation
    with torch.random.fork_rng(devices=[]):  # the random init is overwritten: keep the caller's RNG
        model = LlamaForCausalLM(config)
    model.load_state_dict(state, strict=True)
    model.config._name_or_path = str(path)
    return model.to(device=device, dtype=dtype).eval()


def reference_model(
    train_if_missing: bool = False,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    path: str | os.PathLike | None = None,
    train_minutes: float = 60.0,
):
    """The trained reference model (a fresh `LlamaForCausalLM` each call, eval mode).

    Loads from `path` if given, else the weights shipped in the package, else the user cache.
    When none exist: raises `ReferenceWeightsMissing` (how to train them), or, with
    ``train_if_missing=True``, trains `DEFAULT_RECIPE` for up to `train_minutes` into the user cache
    (on `device`; minutes on a GPU, about an hour on a laptop CPU) and loads that.
    """
    if path is None:
        found = weights_path()
        if found is None:
            if not train_if_missing:
                raise ReferenceWeightsMissing(f"the reference model's weights are not installed; {TRAIN_HINT}")
            dev = torch.device(device)
            recipe = gpu_recipe() if dev.type == "cuda" else DEFAULT_RECIPE
            target = cache_dir(recipe)
            train_reference(target, device=str(dev), minutes=train_minutes, recipe=recipe)
            found = target
        path = found
    return load_model(path, device=device, dtype=dtype, attn_implementation=attn_implementation)


def build_model_for_tests(recipe: Recipe):
    """A freshly initialised (untrained) model of `recipe`'s architecture."""
    return build_model(recipe)


def reference_info(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """recipe.json and eval.json of the installed weights ({} for a file that is absent)."""
    path = Path(path) if path is not None else weights_path()
    if path is None:
        raise ReferenceWeightsMissing(f"the reference model's weights are not installed; {TRAIN_HINT}")
    info = {}
    for name in ("recipe", "eval"):
        file = path / f"{name}.json"
        info[name] = json.loads(file.read_text()) if file.is_file() else {}
    info["path"] = str(path)
    return info


def reference_vocab() -> SyntheticVocab:
    """The synthetic vocabulary of the reference model (markers, keys, values, filler)."""
    return REFERENCE_VOCAB


def reference_tokenizer():
    """A `PreTrainedTokenizerFast` over the reference vocabulary (whitespace-separated token names)."""
    return synthetic_tokenizer(REFERENCE_VOCAB)


__all__ = [
    "DEFAULT_RECIPE",
    "FILES",
    "PACKAGE_DIR",
    "Recipe",
    "ReferenceWeightsMissing",
    "build_model",
    "build_model_for_tests",
    "cache_dir",
    "gpu_recipe",
    "has_weights",
    "load_model",
    "needle_table",
    "reference_info",
    "reference_model",
    "reference_tokenizer",
    "reference_vocab",
    "save_model",
    "train_reference",
    "weights_path",
]
