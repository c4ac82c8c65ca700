"""Which axis of an op's output is the batch, which the units, which the positions.

The probe must never read "dim 0 is the batch, dim 1 the channel" into a tensor that is
laid out otherwise (``(B, H, W, C)`` in Swin, ``(L, B, E)`` inside a sequence-first
``nn.MultiheadAttention``, windows folded into the batch): that gives silently wrong
units. :func:`infer_layouts` works the layout out for every op of a trace:

- **Batch axis**, from the trace itself: the model is replayed on batches of 2x and 3x
  the traced one; the axis whose size grows by exactly those factors is the batch. An
  axis that grows by them but holds more than one slot per sample (``2m -> 3m``: windows
  folded into the batch) or no axis at all (weights, position tables) means the op has
  no per-sample activation to probe: it is skipped, with that reason. Where every op
  keeps axis 0 as the batch by what it computes (a CNN), the trace says so without the
  replay (:func:`_traced_batch_axes`).
- **Unit axis**, from the op's semantics, carried along the graph: convolutions and
  batch/group/instance norms make units on the axis after the batch (``NC...``); linear
  layers, ``layer_norm``, matmuls with a weight and RNNs (their hidden units) make them on
  the last axis. Every other op carries its parents' unit axis where it keeps that axis
  whole (elementwise ops, permutes, reshapes that keep the axis and what comes before it,
  slicing, concatenation; the same per-axis rules as :mod:`lurker.graph.receptive`);
  parents that disagree, or an op that mixes or splits the axis (attention heads), leave
  it unknown. Unknown -> the op is skipped with a reason, unless the caller names the axis
  (``unit_dim``). A batch folded with other slots cannot be fixed so: its reason names the
  first layer after it where the batch has an axis of its own again.
- **Positions** are the remaining axes, kept as they are (one or two; more are merged
  into two). Token axes made by flattening a conv's spatial grid (ViT patch embeddings)
  are followed through the graph too, so each token maps back to its patch box; tokens
  that come from elsewhere (the class token) have no box.
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
import weakref
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from ..errors import LurkerError
from ..graph.receptive import RF, follow_axes, receptive_fields
from ..ops.catalogue import QUANTIZED_CONV, QUANTIZED_LINEAR, bind

if TYPE_CHECKING:
    from ..capture.trace import Trace
    from ..graph.nodes import Op

__all__ = [
    "PATCH_TOKENS",
    "UNIT_DIM_HINT",
    "Layout",
    "Skip",
    "as_units",
    "cached_layouts",
    "infer_layouts",
    "layer_layout",
    "layer_name",
    "own_unit_axis",
    "patch_grid",
    "position_box",
    "position_frames",
    "token_axes",
]

_CONV = {  # units on the axis after the batch: name -> spatial dims
    **{f"{p}{n}d": n for p in ("conv", "conv_transpose") for n in (1, 2, 3)},
    **QUANTIZED_CONV,
}
#: aten's convolutions of any dims, transposed or not (graphs of make_fx, decomposed exports)
_ATEN_CONV = {"convolution", "_convolution"}
_CHANNEL_NORMS = {"batch_norm", "instance_norm", "group_norm"}
_LAST_AXIS = {  # units on the last axis: hidden units of RNNs (nn.LSTM, nn.GRU, nn.RNN) too
    "linear", "embedding", "_native_multi_head_attention", "lstm", "gru", "rnn_tanh", "rnn_relu",
    "lstm_cell", "gru_cell", "rnn_tanh_cell", "rnn_relu_cell", *QUANTIZED_LINEAR,
}  # fmt: skip
_WEIGHT_PRODUCTS = {"matmul", "mm", "bmm", "addmm"}


@dataclass(frozen=True)
class Layout:
    """Where batch, units and positions are in one op's output (axes of the full output).

    ``boxes``: for one position axis of tokens that map to patches, each token's
    half-open input box ``(y0, y1, x0, x1)``, ``None`` for a token with no position.
    ``source`` says how the unit axis was found: the op's own semantics (``"conv"``,
    ``"norm"``, ``"linear"``), from its inputs (``"carried"``) or named by the user
    (``"unit_dim"``).
    """

    batch: int
    unit: int
    positions: tuple[int, ...]
    source: str = "carried"
    boxes: tuple[tuple[int, int, int, int] | None, ...] | None = None

    @property
    def identity(self) -> bool:
        """The output already is ``(B, C, *positions)`` with at most two positions."""
        return (
            self.batch == 0
            and self.unit == 1
            and self.positions == tuple(range(2, 2 + len(self.positions)))
            and len(self.positions) <= 2
        )

    def patch_grid(self) -> tuple[list[int], int, int, list[int]] | None:
        """For tokens that stand for image patches: the tokens in row-major order of the
        patch grid their boxes tile, the grid's rows and columns, and the tokens with no
        patch (a class token); None where the boxes are not one grid cell per token."""
        return None if self.boxes is None else patch_grid(self.boxes)

    def map_shape(self, shape: Any) -> tuple[int, int] | None:
        """``(h, w)`` of the map each unit makes in an output of ``shape`` (batch axis
        included): its two position axes, or the patch grid of its tokens; None where its
        positions are not an image's rows and columns."""
        if len(self.positions) == 2:
            return int(shape[self.positions[0]]), int(shape[self.positions[1]])
        grid = self.patch_grid() if len(self.positions) == 1 else None
        return (grid[1], grid[2]) if grid is not None else None

    def line_shape(self, shape: Any) -> tuple[int, int] | None:
        """``(1, L)`` of the map each unit makes along a signal's time in an output of
        ``shape`` (batch axis included): its one position axis (a Conv1d's ``(B, C, L)``);
        None where it has another number of them."""
        return (1, int(shape[self.positions[0]])) if len(self.positions) == 1 else None

    def makes_map(self, shape: Any, line: bool = False) -> bool:
        """Whether each unit makes a map of more than one position in an output of ``shape``
        (batch axis included; along time on a signal, ``line``): the layers Grad-CAM can be
        taken at. The one rule for ``lurker.explain``'s choices and the explorer's list."""
        hw = self.line_shape(shape) if line else self.map_shape(shape)
        return hw is not None and hw[0] * hw[1] > 1

    def units(self, t: Tensor) -> Tensor:
        """``t`` as ``(B, C)``, ``(B, C, L)`` or ``(B, C, H, W)``: what UnitStats takes."""
        if self.identity:
            return t
        t = t.permute(self.batch, self.unit, *self.positions)
        if len(self.positions) > 2:
            t = t.reshape(*t.shape[:2], -1, t.shape[-1])
        return t

    def to_dict(self) -> dict[str, Any]:
        """The JSON record stored with a layer (see docs/run-store.md)."""
        d: dict[str, Any] = {
            "batch": self.batch,
            "unit": self.unit,
            "positions": list(self.positions),
            "source": self.source,
        }
        if self.boxes is not None:
            d["boxes"] = [None if b is None else list(b) for b in self.boxes]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Layout:
        boxes = d.get("boxes")
        return cls(
            int(d["batch"]),
            int(d["unit"]),
            tuple(int(p) for p in d["positions"]),
            str(d.get("source", "carried")),
            None if boxes is None else tuple(None if b is None else tuple(b) for b in boxes),  # type: ignore[misc]
        )


