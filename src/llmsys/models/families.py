"""Which model families llmsys supports, and the error for the rest."""

from __future__ import annotations

from torch import nn

# model_type (as in config.model_type) -> human name
DENSE_FAMILIES: dict[str, str] = {
    "llama": "Llama",
    "mistral": "Mistral",
    "qwen2": "Qwen2",
    "qwen3": "Qwen3",
    "phi3": "Phi-3",
}
MOE_FAMILIES: dict[str, str] = {
    "mixtral": "Mixtral",
    "qwen2_moe": "Qwen2-MoE",
    "qwen3_moe": "Qwen3-MoE",
    "olmoe": "OLMoE",
}
SUPPORTED_FAMILIES: dict[str, str] = {**DENSE_FAMILIES, **MOE_FAMILIES}


class UnsupportedModelError(ValueError):
    """The model's architecture is not one llmsys knows how to reach into."""


def _describe(families: dict[str, str]) -> str:
    return ", ".join(f"{name} ({key})" for key, name in families.items())


def family_of(model: nn.Module, *, moe: bool | None = None) -> str:
    """The config.model_type of a supported model; raise UnsupportedModelError otherwise.

    `moe=True` / `moe=False` additionally require a MoE / dense family (plug-ins that only make sense
    for one kind say so with a clear error instead of failing deep inside).
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    allowed = SUPPORTED_FAMILIES if moe is None else (MOE_FAMILIES if moe else DENSE_FAMILIES)
    if model_type not in allowed:
        kind = {None: "", True: " MoE", False: " dense"}[moe]
        raise UnsupportedModelError(
            f"llmsys does not support model_type={model_type!r} ({type(model).__name__}) here. "
            f"Supported{kind} families: {_describe(allowed)}. "
            "Adding a family means teaching llmsys.models where its layers, attention and router live."
        )
    return model_type


def is_moe(model: nn.Module) -> bool:
    return family_of(model) in MOE_FAMILIES
