"""Integrated gradients (Sundararajan et al., 2017, arXiv:1703.01365): ``(x - x0) *
integral_0^1 d score / d x (x0 + a (x - x0)) da``, the integral by Gauss-Legendre
quadrature or a Riemann sum with Captum's nodes and weights (the trapezoid's weights
corrected: see :func:`nodes`).

All steps of all rows go through the model as one batch (chunked by
``internal_batch_size`` to bound memory), one forward and one backward, rather than one
per step. The convergence delta, ``sum(attribution) - (f(x) - f(x0))`` per row, says how
far the quadrature is from completeness (the axiom the exact integral satisfies); it
and the weighted sum of the steps are computed at float32 at least (float64 for the
delta), so that a float16 model's delta is not rounded to 0.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import LurkerError
from .base import Explanation, Method, check_count, input_grad, register
from .targets import Forward

METHODS = ("gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid")


def nodes(method: str, n: int) -> tuple[list[float], list[float]]:
    """``(alphas, weights)`` of the quadrature on [0, 1]: Captum's nodes, and its weights
    but for ``riemann_trapezoid``. Captum gives the trapezoid's ``n`` nodes, spaced
    ``1 / (n - 1)``, the weights ``1 / n`` (halved at the ends), which sum to
    ``(n - 1) / n``: every attribution is that much too small (a linear model's misses
    ``1 / n`` of ``f(x) - f(x0)``). Here the trapezoid's weights are the rule's own,
    ``1 / (n - 1)`` (halved at the ends), summing to 1: ``n / (n - 1)`` times Captum's."""
    n = check_count("integrated gradients", "n_steps", n)
    if method == "gausslegendre":
        t, w = np.polynomial.legendre.leggauss(n)
        return list(0.5 * (t + 1)), list(0.5 * w)
    if method not in METHODS:
        raise LurkerError(f"unknown integration method {method!r}; supported: {', '.join(METHODS)}")
    if n < 2:
        raise LurkerError(f"a Riemann sum needs n_steps >= 2, got {n}")
    w = [1 / n] * n
    kind = method.split("_")[1]
    if kind == "trapezoid":  # nodes 1 / (n - 1) apart, so weights of 1 / (n - 1)
        w = [1 / (n - 1)] * n
        w[0] /= 2
        w[-1] /= 2
        a = torch.linspace(0, 1, n, dtype=torch.float64)
    elif kind == "left":
        a = torch.linspace(0, 1 - 1 / n, n, dtype=torch.float64)
    elif kind == "middle":
        a = torch.linspace(1 / (2 * n), 1 - 1 / (2 * n), n, dtype=torch.float64)
    else:
        a = torch.linspace(1 / n, 1, n, dtype=torch.float64)
    return a.tolist(), w


def as_baseline(baseline: Any, x: Tensor) -> Tensor:
    """A baseline broadcast to ``x``: None (zeros), a number, or a tensor shaped like
    ``x``, one row of it, or anything that broadcasts."""
    if baseline is None:
        return torch.zeros_like(x)
    if isinstance(baseline, (int, float)) and not isinstance(baseline, bool):
        x0 = torch.full_like(x, float(baseline))
    elif not isinstance(baseline, Tensor):
        raise LurkerError(
            f"baseline must be None, a number or a tensor; got {type(baseline).__name__}: "
            "pass None (zeros), a number (baseline=0.5) or a tensor shaped like one row of "
            f"the input {tuple(x.shape[1:])}"
        )
    else:
        try:
            x0 = baseline.detach().to(x.device, x.dtype).expand_as(x)
        except RuntimeError as e:
            raise LurkerError(
                f"baseline of shape {tuple(baseline.shape)} does not broadcast to the input "
                f"{tuple(x.shape)}; pass one shaped like a row of it {tuple(x.shape[1:])} "
                f"(the same for every row), like the input itself {tuple(x.shape)} (one per "
                "row), or a number"
            ) from e
    if not bool(torch.isfinite(x0).all()):  # every map made from it would be NaN
        raise LurkerError("baseline holds NaN or inf values; give a finite baseline")
    return x0


def integrated_gradients(
    fw: Forward,
    x: Tensor,
    x0: Tensor,
    n_steps: int,
    method: str,
    internal_batch_size: int | None,
) -> Tensor:
    """The attribution of every row of ``x`` against ``x0``: steps batched, step-major."""
    alphas, weights = nodes(method, n_steps)
    B = x.shape[0]
    a = torch.tensor(alphas, dtype=x.dtype, device=x.device)
    # the weighted sum of the steps' gradients at float32 at least: a float16 sum of 50
    # terms is off by a few 1e-3 of itself
    wide = torch.promote_types(x.dtype, torch.float32)
    w = torch.tensor(weights, dtype=wide, device=x.device)
    shape = (-1,) + (1,) * (x.dim() - 1)
    diff = x - x0
    total = len(alphas) * B
    chunk = (
        total
        if internal_batch_size is None
        else check_count("integrated gradients", "internal_batch_size", internal_batch_size)
    )
    rows_all = torch.arange(B, device=x.device).repeat(len(alphas))
    step_all = torch.arange(len(alphas), device=x.device).repeat_interleave(B)
    acc = torch.zeros_like(x, dtype=wide)
    for start in range(0, total, chunk):
        rows = rows_all[start : start + chunk]
        steps = step_all[start : start + chunk]
        xb = (x0[rows] + a[steps].view(shape) * diff[rows]).requires_grad_(True)
        g = input_grad(fw(xb, rows).score, xb)
        acc.index_add_(0, rows, g * w[steps].view(shape))
    return (acc * diff.to(wide)).to(x.dtype)


def convergence_delta(attr: Tensor, f_x: Tensor, f_0: Tensor) -> Tensor:
    """``sum(attr) - (f_x - f_0)`` per row, computed in float64: at the model's float16
    it rounds to a few 1e-3 of the scores and can read 0 where completeness is off by
    more. Returned at float32 at least (the model's dtype where that is wider)."""
    d = attr.detach().double().reshape(attr.shape[0], -1).sum(1)
    d = d - (f_x.detach().double() - f_0.detach().double())
    return d.to(torch.promote_types(attr.dtype, torch.float32))


@register
class IntegratedGradients(Method):
    name = "integrated_gradients"
    signed = True
    summary = "path integral of gradients from a baseline, with its convergence delta (Sundararajan et al., 2017)"

    def compute(
        self,
        model: nn.Module,
        x: Tensor,
        target: Any,
        *,
        baseline: Any = None,
        n_steps: int = 50,
        integration: str = "gausslegendre",
        internal_batch_size: int | None = None,
    ) -> Explanation:
        fw = Forward(model, x, target)
        x0 = as_baseline(baseline, x)
        if fw.unit is None:
            fw.resolve_top()
        attr = integrated_gradients(fw, x, x0, n_steps, integration, internal_batch_size)
        with torch.no_grad():
            ends = fw(torch.cat([x, x0]), torch.arange(x.shape[0], device=x.device).repeat(2))
        f_x, f_0 = ends.score[: x.shape[0]], ends.score[x.shape[0] :]
        delta = convergence_delta(attr, f_x, f_0)
        out = None if ends.output is None else ends.output[: x.shape[0]].detach()
        options = {"n_steps": n_steps, "integration": integration, "baseline": baseline}
        return self.explanation(attr, fw, options, output=out, delta=delta.detach())
