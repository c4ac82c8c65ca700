"""Errors lurker raises on purpose.

Every error a user can cause (a bad model spec, a wrong input shape, a model that
fails mid-forward) is one of these, with a message that names the cause and the fix,
so that nobody has to read a traceback from deep inside torch.
"""

from __future__ import annotations

import contextlib
import difflib
import threading
from collections.abc import Iterable, Iterator
from typing import Any


def close_names(name: str, candidates: Iterable[str], n: int = 5, cutoff: float = 0.6) -> list[str]:
    """Names ``name`` may have meant, best first, for a "did you mean" hint.

    First every candidate that ends with ``.<name>`` (shallowest first): the module path of
    a model under a wrapper, ``module.conv1`` of an ``nn.DataParallel`` or
    ``model.net.conv1`` of a Lightning-style one, which fuzzy matching ranks below op
    labels (``conv2d_1``) or misses; then :func:`difflib.get_close_matches`. At most ``n``.
    """
    names = [c for c in dict.fromkeys(candidates) if c]
    suffix = "." + name
    under = sorted((c for c in names if c.endswith(suffix)), key=lambda c: c.count("."))
    fuzzy = difflib.get_close_matches(name, names, n=n, cutoff=cutoff)
    return list(dict.fromkeys([*under, *fuzzy]))[:n]


class LurkerError(Exception):
    """Base class: a problem lurker explains in its message.

    ``cli`` is the message as a command-line user should read it, where the fix differs
    (``--overwrite`` instead of ``overwrite=True``, no ``err.partial``); the CLI prints
    :meth:`for_cli`.
    """

    #: raised alike by every process of a ``torchrun`` job (rank 0 decided it for all): the
    #: CLI prints it once, on rank 0
    every_rank: bool = False

    def __init__(self, *args: Any, cli: str | None = None) -> None:
        super().__init__(*args)
        self.cli_message = cli

    def for_cli(self) -> str:
        """The message for the command line (the Python one where they do not differ)."""
        return self.cli_message or str(self)


class ModelSpecError(LurkerError):
    """A model spec (``torchvision:NAME``, ``pkg.mod:fn``, ``file.py:fn``) could not be resolved."""


class DataSpecError(LurkerError):
    """A dataset spec (``pkg.mod:fn``, ``file.py:fn``) could not be resolved, or what it
    names is not a dataset of ``(input, label)`` pairs."""


class WeightsError(LurkerError):
    """A weights file is missing, unreadable, or does not fit the model."""


class InputSpecError(LurkerError):
    """An input description (e.g. ``--input-shape``) is malformed."""


class GraphDocumentError(LurkerError, ValueError):
    """What ``Graph.from_json`` was given is not a trace document it reads: not JSON, not a
    ``lurker.trace`` document, another schema version, or one with a field missing. A
    ``ValueError`` too, as it always was."""


class TraceError(LurkerError):
    """The model raised during a traced forward pass.

    ``partial`` is the :class:`~lurker.Trace` of everything recorded up to the failure
    (its last op is the one that failed), and ``failed_op`` that op's label.
    ``input_advice`` is the sentence of the message that blames the inputs and names
    ``lurker trace``'s input options (None when the failure is not put down to the inputs),
    so that a caller that makes the inputs itself (the probe) can say it in its own words.
    """

    def __init__(
        self,
        message: str,
        partial: Any = None,
        failed_op: str | None = None,
        *,
        cli: str | None = None,
        input_advice: str | None = None,
    ):
        super().__init__(message, cli=cli)
        self.partial = partial
        self.failed_op = failed_op
        self.input_advice = input_advice


class MemoryLimitError(TraceError):
    """A trace (or a ``Trace.run``) stopped because the activations it saves would exceed
    ``max_memory``.

    ``partial`` is the graph recorded so far, with its saved activations dropped (they
    are what ran out of room); None for a run, whose trace is the graph. ``saved_bytes``
    is what had been saved, ``limit`` the budget.
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


class OpKeyError(LurkerError, KeyError):
    """A name or index given for an op (a hook's key) names no op of the trace.

    A ``KeyError`` too, as for ``trace[key]``; its message says what the key could have
    been (close matches) rather than repeating the key.
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class GraphChangedError(LurkerError):
    """``Trace.run`` saw a different sequence of ops than the trace (data-dependent control flow)."""


_local = threading.local()


@contextlib.contextmanager
def collected() -> Iterator[list[str]]:
    """Collect the warnings lurker gives in this thread instead of showing them (a server
    shows them beside a result). Thread-safe, unlike ``warnings.catch_warnings``, which
    swaps process-wide state that concurrent requests would restore out of order."""
    outer = getattr(_local, "sink", None)
    sink: list[str] = []
    _local.sink = sink
    try:
        yield sink
    finally:
        _local.sink = outer


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` attributed to the first caller outside lurker (the user's line,
    however deep inside lurker the warning is raised); inside :func:`collected`, the
    message is collected instead."""
    import os
    import sys
    import warnings

    sink = getattr(_local, "sink", None)
    if sink is not None:
        if message not in sink:
            sink.append(message)
        return

    here = os.path.dirname(os.path.abspath(__file__)) + os.sep
    level, frame = 2, sys._getframe(1)  # 1: this function; 2: its caller
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(here):
        level += 1
        frame = frame.f_back
    warnings.warn(message, category, stacklevel=level)


def first_three(items: list[str], sep: str = ", ") -> str:
    """Up to three items for a message, and how many more there are."""
    more = f" and {len(items) - 3} more" if len(items) > 3 else ""
    return sep.join(items[:3]) + more
