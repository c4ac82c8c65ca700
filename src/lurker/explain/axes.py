"""Which axis of a model's input holds the channels, and which are an image's rows and
columns: a heatmap sums over the channels, Grad-CAM scales its map to the rows and
columns and occlusion's windows span the channels whole.

lurker used to take every input as ``(B, C, H, W)``; a model that takes channels-last
``(B, H, W, C)`` (TF ports, NHWC wrappers that permute inside ``forward``) then got a
heatmap summed over its rows, without a word. :func:`input_axes` asks the model instead:
it traces one row, follows the input's axes through the graph (permutes, reshapes that
keep an axis, elementwise ops: :func:`lurker.graph.receptive.follow_axes`) to the first op
that reads an axis as channels (a convolution, a batch/group norm, a linear layer or
LayerNorm over the last axis: :func:`lurker.probe.layout.own_unit_axis`), and takes the
input axis that lands there. ``channel_dim=`` names it instead.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import LurkerError, collected

__all__ = ["InputAxes", "graph_input_axes", "graph_signal_layout", "input_axes"]

#: what a user can do where lurker cannot tell
HINT = "pass channel_dim= (the input's channel axis, counting the batch axis: 1 or -1)"


@dataclass(frozen=True)
class InputAxes:
    """Where an input ``(B, ...)`` keeps its channels and its image (axes of the input,
    the batch axis 0 counted).

    ``channel``: the channel axis, None where there is none (a one-channel ``(B, H, W)``
    image) or lurker cannot tell. ``image``: the rows and columns axes, in the input's
    order; None where the input is not an image (a ``(B, C, L)`` sequence) or lurker
    cannot tell (``found == "unknown"``). ``found``: ``"graph"`` (from the model's first
    op that reads channels), ``"channel_dim"`` (named by the caller), ``"assumed"`` (the
    graph does not say; the ``(B, C, H, W)`` or ``(B, H, W)`` convention) or
    ``"unknown"``. ``why``: how, in words, for errors. ``waveform``: a ``(B, T)`` input
    the model gives its one channel itself in front of a ``Conv1d`` (``x.unsqueeze(1)``):
    a one-channel signal with no channel axis of its own.
    """

    channel: int | None
    image: tuple[int, int] | None
    found: str
    why: str
    waveform: bool = False

    def not_an_image(self, shape: Any, what: str) -> LurkerError:
        """The error for ``what`` (a heatmap, Grad-CAM) asked of an input that is not an
        image, or whose channel axis lurker cannot tell."""
        fix = (
            HINT
            if self.found == "unknown"
            else "use the attribution itself (.attribution), which has the input's shape"
        )
        return LurkerError(
            f"{what} needs an image input (B, C, H, W), (B, H, W, C) or (B, H, W), and this "
            f"input {tuple(shape)} is not one lurker can read: {self.why}; {fix}."
        )


def input_axes(model: nn.Module, x: Tensor, channel_dim: int | None = None) -> InputAxes:
    """Where ``x`` (the batch a method explains) holds its channels and image axes:
    ``channel_dim`` where given (checked), else from the model's graph (:mod:`this
    module <lurker.explain.axes>`), else the convention (channels on axis 1 of a 4-D
    input, a 3-D input a one-channel image) unless the input looks channels-last (a last
    axis of 1, 3 or 4 values and an axis 1 of others), which is left unknown: the
    heatmap, Grad-CAM and occlusion's default window then refuse, naming ``channel_dim``."""
    shape = tuple(x.shape)
    if channel_dim is not None:
        return _named(channel_dim, shape)
    found = _from_graph(model, x)
    if found is not None:
        return found
    return _convention(
        shape,
        "the model's graph does not show which of its axes holds the channels (no op reads "
        "one of them whole as channels, or the model could not be traced)",
    )


def _named(channel_dim: Any, shape: tuple[int, ...]) -> InputAxes:
    nd = len(shape)
    if not isinstance(channel_dim, int) or isinstance(channel_dim, bool):
        raise LurkerError(
            f"channel_dim must be an int (the input's channel axis, counting the batch "
            f"axis), got {channel_dim!r}"
        )
    if not -nd <= channel_dim < nd or channel_dim % nd == 0:
        raise LurkerError(
            f"channel_dim={channel_dim} is not a channel axis of the input {shape}: an int "
            f"from 1 to {nd - 1} (axis 0 is the batch) or negative from the end"
        )
    c = channel_dim % nd
    return _channels_at(c, nd, "channel_dim", f"channel_dim={channel_dim}")


def _channels_at(c: int, nd: int, found: str, how: str) -> InputAxes:
    """Channels on axis ``c`` of an ``nd``-axis input: an image where that leaves two axes
    besides the batch (the input's own axes decide: a model may read the rows and columns
    already flattened into tokens or pooled away), else not an image, saying why."""
    rest = [d for d in range(1, nd) if d != c]
    if len(rest) == 2:
        return InputAxes(c, (rest[0], rest[1]), found, how)
    return InputAxes(
        c,
        None,
        found,
        f"{how}, which leaves the input {len(rest)} ax{'is' if len(rest) == 1 else 'es'} "
        "besides the batch, a sequence rather than an image's rows and columns",
    )


def _convention(shape: tuple[int, ...], why: str) -> InputAxes:
    nd = len(shape)
    if nd == 4:
        if shape[-1] in (1, 3, 4) and shape[1] not in (1, 3, 4):
            return InputAxes(
                None,
                None,
                "unknown",
                f"{why}, and its last axis ({shape[-1]}) looks like channels while axis 1 "
                f"({shape[1]}) does not, so lurker cannot tell (B, C, H, W) from (B, H, W, C)",
            )
        return InputAxes(1, (2, 3), "assumed", f"{why}; taken as (B, C, H, W)")
    if nd == 3:
        return InputAxes(None, (1, 2), "assumed", f"{why}; taken as a one-channel (B, H, W)")
    return InputAxes(None, None, "assumed", f"{why}; it has {nd - 1} axes besides the batch")


# model -> {(a row's shape, dtype, device, training, its modules): what its graph says}: a
# trace per explain call would cost every method of the explorer's page a trace of the model
_FOUND: weakref.WeakKeyDictionary[nn.Module, dict[Any, InputAxes | None]] = (
    weakref.WeakKeyDictionary()
)


def _from_graph(model: nn.Module, x: Tensor) -> InputAxes | None:
    """From the first op the input reaches that reads an axis as channels; None where the
    model cannot be traced or no such op reads an axis of the input whole. Remembered per
    model and input shape (weakly: a model freed is forgotten)."""
    # the modules too: a model whose layers were replaced since (a channels-last stem put
    # in front) is asked again, not answered for the model it was
    modules = tuple((id(m), type(m)) for m in model.modules())
    key = (tuple(x.shape[1:]), x.dtype, x.device, model.training, modules)
    try:
        known = _FOUND.setdefault(model, {})
    except TypeError:  # a model that cannot be weakly referenced: asked each time
        known = {}
    if key not in known:
        known[key] = _traced(model, x)
    return known[key]


def _traced(model: nn.Module, x: Tensor) -> InputAxes | None:
    from ..capture import settled_trace
    from .base import untouched

    tr = None
    for rows in (x[:1], x):  # one row is cheaper; a train-mode BatchNorm1d needs two
        try:
            # the trace's own warnings are about tracing, not the explanation: dropped
            with collected(), untouched(model), torch.no_grad():
                tr = settled_trace(model, rows, save="none")
            break
        except Exception:  # no graph: the convention decides
            continue
    return None if tr is None else _read(tr, x.dim())


def graph_input_axes(graph: Any, nd: int) -> InputAxes | None:
    """How a recorded graph (a :class:`~lurker.capture.Trace`, or a run's stored
    :class:`~lurker.graph.Graph`) reads the axes of its first input of ``nd`` axes (the
    batch counted): what :func:`input_axes` finds, from a graph already at hand (the
    explorer asks it of a run without tracing the model). None where the graph does not
    say (no op reads one of the input's axes whole as channels)."""
    return _read(graph, nd)


def graph_signal_layout(graph: Any, shape: Any) -> tuple[int, int, bool] | None:
    """``(C, T, channels_last)`` where samples of ``shape`` (the batch not counted) are
    1-D signals as ``graph`` reads them. Two axes: the first op that reads one of the
    input's axes as channels (a ``Conv1d``'s ``(N, C, T)``; channels last through a
    transpose into one, an ``LSTM``/``GRU`` with ``batch_first``, a ``Linear`` per step).
    One axis ``(T,)``: a raw waveform the model gives a channel axis of 1 in front of a
    ``Conv1d`` (``x.unsqueeze(1)``, ``x.view(N, 1, T)``, ``x[:, None]``), a one-channel
    signal ``(1, T, False)``, served as ``(1, T)`` (:func:`_one_channel`). None for other
    shapes, ids an embedding looks up, features a ``Linear`` reads, a one-channel image
    the model unsqueezes, or a graph that does not say. The one rule the explorer, the
    probe, unit images and featviz tell signals by."""
    from ..vocab import reads_ids

    if shape is None or len(shape) not in (1, 2):
        return None
    try:
        if reads_ids(graph):  # ids looked up per position are no signal
            return None
        if len(shape) == 1:
            wave = _read(graph, 2)
            return (1, int(shape[0]), False) if wave is not None and wave.waveform else None
        axes = _read(graph, 3)
    except Exception:  # no graph, or one the axis rules cannot follow: tells nothing
        return None
    if axes is None or axes.image is not None or axes.channel not in (1, 2):
        return None
    if axes.channel == 1:
        return int(shape[0]), int(shape[1]), False
    return int(shape[1]), int(shape[0]), True


def _read(tr: Any, nd: int) -> InputAxes | None:
    found = _first_reader(tr, nd)
    if found is None:
        return None
    shape, op, unit, args = found
    if nd == 2 and _one_channel(tr, found):
        why = f"{op.name.rstrip('_')} ({op.label}) reads it as a one-channel signal"
        return InputAxes(None, None, "graph", why, waveform=True)
    return _doubted(_at(op, unit, args, nd), shape)


def _first_reader(tr: Any, nd: int) -> tuple[tuple[int, ...], Any, int, list] | None:
    """The first op that reads an axis of the graph's first input (of ``nd`` axes) as its
    channels: ``(the input's shape, the op, its unit axis, [(argument, ref, {input axis:
    axis of that argument})])`` for the arguments that carry input axes whole; None where
    no op does (or the first input has another number of axes)."""
    from ..graph.nodes import OpRef, refs
    from ..graph.receptive import follow_axes
    from ..probe.layout import own_unit_axis

    first = next((op for op in tr.ops if op.kind == "input" and op.outputs), None)
    if first is None or len(first.outputs[0].shape) != nd:
        return None
    # (node, output) -> {input axis: axis of that tensor}, for the axes carried whole
    carried: dict[tuple[int, int], dict[int, int]] = {(first.index, 0): {d: d for d in range(nd)}}
    for op in tr.ops:
        if op.kind != "op" or not op.outputs:
            continue
        args = [
            (j, r, carried[(r.index, r.output)])
            for j, r in enumerate(refs(op))
            if type(r) is OpRef and (r.index, r.output) in carried
        ]
        if not args:
            continue
        unit = own_unit_axis(op)
        if unit is not None:
            return tuple(first.outputs[0].shape), op, unit[0], args
        for k in range(len(op.outputs)):
            entries = [
                (j, e, tuple(tr.ops[r.index].outputs[r.output].shape), d)
                for j, r, m in args
                for d, e in m.items()
            ]
            try:
                where = follow_axes(op, k, [t[:3] for t in entries], tr)
            except Exception:  # an op the rules do not know: nothing carried
                where = [None] * len(entries)
            out: dict[int, int] = {}
            for (_, _, _, d), w in zip(entries, where):
                if w is not None:
                    out.setdefault(d, w[0])
            if out:
                carried[(op.index, k)] = out
    return None


def _one_channel(tr: Any, found: tuple[tuple[int, ...], Any, int, list]) -> bool:
    """Whether a graph's ``(B, T)`` input is a one-channel signal: the first op that reads
    channels reads a ``(B, 1, T)`` tensor channels first (a ``Conv1d``, a
    ``BatchNorm1d``), the input's batch on its axis 0, its one axis along the time axis 2
    and the size-1 channel axis made by the model (``x.unsqueeze(1)``, ``x.view(B, 1,
    T)``, ``x[:, None]``). A ``Linear`` reading the values as features, or one per value
    (``x.unsqueeze(-1)``: a tabular model's per-feature tokens), is not. ``found``: that
    op, as :func:`_first_reader` gives it."""
    from ..graph.nodes import OpRef

    _, op, unit, args = found
    for j, r, m in args:
        if j != 0 or type(r) is not OpRef:
            continue
        shape = tuple(tr.ops[r.index].outputs[r.output].shape)
        return (
            len(shape) == 3
            and unit % 3 == 1
            and shape[1] == 1
            and len(op.outputs[0].shape) == 3
            and m.get(0) == 0
            and m.get(1) == 2
        )
    return False


def _doubted(found: InputAxes | None, shape: tuple[int, ...]) -> InputAxes | None:
    """``found``, unless it reads the last axis as channels (a Linear or LayerNorm over
    it) of an input that looks like ``(B, C, H, W)`` (axis 1 of 1, 3 or 4 values, the
    last of others): a channels-last patch embedding and a layer applied along an image's
    rows look alike in the graph, and a heatmap summed over the wrong one would be
    silently wrong, so that is left for ``channel_dim=`` to say."""
    if (
        found is None
        or len(shape) != 4
        or found.channel != 3
        or shape[1] not in (1, 3, 4)
        or shape[3] in (1, 3, 4)
    ):
        return found
    return InputAxes(
        None,
        None,
        "unknown",
        f"{found.why}, but the input {shape} looks like (B, C, H, W) with {shape[1]} "
        f"channel{'s' if shape[1] > 1 else ''}, so lurker cannot tell a channels-last input "
        "from a layer applied along the image's rows",
    )


def _at(op: Any, unit: int, args: list, nd: int) -> InputAxes | None:
    """The axes as read by ``op``, the first op that reads an axis as its channels."""
    out_nd = len(op.outputs[0].shape)
    name = op.name.rstrip("_")
    m: dict[int, int] = {}
    for _, _, mm in args:
        m.update({d: e for d, e in mm.items() if d not in m})
    where = f"{name} ({op.label})"
    batch = m.get(0)
    ch = [d for d, e in m.items() if d != 0 and e == unit % out_nd]
    positions = [e for e in range(out_nd) if e not in (unit % out_nd, batch)]
    landed = sorted(d for d, e in m.items() if d != 0 and e in positions)
    if ch:  # (``x.flatten(2).transpose(1, 2)`` before a Linear is still an image)
        return _channels_at(ch[0], nd, "graph", f"{where} reads axis {ch[0]} as channels")
    if nd == 3 and len(positions) == 2 and landed == [1, 2]:
        return InputAxes(None, (1, 2), "graph", f"{where} reads it as a one-channel image")
    return None  # it reads none of the input's axes as channels: the convention decides
