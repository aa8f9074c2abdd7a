"""Errors of the threads plug-in: each names the fix."""

from __future__ import annotations


class ThreadsError(Exception):
    """Base class of the errors raised by `llmsys.threads`."""


class GrammarUnavailableError(ThreadsError):
    """Grammar-constrained decoding was asked for but xgrammar cannot be used."""


class ToolSpecError(ThreadsError, ValueError):
    """A tool definition is unusable (not callable, bad name, bad parameter schema)."""


class ScriptError(ThreadsError, ValueError):
    """A forced-token script cannot be built (e.g. a tree that is not a Response)."""


__all__ = ["GrammarUnavailableError", "ScriptError", "ThreadsError", "ToolSpecError"]
