"""Occlusion (Zeiler and Fergus, 2014, arXiv:1311.2901): slide a window over the input,
replace it by a baseline, and credit each input value with the mean drop of the target
score over the windows that covered it, as Captum's ``Occlusion`` (same window
positions: starts ``0, s, 2s, ...`` until the window reaches the end, the last one
clipped).

Several occluded copies go through the model per forward (``internal_batch_size`` rows),
not one forward per window; no gradients are taken.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import LurkerError
from .axes import HINT
from .base import Explanation, Method, check_count, register
from .integrated_gradients import as_baseline
from .targets import Forward


def _per_dim(
    value: Any, dims: tuple[int, ...], what: str, whole: int | None = -1
) -> tuple[int, ...]:
    """An int or tuple for the sample's dims. ``whole``: the sample axis a window spans
    whole (the channels), None where every axis is windowed (a one-channel ``(H, W)``
    image), -1 where the channel axis is not known: then an int or short tuple is for the
    trailing dims and leaves the leading ones whole. An int, or a tuple of one value per
    axis but ``whole``, windows the other axes and spans ``whole``."""
    n = len(dims)
    example = "window=8" if what == "window" else "strides=4"
    if isinstance(value, int) and not isinstance(value, bool):
        count = n if whole is None else (n - 1 if n > 1 else 1)
        vals = (value,) * count
    elif isinstance(value, (tuple, list)) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        vals = tuple(value)
    else:
        raise LurkerError(
            f"occlusion: {what} must be an int or a tuple of ints, got {value!r}; pass "
            f"{example} (every axis of the image alike) or a tuple of one int per axis"
        )
    if len(vals) > n:
        raise LurkerError(
            f"occlusion: {what}={value!r} has {len(vals)} values, more than a sample "
            f"{dims} has axes ({n}, the batch axis not counted); pass an int ({example}) "
            f"or a tuple of at most {n} values"
        )
    if whole is not None and whole >= 0 and len(vals) == n - 1:
        full = dims[whole] if what == "window" else 1
        return (*vals[:whole], full, *vals[whole:])
    return (
        tuple(dims[: n - len(vals)]) + tuple(vals)
        if what == "window"
        else ((1,) * (n - len(vals)) + tuple(vals))
    )


def windows(
    dims: tuple[int, ...],
    window: tuple[int, ...],
    strides: tuple[int, ...],
    given: tuple[Any, Any] | None = None,
) -> list[tuple[slice, ...]]:
    """Every window position as slices into a sample (Captum's positions). ``given``: the
    ``window`` and ``strides`` as the user wrote them, which the errors quote."""
    said_w, said_s = given if given is not None else (window, strides)
    starts = []
    # what to pass instead, a size that fits every axis: an int window as given applies
    # to each axis it windows, and fits those it does not fit at the shortest of them (the
    # others are longer than it); an int stride fits every window not spanning its axis
    bad = [d for d, w in zip(dims, window) if not 1 <= w <= d]
    fit = (
        f"window={min(8, *bad)}, say"
        if isinstance(said_w, int) and bad
        else "in a tuple, one size per axis"
    )
    parts = [w for d, w in zip(dims, window) if w != d]
    step = max(1, min(parts) // 2) if parts else 1
    for d, w, s in zip(dims, window, strides):
        if not 1 <= w <= d:
            raise LurkerError(
                f"occlusion: window={said_w!r} makes windows {window}, which do not fit a "
                f"sample of shape {dims}: each size must be from 1 to its axis's length; "
                f"pass one from 1 to {d} for this axis ({fit})"
            )
        if s < 1 or (s > w and d != w):
            raise LurkerError(
                f"occlusion: strides={said_s!r} makes steps {strides} for windows {window}: "
                "each step must be from 1 to its window's size (a larger one skips inputs no "
                "window covers); pass "
                + (f"strides={step} (half the smallest window) or " if step > 1 else "")
                + "strides=1"
            )
        count = math.ceil((d - w) / s) + 1
        starts.append([slice(k * s, min(k * s + w, d)) for k in range(count)])
    return list(itertools.product(*starts))


@register
class Occlusion(Method):
    name = "occlusion"
    signed = True
    gradients = False
    summary = "drop of the target score when a sliding window is replaced by a baseline (Zeiler and Fergus, 2014)"

    def _whole(self, x: Tensor, window: Any, strides: Any) -> int | None:
        """The sample axis a window spans whole: the input's channels (``self.axes``);
        None for a one-channel image with no channel axis; -1 (the leading axes) where
        lurker has no axes, or refused where it cannot tell and the window does not give
        every axis."""
        ax = self.axes
        if ax is None or ax.found == "assumed":
            if ax is not None and ax.image is not None and ax.channel is None:
                return None  # (B, H, W): both axes windowed
            return -1
        if ax.found == "unknown":
            full = [  # (strides left out follow the window)
                isinstance(v, (tuple, list)) and len(v) == x.dim() - 1
                for v in ((window,) if strides is None else (window, strides))
            ]
            if not all(full):
                raise LurkerError(
                    f"occlusion spans the channels whole with each window, and {ax.why}; "
                    f"{HINT}, or give window and strides as tuples of {x.dim() - 1} values, "
                    "one per axis of a sample"
                )
            return -1
        return None if ax.channel is None else ax.channel - 1

    def compute(
        self,
        model: nn.Module,
        x: Tensor,
        target: Any,
        *,
        window: int | tuple[int, ...] = 8,
        strides: int | tuple[int, ...] | None = None,
        baseline: Any = None,
        internal_batch_size: int = 64,
    ) -> Explanation:
        dims = tuple(x.shape[1:])
        whole = self._whole(x, window, strides)
        win = _per_dim(window, dims, "window", whole)
        if strides is None:  # 4, or a window's size where it is smaller (window=3 alone
            # ran into the fixed default's "each step must be from 1 to its window's size")
            four = _per_dim(4, dims, "strides", whole)
            if self.axes is not None and self.axes.found == "unknown":  # the window gives
                # every axis and none is known to be the channels: 4 on each it slides over
                four = tuple(4 if w < d else 1 for w, d in zip(win, dims))
            st = tuple(min(s, w) for s, w in zip(four, win))
        else:
            st = _per_dim(strides, dims, "strides", whole)
        spots = windows(dims, win, st, (window, st if strides is None else strides))
        internal_batch_size = check_count("occlusion", "internal_batch_size", internal_batch_size)
        fw = Forward(model, x, target)
        x0 = as_baseline(baseline, x)
        B = x.shape[0]
        with torch.no_grad():
            clean = fw(x)
            f_x = clean.score
            total = torch.zeros_like(x)
            count = torch.zeros(dims, dtype=x.dtype, device=x.device)
            for sl in spots:
                count[sl] += 1
            jobs = [(w, r) for w in range(len(spots)) for r in range(B)]  # window-major
            for start in range(0, len(jobs), internal_batch_size):
                part = jobs[start : start + internal_batch_size]
                rows = torch.tensor([r for _, r in part], device=x.device)
                xb = x[rows].clone()
                for i, (w, r) in enumerate(part):
                    xb[(i, *spots[w])] = x0[(r, *spots[w])]
                drop = f_x[rows] - fw(xb, rows).score
                for i, (w, r) in enumerate(part):
                    total[(r, *spots[w])] += drop[i]
        options = {"window": win, "strides": st, "baseline": baseline}
        out = None if clean.output is None else clean.output.detach()
        # a window across every channel credits each channel with the pixel's whole drop
        c = whole if whole is not None and whole >= 0 else 0
        # (an image's (C, H, W), or a signal's (C, T): one drop per position along time)
        across = (
            whole is not None
            and win[c] == dims[c]
            and (len(dims) == 3 or (len(dims) == 2 and whole >= 0))
        )
        return self.explanation(total / count, fw, options, output=out, repeated=across)
