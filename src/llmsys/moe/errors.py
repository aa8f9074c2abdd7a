"""The exceptions of llmsys.moe: each names what was wrong and how to fix it."""

from __future__ import annotations


class PlacementError(ValueError):
    """Base class: a placement cannot be built, solved, run or deployed as asked."""


class InfeasiblePlacementError(PlacementError):
    """The constraints leave no valid placement (e.g. fewer slots than experts, an expert without a slot)."""


class PlacementConstraintError(PlacementError):
    """A placement violates what an engine (vLLM, SGLang, vLLM-Ascend) or the EP runtime requires."""


class TraceError(ValueError):
    """A routing trace is malformed or does not fit the model/placement it is used with."""
