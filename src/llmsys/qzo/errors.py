"""Errors of the qzo plug-in: each names the fix."""

from __future__ import annotations


class QZOError(Exception):
    """Base class of the errors raised by `llmsys.qzo`."""


class NoTrainableTensorsError(QZOError, ValueError):
    """The model has no quantisation scales QZO can train (and unquantised training is off)."""


class DoubleQuantizationError(QZOError, ValueError):
    """A bitsandbytes layer uses double quantisation (uint8 absmax codes) and conversion was not asked for."""


class QuantizationError(QZOError, ValueError):
    """A layer cannot be quantised / loaded into llmsys's int4 format (shape, group size, GPTQ layout)."""


class BitsAndBytesUnavailableError(QZOError, ImportError):
    """bitsandbytes is needed for this path but cannot be imported."""


class CheckpointError(QZOError, ValueError):
    """A QZO checkpoint does not match the model or optimizer it is loaded into."""


__all__ = [
    "BitsAndBytesUnavailableError",
    "CheckpointError",
    "DoubleQuantizationError",
    "NoTrainableTensorsError",
    "QZOError",
    "QuantizationError",
]
