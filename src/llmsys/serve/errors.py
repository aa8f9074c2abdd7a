"""Exceptions of llmsys.serve: each names what went wrong and how to fix it."""

from __future__ import annotations


class ServeError(RuntimeError):
    """Base class of the serving engine's errors."""


class PromptTooLongError(ServeError, ValueError):
    """A request can never fit in the KV pool (or the model's context); rejected at submission."""


class RequestNotFoundError(ServeError, KeyError):
    """No live or finished request has this id."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0]) if self.args else "unknown request"


class EngineClosedError(ServeError):
    """The engine (or its asyncio front end) was closed."""


class SchedulerConfigError(ServeError, ValueError):
    """A scheduler was given a bad hyper-parameter or an unknown name."""


class ProfileError(ServeError, ValueError):
    """A cost-model profile is malformed, or cannot be fitted from the samples given."""


class WorkloadError(ServeError, ValueError):
    """A workload (synthetic distribution name, CSV file) is malformed."""


class SimulationError(ServeError):
    """The simulation cannot make progress (a request that never fits, a scheduler that stalls)."""


class GPUUnavailableError(ServeError):
    """A CUDA-only path (SM partitions, GPU profiling) was asked for on a machine without CUDA."""


__all__ = [
    "EngineClosedError",
    "GPUUnavailableError",
    "ProfileError",
    "PromptTooLongError",
    "RequestNotFoundError",
    "SchedulerConfigError",
    "ServeError",
    "SimulationError",
    "WorkloadError",
]
