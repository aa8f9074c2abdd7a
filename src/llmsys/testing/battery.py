"""The shared test battery: one decorator runs a test over every tiny model family.

    from llmsys.testing import every_dense_family

    @every_dense_family
    def test_something(family):
        model = tiny_model(family)
        ...

pytest is imported lazily so that `import llmsys.testing` works without it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from llmsys.models.families import DENSE_FAMILIES, MOE_FAMILIES, SUPPORTED_FAMILIES

F = TypeVar("F", bound=Callable)


def _parametrize(families: dict[str, str]) -> Callable[[F], F]:
    def decorate(test: F) -> F:
        import pytest

        return pytest.mark.parametrize("family", list(families))(test)

    return decorate


every_family = _parametrize(SUPPORTED_FAMILIES)
every_dense_family = _parametrize(DENSE_FAMILIES)
every_moe_family = _parametrize(MOE_FAMILIES)
