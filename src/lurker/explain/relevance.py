"""Concept relevance: which units of a layer carried a decision (conditional LRP).

As zennit-crp computes it (Achtibat et al., 2023, "From attribution maps to
human-understandable explanations through Concept Relevance Propagation"), reimplemented
on lurker's LRP engine (zennit-crp pins torch < 2): one LRP backward gives the relevance
arriving at the chosen layer, summed per channel, which ranks the units; then the
backward is repeated from that layer alone, its relevance masked to one channel, which
gives that unit's conditional heatmap in input space (relevance that bypasses the layer,
by a residual's identity, is in no unit's map). The masked backwards are batched: the
input is repeated once per (row, unit), each copy with its own mask, so ``k`` units cost
``k / batch_size`` passes, not ``k``.

Conservation: the units' relevances sum to the layer's total (they partition it), and
each heatmap sums to its unit's relevance where the rules below the layer conserve
(biases zero, tiny epsilon); :attr:`Concepts.heatmap_sums` lets one check.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import LurkerError
from .base import (
    check_input,
    input_errors,
    no_param_grads,
    outside_inference_mode,
    untouched,
)
from .lrp import SUPPORTED, Engine, NoRule, QuantizedNoRule, _warn_leaks
from .targets import UnitTarget, by_unit

__all__ = ["Concepts", "concepts"]


@dataclass
class Concepts:
    """The units of ``layer`` ranked by their share of the relevance, per batch row.

    ``relevance`` (B, C): every channel's relevance at the layer; ``total`` (B,): the
    layer's total; ``units`` (B, k): the top-k channels, most relevant first (signed:
    positive relevance supports the target); ``unit_relevance`` (B, k) their relevance;
    ``heatmaps`` (B, k, *input shape[1:]): each unit's conditional relevance in input
    space.
    """

    layer: str
    target: list[int] | UnitTarget
    composite: str
    relevance: Tensor
    total: Tensor
    units: Tensor
    unit_relevance: Tensor
    heatmaps: Tensor
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def heatmap_sums(self) -> Tensor:
        """(B, k): each conditional heatmap's sum, to hold against ``unit_relevance``."""
        return self.heatmaps.flatten(2).sum(2)

    def __repr__(self) -> str:
        """One line (the dataclass's printed every tensor, heatmaps included: a page of
        numbers ending a notebook cell): the layer, target, and each row's top units."""
        target = self.target
        if isinstance(target, list) and len(target) > 8:
            target_text = f"[{', '.join(map(str, target[:8]))}, ... ({len(target)} rows)]"
        else:
            target_text = str(target)
        rows = self.units.tolist()
        top = ", ".join(
            "[" + ", ".join(map(str, r[:8])) + (", ...]" if len(r) > 8 else "]") for r in rows[:2]
        )
        top += f", ... ({len(rows)} rows)" if len(rows) > 2 else ""
        return (
            f"<Concepts {self.composite} at {self.layer!r}: target {target_text}, "
            f"top units {top}, heatmaps {tuple(self.heatmaps.shape)}>"
        )


