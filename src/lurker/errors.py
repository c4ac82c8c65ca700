"""Errors lurker raises on purpose.

Every error a user can cause (a bad model spec, a wrong input shape, a model that
fails mid-forward) is one of these, with a message that names the cause and the fix,
so that nobody has to read a traceback from deep inside torch.
"""

from __future__ import annotations

from typing import Any


class LurkerError(Exception):
    """Base class: a problem lurker explains in its message."""


class ModelSpecError(LurkerError):
    """A model spec (``torchvision:NAME``, ``pkg.mod:fn``, ``file.py:fn``) could not be resolved."""


class WeightsError(LurkerError):
    """A weights file is missing, unreadable, or does not fit the model."""


class InputSpecError(LurkerError):
    """An input description (e.g. ``--input-shape``) is malformed."""


class TraceError(LurkerError):
    """The model raised during a traced forward pass.

    ``partial`` is the :class:`~lurker.Trace` of everything recorded up to the failure
    (its last op is the one that failed), and ``failed_op`` that op's label.
    """

    def __init__(self, message: str, partial: Any = None, failed_op: str | None = None):
        super().__init__(message)
        self.partial = partial
        self.failed_op = failed_op


class MemoryLimitError(TraceError):
    """A trace stopped because the activations it saves would exceed ``max_memory``.

    ``partial`` is the graph recorded so far, with its saved activations dropped (they
    are what ran out of room); ``saved_bytes`` what had been saved, ``limit`` the budget.
    """

    def __init__(
        self,
        message: str,
        partial: Any = None,
        failed_op: str | None = None,
        saved_bytes: int = 0,
        limit: int = 0,
    ):
        super().__init__(message, partial=partial, failed_op=failed_op)
        self.saved_bytes = saved_bytes
        self.limit = limit


class ValidationError(LurkerError):
    """A saved activation does not match a re-execution of its op."""

    def __init__(self, message: str, op: str | None = None):
        super().__init__(message)
        self.op = op


class GraphChangedError(LurkerError):
    """``Trace.run`` saw a different sequence of ops than the trace (data-dependent control flow)."""