def patch_grid(
    boxes: Sequence[tuple[int, int, int, int] | None],
) -> tuple[list[int], int, int, list[int]] | None:
    """Tokens' input boxes (None: a token with no patch) as a patch grid: the tokens in
    row-major order of the grid their boxes tile, its rows and columns, and the tokens
    with no patch (a class token); None where the boxes are not one grid cell per token."""
    cells = [(i, b) for i, b in enumerate(boxes) if b is not None]
    if not cells:
        return None
    ys = sorted({b[0] for _, b in cells})
    xs = sorted({b[2] for _, b in cells})
    at = {(b[0], b[2]): i for i, b in cells}
    if len(at) != len(cells) or len(cells) != len(ys) * len(xs):
        return None
    order = [at[(y, x)] for y in ys for x in xs]
    return order, len(ys), len(xs), [i for i, b in enumerate(boxes) if b is None]


@dataclass(frozen=True)
class Skip:
    """An op the probe cannot read units from, and why. ``per_sample`` is False for ops
    that do not depend on the batch at all (weights, position tables): not activations.
    ``kind`` says what went wrong: ``"unit"`` where the batch axis is known and the unit
    axis is not (or the one named is wrong): naming it (``unit_dim``) can fix that;
    ``"folded"`` where the batch shares an axis with heads, windows or patches; ``""``
    for other problems with the batch; ``"split"`` where a reshape spread the units over
    several axes (attention heads x channels per head). Only ``"unit"`` skips can be fixed
    by ``unit_dim``. ``batch`` is the batch axis where it is known (a ``"unit"`` skip), so
    that a caller that reads the output whole (the map's one vector per sample) needs no
    second search for it."""

    reason: str
    per_sample: bool = True
    kind: str = ""
    batch: int | None = None

    @property
    def unit_dim_helps(self) -> bool:
        """Whether naming the unit axis (``unit_dim=``, ``--unit-dim``) can make it probed."""
        return self.kind == "unit"


def as_units(layout: Layout | Mapping[str, Any] | None, t: Any) -> Any:
    """A layer's output (a tensor, or the tuple a multi-output op gives: its first) as
    ``(B, C, *positions)``; ``layout`` None (runs written before layouts) leaves it as is."""
    if isinstance(t, (tuple, list)):
        t = next((v for v in t if isinstance(v, Tensor)), t)
    if layout is None or not isinstance(t, Tensor):
        return t
    lay = layout if isinstance(layout, Layout) else Layout.from_dict(layout)
    return lay.units(t)


def position_box(
    layout: Layout | Mapping[str, Any] | None,
    rf: RF | Mapping[str, Any] | None,
    y: int,
    x: int,
    image_size: tuple[int, int],
) -> tuple[int, int, int, int] | None:
    """Half-open input box ``(y0, y1, x0, x1)`` seen by position ``(y, x)`` of a layer.

    On a layer of a video clip (positions ``(D', H', W')``, peaks stored as
    ``y = frame * H' + row``), the box on each frame the position sees (those frames:
    :func:`position_frames`). ``None`` when the position has no place in the image (a
    class token) or the layer's positions do not map to it; callers then show the whole
    image.
    """
    lay = (
        layout if isinstance(layout, Layout) or layout is None else Layout.from_dict(layout)  # type: ignore[arg-type]
    )
    h, w = image_size
    if lay is not None and lay.boxes is not None:
        if not 0 <= x < len(lay.boxes) or lay.boxes[x] is None:
            return None
        y0, y1, x0, x1 = lay.boxes[x]  # type: ignore[misc]
        return (max(y0, 0), min(y1, h), max(x0, 0), min(x1, w))
    if rf is None:
        return None
    r = rf if isinstance(rf, RF) else RF.from_dict(dict(rf))
    if r.t is not None:
        if r.y.dim is None or not r.y.lo:
            return r.box(0, x, clip_to=(h, w))
        return r.box(y % len(r.y.lo), x, clip_to=(h, w))  # y = frame * H' + row
    return r.box(y, x, clip_to=(h, w))