@outside_inference_mode
def concepts(
    model: nn.Module,
    x: Tensor,
    target: Any = None,
    layer: str = "",
    top: int = 8,
    composite: str | None = None,
    units: list[int] | None = None,
    batch_size: int = 16,
    tolerance: float = 1e-3,
    unit_dim: int | None = None,
    **params: Any,
) -> Concepts:
    """Rank ``layer``'s units by their relevance for ``target`` and give each of the
    ``top`` units (or the given ``units``) its conditional heatmap. ``layer``: a module
    path or trace label; its units are on the axis the probe finds for it (channels of a
    convolution, the last axis of tokens or channels-last maps; see
    :func:`~lurker.explain.targets.unit_layout`), or on ``unit_dim`` (counting the batch
    axis) for a layer lurker cannot read. ``composite`` and ``params`` (``epsilon``,
    ``stabilizer``, ``gamma``, ``low``, ``high``) as for ``method="lrp"``. The model is
    left as it was (hooks, ``requires_grad``), however this exits.
    """
    x = check_input(model, x, "concepts")
    if not layer:
        raise LurkerError("concepts needs layer=: a module path or trace label")
    if not isinstance(top, int) or top < 1:
        raise LurkerError(f"top must be a positive int, got {top!r}")
    if batch_size < 1:
        raise LurkerError(f"batch_size must be >= 1, got {batch_size}")
    with untouched(model), no_param_grads(model), torch.enable_grad():
        with input_errors(model, x):  # a ViT given the wrong image size, ...
            try:
                eng = Engine(model, x, composite, **params)
            except LurkerError as e:
                raise _no_rule(e) from None
            rel, tgt = eng.run(x, target, at=layer, mask=None)
        _warn_leaks(rel, tolerance)
        if rel.layer is None:
            raise LurkerError(
                f"no relevance reached layer {layer!r}: it is not between the input and the target"
            )
        at = rel.layer
        if at.dim() < 2:
            raise LurkerError(f"layer {layer!r} has output {tuple(at.shape)}: no channels to rank")
        layout = eng.layout(layer, unit_dim)
        by = by_unit(at, layout)  # (B, C, *positions)
        per = by.reshape(by.shape[0], by.shape[1], -1).sum(2)  # (B, C)
        C = per.shape[1]
        if units is not None:
            bad = [u for u in units if not 0 <= u < C]
            if bad:
                raise LurkerError(
                    f"unit {bad[0]} out of range: {layer!r} has {C} channels (0 to {C - 1})"
                )
            chosen = torch.tensor(units, device=per.device).expand(per.shape[0], -1)
        else:
            chosen = per.argsort(1, descending=True)[:, : min(top, C)]
        B, k = chosen.shape
        rows = torch.arange(B, device=x.device).repeat_interleave(k)
        chans = chosen.reshape(-1)
        heat = []
        for s in range(0, B * k, batch_size):
            r, c = rows[s : s + batch_size], chans[s : s + batch_size]
            shape = list(at.shape)
            shape[layout.batch] = len(r)
            mask = torch.zeros(shape, device=x.device, dtype=at.dtype)
            by_unit(mask, layout)[torch.arange(len(r)), c] = 1  # the unit's every position
            t = tgt if isinstance(tgt, UnitTarget) else [tgt[int(i)] for i in r]
            part, _ = eng.run(x[r], t, at=layer, mask=mask, known=at.index_select(layout.batch, r))
            heat.append(part.input)
        heatmaps = torch.cat(heat).reshape(B, k, *x.shape[1:])
    return Concepts(
        layer=layer,
        target=tgt,
        composite=eng.composite,
        relevance=per.detach(),
        total=per.sum(1).detach(),
        units=chosen.detach(),
        unit_relevance=per.gather(1, chosen).detach(),
        heatmaps=heatmaps.detach(),
        options={"top": top, "batch_size": batch_size, **params},
    )


def _no_rule(e: LurkerError) -> LurkerError:
    """LRP's refusal of a layer it has no rule for (an LSTM), said for concept relevance,
    which propagates LRP from the output through every layer, whichever layer it ranks:
    what to use instead is a method that needs no rule; any other error as it is."""
    if not isinstance(e, NoRule):
        return e
    return LurkerError(no_rule_said(e))


def no_rule_said(e: NoRule, instead: str = "integrated_gradients") -> str:
    """Concept relevance's refusal for LRP's ``e``, suggesting the gradient method
    ``instead``: a caller that knows the model refuses integrated gradients (the explorer,
    which runs it from zeros only) names one that runs. A quantized layer's refusal names
    the fixes that work there (a gradient method's gradients are as absent)."""
    if isinstance(e, QuantizedNoRule):
        return (
            "concept relevance is LRP, propagated from the output through every layer, and "
            + e.said()
        )
    return (
        f"concept relevance is LRP, propagated from the output through every layer, and LRP "
        f"has no rule for {e.where} (supported: {SUPPORTED}). Instead, attribute the "
        f"decision with a gradient method (lurker.explain(model, x, method={instead!r})), "
        "Grad-CAM at a convolution's map (method='gradcam', layer=...), or a unit target "
        "(target=(layer, channel)) to see what drives one unit."
    )
