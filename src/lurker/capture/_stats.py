"""Per-op statistics of saved activations (mean, std, range, zeros), counted on request.

What a debugging user looks at first when a layer explodes or dies: a conv whose outputs
reach 1e6, a ReLU whose outputs are all 0. Nothing here runs while recording: each figure
is a reduction over a tensor the trace (or a run of it) already holds, paid only by the
caller who asks (``Trace.stats``, ``Activations.stats``), so the hot path is untouched.

The sums are taken in float64, chunk by chunk, and the spread is each chunk's sum of
squared deviations from its own mean, combined (Chan et al.): never ``E[x²] - E[x]²``,
which cancels catastrophically when the mean is large against the spread and would make
a float16 layer's statistics overflow.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ..errors import LurkerError
from ._tree import tensors

#: elements reduced at a time: a chunk's float64 copy is at most 32 MiB, whatever the layer
_CHUNK = 1 << 22


@dataclass(frozen=True)
class OpStats:
    """Statistics of one op's saved output, over its floating-point elements (every output
    of a multi-output op together).

    ``mean``, ``std`` (population std, numpy's default), ``min`` and ``max`` are over the
    finite elements, None when none is; ``nonfinite`` counts the NaN and ±inf elements left
    out of them (``Trace.first_nonfinite`` says which op made them); ``zeros`` is the
    fraction of all ``numel`` elements that are exactly 0 (a ReLU whose units never fire: 1.0).
    """

    numel: int
    mean: float | None
    std: float | None
    min: float | None
    max: float | None
    zeros: float
    nonfinite: int

    def __str__(self) -> str:
        if self.mean is None or self.std is None or self.min is None or self.max is None:
            text = "no finite value"
        else:
            text = (
                f"mean {self.mean:.4g}, std {self.std:.4g}, min {self.min:.4g}, "
                f"max {self.max:.4g}, zeros {self.zeros:.1%}"
            )
        if self.nonfinite:
            text += f"; {self.nonfinite:,} NaN or inf of {self.numel:,} left out"
        return text


def of(value: Any) -> OpStats | None:
    """The statistics of a saved value; None when it holds no floating-point element."""
    numel = zeros = bad = 0
    n, mean, m2 = 0, 0.0, 0.0  # finite elements so far, their mean, sum of squared deviations
    lo, hi = math.inf, -math.inf
    # the real floating-point tensors of the value (integer, boolean and complex ones have
    # no such statistics)
    for t in tensors(value, []):
        if not t.is_floating_point():
            continue
        flat = t.detach().reshape(-1)
        numel += flat.numel()
        for start in range(0, flat.numel(), _CHUNK):
            chunk = flat[start : start + _CHUNK]
            if chunk.device.type == "mps":  # no float64 on Apple GPUs: reduce on the CPU
                chunk = chunk.cpu()
            zeros += int((chunk == 0).sum())
            finite = chunk.isfinite()
            k = int(finite.sum())
            bad += chunk.numel() - k
            if k == 0:
                continue
            x = (chunk if k == chunk.numel() else chunk[finite]).double()
            cmean = float(x.mean())
            cm2 = float(((x - cmean) ** 2).sum())
            lo, hi = min(lo, float(x.min())), max(hi, float(x.max()))
            delta, total = cmean - mean, n + k
            mean += delta * k / total
            m2 += cm2 + delta * delta * n * k / total
            n = total
    if numel == 0:
        return None
    if n == 0:
        return OpStats(numel, None, None, None, None, zeros / numel, bad)
    return OpStats(numel, mean, math.sqrt(m2 / n), lo, hi, zeros / numel, bad)


def table(pairs: Iterable[tuple[str, Any]]) -> dict[str, OpStats]:
    """``{label: OpStats}`` of the values that hold floating-point elements, in order."""
    out: dict[str, OpStats] = {}
    for label, value in pairs:
        s = of(value)
        if s is not None:
            out[label] = s
    return out


def require_saved(count: int, what: str) -> None:
    """Refuse to answer with an empty table for a trace or run that kept nothing: that
    would read as "no op has statistics", when none was saved to have them."""
    if count == 0:
        raise LurkerError(
            f"{what} kept no activations (save='none', or save= names that matched no op), so "
            "it has no statistics to give. Trace with save='all' (the default), or save= the "
            "ops to look at; tr.run(x, save=[...]) keeps them for one run."
        )
