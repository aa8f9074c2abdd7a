"""A registry of methods by name (PEFT style): plug-ins register their dataclasses here.

    @register_method("gemfilter", plugin="filter")
    @dataclass
    class GemFilter: ...

    get_method("gemfilter")(layer=13, topk=1024)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")

#: the six plug-ins: subpackage -> (paper, what it does)
PLUGINS: dict[str, tuple[str, str]] = {
    "filter": ("GemFilter", "early-layer attention selects the input tokens"),
    "kv": ("LeoAM", "adaptive GPU/CPU/disk KV tiers with chunk abstracts"),
    "moe": ("MoETuner", "ILP expert-to-GPU placement"),
    "qzo": ("QZO", "zeroth-order fine-tuning of 4-bit models"),
    "threads": ("TIM / TIMRUN", "reasoning trees with subtask KV pruning"),
    "serve": ("Nexus", "intra-GPU prefill/decode disaggregation"),
}


@dataclass(frozen=True)
class MethodEntry:
    name: str
    plugin: str
    factory: Callable


_METHODS: dict[str, MethodEntry] = {}


class UnknownMethodError(KeyError):
    pass


def register_method(name: str, plugin: str) -> Callable[[T], T]:
    if plugin not in PLUGINS and plugin != "core":
        raise ValueError(f"unknown plug-in {plugin!r}; one of {sorted(PLUGINS)} or 'core'")

    def decorate(factory: T) -> T:
        existing = _METHODS.get(name)
        if existing is not None and existing.factory is not factory:
            raise ValueError(f"method name {name!r} is already registered by {existing.plugin}")
        _METHODS[name] = MethodEntry(name, plugin, factory)  # type: ignore[arg-type]
        return factory

    return decorate


def get_method(name: str) -> Callable:
    try:
        return _METHODS[name].factory
    except KeyError:
        raise UnknownMethodError(
            f"no method named {name!r}; registered: {sorted(_METHODS) or 'none'} "
            "(import the plug-in subpackage that defines it first)"
        ) from None


def list_methods() -> list[MethodEntry]:
    return sorted(_METHODS.values(), key=lambda e: (e.plugin, e.name))