def position_frames(rf: RF | Mapping[str, Any] | None, y: int) -> tuple[int, int] | None:
    """Half-open range ``(t0, t1)`` of input frames seen by the peak ``(y, x)`` of a layer
    of a video clip (its ``rf`` has a ``t`` axis; ``y = frame * H' + row``); ``None`` for
    other layers. ``(0, 0)``: it sees none (it lies in padding in time)."""
    if rf is None:
        return None
    r = rf if isinstance(rf, RF) else RF.from_dict(dict(rf))
    if r.t is None:
        return None
    rows = len(r.y.lo) if r.y.dim is not None else 1
    return r.frames(y // rows, clip_to=int(r.input_size[0]))


def peak_frame(
    layout: Layout | Mapping[str, Any] | None,
    shape: Sequence[int],
    y: int,
    frames: int,
    rf: RF | Mapping[str, Any] | None = None,
) -> int | None:
    """The frame of a ``frames``-frame input clip to show for a peak ``(y, x)`` of a layer
    with three position axes (a 3-D convolution's ``(D', H', W')``, stored as
    ``y = frame * H' + row``); ``None`` for other layers.

    With the layer's receptive field ``rf``, the frame at the centre of the peak's window
    in time (its affine map: ``start + f * stride + (size - 1) / 2``, rounded down), moved
    into the frames it sees (:func:`position_frames`): the frame its crop is cut from and
    its box drawn on. That is ``f`` itself on a layer that keeps the clip's frames with a
    centred kernel (r3d_18's stem), also at the clip's ends, where the exact range is cut
    short. Without one (older runs), the frame at the peak's place in time: the middle of
    the input frames its frame ``f`` of ``D'`` spans, ``((2f + 1) * frames) // (2 D')``;
    ``f`` itself when the layer keeps the clip's frames (``D' == frames``).
    """
    lay = (
        layout if isinstance(layout, Layout) or layout is None else Layout.from_dict(layout)  # type: ignore[arg-type]
    )
    if lay is None or len(lay.positions) != 3:
        return None
    seen = position_frames(rf, y)
    if seen is not None and seen[0] < seen[1] and seen[1] <= frames:
        r = rf if isinstance(rf, RF) else RF.from_dict(dict(rf))  # type: ignore[arg-type]
        t = r.t
        assert t is not None  # position_frames gave a range
        rows = len(r.y.lo) if r.y.dim is not None else 1
        f = y // rows if t.dim is not None else 0
        centre = t.start + f * t.stride + (t.size - 1) / 2
        if not math.isfinite(centre):
            return (seen[0] + seen[1] - 1) // 2
        return min(max(math.floor(centre + 1e-9), seen[0]), seen[1] - 1)
    # ``shape`` is the output's without its batch axis
    dims = [p - (p > lay.batch) for p in lay.positions]
    d, h = int(shape[dims[0]]), int(shape[dims[1]])
    f = y // h
    if d == frames:
        return f
    return min(frames - 1, ((2 * f + 1) * frames) // (2 * d))


#: ``rf_reason`` of a layer of patch tokens: it has crops, cut from its boxes, so the
#: reason says what they are rather than the op that ended the receptive field.
PATCH_TOKENS = (
    "its positions are patch tokens, not a receptive field's grid: a crop is the peak "
    "token's patch (where the token sits; through attention it sees more of the image)"
)


def rf_matches(layout: Layout, rf: RF) -> bool:
    """Whether ``rf``'s axes (t, y, x; y, x) are the layout's position axes (else its
    boxes do not index the stored peaks)."""
    dims = [a.dim for a in (rf.t, rf.y, rf.x) if a is not None and a.dim is not None]
    if rf.t is not None:
        return len(layout.positions) == 3 and dims == list(layout.positions)
    return len(layout.positions) <= 2 and dims == list(layout.positions)


def rf_mismatch(layout: Layout, op: Op, trace: Trace, rfs: dict[int, RF]) -> str:
    """Why the field of ``op`` (``rfs[op.index]``, which :func:`rf_matches` refused) is not
    stored: the op where the input's axes stopped being the positions in order (a
    transpose of H and W, a ``grid_sample`` that reads the whole input), found by walking
    back through the ops whose fields are out of order too."""

    def ordered(rf: RF) -> bool:
        dims = [a.dim for a in (rf.t, rf.y, rf.x) if a is not None]
        return None not in dims and dims == sorted(dims)

    def names(rf: RF) -> str:
        axes = [(n, a.dim) for n, a in (("t", rf.t), ("y", rf.y), ("x", rf.x)) if a is not None]
        return ", ".join(f"{n} on dim {d}" if d is not None else f"{n} reduced" for n, d in axes)

    rf = rfs[op.index]
    at = op
    while True:
        ups = [trace.ops[s] for s, _ in at._inputs if isinstance(s, int) and s in rfs]
        up = next((u for u in ups if not ordered(rfs[u.index])), None)
        if up is None:
            break
        at = up
    found = rfs[at.index]
    where = f"{at.label} ({at.name})"
    if ordered(found):
        where, how = op.label, "keeps the input's axes in order but not as its layout's"
    elif found.y.dim is not None and found.x.dim is not None and found.y.dim > found.x.dim:
        how = "swaps the input's y and x axes"
    elif None in (found.y.dim, found.x.dim):
        how = "mixes the whole input along its y and x axes (every position sees all of it)"
    else:
        how = "moves the input's axes"
    return (
        f"{where} {how}: the field ({names(rf)}) is not along this layer's position axes "
        f"{list(layout.positions)} in order, so no crop is kept"
    )


# --------------------------------------------------------------------------- batch axes
def _batch_shapes(trace: Trace, example: tuple, factor: int) -> dict[int, tuple[int, ...]]:
    args = tuple(
        torch.cat([a] * factor) if isinstance(a, Tensor) and a.dim() else a for a in example
    )
    shapes: dict[int, tuple[int, ...]] = {}

    def grab(op: Any, value: Any) -> None:
        t = value[0] if isinstance(value, tuple) else value
        shapes[op.index] = tuple(t.shape)

    want = [op.index for op in trace.ops if op.kind == "op" and op.outputs]
    with torch.no_grad():
        trace.run(*args, save="none", hooks=dict.fromkeys(want, grab))
    return shapes


#: Ops whose output has the batch on axis 0 wherever their activation inputs have it there,
#: whatever their other arguments (weights, kernel sizes): per-sample by what they compute
_KEEP_BATCH_FIRST = {
    *_CONV, *_ATEN_CONV, *_CHANNEL_NORMS, "linear", *QUANTIZED_LINEAR,
    *(f"{p}_pool{n}d" for p in ("max", "avg", "adaptive_max", "adaptive_avg") for n in (1, 2, 3)),
    "relu", "relu6", "leaky_relu", "gelu", "silu", "sigmoid", "tanh", "hardtanh", "hardswish",
    "hardsigmoid", "elu", "selu", "mish", "dropout", "contiguous", "clone",
}  # fmt: skip
#: Elementwise ops of activations alone (no weight or constant tensor to broadcast against)
_ELEMENTWISE_PAIRS = {"add", "mul", "sub", "div", "maximum", "minimum"}


def _traced_batch_axes(trace: Trace, example: tuple) -> dict[int, int] | None:
    """Every op's batch axis read off the trace, without running the model: axis 0, where
    the model's one input is ``example`` and every op keeps its input's axis 0 as its own by
    what it computes (a CNN: convolutions, norms, pooling, activations, residual sums,
    ``flatten(1)``, linear layers). None as soon as one op is anything else (a reshape,
    permute, matmul, attention, a tensor made in ``forward``): those are what the replay
    at larger batches is for (sequence-first attention, batches folded with windows), and a
    guess there would read units of the wrong samples."""
    tensors = [a for a in example if isinstance(a, Tensor)]
    inputs = [op for op in trace.ops if op.kind == "input"]
    if len(tensors) != 1 or len(inputs) != 1 or tensors[0].dim() < 2:
        return None
    if tuple(inputs[0].shape or ()) != tuple(tensors[0].shape):
        return None
    b0 = int(tensors[0].shape[0])
    batched = {inputs[0].index}  # nodes whose axis 0 is the batch
    out: dict[int, int] = {}
    for op in trace.ops:
        if op.kind in ("input", "output", "buffer", "constant"):
            continue
        if op.kind != "op" or not op.outputs:
            return None  # readouts, generated tensors, failed calls: not a plain CNN
        shape = tuple(op.shape or ())
        acts = [(j, s) for j, (s, _) in enumerate(op._inputs) if s in batched]
        nodes = [s for s, _ in op._inputs if isinstance(s, int) and s >= 0]
        if not acts or len(shape) < 2 or shape[0] != b0:
            return None
        if any(trace.ops[s].kind == "op" and s not in batched for s in nodes):
            return None  # an op input without a batch axis 0 (computed from weights)
        ranks = {len(trace.ops[s].shape or ()) for _, s in acts}
        name = op.name[:-1] if op.name.endswith("_") and not op.name.endswith("__") else op.name
        if name in _KEEP_BATCH_FIRST:
            # the activation is the op's input itself (``input=`` by keyword too), never its
            # weight: ``F.linear(weight=act, input=q)`` puts the batch on another axis
            first = op.args[0] if op.args else op.kwargs.get("input")
            ok = len(acts) == 1 and getattr(first, "index", None) in batched
            ok = ok and ranks == {len(shape)}
            spatial = _CONV.get(name)
            if spatial is None and name[-1] == "d" and name[-2].isdigit():  # max_pool2d
                spatial = int(name[-2])
            if spatial is not None:  # a batched input (unbatched: axis 0 is channels)
                ok = ok and len(shape) == spatial + 2
        elif name in _ELEMENTWISE_PAIRS:
            ok = len(acts) == len(op._inputs) and ranks == {len(shape)}
        elif name in ("flatten", "cat"):
            key = "start_dim" if name == "flatten" else "dim"  # (x, start_dim), (xs, dim)
            dim = op.args[1] if len(op.args) > 1 else op.kwargs.get(key, 0)
            rank = ranks.pop() if len(ranks) == 1 else 0
            ok = (
                type(dim) is int
                and -rank <= dim < rank
                and dim % rank != 0
                and (len(acts) == 1 if name == "flatten" else len(acts) == len(op._inputs))
                and (name == "flatten" or len(shape) == rank)
            )
        else:
            ok = False
        if not ok:
            return None
        batched.add(op.index)
        out[op.index] = 0
    return out


def _batch_axes(trace: Trace, example: tuple) -> dict[int, int | Skip]:
    b0 = next((int(a.shape[0]) for a in example if isinstance(a, Tensor) and a.dim()), None)
    if b0 is None:
        raise LurkerError(
            "lurker finds each layer's batch axis by growing the batch (dim 0) of the "
            "model's first tensor input, and this trace has none: pass example=(x,)."
        )
    traced = _traced_batch_axes(trace, example)
    if traced is not None:
        return dict(traced)
    try:
        s2, s3 = _batch_shapes(trace, example, 2), _batch_shapes(trace, example, 3)
    except Exception as e:
        raise LurkerError(
            "lurker finds which axis of each layer is the batch by running the model on "
            f"batches of {2 * b0} and {3 * b0} copies of the traced input (dim 0), and that "
            f"failed: {type(e).__name__}: {e}. The probe feeds the model batches along dim 0, "
            "so it must accept them."
        ) from e
    out: dict[int, int | Skip] = {}
    for op in trace.ops:
        if op.kind != "op" or not op.outputs:
            continue
        s1, a, b = tuple(op.shape or ()), s2.get(op.index), s3.get(op.index)
        if b0 == 1 and a is not None and b is not None and len(a) == len(b) == len(s1) + 1:
            out[op.index] = Skip(
                "it has no batch axis when the model runs on one sample (the batch of one "
                "lurker traces with), as after x.squeeze(); keep the batch axis in the model "
                "(x.flatten(1), or x.squeeze(-1) for the axes meant)"
            )
            continue
        if a is None or b is None or not (len(s1) == len(a) == len(b)):
            out[op.index] = Skip(
                "its number of dimensions changes with the batch size, so lurker cannot "
                "tell which axis is the batch"
            )
            continue
        grown = [d for d in range(len(s1)) if not (s1[d] == a[d] == b[d])]
        if not grown:
            out[op.index] = Skip(
                "its output does not depend on the batch (not per sample)", per_sample=False
            )
            continue
        if len(grown) > 1:
            out[op.index] = Skip(f"the batch is spread over axes {grown} of its output")
            continue
        d = grown[0]
        if not (a[d] == 2 * s1[d] and b[d] == 3 * s1[d] and s1[d] % b0 == 0):
            out[op.index] = Skip(f"axis {d} grows with the batch, but not in proportion")
        elif s1[d] != b0:
            m = s1[d] // b0
            out[op.index] = Skip(
                f"its axis {d} holds the batch folded with {m} slots per sample (attention "
                "heads, windows or patches), so one sample's units cannot be read apart, "
                "whichever axis holds them",
                kind="folded",
            )
        else:
            out[op.index] = d
    return out


def _leading_batch(trace: Trace, example: tuple) -> dict[int, int | Skip]:
    """Batch axes taken, not found: axis 0 where its size is the example's batch size."""
    b0 = next((int(a.shape[0]) for a in example if isinstance(a, Tensor) and a.dim()), None)
    why = Skip(
        "the model does not run on larger batches, so lurker cannot find its batch axis, "
        f"and its first axis is not the batch's size ({b0})"
    )
    return {
        op.index: 0 if op.shape and op.shape[0] == b0 else why
        for op in trace.ops
        if op.kind == "op" and op.outputs
    }


# --------------------------------------------------------------------------- unit axes
def _defined_unit(op: Op, static: Collection[int] | None = None) -> tuple[int, str] | None:
    """The unit axis an op makes by what it computes, if it makes one. ``static``: the
    nodes that do not depend on the batch (weights transposed or scaled in ``forward``);
    a product of an activation with one of them is a linear layer written by hand
    (``x @ W.t()``, ``torch.einsum("blc,dc->bld", x, W)``), whose units are the weight's
    output features."""
    nd = len(op.shape or ())
    name = op.name.rstrip("_") if op.name.endswith("_") and not op.name.endswith("__") else op.name
    if name in _CONV:
        return max(nd - _CONV[name] - 1, 0), "conv"
    if name in _ATEN_CONV and nd >= 3:  # (aten's convolution takes batched inputs only)
        return 1, "conv"
    if name in _CHANNEL_NORMS and nd >= 2:
        return 1, "norm"
    if name in ("layer_norm", "rms_norm"):
        shape = None
        with contextlib.suppress(TypeError):  # a call the signature does not take
            shape = bind(name, op.args, op.kwargs, op.target).get("normalized_shape")
        if isinstance(shape, (list, tuple)) and len(shape) != 1:
            return None
        return nd - 1, "norm"
    if name in _LAST_AXIS:
        return nd - 1, "linear"
    if name in _WEIGHT_PRODUCTS and nd >= 2:
        srcs = [s for s, _ in op._inputs]
        fixed = [s == -1 or (static is not None and s in static) for s in srcs]
        if name == "addmm" and op.params:
            return nd - 1, "linear"
        if name != "addmm" and len(srcs) == 2 and fixed[0] != fixed[1]:
            return (nd - 1, "linear") if fixed[1] else (nd - 2, "linear")
    if name == "einsum" and static is not None:
        return _einsum_unit(op, static)
    return None


def _einsum_unit(op: Op, static: Collection[int]) -> tuple[int, str] | None:
    """The output axis of an einsum of one activation with weights that only the weights
    index (``"blc,dc->bld"``: ``d``): the units of a linear layer written as an einsum.
    None where the activation is not one operand or no single such axis exists."""
    eq = op.args[0] if op.args and isinstance(op.args[0], str) else None
    srcs = [s for s, _ in op._inputs]
    if eq is None or "->" not in eq or len(srcs) < 2:
        return None
    ins, out = eq.replace(" ", "").split("->")
    terms = ins.split(",")
    data = [i for i, s in enumerate(srcs) if not (s == -1 or s in static)]
    if len(terms) != len(srcs) or len(data) != 1:
        return None
    seen = set(terms[data[0]].replace("...", ""))
    only = [c for c in out.replace("...", "") if c not in seen]
    if len(only) != 1:
        return None
    before, _, after = out.partition("...")
    nd = len(op.shape or ())
    c = only[0]
    axis = before.index(c) if c in before else nd - len(after) + after.index(c)
    return axis, "linear"


def own_unit_axis(op: Op) -> tuple[int, str] | None:
    """The unit axis ``op`` makes by what it computes (a convolution's channels, a linear
    layer's or a norm's last axis) and how (``"conv"``, ``"norm"``, ``"linear"``); None for
    an op that only carries its inputs' axes. These ops read their input's units on the
    same axis, so explain finds a model input's channel axis with it."""
    return _defined_unit(op)


#: Ops that rescale along one axis but keep every index of every axis where it was (each
#: unit stays itself, as through layer_norm), though positions along that axis are mixed
_RESCALE_ALONG = {"normalize", "softmax", "log_softmax", "softmin"}


def _kept_unit(
    op: Op, parents: list[tuple[int, int, int]], units: Mapping[tuple[int, int], Any]
) -> tuple[int, str] | None:
    """The unit axis through ``F.normalize`` or a softmax: the input's, even where the op
    normalises over the units themselves (the receptive-field rules see that axis mixed)."""
    if op.name not in _RESCALE_ALONG or not parents:
        return None
    _, s, q = parents[0]
    u = units.get((s, q))
    return (u[0], "carried") if u is not None else None


#: Reshapes that can split one axis into several
_RESHAPES = {"view", "reshape", "unflatten", "view_as", "reshape_as"}
#: Ops after which units split over several axes stay split (each element is still one
#: unit's value): the reason a reshape gave is the reason of their outputs too
_SPLIT_KEEPS = {
    "transpose", "permute", "contiguous", "clone", "getitem", "pad", "constant_pad_nd",
    "mul", "add", "sub", "div", "neg", "dropout", "cat",
}  # fmt: skip


def _split_units(op: Op, trace: Trace, known: list[tuple[int, int, tuple[int, ...]]]) -> str | None:
    """Why ``op`` has no unit axis where it is a reshape that splits its input's unit axis
    into several axes (CoaT's conv relative position encoding: 64 channels as 8 heads x 8
    channels per head), else None. No one axis holds such units: naming one (unit_dim)
    would read each head, or each channel of every head together, as a unit."""
    if op.name not in _RESHAPES or len(known) != 1 or known[0][0] != 0:
        return None
    _, a, ish = known[0]
    osh = tuple(op.outputs[0].shape)
    before, size = math.prod(ish[:a]), ish[a]
    for i in range(len(osh) + 1):
        if math.prod(osh[:i]) != before:
            continue
        for j in range(i + 1, len(osh) + 1):
            if math.prod(osh[i:j]) == size:
                axes = [d for d in range(i, j) if osh[d] != 1]
                if len(axes) < 2:
                    return None
                src = trace.ops[op.parents[0]] if op.parents else None
                was = f"; probe {layer_name(src, trace)}, before the split" if src else ""
                return (
                    f"{op.label} split its {size} units over {len(axes)} axes "
                    f"({' x '.join(str(osh[d]) for d in axes)}, attention heads x channels per "
                    f"head, say): no one axis holds them{was}"
                )
            if math.prod(osh[i:j]) > size:
                break
    return None


def _tensor_parents(op: Op, trace: Trace) -> list[tuple[int, int, int]]:
    """(position among the op's tensor arguments, parent node, its output index)."""
    return [
        (j, s, k)
        for j, (s, k) in enumerate(op._inputs)
        if isinstance(s, int) and s >= 0 and trace.ops[s].kind == "op"
    ]


def _token_start(op: Op, trace: Trace, rfs: Mapping[int, RF]) -> tuple[int, np.ndarray] | None:
    """A reshape that merges a parent's (y, x) grid into one axis: tokens with patch boxes."""
    if op.name not in ("view", "reshape", "flatten"):
        return None
    parents = _tensor_parents(op, trace)
    if not parents:
        return None
    _, s, _ = parents[0]
    rf = rfs.get(s)
    pshape = tuple(trace.ops[s].shape or ())
    out = tuple(op.shape or ())
    if rf is None or rf.y.dim is None or rf.x.dim is None or rf.x.dim != rf.y.dim + 1:
        return None
    a = rf.y.dim
    hh, ww = pshape[a], pshape[a + 1]
    pre = int(np.prod(pshape[:a]))
    for e in range(len(out)):
        if out[e] == hh * ww and int(np.prod(out[:e])) == pre and hh * ww > 1:
            ylo, yhi = np.asarray(rf.y.lo)[:hh], np.asarray(rf.y.hi)[:hh]
            xlo, xhi = np.asarray(rf.x.lo)[:ww], np.asarray(rf.x.hi)[:ww]
            boxes = np.stack(
                np.broadcast_arrays(ylo[:, None], yhi[:, None], xlo[None, :], xhi[None, :]),
                axis=-1,
            ).reshape(hh * ww, 4)  # token i*ww + j: the box of grid position (i, j)
            return e, boxes
    return None


def infer_layouts(
    trace: Trace,
    example: tuple | None = None,
    *,
    unit_dim: int | Mapping[str, int] | None = None,
    names: Mapping[int, list[str]] | None = None,
    rfs: Mapping[int, RF] | None = None,
    batch_fallback: bool = False,
) -> dict[int, Layout | Skip]:
    """The layout of every op's output (by node index), or why it has none.

    ``example`` is the model's positional input with the batch on dim 0 (default: the
    input the trace recorded); the model is replayed on 2x and 3x that batch to find
    batch axes, unless every op keeps axis 0 as the batch (:func:`_traced_batch_axes`). ``unit_dim`` names the unit axis (of the full output, batch included;
    negative counts from the end) for every op, or per layer as ``{pattern: axis}``
    (globs matched against the op label, rolled label, op name and module outputs; the
    first matching pattern wins): it overrides what the semantics say. ``rfs``: the
    trace's receptive fields, if already computed. ``batch_fallback``: where the model
    cannot run the larger batches (a fixed batch size in its code), take axis 0 as the
    batch of every op whose first axis has the example's batch size, as lurker read every
    tensor before layouts, instead of raising; the units still come from the semantics.
    """
    check_unit_dim(unit_dim)
    if example is None:
        example = tuple(trace._inputs[0])
    try:
        batch = _batch_axes(trace, example)
    except LurkerError:
        if not batch_fallback:
            raise
        batch = _leading_batch(trace, example)
    if rfs is None:
        try:
            rfs = receptive_fields(trace)
        except LurkerError:
            rfs = {}
    static = {i for i, b in batch.items() if isinstance(b, Skip) and not b.per_sample}
    units: dict[tuple[int, int], tuple[int, str] | None] = {}
    tokens = token_axes(trace, rfs)
    split: dict[tuple[int, int], str] = {}  # why units are split over several axes
    result: dict[int, Layout | Skip] = {}
    for op in trace.ops:
        if op.kind not in ("op",) or not op.outputs:
            continue
        parents = _tensor_parents(op, trace)
        for k in range(len(op.outputs)):
            unit = _defined_unit(op, static) if k == 0 else None
            if unit is None and k == 0:
                unit = _kept_unit(op, parents, units)
            if unit is None:
                known = [
                    (j, u[0], tuple(trace.ops[s].outputs[q].shape))
                    for j, s, q in parents
                    if (u := units.get((s, q))) is not None
                ]
                axes = (
                    {c[0] for c in follow_axes(op, k, known, trace) if c is not None}
                    if known
                    else set()
                )
                unit = (axes.pop(), "carried") if len(axes) == 1 else None
                if unit is None:  # split by this reshape, or by one before it
                    why = _split_units(op, trace, known) if k == 0 else None
                    if why is None and not known and op.name in _SPLIT_KEEPS:
                        came = [split[(s, q)] for _, s, q in parents if (s, q) in split]
                        why = came[0] if came else None
                    if why is not None:
                        split[(op.index, k)] = why
            units[(op.index, k)] = unit
        result[op.index] = _layout(
            op,
            batch.get(op.index),
            units[(op.index, 0)],
            tokens.get((op.index, 0)),
            unit_dim,
            names,
            split.get((op.index, 0)),
        )
    _point_past_folds(trace, result)
    return result


def token_axes(
    trace: Trace, rfs: Mapping[int, RF] | None = None
) -> dict[tuple[int, int], tuple[int, np.ndarray]]:
    """Each op output's axis of tokens that stand for image patches, by ``(op index,
    output)``: the axis and each token's input box ``(y0, y1, x0, x1)`` (a row of -1: a
    token with no patch, a class token). Made where a reshape flattens a conv's grid into
    one axis (a ViT's patch embedding) and carried whole along the graph (transposes,
    views, head splits, concatenation with a class token); outputs with no such axis are
    absent. ``rfs``: the trace's receptive fields, if already computed."""
    if rfs is None:
        try:
            rfs = receptive_fields(trace)
        except LurkerError:
            rfs = {}
    tokens: dict[tuple[int, int], tuple[int, np.ndarray] | None] = {}
    for op in trace.ops:
        if op.kind != "op" or not op.outputs:
            continue
        parents = _tensor_parents(op, trace)
        for k in range(len(op.outputs)):
            tokens[(op.index, k)] = (_token_start(op, trace, rfs) if k == 0 else None) or (
                _carry_tokens(op, k, trace, parents, tokens)
            )
    return {key: t for key, t in tokens.items() if t is not None}


def layer_name(op: Op, trace: Any) -> str:
    """The op's name in a run: the (innermost) module path whose output it is, else its
    label; a module path only where ``trace[path]`` is this op. A module call that returns
    several tensors (timm's PiT blocks return ``(x, cls_tokens)``) gives its path to the
    one the trace returns for it, and its other outputs go by their labels, so that every
    layer name is unique and looks up its own op."""
    for m in op.module_outputs:
        try:
            if trace[m].index == op.index:
                return m
        except KeyError:
            continue
    return op.label


def _point_past_folds(trace: Trace, result: dict[int, Layout | Skip]) -> None:
    """Complete each folded-batch skip with where the batch has an axis of its own again:
    the first op after it (that depends on it) with a layout, and the first such module
    output where that op is none. Naming the unit axis cannot help a folded batch."""
    folded = [i for i, lay in result.items() if isinstance(lay, Skip) and lay.kind == "folded"]
    if not folded:
        return
    children: dict[int, list[int]] = {}
    for op in trace.ops:
        for s, _ in op._inputs:
            if isinstance(s, int) and s >= 0:
                children.setdefault(s, []).append(op.index)
    names: dict[int, str] = {}

    def name(i: int) -> str:
        if i not in names:
            names[i] = layer_name(trace.ops[i], trace)
        return names[i]

    def first(start: int, module: bool) -> int | None:
        """The earliest op after ``start`` with a layout (and a module path: ``module``)."""
        seen, todo, best = {start}, [start], None
        while todo:
            i = todo.pop()
            for c in children.get(i, ()):
                if c in seen:
                    continue
                seen.add(c)
                if isinstance(result.get(c), Layout) and (
                    not module or name(c) != trace.ops[c].label
                ):
                    best = c if best is None else min(best, c)
                    continue  # what depends on it comes later
                todo.append(c)
        return best

    for i in folded:
        skip = result[i]
        assert isinstance(skip, Skip)
        at = first(i, module=False)
        if at is None:
            where = "; use a layer after the slots are merged back into the batch"
        else:
            where = f"; the batch has an axis of its own again at {name(at)!r}"
            mod = first(i, module=True) if name(at) == trace.ops[at].label else None
            if mod is not None:  # an op with no module: name the first module output too
                where += f" and at {name(mod)!r} (the first module output after it)"
            where += ": use " + ("one of those" if mod is not None else "that layer") + " instead"
        result[i] = Skip(skip.reason + where, skip.per_sample, skip.kind)


def _carry_tokens(
    op: Op, k: int, trace: Trace, parents: list[tuple[int, int, int]], tokens: dict
) -> tuple[int, np.ndarray] | None:
    """A token axis of the parents, carried whole: each output token's box (-1: none)."""
    known = [
        (j, t, tuple(trace.ops[s].outputs[q].shape))
        for j, s, q in parents
        if (t := tokens.get((s, q))) is not None
    ]
    if not known:
        return None
    cands = []
    for (_, (_, src), _), c in zip(
        known, follow_axes(op, k, [(j, t[0], sh) for j, t, sh in known], trace)
    ):
        if c is not None:
            e, idx = c
            if len(src):
                boxes = np.where((idx >= 0)[:, None], src[np.clip(idx, 0, None)], -1)
            else:  # an empty part (a cat with no prefix tokens): no output token is from it
                boxes = np.full((len(idx), 4), -1, dtype=np.int64)
            cands.append((e, boxes))
    if not cands or any(c[0] != cands[0][0] for c in cands):
        return None
    boxes = _merge_boxes([c[1] for c in cands])
    return None if boxes is None else (cands[0][0], boxes)


def _merge_boxes(cands: list[np.ndarray]) -> np.ndarray | None:
    """Per token, the box of the parents that have one (a row of -1: none): the parts of
    a concatenation each give their own tokens; parents giving a token different boxes
    conflict (None)."""
    out = cands[0]
    for c in cands[1:]:
        if c.shape != out.shape:
            return None
        have_out, have_c = (out != -1).any(1), (c != -1).any(1)
        both = have_out & have_c
        if not np.array_equal(out[both], c[both]):
            return None
        out = np.where((have_c & ~have_out)[:, None], c, out)
    return out


#: How the reason of a layer whose unit axis lurker cannot tell ends (what --unit-dim fixes)
UNIT_DIM_HINT = "; name it with unit_dim= (--unit-dim)"


def layer_layout(
    trace: Any,
    layer: str,
    unit_dim: int | None = None,
    cache: dict[Any, Any] | None = None,
    hint: str = "name the axis with unit_dim= (counting the batch axis)",
) -> Layout:
    """Where ``layer`` (a module path, op label or rolled label: what ``trace.hooks``
    takes) holds its batch, units and positions: :func:`infer_layouts` of the op a hook on
    ``layer`` reaches (with ``unit_dim``, the user's unit axis, counting the batch axis;
    its batch axis is still found). The inference replays ``trace`` at two larger batches
    (where the trace alone does not tell the batch axes) once per model and graph (kept per model, and in ``cache``); where the model cannot
    run them, axis 0 is taken as the batch (``batch_fallback``). Refused with the reason
    where lurker cannot tell: reading another axis as the units would give numbers about
    something else without a word (explain's unit targets, concept relevance and
    Grad-CAM, feature visualization without a run); ``hint`` says what the caller's user
    can do about it."""
    op = trace.hook_ops(layer)[0]
    shape = list(op.outputs[0].shape) if op.outputs else []
    if unit_dim is not None and not (
        isinstance(unit_dim, int)
        and not isinstance(unit_dim, bool)
        and -len(shape) <= unit_dim < len(shape)
    ):
        raise LurkerError(
            f"unit_dim={unit_dim!r} is not an axis of {layer!r}'s output {shape}: an int "
            f"from 0 to {len(shape) - 1} (counting the batch axis) or negative from the end"
        )
    found = cached_layouts(trace, None if unit_dim is None else {op.label: unit_dim}, cache)
    lay = found.get(op.index)
    if isinstance(lay, Layout):
        return lay
    why = lay.reason if lay is not None else f"it is the model's {op.kind}, not an op's output"
    why = why.removesuffix(UNIT_DIM_HINT)
    if lay is not None and lay.kind in ("folded", "split"):  # naming an axis cannot help
        raise LurkerError(f"layer {layer!r}, output {shape}: {why}.")
    raise LurkerError(f"layer {layer!r}, output {shape}: {why}; {hint}.")


#: per model: (graph signature, unit_dim) -> layouts; a forward's graph rarely changes
_MODEL_LAYOUTS: weakref.WeakKeyDictionary[Any, dict[Any, dict[int, Layout | Skip]]] = (
    weakref.WeakKeyDictionary()
)


def cached_layouts(
    trace: Any, unit_dim: Mapping[str, int] | None = None, cache: dict[Any, Any] | None = None
) -> dict[int, Layout | Skip]:
    """:func:`infer_layouts` of ``trace`` (with ``batch_fallback``), computed once per
    model and graph (the same ops, kinds and shapes) and unit_dim."""
    key = (
        tuple((op.label, op.kind, tuple(op.shape or ())) for op in trace.ops),
        None if unit_dim is None else tuple(sorted(unit_dim.items())),
    )
    if cache is not None and key in cache:
        return cache[key]  # type: ignore[no-any-return]
    per_model = _MODEL_LAYOUTS.setdefault(trace.model, {}) if trace.model is not None else {}
    found = per_model.get(key)
    if found is None:
        found = infer_layouts(trace, unit_dim=unit_dim, batch_fallback=True)
        per_model.clear()  # one graph per model is what callers reuse
        per_model[key] = found
    if cache is not None:
        cache[key] = found
    return found


def check_unit_dim(unit_dim: Any) -> None:
    """Raise a clear error unless ``unit_dim`` is None, an int or ``{pattern: int}``."""
    if unit_dim is None:
        return
    ok = isinstance(unit_dim, int) and not isinstance(unit_dim, bool)
    if isinstance(unit_dim, Mapping):
        ok = all(
            isinstance(p, str) and isinstance(a, int) and not isinstance(a, bool)
            for p, a in unit_dim.items()
        )
    if not ok:
        raise LurkerError(
            f"unit_dim must be an axis number (e.g. -1) or a dict of layer pattern -> axis "
            f"(e.g. {{'features.1.0.mlp.0': -1}}); got {unit_dim!r}."
        )


def op_names(op: Op, types: Mapping[int, list[str]] | None = None) -> list[str]:
    """Every name a layer pattern matches: op label, rolled label, op name, the module
    outputs (a module called more than once, ``layer1.0.relu:2``, also by its path, which
    names all its calls, as in ``trace.hooks``) and (from ``types``, by op index) the
    module type."""
    names = [op.label, op.rolled, op.name, *op.module_outputs, *reused_paths(op)]
    if types is not None:
        names += types.get(op.index, ())
    return names


def reused_paths(op: Op) -> list[str]:
    """The paths of the reused modules whose calls output ``op`` (``cell`` of ``cell:2``)."""
    return [m.split(":")[0] for m in op.module_outputs if ":" in m]


def _user_axis(op: Op, unit_dim: int | Mapping[str, int] | None, names: Any) -> int | None:
    if unit_dim is None:
        return None
    if isinstance(unit_dim, int):
        return unit_dim
    keys = op_names(op, names)
    for pat, axis in unit_dim.items():
        if any(fnmatch.fnmatchcase(n, pat) for n in keys):
            return int(axis)
    return None


def _layout(
    op: Op,
    batch: int | Skip | None,
    unit: tuple[int, str] | None,
    token: tuple[int, np.ndarray] | None,
    unit_dim: Any,
    names: Any,
    split: str | None = None,
) -> Layout | Skip:
    shape = tuple(op.shape or ())
    nd = len(shape)
    if batch is None:
        return Skip("it does not run on the batch", per_sample=False)
    if isinstance(batch, Skip):
        return batch
    user = _user_axis(op, unit_dim, names)
    if user is not None:
        if not -nd <= user < nd:
            return Skip(
                f"the unit axis named for it, {user}, is out of range for its {nd} dimensions",
                kind="unit",
                batch=batch,
            )
        u, source = user % nd, "unit_dim"
        if u == batch:
            return Skip(
                f"the unit axis named for it, {user}, is its batch axis", kind="unit", batch=batch
            )
    elif unit is None and split is not None:
        return Skip(split, kind="split")
    elif unit is None:
        return Skip(
            f"lurker cannot tell which axis of its output {list(shape)} holds the units "
            f"({op.name} mixes or reshapes them, or no op before it says)" + UNIT_DIM_HINT,
            kind="unit",
            batch=batch,
        )
    else:
        u, source = unit
        if u == batch:
            return Skip(f"its unit axis would be its batch axis ({u})", kind="unit", batch=batch)
    positions = tuple(d for d in range(nd) if d not in (batch, u))
    boxes = None
    if token is not None and positions == (token[0],):
        boxes = tuple(
            None if b[0] < 0 or b[0] >= b[1] or b[2] >= b[3] else tuple(int(v) for v in b)
            for b in token[1]
        )
    return Layout(batch, u, positions, source, boxes)  # type: ignore[arg-type]
