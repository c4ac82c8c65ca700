"""The memory guard: ``max_memory=`` of :func:`lurker.trace`.

Saving every activation of a large model on a large input can need more memory than the
machine has; the kernel then kills the process and all work is lost. The recorder keeps a
running total of the bytes it saves (one addition and a comparison per op) and stops the
trace with :class:`~lurker.errors.MemoryLimitError` before the total passes the budget.

With the default (``"auto"``) nothing is measured until the saved total reaches
:data:`AUTO_FIRST_CHECK`: small traces never read the machine's memory. Past it, the
budget becomes :data:`AUTO_FRACTION` of what the device had available when the trace
started (what is available now plus what the trace has saved so far).
"""

from __future__ import annotations

import numbers
import os
import re
from typing import Any

import torch

from ..errors import LurkerError

AUTO_FRACTION = 0.8  # of the memory available when the trace started
AUTO_FIRST_CHECK = 256 * 2**20  # saved bytes below which "auto" measures nothing

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


class _Traced:
    """``Trace.run``'s default ``max_memory``: the value the trace was made with."""

    def __repr__(self) -> str:
        return "<as traced>"


TRACED: Any = _Traced()


def parse_max_memory(value: Any) -> tuple[int | None, float | None]:
    """``max_memory=`` as (a fixed limit in bytes, or a fraction of available memory).

    ``(None, None)`` disables the guard.
    """
    if value is None or value is False or (isinstance(value, str) and value.lower() == "off"):
        return None, None
    if isinstance(value, str) and value.lower() == "auto":
        return None, AUTO_FRACTION
    if isinstance(value, bool):
        value = "invalid"  # True is not a size
    if isinstance(value, numbers.Integral) and value > 0:  # numpy integers too
        return int(value), None
    if isinstance(value, numbers.Real) and 0 < value <= 1:
        return None, float(value)
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
        if m and m.group(2).lower() in _UNITS:
            n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
            if n >= 1 and (m.group(2) or "." not in m.group(1)):  # "0.5": not a size
                return n, None
    raise LurkerError(
        f"max_memory={value!r} is not understood. Pass a size in bytes (2_000_000_000) or "
        "with a unit ('2GB', '512MiB'), a fraction of the available memory (0.5), 'auto' "
        "(the default: 80% of the memory available) or None to disable the check."
    )


def available_bytes(device: torch.device) -> int | None:
    """Memory free for new tensors on ``device``; None where it cannot be told."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        # blocks torch's caching allocator holds but does not use are free to torch
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def fmt_bytes(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


class OverLimit(Exception):
    """Raised inside the forward by the recorder; :func:`lurker.trace` reports it."""

    def __init__(
        self,
        node_index: int,
        nbytes: int,
        saved: int,
        limit: int,
        basis: str,
        device: torch.device | None = None,
    ):
        super().__init__("the trace's memory budget is exhausted")
        self.node_index = node_index
        self.nbytes = nbytes
        self.saved = saved
        self.limit = limit
        self.basis = basis
        # where the values are kept (a run's error suggests save_to= off an accelerator)
        self.device = device


class Budget:
    """One replay's running total of saved bytes against ``max_memory=`` (``Trace.run``).

    ``device`` in :meth:`over` is where the values are kept (the trace's ``save_to=``
    where it was given), so ``"auto"`` measures that device's memory, not the model's.

    The recorder keeps its own total (it counts new storages as it records); a replay adds
    the bytes of each value it keeps and compares, and reads the machine's memory only as
    the recorder does: at the first saved tensor for a fraction asked for, at
    :data:`AUTO_FIRST_CHECK` saved bytes for ``"auto"``, never below it.
    """

    __slots__ = ("basis", "check", "fraction", "over_limit", "saved", "storages")

    def __init__(self, limit: int | None, fraction: float | None, auto: bool) -> None:
        self.saved = 0
        # data pointers of the storages counted: a value on one counted already (a
        # ``detach()``, an in-place op's result) adds nothing, as in the recorder
        self.storages: set[int] = set()
        self.over_limit: OverLimit | None = None
        self.fraction: float | None = None
        self.basis = ""
        if limit is not None:
            self.check: float = limit
            self.basis = f"max_memory={limit:,} bytes"
        else:
            self.check = AUTO_FIRST_CHECK if auto else 0
            self.fraction = fraction

    def over(self, node_index: int, nbytes: int, device: torch.device) -> None:
        """The saved total passed the point to check: measure the budget, or stop (raise
        :class:`OverLimit`, again at every later save if the model swallows it)."""
        saved = self.saved
        if self.fraction is not None:  # a fraction: measure once, now
            fraction = self.fraction
            self.fraction = None
            avail = available_bytes(device)
            if avail is None:  # cannot tell: no guard rather than a wrong one
                self.check = float("inf")
                return
            start = avail + saved  # what was available when the run started
            self.check = int(fraction * start)
            self.basis = (
                f"{fraction:.0%} of the {fmt_bytes(start)} available on {device} when the "
                "run started"
            )
            if saved <= self.check:
                return
        if self.over_limit is None:  # the first op past the limit is the one to name
            self.over_limit = OverLimit(
                node_index, nbytes, saved, int(self.check), self.basis, device
            )
        raise OverLimit(node_index, nbytes, saved, int(self.check), self.basis, device)
