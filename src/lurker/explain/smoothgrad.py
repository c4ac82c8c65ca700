"""SmoothGrad (Smilkov et al., 2017, arXiv:1706.03825): the mean of the gradients of
noisy copies of the input, ``x + N(0, stdev^2)``, as Captum's ``NoiseTunnel`` with
``nt_type="smoothgrad"`` over ``Saliency`` (``abs=False``: the signed gradient; Captum's
default Saliency takes the absolute value of each sample's gradient first, ``abs=True``).

All samples of all rows go through the model as one batch (chunked by
``internal_batch_size``), not one forward per sample. ``noise`` may be given (shape
``(n_samples, *x.shape)``) to make results reproducible or to compare with another
implementation on the same draws: it is added as given (``stdev`` and ``seed`` are then
unused, and recorded as None).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..errors import LurkerError
from .base import (
    Explanation,
    Method,
    check_count,
    check_real,
    check_seed,
    input_grad,
    register,
)
from .targets import Forward


@register
class SmoothGrad(Method):
    name = "smoothgrad"
    signed = True
    summary = "mean gradient over Gaussian-noised copies of the input (Smilkov et al., 2017)"

    def compute(
        self,
        model: nn.Module,
        x: Tensor,
        target: Any,
        *,
        n_samples: int = 25,
        stdev: float = 0.15,
        abs: bool = False,
        noise: Tensor | None = None,
        seed: int | None = None,
        internal_batch_size: int | None = None,
    ) -> Explanation:
        seed = check_seed("smoothgrad", seed)  # (before any forward: a bad one said first)
        fw = Forward(model, x, target)
        if fw.unit is None:
            fw.resolve_top()  # of the clean input, not of each noisy copy
        B = x.shape[0]
        if noise is None:
            n_samples = check_count("smoothgrad", "n_samples", n_samples)
            if isinstance(stdev, Tensor) and stdev.dim() > 0:  # a scale per channel, say
                if not bool((torch.isfinite(stdev) & (stdev >= 0)).all()):
                    raise LurkerError(
                        "smoothgrad: stdev must be finite numbers >= 0, got a tensor holding "
                        "NaN, inf or negative values"
                    )
            else:
                stdev = check_real("smoothgrad", "stdev", stdev)
            if seed is not None:  # drawn on the CPU: a seed gives the same noise on any device
                gen = torch.Generator().manual_seed(seed)
                noise = torch.randn((n_samples, *x.shape), generator=gen, dtype=x.dtype)
                noise = noise.to(x.device)
            else:
                noise = torch.randn((n_samples, *x.shape), device=x.device, dtype=x.dtype)
            noise = noise * stdev
        else:
            if (
                not isinstance(noise, Tensor)
                or noise.dim() != x.dim() + 1
                or noise.shape[1:] != x.shape
            ):
                got = tuple(noise.shape) if isinstance(noise, Tensor) else type(noise).__name__
                raise LurkerError(
                    f"noise must have shape (n_samples, *x.shape) = (n, {', '.join(map(str, x.shape))}); got {got}"
                )
            noise = noise.to(x.device, x.dtype)
            if not bool(torch.isfinite(noise).all()):
                raise LurkerError("smoothgrad: noise holds NaN or inf values; give finite draws")
            n_samples = noise.shape[0]
            stdev = seed = None  # type: ignore[assignment]  # (the options record what was used)
        total = n_samples * B
        chunk = (
            total
            if internal_batch_size is None
            else check_count("smoothgrad", "internal_batch_size", internal_batch_size)
        )
        noisy = (x.unsqueeze(0) + noise).reshape(total, *x.shape[1:])  # sample-major
        rows_all = torch.arange(B, device=x.device).repeat(n_samples)
        acc = torch.zeros_like(x)
        for start in range(0, total, chunk):
            rows = rows_all[start : start + chunk]
            xb = noisy[start : start + chunk].clone().requires_grad_(True)
            g = input_grad(fw(xb, rows).score, xb)
            acc.index_add_(0, rows, g.abs() if abs else g)
        options = {"n_samples": n_samples, "stdev": stdev, "abs": abs, "seed": seed}
        if stdev is None:
            options["noise"] = "given"
        return self.explanation(acc / n_samples, fw, options, signed=not abs)
