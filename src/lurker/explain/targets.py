"""What an explanation explains: a class of the model's output or one unit inside it.

``target`` is an int class index (every row), a sequence of ints (one per row), None or
``"top"`` (each row's top predicted class), or a unit ``(layer, channel)`` /
``(layer, channel, y, x)`` with ``layer`` a module path (``"features.3"``) or a trace
label (``"relu_4"``, ``"add_2"``: functional ops too, which no module hook reaches). A
unit's score is its activation at ``(y, x)``, or its spatial mean without a position
(the value the probe ranks units by). A module that runs several times in a forward is
refused as a unit's layer, naming its calls' trace labels (``"lin:2"``), which are
targets; on token ids too (labels of the model's trace on the ids). Which axis of a
layer's output holds its units is the probe's layout of that op
(:func:`lurker.probe.layout.layer_layout`): channels after the batch for convolutions,
the last axis for linear layers and norms on tokens or channels-last maps, sequence-first tensors inside attention; a layer whose units lurker
cannot locate is refused with the reason, unless ``unit_dim`` names the axis.

:class:`Forward` turns the target into one differentiable score per batch row, and taps
other layers' outputs on the way (Grad-CAM). A module path is tapped with a forward hook
on that module, removed after each call; any other label through the trace's hook API
(``lurker.trace`` once, then ``trace.run(x, hooks=...)`` per forward).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from numbers import Integral
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import LurkerError, close_names
from .tokens import Embedded

__all__ = ["Forward", "Scored", "UnitTarget", "by_unit", "parse_target"]


@dataclass(frozen=True)
class UnitTarget:
    """One unit: ``channel`` of ``layer``'s output, at ``(y, x)`` or spatially averaged.

    ``unit_dim``: the axis of the layer's output (counting the batch axis) that holds the
    units, for a layer whose layout lurker cannot tell (its batch axis is still found).
    """

    layer: str
    channel: int
    y: int | None = None
    x: int | None = None
    unit_dim: int | None = None

    def __str__(self) -> str:
        at = "" if self.y is None else f":{self.y}:{self.x}"
        return f"{self.layer}:{self.channel}{at}"


def parse_target(target: Any, batch: int) -> list[int] | UnitTarget | None:
    """``target`` checked and normalised: class list (one per row), a unit, or None (top)."""
    if target is None or (isinstance(target, str) and target == "top"):
        return None
    if isinstance(target, UnitTarget):
        return target
    if isinstance(target, bool):
        raise LurkerError(_TARGET_HELP.format(got=repr(target)))
    if isinstance(target, Integral):  # int, numpy's integers
        _check_class(int(target))
        return [int(target)] * batch
    if isinstance(target, Tensor) or type(target).__name__ == "ndarray":  # (torch, numpy)
        integers = (
            not (target.is_floating_point() or target.is_complex() or target.dtype == torch.bool)
            if isinstance(target, Tensor)
            else target.dtype.kind in "iu"
        )
        if not integers:  # 2.7 is no class, and True is no index
            raise LurkerError(_TARGET_HELP.format(got=repr(target)))
        target = target.tolist() if target.ndim else int(target)
        return parse_target(target, batch)
    if isinstance(target, (tuple, list)) and target and isinstance(target[0], str):
        if len(target) not in (2, 4) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in target[1:]
        ):
            raise LurkerError(
                f"a unit target is (layer, channel) or (layer, channel, y, x) with ints; got "
                f"{tuple(target)!r}"
            )
        if any(v < 0 for v in target[1:]):
            raise LurkerError(
                f"a unit target's channel and position are >= 0; got {tuple(target)!r}"
            )
        return UnitTarget(*target)
    if isinstance(target, Sequence) and not isinstance(target, str):
        values = list(target)
        if not all(isinstance(v, Integral) and not isinstance(v, bool) for v in values):
            raise LurkerError(_TARGET_HELP.format(got=repr(target)))
        values = [int(v) for v in values]
        if len(values) != batch:
            raise LurkerError(
                f"a target list has one class per row of the batch: {batch} rows, "
                f"{len(values)} targets"
            )
        for v in values:
            _check_class(v)
        return values
    raise LurkerError(_TARGET_HELP.format(got=repr(target)))


_TARGET_HELP = (
    "target {got} is not supported: give a class index (int), one per row (list of ints), "
    "None or 'top' (the top predicted class), or a unit (layer, channel[, y, x])"
)


#: what a user can do about a unit target's layer whose units lurker cannot locate
UNIT_HINT = (
    "name the axis with UnitTarget(layer, channel, unit_dim=AXIS), counting the batch axis "
    "(lurker explain --unit-dim AXIS)"
)


def class_output_error(
    out: Any,
    batch: int | None = None,
    input_shape: tuple[int, ...] | None = None,
    token_ids: bool = False,
) -> LurkerError:
    """Why a class target does not fit the model's output ``out``, and what does
    (``batch``: the rows of the input, where the output's first axis has another size;
    ``input_shape``: the input's, to tell a batch read off another axis of it;
    ``token_ids``: the input is token ids, so a 3-D output is read as a language model's
    ``(batch, tokens, vocabulary)``: on other inputs, a 1-D segmentation's ``(batch,
    classes, steps)`` say, its second axis is not the positions)."""
    example, cli_example = "('fc', 3)", "fc:3"
    if isinstance(out, Tensor) and batch is not None and out.shape[0] in (input_shape or ())[1:]:
        axis = list(input_shape or ())[1:].index(out.shape[0]) + 1
        what = (
            f"a tensor of shape {tuple(out.shape)}, whose first axis is not the batch of "
            f"{batch} rows: where the model reads its batch off axis {axis} of the input "
            f"{tuple(input_shape or ())} (a time-major (steps, batch, features) one), pass "
            f"x.movedim({axis}, 0), batch first, and move it back in a wrapper's forward "
            "(explain reads the input's first axis as its batch, one explanation per row); "
            "where it returns (classes, batch), return out.transpose(0, 1) from the wrapper"
        )
    elif isinstance(out, Tensor) and batch is not None:
        what = (
            f"a tensor of shape {tuple(out.shape)}, whose first axis is not the batch of "
            f"{batch} rows (a time-major model's (steps, batch, classes), or (classes, "
            "batch): return out[-1] or out.transpose(0, 1) from the wrapper)"
        )
    elif isinstance(out, Tensor) and out.dim() == 3 and token_ids:
        # a score per class at each position (a language model's logits): the unit target
        # alone averages over the positions, which is not the next token's score
        last = out.shape[1] - 1
        what = (
            f"a tensor of shape {tuple(out.shape)}, a score per class at each of its "
            f"{out.shape[1]} positions (a language model's (batch, tokens, vocabulary) "
            "logits). (LAYER, CLASS) alone is the class's score averaged over the "
            "positions; one position's score, such as the next-token prediction at the "
            f"last, is (LAYER, CLASS, 0, {last}) (the explorer's LAYER:CLASS:0:{last})"
        )
        example, cli_example = f"('head', 3, 0, {last})", f"head:3:0:{last}"
    elif isinstance(out, Tensor):
        what = f"a tensor of shape {tuple(out.shape)}"
    elif isinstance(out, (tuple, list)) or hasattr(out, "keys"):
        items = list(out.items()) if hasattr(out, "keys") else list(enumerate(out))
        shapes = ", ".join(
            f"{k}: {tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__}"
            for k, v in items[:6]
        )
        what = f"a {type(out).__name__} ({shapes}{', ...' if len(items) > 6 else ''})"
    else:
        what = f"a {type(out).__name__}"
    head = (
        f"a class target needs the model to return one (batch, classes) tensor; it returns "
        f"{what}. Target the class as a unit of the layer that computes its score, "
    )
    return LurkerError(
        head + f"(LAYER, CLASS) such as {example} (a module path or a trace label: "
        "lurker.trace(model, x) lists them), or wrap the model in a module whose forward "
        "returns that tensor",
        cli=head + f"--target LAYER:CLASS such as {cli_example} (a module path or a trace label: "
        "lurker trace MODEL lists them)",
    )


def check_unit(u: UnitTarget, channels: int) -> None:
    if u.channel >= channels:
        raise LurkerError(
            f"unit target {u}: channel {u.channel} is out of range; {u.layer} has "
            f"{channels} channels (0 to {channels - 1})"
        )


def unit_position(u: UnitTarget, positions: Sequence[int]) -> tuple[int, ...]:
    """The index into a unit's ``positions`` (its map's axes) of the target's ``(y, x)``,
    read as the probe stores a peak: one position axis (a ViT's tokens) is ``(0, token)``,
    more than two are merged, all but the last into ``y``; so a stored peak explains as is.
    """
    if not positions:
        raise LurkerError(
            f"unit target {u}: {u.layer}'s units have no positions (one value per sample): "
            f"target ({u.layer!r}, {u.channel}) without a position"
        )
    width = int(positions[-1])
    height = math.prod(int(n) for n in positions[:-1])
    y, x = u.y, u.x
    if y is None or x is None or not (0 <= y < height and 0 <= x < width):
        tokens = (
            f" (one axis of {width} positions, a layer of tokens: (0, token) as the probe "
            f"stores its peaks; or target ({u.layer!r}, {u.channel}) without a position, "
            "its mean over the tokens)"
            if len(positions) == 1
            else ""
        )
        raise LurkerError(
            f"unit target {u}: position ({y}, {x}) lies outside the {height}x{width} map of "
            f"{u.layer}{tokens}"
        )
    flat, index = y * width + x, []
    for n in reversed(positions):
        flat, i = divmod(flat, int(n))
        index.append(i)
    return tuple(reversed(index))


def by_unit(t: Tensor, layout: Any) -> Tensor:
    """``t`` (a layer's output, or what has its shape) as ``(B, C, *positions)``: a view,
    so writing into it writes into ``t``."""
    return t.permute(layout.batch, layout.unit, *layout.positions)


def _ids_layers(modules: dict[str, nn.Module]) -> str:
    """The module paths a unit target on token ids can name, for an error message."""
    names = [n for n in modules if n]
    more = f", ... ({len(names)} in all)" if len(names) > 40 else ""
    return ", ".join(names[:40]) + more


def _check_class(v: int) -> None:
    if v < 0:
        raise LurkerError(f"target class {v} is negative; class indices start at 0")


@dataclass
class Scored:
    """One forward: the score per row (differentiable), the model output (None when the
    forward stopped at the unit target) and the tapped layers' outputs by name."""

    score: Tensor
    output: Tensor | None
    layers: dict[str, Tensor]


class _Stop(Exception):
    """Ends a forward once everything it needs has run."""


class Forward:
    """Scores the target for batches derived from ``x`` (scaled, noised, occluded copies).

    ``rows[i]`` of each call says which row of ``x`` batch row ``i`` stands for, so that
    each copy is scored for its own row's class. ``layers``: outputs to tap (Grad-CAM).
    """

    def __init__(
        self, model: nn.Module, x: Tensor, target: Any, layers: Sequence[str] = ()
    ) -> None:
        self.model = model
        self.x = x
        self.target = parse_target(target, x.shape[0])
        self.unit = self.target if isinstance(self.target, UnitTarget) else None
        self.classes: Tensor | None = (
            torch.tensor(self.target, device=x.device) if isinstance(self.target, list) else None
        )
        self.layers = list(dict.fromkeys(layers))
        taps = [*self.layers, *([self.unit.layer] if self.unit else [])]
        # token ids: the layers are the wrapped model's, tapped while it runs on the ids
        self._ids_model: nn.Module | None = model.inner if isinstance(model, Embedded) else None
        self._modules = dict((self._ids_model or model).named_modules())
        self._trace: Any = None
        self._trace_hooks: dict[str, Any] = {}
        self.taps = list(dict.fromkeys(taps))
        for name in self.taps:
            self._check_layer(name)
        self._unit_layout: Any = None
        if self.unit is not None:
            from ..probe.layout import layer_layout  # (probe imports explain's guided ReLU)

            self._check_once(self.unit.layer)
            self._unit_layout = layer_layout(
                self._traced(), self.unit.layer, self.unit.unit_dim, hint=UNIT_HINT
            )

    def _check_once(self, name: str) -> None:
        """Refuse a unit target on a module that runs several times in a forward: which
        call's unit is meant cannot be told (each is named by its own trace label)."""
        if name not in self._modules:
            return  # a trace label names one op (a rolled label is refused by the hook)
        ops = self._traced().hook_ops(name)
        if len(ops) < 2:
            return
        calls = [
            next((m for m in op.module_outputs if m.startswith(name + ":")), op.label) for op in ops
        ]
        named = ", ".join(
            c if c == op.label else f"{c} (op {op.label})" for c, op in zip(calls, ops)
        )
        u = self.unit
        assert u is not None
        at = "" if u.y is None else f", {u.y}, {u.x}"
        raise LurkerError(
            f"unit target {u}: module {name!r} runs {len(ops)} times in a forward, and each "
            f"call has its own units; name one call by its trace label: {named} (such as "
            f"({calls[-1]!r}, {u.channel}{at}))",
            cli=f"unit target {u}: module {name!r} runs {len(ops)} times in a forward, and "
            f"each call has its own units; name one call by its trace label: {named} (such "
            f"as --target {calls[-1]}:{u.channel}{'' if u.y is None else f':{u.y}:{u.x}'})",
        )

    def _traced(self) -> Any:
        """The model's trace on one row of ``x`` (made once, when a label or a unit needs it)."""
        if self._trace is None:
            from ..capture import settled_trace

            with torch.no_grad():
                if isinstance(self.model, Embedded):
                    self._trace = settled_trace(self.model.inner, self.model.ids[:1], save="none")
                else:
                    self._trace = settled_trace(self.model, self.x[:1], save="none")
        return self._trace

    # ------------------------------------------------------------------ layers
    def _check_layer(self, name: str) -> None:
        if not isinstance(name, str) or not name:
            raise LurkerError(f"a layer is a module path or trace label (a string); got {name!r}")
        if name in self._modules:
            return
        # any other name through the trace (on token ids, the inner model's trace of them)
        from ..errors import OpKeyError

        try:
            self._traced().hook_ops(name)
        except OpKeyError as e:
            close = close_names(name, [*self._modules, *self._trace.keys()])
            hint = f" Close names: {', '.join(close)}." if close else ""
            if self._ids_model is not None:  # (the trace of the ids: after the lookup too)
                hint += f" Its modules: {_ids_layers(self._modules)}."
            raise LurkerError(
                f"layer {name!r} is not in the model: name a module path "
                f"(model.named_modules()) or a trace label (lurker.trace(model, x)).{hint}"
            ) from e

    def resolve_top(self) -> Tensor:
        """Each row's top predicted class (a forward without gradients, when needed)."""
        if self.classes is None:
            if self.unit is not None:
                raise LurkerError("a unit target has no classes")
            if isinstance(self.model, Embedded):
                self.model.rows = None
            with torch.no_grad():
                out = self._model_output(
                    self.model(self.x), self.x.shape, isinstance(self.model, Embedded)
                )
            self.classes = out.argmax(1)
            self.target = self.classes.tolist()
        return self.classes

    @staticmethod
    def _model_output(out: Any, shape: tuple[int, ...], token_ids: bool) -> Tensor:
        """The model's (batch, classes) output for an input of ``shape``, a batch of
        ``shape[0]`` rows: a batch on another axis would have each row scored by another's
        (or a class's) values. ``token_ids``: the model reads token ids (its refusal of a
        3-D output names the last token's unit)."""
        if not isinstance(out, Tensor) or out.dim() != 2:
            raise class_output_error(out, token_ids=token_ids)
        if out.shape[0] != shape[0]:
            raise class_output_error(out, shape[0], tuple(shape))
        return out

    # ------------------------------------------------------------------ forward
    def __call__(self, xb: Tensor, rows: Tensor | None = None) -> Scored:
        """Score ``xb``; ``rows`` None means ``xb`` is ``x`` itself (then "top" is read off
        this very output)."""
        if isinstance(self.model, Embedded):  # token ids: which ids each row of xb embeds
            self.model.rows = rows
        grabbed: dict[str, Tensor] = {}
        stop_after = self.unit.layer if self.unit is not None and not self.layers else None
        output: Any = None
        with self._tapped(grabbed, stop_after) as run, contextlib.suppress(_Stop):
            output = run(xb)
        for name in self.taps:
            if name not in grabbed:
                raise LurkerError(f"layer {name!r} did not run in this forward pass")
        if self.unit is not None:
            score = self._unit_score(grabbed[self.unit.layer])
            if isinstance(self.model, Embedded) and xb.requires_grad and not score.requires_grad:
                raise LurkerError(
                    f"unit target {self.unit}: {self.unit.layer!r} does not depend on the "
                    "embedding's output, where token ids are attributed (it runs before or "
                    "beside the lookup of the ids, or is that lookup itself): name a layer "
                    f"after it; the model's layers: {_ids_layers(self._modules)}"
                )
            out = output if isinstance(output, Tensor) else None
        else:
            out = self._model_output(output, xb.shape, isinstance(self.model, Embedded))
            if self.classes is None:
                if rows is not None:
                    self.resolve_top()
                else:
                    self.classes = out.detach().argmax(1)
                    self.target = self.classes.tolist()
            assert self.classes is not None
            classes = self.classes if rows is None else self.classes[rows]
            big = int(classes.max()) if len(classes) else -1
            if big >= out.shape[1]:
                raise LurkerError(
                    f"target class {big} is out of range: the model has {out.shape[1]} "
                    f"outputs (classes 0 to {out.shape[1] - 1})"
                )
            score = out.gather(1, classes.to(out.device)[:, None])[:, 0]
        return Scored(score, out, {k: grabbed[k] for k in self.layers})

    def _unit_score(self, act: Tensor) -> Tensor:
        u = self.unit
        assert u is not None
        if act.dim() < 2:
            raise LurkerError(
                f"unit target {u}: the layer's output {tuple(act.shape)} has no channels"
            )
        units = by_unit(act, self._unit_layout)
        check_unit(u, units.shape[1])
        a = units[:, u.channel]
        if u.y is None:
            return a.reshape(a.shape[0], -1).mean(1)
        return a[(slice(None), *unit_position(u, a.shape[1:]))]

    @contextlib.contextmanager
    def _tapped(self, grabbed: dict[str, Tensor], stop_after: str | None) -> Iterator[Any]:
        """A ``run(x)`` that forwards the model, keeping the taps' outputs in ``grabbed``.

        Each tapped value is the tensor the rest of the forward depends on and which no
        later in-place op modifies (a clone goes on instead), so gradients taken with
        respect to it are the layer's own.
        """
        # all on the trace as soon as one needs it: the replay refuses module hooks added
        # since the trace (they change the ops a forward runs)
        on_trace = self.taps if any(n not in self._modules for n in self.taps) else []
        on_modules = [] if on_trace else self.taps
        handles = []

        def module_hook(name: str) -> Any:
            def hook(mod: nn.Module, inp: Any, out: Any) -> Any:
                if name in grabbed:
                    raise LurkerError(
                        f"module {name!r} runs more than once in a forward; name one pass by "
                        f"its trace label ('{name}:2' for the second)"
                    )
                if not isinstance(out, Tensor):
                    raise LurkerError(
                        f"module {name!r} returns {type(out).__name__}, not a tensor; name the "
                        "op inside it (a trace label) instead"
                    )
                grabbed[name] = out
                if name == stop_after:
                    raise _Stop
                return out.clone()

            return hook

        def trace_hook(name: str) -> Any:
            def hook(op: Any, out: Any) -> Any:
                if not isinstance(out, Tensor):
                    out = next((t for t in out if isinstance(t, Tensor)), None)
                    if out is None:
                        raise LurkerError(f"{name!r} has no tensor output")
                if name in grabbed:  # a rolled label or reused module: every pass
                    raise LurkerError(f"{name!r} names several passes; name one ({op.label!r})")
                keep = out.clone()  # (an in-place op writes the replacement into `out`)
                grabbed[name] = keep
                if name == stop_after:
                    raise _Stop
                return keep.clone()

            return hook

        try:
            for name in on_modules:
                handles.append(self._modules[name].register_forward_hook(module_hook(name)))
            if on_trace:
                hooks = {name: trace_hook(name) for name in on_trace}
                tr = self._trace

                def replay(x: Tensor) -> Any:
                    return tr.run(x, save="none", hooks=hooks).output

                def run(xb: Tensor) -> Any:
                    if isinstance(self.model, Embedded):  # the ids' trace, embedding replaced
                        return self.model.run(xb, replay)
                    return replay(xb)

                yield run
            else:
                yield self.model
        finally:
            for h in handles:
                h.remove()
