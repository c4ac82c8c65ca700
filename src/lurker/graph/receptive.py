"""Receptive fields: which input pixels each position of each op's output can see.

:func:`receptive_fields` walks a traced graph in execution order and, for every op whose
output still carries the input's spatial axes, gives an :class:`RF`: per axis
(``y`` = input height, ``x`` = input width, and ``t`` = the frames of a video clip
``(N, C, D, H, W)``) both

- the classic affine map (size, stride, start): position ``i`` sees input rows
  ``[start + i*stride, start + i*stride + size - 1]`` (inclusive, may run past the image).
  Through a conv/pool with kernel ``k``, stride ``s``, left padding ``p``, dilation ``d``:
  ``k_eff = d*(k-1) + 1``, ``size' = size + (k_eff-1)*stride``, ``stride' = stride*s``,
  ``start' = start - p*stride``; and
- the exact per-position bounds (``Axis.lo``/``Axis.hi``, half-open, clipped to the image),
  which :meth:`RF.box` returns.

Both come from one rule. Every spatial op is described, per tensor dim, by the parent
positions ``idx[i, :]`` that output position ``i`` reads plus a nominal ratio ``r`` (its
stride). The exact bounds are the hull of the parent bounds over the in-range entries (so
padding, reflection, interpolation taps and ragged windows are exact), and the affine
map is fitted as ``lo = min(idx - i*r)``, ``hi = max(idx - i*r)``, giving
``start' = start + lo*stride``, ``size' = size + (hi-lo)*stride``, ``stride' = r*stride``
(for conv/pool this is the formula above). Ops that read several tensors (add, mul, cat,
``where``) take per position the union of their parents: same stride -> min start, max
end; different strides -> the smallest affine map over the output's extent that bounds
all of them (so the affine map is then conservative; the exact bounds stay exact).

What is exact, approximate or unsupported:

- conv/pool (1-D/2-D/3-D, any kernel, stride, padding incl. ``'same'``, dilation, groups,
  ``ceil_mode``), conv_transpose, adaptive pools, ``F.pad`` (all modes), pixel
  (un)shuffle, slicing, cat/split/stack, flip/roll, permutes and reshapes that keep the
  spatial dims, reductions and softmax over spatial dims: exact bounds. For conv_transpose,
  interpolation and adaptive pools the affine map is a bound (fractional stride); for
  reflect/replicate/circular padding it is the nominal shift (wrong only in the padded
  border, where the exact bounds fold back into the image).
- ``interpolate``: exact source taps for nearest/nearest-exact/(bi)linear/bicubic/area
  (computed as torch does, in float32 and float64, keeping both); with ``antialias`` the
  taps are widened by one pixel each side (approximate but conservative).
- Normalisation layers (batch/instance/group/layer norm) are position-wise: their
  statistics pool over the map, a global but weak dependence that receptive fields, as is
  conventional, ignore. Position-independent inputs that are *not* ignored by default
  (squeeze-excitation gates, image-pooling branches) make every later position see the
  whole image; ``global_context=False`` leaves them out.
- 1-D inputs (N, C, L): ``y`` is a trivial axis (one position, the single input row).
- Video clips (N, C, D, H, W): a third axis ``t`` over the frames, by the same rules
  (one code path for every axis: a 3-D conv or pool is a window on each of its dims).
- An op that collapses a spatial dim (flatten, linear over it, global means, a reshape
  that merges H and W) makes that axis one box: the hull of everything it saw (``full``
  when it covers the input). That is always a valid bound.
- Recurrent ops (``nn.LSTM``, ``nn.GRU``, ``nn.RNN``: torch's lstm, gru, rnn_tanh,
  rnn_relu) run along their sequence axis: step ``t`` sees steps ``0..t`` (every step when
  bidirectional), exact bounds; their final states see every step. RNN cells keep the
  batch rows and mix the features.
- An op not known here that keeps the spatial sizes is taken to mix each spatial axis
  whole (every output position sees all that its inputs saw along it) and its RF (and its
  descendants') gets ``exact=False``: a bound, possibly the whole input, never a guess
  that could be too small. Only the ops listed here are position-wise. One that changes
  the sizes gets no RF, and neither does anything computed from it, rather than a wrong
  box (``receptive_fields(gaps=)`` says which op broke the chain, and how).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from ..errors import LurkerError
from ..ops.catalogue import QUANTIZED_CONV, QUANTIZED_LINEAR, bind, packed_call
from .nodes import OpRef

if TYPE_CHECKING:
    from .nodes import Op

__all__ = ["RF", "Axis", "follow_axes", "receptive_fields"]


class _OpGraph(Protocol):
    """What this module reads of a graph (a :class:`~lurker.Trace` is one): its ops in
    execution order, its inputs, and lookup by label or name."""

    @property
    def ops(self) -> list[Op]: ...

    @property
    def inputs(self) -> list[Op]: ...

    def __getitem__(self, key: str) -> Op: ...


_BIG = 1 << 62  # "sees nothing" sentinel for the inclusive bounds: lo = BIG > hi = -BIG
_EPS = 1e-9


# --------------------------------------------------------------------------- public types
@dataclass(frozen=True)
class Axis:
    """One spatial axis of a receptive field.

    ``size``/``stride``/``start``: the classic affine map (position ``i`` sees
    ``[start + i*stride, start + i*stride + size - 1]``); ints unless an upsampling made
    them fractional. ``lo[i]:hi[i]`` are the exact, clipped, half-open bounds per
    position (``lo == hi``: sees nothing). ``dim`` is the tensor dim holding this axis in
    the op's output, ``None`` when it was reduced away (then ``lo``/``hi`` hold one box).
    """

    size: float
    stride: float
    start: float
    dim: int | None
    lo: tuple[int, ...]
    hi: tuple[int, ...]

    def bounds(self, i: int) -> tuple[int, int]:
        """Exact half-open bounds of position ``i`` (ignored for a reduced axis)."""
        if self.dim is None:
            i = 0
        return self.lo[i], self.hi[i]

    def nominal(self, i: int) -> tuple[int, int]:
        """Half-open integer bounds of the affine map at ``i`` (not clipped)."""
        a = self.start + i * self.stride
        return math.ceil(a - _EPS), math.floor(a + self.size - 1 + _EPS) + 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "stride": self.stride,
            "start": self.start,
            "dim": self.dim,
            "lo": list(self.lo),
            "hi": list(self.hi),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Axis:
        return cls(d["size"], d["stride"], d["start"], d["dim"], tuple(d["lo"]), tuple(d["hi"]))


@dataclass(frozen=True)
class RF:
    """The input region each position of one op's output can see.

    ``full``: every position sees the whole input. ``exact``: every op on the way has a
    known spatial footprint (``False``: one was not known, and was taken to mix its
    spatial axes whole, so boxes are bounds, larger than the true ones, often the whole
    input). ``input_size`` is the (H, W) of the traced input ((1, L) for 1-D inputs;
    (D, H, W) for a video clip, which has a ``t`` axis over its D frames; ``t`` is None
    otherwise).
    """

    y: Axis
    x: Axis
    input_size: tuple[int, ...]
    full: bool
    exact: bool
    t: Axis | None = None

    @property
    def size(self) -> tuple[float, float]:
        return self.y.size, self.x.size

    @property
    def stride(self) -> tuple[float, float]:
        return self.y.stride, self.x.stride

    @property
    def start(self) -> tuple[float, float]:
        return self.y.start, self.x.start

    def box(
        self, y: int = 0, x: int = 0, clip_to: tuple[int, int] | None = None
    ) -> tuple[int, int, int, int]:
        """Half-open ``(y0, y1, x0, x1)`` seen by output position ``(y, x)``.

        Exact and already inside the traced input; ``clip_to`` clips further. A position
        that sees nothing (it lies in zero padding) gives ``(0, 0, 0, 0)``.
        """
        y0, y1 = self.y.bounds(y)
        x0, x1 = self.x.bounds(x)
        return _clip((y0, y1, x0, x1), clip_to)

    def frames(self, t: int = 0, clip_to: int | None = None) -> tuple[int, int]:
        """Half-open frame range ``(t0, t1)`` of the input clip seen by output frame ``t``
        (``(0, 0)`` when it sees none); ``(0, 1)`` for an input with no frames (an image),
        so a box on an image is a box on its one frame."""
        if self.t is None:
            return (0, 1)
        t0, t1 = self.t.bounds(t)
        if clip_to is not None:
            t0, t1 = max(t0, 0), min(t1, clip_to)
        return (t0, t1) if t0 < t1 else (0, 0)

    def volume(
        self, t: int = 0, y: int = 0, x: int = 0, clip_to: tuple[int, int, int] | None = None
    ) -> tuple[int, int, int, int, int, int]:
        """Half-open ``(t0, t1, y0, y1, x0, x1)`` seen by output position ``(t, y, x)``
        of a clip's layer: the frames and the box on each (all zeros where it sees
        nothing). ``clip_to`` is ``(D, H, W)``."""
        t0, t1 = self.frames(t, None if clip_to is None else clip_to[0])
        box = self.box(y, x, None if clip_to is None else clip_to[1:])  # type: ignore[arg-type]
        if t0 >= t1 or box == (0, 0, 0, 0):
            return (0, 0, 0, 0, 0, 0)
        return (t0, t1, *box)

    def affine_box(
        self, y: int = 0, x: int = 0, clip_to: tuple[int, int] | None = None
    ) -> tuple[int, int, int, int]:
        """Half-open box of the affine map at ``(y, x)``, unclipped unless ``clip_to``."""
        y0, y1 = self.y.nominal(0 if self.y.dim is None else y)
        x0, x1 = self.x.nominal(0 if self.x.dim is None else x)
        return _clip((y0, y1, x0, x1), clip_to)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form (see :meth:`from_dict`); ``t`` only for a clip's field."""
        d = {
            "y": self.y.to_dict(),
            "x": self.x.to_dict(),
            "input_size": list(self.input_size),
            "full": self.full,
            "exact": self.exact,
        }
        if self.t is not None:
            d["t"] = self.t.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RF:
        t = d.get("t")
        return cls(
            Axis.from_dict(d["y"]),
            Axis.from_dict(d["x"]),
            tuple(int(n) for n in d["input_size"]),
            d["full"],
            d["exact"],
            None if t is None else Axis.from_dict(t),
        )


def _clip(
    b: tuple[int, int, int, int], clip_to: tuple[int, int] | None
) -> tuple[int, int, int, int]:
    y0, y1, x0, x1 = b
    if clip_to is not None:
        h, w = clip_to
        y0, y1, x0, x1 = max(y0, 0), min(y1, h), max(x0, 0), min(x1, w)
    if y0 >= y1 or x0 >= x1:
        return (0, 0, 0, 0)
    return (y0, y1, x0, x1)


# --------------------------------------------------------------------------- internal state
@dataclass
class _Ax:
    """One axis of one tensor while propagating: affine map + inclusive bounds per position."""

    dim: int | None
    size: float
    stride: float
    start: float
    lo: np.ndarray
    hi: np.ndarray


@dataclass
class _State:
    axes: tuple[_Ax, ...]  # (y, x), or (t, y, x) for a clip
    exact: bool


@dataclass
class _Parent:
    j: int  # position among the op's tensor arguments (Op._inputs)
    state: _State
    shape: tuple[int, ...]


@dataclass
class _Map:
    """How one parent dim reaches the output: position ``i`` reads ``idx[i, present[i]]``.

    Out-of-range entries are padding: they count for the affine fit, not for the bounds.
    ``aff`` (default ``idx``) are the nominal positions for the affine fit.
    """

    out_dim: int | None
    idx: np.ndarray
    ratio: float
    present: np.ndarray | None = None
    aff: np.ndarray | None = None


_Maps = dict[int, dict[int, "_Map | None"]]  # parent j -> parent dim -> map (None: impossible)
_MISSING = object()


def _col(a: np.ndarray) -> np.ndarray:
    return a.astype(np.int64)[:, None]


def _keep(out_dim: int, n_in: int, n_out: int) -> _Map | None:
    if n_in == n_out:
        return _Map(out_dim, _col(np.arange(n_out)), 1.0)
    if n_in == 1:  # broadcast
        return _Map(out_dim, np.zeros((n_out, 1), np.int64), 0.0)
    return None


def _whole(n_in: int, out_dim: int | None, n_out: int = 1) -> _Map:
    """Every output position reads the whole parent axis."""
    return _Map(out_dim, np.broadcast_to(np.arange(n_in, dtype=np.int64), (n_out, n_in)), 0.0)


def _index(n_in: int, i: int) -> _Map:
    return _Map(None, np.array([[i % n_in if n_in else 0]], np.int64), 0.0)


def _window(n_out: int, k: int, s: int, p: int, d: int) -> _Map:
    idx = _col(np.arange(n_out) * s - p) + np.arange(k, dtype=np.int64) * d
    return _Map(None, idx, float(s))


def _prefix(n: int, out_dim: int) -> _Map:
    """Position ``i`` reads positions ``0..i`` (a running sum, a recurrence)."""
    idx = np.broadcast_to(np.arange(n, dtype=np.int64), (n, n))
    return _Map(out_dim, idx, 1.0, present=idx <= np.arange(n)[:, None])


def _ragged(start: np.ndarray, end: np.ndarray, ratio: float) -> _Map:
    """Windows ``[start[i], end[i])`` of varying length."""
    k = max(int((end - start).max()), 1)
    idx = _col(start) + np.arange(k, dtype=np.int64)
    return _Map(None, idx, ratio, present=idx < end[:, None])


def _apply(ax: _Ax, m: _Map, n_in: int) -> _Ax | None:
    idx = m.idx
    present = m.present if m.present is not None else np.ones(idx.shape, bool)
    if not present.any():
        return None
    valid = present & (idx >= 0) & (idx < n_in)
    safe = idx.clip(0, max(n_in - 1, 0))
    lo = np.where(valid, ax.lo[safe], _BIG).min(1)
    hi = np.where(valid, ax.hi[safe], -_BIG).max(1)
    ratio = m.ratio if idx.shape[0] > 1 else 0.0  # one position: a constant box
    off = (m.aff if m.aff is not None else idx) - np.arange(idx.shape[0])[:, None] * ratio
    a, b = float(off[present].min()), float(off[present].max())
    t = ax.stride
    return _Ax(
        m.out_dim, ax.size + (b - a) * abs(t), ratio * t, ax.start + min(a * t, b * t), lo, hi
    )


def _collapse(q: _Ax) -> _Ax:
    if q.dim is None:
        return q
    out = _apply(q, _whole(len(q.lo), None), len(q.lo))
    assert out is not None
    return out


def _union(parts: list[_Ax], dim: int | None, n: int, context: bool = True) -> _Ax:
    if not context and any(q.stride for q in parts):
        parts = [q for q in parts if q.stride]  # drop position-independent (global) inputs
    lo = np.min([np.broadcast_to(q.lo, (n,)) for q in parts], 0)
    hi = np.max([np.broadcast_to(q.hi, (n,)) for q in parts], 0)
    if len(parts) == 1:
        q = parts[0]
        return _Ax(dim, q.size, q.stride, q.start, lo, hi)
    best: tuple[float, float, float] | None = None  # (size, stride, start)
    for t in sorted({q.stride for q in parts}):
        # box(i) - i*t is linear in i for each part, so its extremes are at i = 0 and n - 1
        ends = [
            (q.start + i * (q.stride - t), q.start + q.size + i * (q.stride - t))
            for q in parts
            for i in (0, n - 1)
        ]
        s, e = min(a for a, _ in ends), max(b for _, b in ends)
        if best is None or e - s < best[0] - _EPS:
            best = (e - s, t, s)
    assert best is not None
    return _Ax(dim, best[0], best[1], best[2], lo, hi)


def _combine(
    parents: list[_Parent], maps: _Maps, out: tuple[int, ...], exact: bool, context: bool = True
) -> _State | None:
    axes: list[_Ax] = []
    for a in range(len(parents[0].state.axes)):
        parts: list[_Ax] = []
        for p in parents:
            ax = p.state.axes[a]
            if ax.dim is None:
                parts.append(ax)
                continue
            m = maps.get(p.j, {}).get(ax.dim, _MISSING)
            if m is _MISSING:
                m = _whole(p.shape[ax.dim], None)
            if m is None:
                return None
            assert isinstance(m, _Map)
            if m.idx.shape[0] != (out[m.out_dim] if m.out_dim is not None else 1):
                return None
            new = _apply(ax, m, p.shape[ax.dim])
            if new is not None:
                parts.append(new)
        if not parts:
            return None
        dim = next((q.dim for q in parts if q.dim is not None), None)
        if dim is not None and any(dim == q.dim for q in axes):
            dim = None  # an earlier axis holds that dim (merged): this one is a hull
        parts = [q if q.dim == dim else _collapse(q) for q in parts]
        axes.append(_union(parts, dim, out[dim] if dim is not None else 1, context))
    return _State(tuple(axes), exact)


# --------------------------------------------------------------------------- call arguments
class _Unbound(Exception):
    """A recorded call that its op's signature does not take: the op is not understood."""


#: The graph being analysed: where a call's public arguments (tensors as OpRefs) are
#: read, the shapes of the ops they name. Set by the module's entry points.
_GRAPH: ContextVar[Any] = ContextVar("lurker_receptive_graph", default=None)


@dataclass(frozen=True)
class _Shaped:
    """A tensor argument known by its shape only (what the handlers read of tensors)."""

    shape: tuple[int, ...]


def _args(op: Op) -> dict[str, Any]:
    """The recorded arguments of one op by parameter name (the op catalogue's ``bind``):
    the raw call where the trace kept it, else the public call, each tensor an OpRef
    whose shape the graph gives (traces with ``save='none'`` keep only that)."""
    args, kwargs = op._skel_args, op._skel_kwargs
    if args is None:
        graph = _GRAPH.get()
        if graph is None:
            raise LurkerError(
                f"receptive_fields needs the call arguments of {op.label} ({op.name}), but "
                "this trace did not keep them (it saved no activation for that op). Trace "
                "with save='all' (the default): lurker.trace(model, x)."
            )
        args, kwargs = _shaped(op.args, graph), _shaped(op.kwargs, graph)
    try:
        return bind(_base_name(op.name), args, kwargs, op.target)
    except TypeError as e:
        raise _Unbound(str(e)) from None


def _shaped(v: Any, graph: Any) -> Any:
    """``v`` with each OpRef replaced by its output's shape (:class:`_Shaped`)."""
    if isinstance(v, OpRef):
        return _Shaped(tuple(graph.ops[v.index].outputs[v.output].shape))
    if isinstance(v, dict):
        return {k: _shaped(x, graph) for k, x in v.items()}
    if type(v) in (tuple, list):
        return type(v)(_shaped(x, graph) for x in v)
    return v


def _tensor_shape(v: Any) -> tuple[int, ...] | None:
    """The shape of a tensor argument, or None for anything else (numbers, None, strings).

    Read off the value's ``shape`` (a live tensor's ``torch.Size``, a :class:`ParamRef`'s
    tuple), so this module needs only graph data and never imports torch.
    """
    shape = getattr(v, "shape", None)
    return tuple(int(n) for n in shape) if isinstance(shape, tuple) else None


def _tup(v: Any, n: int) -> tuple[int, ...]:
    if isinstance(v, (tuple, list)):
        return tuple(int(a) for a in v) if len(v) == n else (int(v[0]),) * n
    return (int(v),) * n


def _dims(v: Any, nd: int) -> list[int]:
    seq = v if isinstance(v, (tuple, list)) else [v]
    return [int(d) % nd if nd else 0 for d in seq]


def _main(parents: list[_Parent]) -> _Parent | None:
    return next((p for p in parents if p.j == 0), None)


def _batch_dims(p: _Parent, out: tuple[int, ...], upto: int) -> dict[int, _Map | None]:
    return {d: _keep(d, p.shape[d], out[d]) for d in range(upto)}


# --------------------------------------------------------------------------- op handlers
# A handler returns, per parent, per parent dim, how it reaches the output; dims and
# parents it leaves out are mixed (each output sees the whole parent axis: always valid).
# ``None`` means "not understood here": the op falls back to the unknown-op rule.
_Handler = Callable[["Op", int, list[_Parent], tuple[int, ...]], "_Maps | None"]


def _aligned(
    parents: list[_Parent], out: tuple[int, ...], reach: Callable[[int, int, int], _Map | None]
) -> _Maps | None:
    """Maps of an op whose output dims line up with each parent's trailing dims
    (broadcasting): ``reach(out_dim, n_in, n_out)`` says how one dim reaches the output,
    or None when it cannot (then the op is not understood here)."""
    maps: _Maps = {}
    for p in parents:
        shift = len(out) - len(p.shape)
        mp: dict[int, _Map | None] = {}
        for ax in p.state.axes:
            if ax.dim is None:
                continue
            d = ax.dim + shift
            m = reach(d, p.shape[ax.dim], out[d]) if d >= 0 else None
            if m is None:
                return None
            mp[ax.dim] = m
        maps[p.j] = mp
    return maps


def _h_pointwise(op: Op, k: int, parents: list[_Parent], out: tuple[int, ...]) -> _Maps | None:
    return _aligned(parents, out, _keep)


def _spatial_op(nd: int, kind: str) -> _Handler:
    """conv / conv_transpose / max, avg and lp pools over the last ``nd`` dims."""

    def handler(op: Op, k: int, parents: list[_Parent], out: tuple[int, ...]) -> _Maps | None:
        p = _main(parents)
        if p is None:
            return {}
        c = (
            _args(op)
            if op.name not in QUANTIZED_CONV
            else packed_call(op.name, op.meta.get("packed"))
        )
        if c is None:  # a quantized conv whose packed weight the trace could not read
            return None
        if kind in ("conv", "convt"):
            w = c.get("weight")
            ws = _tensor_shape(w)
            if ws is None or len(ws) != nd + 2:
                return None
            ks = tuple(int(s) for s in ws[2:])
            stride = _tup(c.get("stride", 1), nd)
        else:
            ks = _tup(c.get("kernel_size"), nd)
            s = c.get("stride")
            stride = ks if s is None or (isinstance(s, (tuple, list)) and not s) else _tup(s, nd)
        dil = _tup(c.get("dilation", 1), nd) if kind in ("conv", "convt", "max") else (1,) * nd
        pad: Any = c.get("padding", 0) if kind != "lp" else 0
        base = len(p.shape) - nd
        maps = _batch_dims(p, out, base - 1)
        if kind != "conv" and kind != "convt":  # pools work per channel
            maps[base - 1] = _keep(base - 1, p.shape[base - 1], out[base - 1])
        for a in range(nd):
            d, kk, s, dl = base + a, ks[a], stride[a], dil[a]
            if pad == "same":
                left = dl * (kk - 1) // 2
            elif pad == "valid":
                left = 0
            else:
                left = _tup(pad, nd)[a]
            if kind == "convt":
                o = np.arange(out[d], dtype=np.int64)[:, None]
                num = o + left - np.arange(kk, dtype=np.int64) * dl
                m = _Map(d, num // s, 1.0 / s, present=(num % s) == 0)
            else:
                m = _window(out[d], kk, s, left, dl)
                m.out_dim = d
            maps[d] = m
        return {p.j: maps}

    return handler


def _conv_add(nd: int) -> _Handler:
    """``quantized::conv2d_add(qx, qaccum, ...)`` (a conv and the add after it, fused):
    ``conv(qx) + qaccum``, so each output position reads ``qx``'s window and ``qaccum``'s
    same position, the fields of a float conv and add merged (``qaccum`` left out would
    read as mixed: the whole image)."""
    conv = _spatial_op(nd, "conv")

    def handler(op: Op, k: int, parents: list[_Parent], out: tuple[int, ...]) -> _Maps | None:
        maps = conv(op, k, [p for p in parents if p.j == 0], out)
        added = _aligned([p for p in parents if p.j == 1], out, _keep)
        return None if maps is None or added is None else {**maps, **added}

    return handler


def _h_convolution(op: Op, k: int, parents: list[_Parent], out: tuple[int, ...]) -> _Maps | None:
    """aten's ``convolution`` (what ``make_fx`` and decomposed exports call for every
    conv): a conv or, ``transposed``, a conv_transpose over its weight's spatial dims."""
    w = _tensor_shape(_args(op).get("weight"))
    if w is None or len(w) < 3:
        return None
    kind = "convt" if _args(op).get("transposed") else "conv"
    return _spatial_op(len(w) - 2, kind)(op, k, parents, out)


def _h_addmm(op: Op, k: int, parents: list[_Parent], out: tuple[int, ...]) -> _Maps | None:
    """``addmm(bias, mat1, mat2)``: the matmul of its second and third tensors (a Linear
    in a decomposed graph); the bias, added to every row, is left mixed."""
    if any(p.j == 0 for p in parents):
        return None  # the bias depends on the input: not a Linear's
    shifted = [_Parent(p.j - 1, p.state, p.shape) for p in parents]
    maps = _h_matmul(op, k, shifted, out)
    return {j + 1: m for j, m in maps.items()} if maps is not None else None


def _adaptive_map(n_in: int, n_out: int) -> _Map:
    i = np.arange(n_out, dtype=np.int64)
    return _ragged((i * n_in) // n_out, ((i + 1) * n_in + n_out - 1) // n_out, n_in / n_out)


def _adaptive(nd: int) -> _Handler:
    def handler(op: Op, k: int, parents: list[_Parent], out: tuple[int, ...]) -> _Maps | None:
        p = _main(parents)
        if p is None:
            return {}
        base = len(p.shape) - nd
        maps = _batch_dims(p, out, base)
        for d in range(base, len(p.shape)):
            m = _adaptive_map(p.shape[d], out[d])
            m.out_dim = d
            maps[d] = m
        return {p.j: maps}

    return handler


def _interp_map(n_in: int, n_out: int, mode: str, align: bool, sf: float | None, aa: bool) -> _Map:
    """Source taps of one interpolated dim, as torch computes them (float32 and float64)."""
    if mode == "area":
        return _adaptive_map(n_in, n_out)
    i = np.arange(n_out)
    f32 = np.float32
    if align and not mode.startswith("nearest"):
        scales = [(f(n_in - 1) / f(n_out - 1) if n_out > 1 else f(0)) for f in (float, f32)]
    else:  # torch divides in the kernel's float type: keep both float64 and float32 taps
        scales = [float(1.0 / sf), f32(1.0 / sf)] if sf else [n_in / n_out, f32(n_in) / f32(n_out)]
    scale = float(scales[0])
    if mode.startswith("nearest"):
        off = 0.5 if mode == "nearest-exact" else 0.0
        cols = [np.floor((i.astype(type(sc)) + type(sc)(off)) * sc) for sc in scales]
        if n_out == 2 * n_in and mode == "nearest":
            cols = [i // 2]
        idx = np.minimum(np.stack(cols, 1).astype(np.int64), n_in - 1)
        return _Map(None, idx, scale)
    cubic = mode == "bicubic"
    if aa:
        return _aa_map(n_in, n_out, scales, cubic)
    cols = []
    for sc in scales:
        dt = type(sc)
        ii = i.astype(dt)
        src = ii * sc if align else (ii + dt(0.5)) * sc - dt(0.5)
        if not cubic:
            src = np.maximum(src, 0)
        base = np.floor(src).astype(np.int64)
        cols += [base + t for t in ((-1, 0, 1, 2) if cubic else (0, 1))]
    return _Map(None, np.stack(cols, 1).clip(0, n_in - 1), scale)


def _aa_filter(x: np.ndarray, cubic: bool) -> np.ndarray:
    """torch's antialiasing filters (``aa_filter``): a triangle, or Keys' cubic (a = -0.5)."""
    x = np.abs(x)
    if not cubic:
        return np.where(x < 1, 1 - x, 0)
    a = x.dtype.type(-0.5)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x < 1, near, np.where(x < 2, far, 0))


def _aa_map(n_in: int, n_out: int, scales: list[Any], cubic: bool) -> _Map:
    """Antialiased taps as torch's ``upsample_*_aa`` weighs them. Its window of
    ``interp_size / 2`` input pixels around ``scale * (i + 0.5)`` (stretched when
    shrinking, the same centre with align_corners) holds end taps the filter weighs 0,
    which nothing reaches: only taps of non-zero weight are kept, in float32 and float64
    (the kernel may weigh in either; their union is a bound), else a box called exact was
    up to two pixels too wide on each side."""
    i = np.arange(n_out)
    rows = np.arange(n_out)
    lo = np.full(n_out, n_in, dtype=np.int64)
    hi = np.zeros(n_out, dtype=np.int64)
    for sc in scales:
        dt = np.float64 if isinstance(sc, float) else np.float32
        s, one, half = dt(sc), dt(1), dt(0.5)
        support = dt(2.0 if cubic else 1.0) * (s if s >= one else one)
        inv = one / s if s >= one else one
        centre = s * (i.astype(dt) + half)
        start = np.maximum(np.trunc(centre - support + half).astype(np.int64), 0)
        end = np.minimum(np.trunc(centre + support + half).astype(np.int64), n_in)
        j = _col(start) + np.arange(max(int((end - start).max()), 1), dtype=np.int64)
        w = _aa_filter((j.astype(dt) - centre[:, None] + half) * inv, cubic)
        nz = (j < _col(end)) & (w != 0)
        has = nz.any(1)
        first = np.where(has, j[rows, nz.argmax(1)], n_in)
        last = np.where(has, j[rows, nz.shape[1] - 1 - nz[:, ::-1].argmax(1)] + 1, 0)
        lo, hi = np.minimum(lo, first), np.maximum(hi, last)
    empty = hi <= lo  # no tap of non-zero weight (not met): the whole axis, as a bound
    return _ragged(np.where(empty, 0, lo), np.where(empty, n_in, hi), float(scales[0]))


def _h_interpolate(op: Op, k: int, parents: list[_Parent], out: tuple[int, ...]) -> _Maps | None:
    p = _main(parents)
    if p is None:
        return {}
    c = _args(op)
    mode = str(c.get("mode", "nearest"))
    nd = len(p.shape) - 2
    sf = c.get("scale_factor")
    if sf is None or c.get("recompute_scale_factor"):
        sfs: tuple[float | None, ...] = (None,) * nd
    else:
        sfs = tuple(float(s) for s in sf) if isinstance(sf, (tuple, list)) else (float(sf),) * nd
    align = bool(c.get("align_corners")) and mode not in ("nearest", "nearest-exact", "area")
    aa = bool(c.get("antialias", False))
    maps = _batch_dims(p, out, 2)
    for a in range(nd):
        d = 2 + a
        m = _interp_map(p.shape[d], out[d], mode, align, sfs[a], aa)
        m.out_dim = d
        maps[d] = m
    return {p.j: maps}


def _h_pad(op: Op, k: int, parents: list[_Parent], out: tuple[int, ...]) -> _Maps | None:
    p = _main(parents)
    if p is None:
        return {}
    c = _args(op)
    pad = [int(v) for v in c.get("pad")]
    mode = str(c.get("mode", "constant"))
    maps: dict[int, _Map | None] = {d: _keep(d, p.shape[d], out[d]) for d in range(len(p.shape))}
    for q in range(len(pad) // 2):
        d = len(p.shape) - 1 - q
        n = p.shape[d]
        x = np.arange(out[d], dtype=np.int64) - pad[2 * q]  # nominal: a shift by the left pad
        if mode == "reflect":
            src = np.where(x < 0, -x, np.where(x >= n, 2 * (n - 1) - x, x))
        elif mode == "replicate":
            src = x.clip(0, n - 1)
        elif mode == "circular":
            src = x % n
        else:
            src = x
        maps[d] = _Map(d, src[:, None], 1.0, aff=x[:, None])
    return {p.j: maps}


def _h_reshape(op: Op, k: int, parents: list[_Parent], out: tuple[int, ...]) -> _Maps | None:
    """view/reshape/flatten/squeeze...: a dim survives if the products before it match."""
    p = _main(parents)
    if p is None:
        return {}
    pre_out = np.cumprod((1, *out))
    maps: dict[int, _Map | None] = {}
    pre = 1
    for d, n in enumerate(p.shape):
        for e, m in enumerate(out):
            if pre_out[e] == pre and m == n:
                maps[d] = _keep(e, n, m)
                break
        pre *= n
    return {p.j: maps}


def _perm(op: Op, nd: int) -> list[int] | None:
    """Output dim e holds input dim perm[e]."""
    name = _base_name(op.name)
    if name not in _PERMUTING:
        return None
    return axis_permutation(name, {} if name in _NO_ARGS else _args(op), nd)


#: ops that reorder axes, and those of them that take no arguments to say how
_PERMUTING = frozenset(
    {"permute", "transpose", "swapaxes", "swapdims", "t", "T", "H", "mT", "mH", "adjoint",
     "movedim", "moveaxis"}
)  # fmt: skip
_NO_ARGS = frozenset({"t", "T", "H", "mT", "mH", "adjoint"})


def axis_permutation(name: str, call: dict[str, Any], nd: int) -> list[int] | None:
    """Which input axis each output axis of the reordering op ``name`` (``permute``,
    ``transpose`` and its aliases, ``t``/``mT`` and their kin, ``movedim``) is, from its
    arguments bound by name (``call``): output axis e holds input axis ``perm[e]``. None
    where the arguments cannot be read (not whole numbers, not a permutation) or ``name``
    reorders no axes. One reading for every analysis that follows axes through these ops
    (receptive fields, attention's query and key axes)."""
    perm = list(range(nd))
    if name == "permute":
        dims = call.get("dims")
        if (
            isinstance(dims, (tuple, list))
            and len(dims) == 1
            and isinstance(dims[0], (tuple, list))
        ):
            dims = dims[0]  # x.permute((0, 2, 1)): the dims as one tuple
        got = _ints(dims, nd)
        return got if got is not None and sorted(got) == perm else None
    if name in ("transpose", "swapaxes", "swapdims"):
        a = call.get("dim0", call.get("axis0"))
        b = call.get("dim1", call.get("axis1"))
        if not (isinstance(a, int) and isinstance(b, int)) or not nd:
            return None
        a, b = a % nd, b % nd
        perm[a], perm[b] = perm[b], perm[a]
        return perm
    if name in ("t", "T", "H"):
        return perm[::-1]
    if name in ("mT", "mH", "adjoint"):
        if nd < 2:
            return None
        perm[-1], perm[-2] = perm[-2], perm[-1]
        return perm
    if name in ("movedim", "moveaxis"):
        src = _ints(call.get("source", 0), nd)
        dst = _ints(call.get("destination", 0), nd)
        if src is None or dst is None or len(src) != len(dst):
            return None
        res: list[int | None] = [None] * nd
        for s, t in zip(src, dst):
            res[t] = s
        rest = iter(d for d in range(nd) if d not in src)
        return [r if r is not None else next(rest) for r in res]
    return None


def _ints(v: Any, nd: int) -> list[int] | None:
    """Axis numbers (one or a sequence) made non-negative; None where one is not a whole
    number or there are no axes."""
    seq = v if isinstance(v, (tuple, list)) else [v]
    if not nd or not all(isinstance(d, int) and not isinstance(d, bool) for d in seq):
        return None
    return [d % nd for d in seq]


def _h_permute(op: Op, k: int, parents: list[_Parent], out: tuple[int, ...]) -> _Maps | None:
    p = _main(parents)
    if p is None:
        return {}
    perm = _perm(op, len(p.shape))
    if perm is None or len(perm) != len(out):
        return None
    return {p.j: {d: _keep(e, p.shape[d], out[e]) for e, d in enumerate(perm)}}


def _h_getitem(op: Op, k: int, parents: list[_Parent], out: tuple[int, ...]) -> _Maps | None:
    p = _main(parents)
    if p is None:
        return {}
    index = _args(op).get("index")
    items = list(index) if isinstance(index, tuple) else [index]
    if any(
        not (e is None or e is Ellipsis or isinstance(e, (int, slice))) or isinstance(e, bool)
        for e in items
    ):
        return None  # advanced indexing
    nd = len(p.shape)
    n_spec = sum(1 for e in items if e is not None and e is not Ellipsis)
    if Ellipsis in items:
        i = items.index(Ellipsis)
        items[i : i + 1] = [slice(None)] * (nd - n_spec)
    items += [slice(None)] * (nd - sum(1 for e in items if e is not None))
    maps: dict[int, _Map | None] = {}
    d = e = 0
    for it in items:
        if it is None:
            e += 1
            continue
        n = p.shape[d]
        if isinstance(it, int):
            maps[d] = _index(n, it)
        else:
            start, _, step = it.indices(n)
            cnt = len(range(*it.indices(n)))
            if e >= len(out) or out[e] != cnt:
                return None
            maps[d] = _Map(e, _col(start + np.arange(cnt) * step), float(step))
            e += 1
        d += 1
    return {p.j: maps}


def _offset_map(out_dim: int, n_out: int, off: int, n_in: int) -> _Map:
    i = np.arange(n_out, dtype=np.int64) - off
    return _Map(out_dim, i[:, None], 1.0, present=((i >= 0) & (i < n_in))[:, None])


def _h_cat(op: Op, k: int, parents: list[_Parent], out: tuple[int, ...]) -> _Maps | None:
    c = _args(op)
    seq = c.get("tensors")
    if not isinstance(seq, (tuple, list)):
        return None
    shapes = [_tensor_shape(t) for t in seq]
    if any(sh is None for sh in shapes):
        return None
    dim = int(c.get("dim", 0)) % len(out)
    stack = op.name == "stack"
    offs = (
        np.cumsum([0] + [0 if sh == (0,) else int(sh[dim]) for sh in shapes])  # type: ignore[index]
        if not stack
        else None
    )
    maps: _Maps = {}
    for p in parents:
        if p.j >= len(seq):
            continue
        mp: dict[int, _Map | None] = {}
        for d, n in enumerate(p.shape):
            if stack:
                e = d if d < dim else d + 1
                mp[d] = _keep(e, n, out[e])
            elif d == dim:
                assert offs is not None
                mp[d] = _offset_map(d, out[d], int(offs[p.j]), n)
            else:
                mp[d] = _keep(d, n, out[d])
        maps[p.j] = mp
    return maps


def _h_split(op: Op, k: int, parents: list[_Parent], out: tuple[int, ...]) -> _Maps | None:
    p = _main(parents)
    if p is None:
        return {}
    unbind = op.name == "unbind"
    c = _args(op)
    dim = int(c.get("dim", 0)) % len(p.shape)
    start = k if unbind else sum(op.outputs[q].shape[dim] for q in range(k))
    return {p.j: _slice_maps(p.shape, dim, start, out, drop=unbind)}


def _h_narrow(op: Op, k: int, parents: list[_Parent], out: tuple[int, ...]) -> _Maps | None:
    p = _main(parents)
    if p is None:
        return {}
    select = op.name == "select"
    c = _args(op)
    dim = int(c.get("dim")) % len(p.shape)
    pos = c.get("index") if select else c.get("start")
    if not isinstance(pos, int):
        return None
    start = pos if select else pos % p.shape[dim]
    return {p.j: _slice_maps(p.shape, dim, start, out, drop=select)}


def _slice_maps(
    shape: tuple[int, ...], dim: int, start: int, out: tuple[int, ...], *, drop: bool
) -> dict[int, _Map | None]:
    """Maps of an op that keeps positions ``start, start + 1, ...`` of ``dim`` and every
    other dimension whole (split, narrow); ``drop``: it keeps the one index ``start`` and
    removes the dimension (unbind, select)."""
    maps: dict[int, _Map | None] = {}
    e = 0
    for d, n in enumerate(shape):
        if d == dim and drop:
            maps[d] = _index(n, start)
            continue
        if d == dim:
            maps[d] = _Map(e, _col(start + np.arange(out[e])), 1.0)
        else:
            maps[d] = _keep(e, n, out[e])
        e += 1
    return maps


def _h_flip(op: Op, k: int, parents: list[_Parent], out: tuple[int, ...]) -> _Maps | None:
    p = _main(parents)
    if p is None:
        return {}
    nd = len(p.shape)
    if op.name in ("fliplr", "flipud"):
        dims = [1 if op.name == "fliplr" else 0]
    else:
        dims = _dims(_args(op).get("dims"), nd)
    maps: dict[int, _Map | None] = {}
    for d, n in enumerate(p.shape):
        maps[d] = _Map(d, _col(n - 1 - np.arange(n)), -1.0) if d in dims else _keep(d, n, out[d])
    return {p.j: maps}


def _h_roll(op: Op, k: int, parents: list[_Parent], out: tuple[int, ...]) -> _Maps | None:
    p = _main(parents)
    if p is None:
        return {}
    c = _args(op)
    dims, shifts = c.get("dims"), c.get("shifts")
    if dims is None or (isinstance(dims, (tuple, list)) and not dims):
        return {}  # rolls the flattened tensor: mix everything
    nd = len(p.shape)
    roll = dict(zip(_dims(dims, nd), _tup(shifts, len(_dims(dims, nd)))))
    maps: dict[int, _Map | None] = {}
    for d, n in enumerate(p.shape):
        maps[d] = (
            _Map(d, _col((np.arange(n) - roll[d]) % n), 1.0) if d in roll else _keep(d, n, out[d])
        )
    return {p.j: maps}


def _h_repeat(op: Op, k: int, parents: list[_Parent], out: tuple[int, ...]) -> _Maps | None:
    p = _main(parents)
    if p is None:
        return {}
    shift = len(out) - len(p.shape)
    return {
        p.j: {
            d: _Map(d + shift, _col(np.arange(out[d + shift]) % n), 1.0)
            for d, n in enumerate(p.shape)
        }
    }


def _h_pixel_shuffle(op: Op, k: int, parents: list[_Parent], out: tuple[int, ...]) -> _Maps | None:
    p = _main(parents)
    if p is None or len(p.shape) < 3:
        return None
    nd = len(p.shape)
    maps = _batch_dims(p, out, nd - 3)
    for d in (nd - 2, nd - 1):
        n_in, n_out = p.shape[d], out[d]
        if op.name == "pixel_shuffle":
            r = n_out // n_in
            maps[d] = _Map(d, _col(np.arange(n_out) // r), 1.0 / r)
        else:
            r = n_in // n_out
            maps[d] = _Map(d, _col(np.arange(n_out) * r) + np.arange(r), float(r))
    return {p.j: maps}


_REDUCE = {
    "mean", "sum", "nansum", "nanmean", "prod", "amax", "amin", "max", "min", "std", "var",
    "std_mean", "var_mean", "norm", "logsumexp", "median", "nanmedian", "mode", "all", "any",
    "argmax", "argmin", "count_nonzero", "aminmax",
}  # fmt: skip


def _h_reduce(op: Op, k: int, parents: list[_Parent], out: tuple[int, ...]) -> _Maps | None:
    p = _main(parents)
    if p is None:
        return {}
    c = _args(op)
    if op.name in ("max", "min") and (
        _tensor_shape(c.get("other")) is not None or _tensor_shape(c.get("dim")) is not None
    ):
        return _h_pointwise(op, k, parents, out)  # torch.max(a, b): elementwise
    nd = len(p.shape)
    dim = c.get("dim")
    if isinstance(dim, bool) or (dim is not None and not isinstance(dim, (int, tuple, list))):
        return None  # std(x, True): that is 'unbiased'
    red = set(range(nd)) if dim is None or dim == () or dim == [] else set(_dims(dim, nd))
    keep = len(out) == nd and nd > 0
    expect = (
        [1 if d in red else n for d, n in enumerate(p.shape)]
        if keep
        else [n for d, n in enumerate(p.shape) if d not in red]
    )
    if tuple(expect) != tuple(out):
        return None
    maps: dict[int, _Map | None] = {}
    e = 0
    for d, n in enumerate(p.shape):
        if d in red:
            maps[d] = _whole(n, e if keep else None)
            e += keep
        else:
            maps[d] = _keep(e, n, out[e])
            e += 1
    return {p.j: maps}


# Ops that mix along one dim (its default is the op's own; softmax's None: the legacy
# implicit dim).
_ALONG = {
    "softmax", "log_softmax", "softmin", "normalize", "sort", "argsort", "cumsum", "cumprod",
    "cummax", "cummin", "logcumsumexp",
}  # fmt: skip


def _h_along(op: Op, k: int, parents: list[_Parent], out: tuple[int, ...]) -> _Maps | None:
    """Ops that mix along one dim: each output sees that whole axis (cum*: a prefix)."""
    p = _main(parents)
    if p is None:
        return {}
    nd = len(p.shape)
    dim = _args(op).get("dim", 0)  # cumsum and friends: dim has no default
    if dim is None:
        dim = 0 if nd in (0, 1, 3) else 1
    dim = int(dim) % nd
    maps: dict[int, _Map | None] = {d: _keep(d, n, out[d]) for d, n in enumerate(p.shape)}
    n = p.shape[dim]
    if op.name.startswith("cum") or op.name == "logcumsumexp":
        maps[dim] = _prefix(n, dim)
    else:
        maps[dim] = _whole(n, dim, n)
    return {p.j: maps}


def _h_linear(op: Op, k: int, parents: list[_Parent], out: tuple[int, ...]) -> _Maps | None:
    """linear acts on the last dim; the others (e.g. H, W of an NHWC tensor) are kept."""
    p = _main(parents)
    if p is None or len(p.shape) != len(out):
        return {} if p is None else None
    return {p.j: _batch_dims(p, out, len(out) - 1)}


def _h_matmul(op: Op, k: int, parents: list[_Parent], out: tuple[int, ...]) -> _Maps | None:
    maps: _Maps = {}
    for p in parents:
        nd = len(p.shape)
        if p.j > 1 or nd < 2 or len(out) < 2:
            continue
        shift = len(out) - nd
        mp: dict[int, _Map | None] = {}
        for d, n in enumerate(p.shape):
            if (p.j == 0 and d < nd - 1) or (p.j == 1 and d != nd - 2):
                mp[d] = _keep(d + shift, n, out[d + shift])
        maps[p.j] = mp
    return maps


def _h_grid_sample(op: Op, k: int, parents: list[_Parent], out: tuple[int, ...]) -> _Maps | None:
    """The input is sampled anywhere (mixed); the grid's (N, H, W) dims are the output's."""
    maps: _Maps = {}
    for p in parents:
        if p.j == 1 and len(p.shape) == len(out):
            nd = len(out)
            maps[1] = {0: _keep(0, p.shape[0], out[0])}
            maps[1].update({d: _keep(d + 1, p.shape[d], out[d + 1]) for d in range(1, nd - 1)})
    return maps


def _h_setitem(op: Op, k: int, parents: list[_Parent], out: tuple[int, ...]) -> _Maps | None:
    """``x[i] = v``: x is kept position-wise; v may land anywhere (mixed)."""
    p = _main(parents)
    if p is None:
        return {}
    return {p.j: {d: _keep(d, n, out[d]) for d, n in enumerate(p.shape)}}


def _recorded_args(op: Op) -> list[Any]:
    """An op's positional arguments as recorded: the raw call, else the public one."""
    args = op._skel_args if op._skel_args is not None else op.args
    return list(args or ())


def _h_recurrent(op: Op, k: int, parents: list[_Parent], out: tuple[int, ...]) -> _Maps | None:
    """``nn.LSTM``/``GRU``/``RNN`` (torch's lstm, gru, rnn_tanh, rnn_relu): output step
    ``t`` depends on input steps ``0..t`` (on every step where the RNN is bidirectional)
    and on the whole initial state; the features are mixed. The final states (outputs 1
    and 2: ``h_n``, ``c_n``) see every step. A packed sequence holds every sequence's
    steps on one axis: each of its rows sees the whole axis."""
    p = _main(parents)
    if p is None:
        return {}  # only the initial state depends on the input: it reaches every step
    args = _recorded_args(op)
    nd = len(p.shape)
    if len(args) > 3 and isinstance(args[3], (list, tuple)):  # (data, batch_sizes, hx, params, ...)
        if k == 0 and nd == 2 and len(out) == 2:
            return {p.j: {0: _whole(p.shape[0], 0, out[0])}}
        return {}
    if len(args) < 9 or nd not in (2, 3):  # (input, hx, params, ..., bidirectional, batch_first)
        return None
    bidirectional, batch_first = bool(args[7]), bool(args[8])
    t_dim, b_dim = ((1, 0) if batch_first else (0, 1)) if nd == 3 else (0, None)
    maps: dict[int, _Map | None] = {}
    if k == 0:
        if len(out) != nd:
            return None
        n = p.shape[t_dim]
        if out[t_dim] != n:
            return None
        maps[t_dim] = _whole(n, t_dim, n) if bidirectional else _prefix(n, t_dim)
        if b_dim is not None:
            maps[b_dim] = _keep(b_dim, p.shape[b_dim], out[b_dim])
    elif b_dim is not None and len(out) == 3:  # h_n, c_n: (layers * directions, N, H)
        maps[b_dim] = _keep(1, p.shape[b_dim], out[1])
    return {p.j: maps}


def _h_cell(op: Op, k: int, parents: list[_Parent], out: tuple[int, ...]) -> _Maps | None:
    """One step of an RNN cell (lstm_cell, gru_cell, rnn_*_cell): each batch row of the
    input and the state gives that row of the output; the features are mixed."""
    return {
        p.j: {0: _keep(0, p.shape[0], out[0])}
        for p in parents
        if len(p.shape) == 2 and len(out) == 2
    }


def _h_unknown(op: Op, k: int, parents: list[_Parent], out: tuple[int, ...]) -> _Maps | None:
    """An op whose footprint is not known here but that keeps the spatial sizes: each
    output position may read any position of each spatial axis (a rotation, a gather, an
    RNN lurker does not know), so it sees the whole axis, kept in place. Assuming it
    position-wise instead would give boxes that are silently too small. ``None`` where the
    sizes change (which output dim holds which axis is then unknown)."""
    return _aligned(parents, out, _read_whole)


def _read_whole(out_dim: int, n_in: int, n_out: int) -> _Map | None:
    """A dim kept in place (or broadcast) whose every output position reads all of it."""
    return _whole(n_in, out_dim, n_out) if n_in in (n_out, 1) else None


_POINTWISE = {
    "add", "sub", "subtract", "mul", "multiply", "div", "divide", "true_divide", "floor_divide",
    "remainder", "fmod", "mod", "pow", "float_power", "neg", "negative", "pos", "positive", "abs",
    "absolute", "exp", "exp2", "expm1", "log", "log2", "log10", "log1p", "sqrt", "rsqrt",
    "square", "reciprocal", "sign", "sgn", "sin", "cos", "tan", "sinh", "cosh", "asin", "acos",
    "atan", "atan2", "floor", "ceil", "round", "trunc", "frac", "erf", "erfc", "erfinv",
    "sigmoid", "logit", "tanh", "relu", "relu6", "leaky_relu", "elu", "selu", "celu", "gelu",
    "silu", "mish", "hardswish", "hardsigmoid", "hardtanh", "hardshrink", "softshrink",
    "softplus", "softsign", "tanhshrink", "threshold", "logsigmoid", "prelu", "rrelu", "clamp",
    "clip", "clamp_min", "clamp_max", "maximum", "minimum", "fmax", "fmin", "where", "lerp",
    "addcmul", "addcdiv", "masked_fill", "nan_to_num", "eq", "ne", "lt", "le", "gt", "ge",
    "logical_and", "logical_or", "logical_not", "logical_xor", "bitwise_and", "bitwise_or",
    "bitwise_not", "bitwise_xor", "and", "or", "xor", "invert", "isnan", "isinf", "isfinite",
    "batch_norm", "instance_norm", "group_norm", "layer_norm", "rms_norm",
    "local_response_norm", "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout",
    "feature_alpha_dropout", "feature_dropout", "contiguous", "clone", "detach", "to", "type",
    "type_as", "float", "double", "half", "bfloat16", "int", "long", "bool", "cpu", "cuda",
    "copy", "zero", "fill", "expand", "expand_as", "broadcast_to", "channel_shuffle",
    "native_channel_shuffle", "requires_grad", "radd", "rsub", "rmul", "rdiv", "rpow",
    "rfloordiv", "rmod", "iadd", "isub", "imul", "itruediv", "idiv", "ifloordiv", "imod", "ipow",
    "real", "imag", "conj", "masked_scatter", "tril", "triu", "logaddexp", "logaddexp2",
    "hypot", "copysign", "xlogy", "heaviside", "sinc", "lgamma", "digamma", "fix", "ldexp",
    "angle", "signbit", "conj_physical", "lshift", "rshift", "bitwise_left_shift",
    "bitwise_right_shift", "deg2rad", "rad2deg", "i0", "nextafter", "isclose", "isneginf",
    "isposinf", "isreal",
    # quantization (QuantStub, DeQuantStub) and what quantized models run elementwise
    "quantize_per_tensor", "dequantize", "quantized_add", "quantized_add_relu",
    "quantized_mul", "quantized_mul_relu", "quantized_hardswish", "quantized_leaky_relu",
    "quantized_elu", "quantized_batch_norm1d", "quantized_batch_norm2d",
    "quantized_batch_norm3d",
    # what decomposed aten graphs (make_fx, run_decompositions) call for a BatchNorm in eval
    # (output 0; its saved statistics are of other shapes) and for a returned view
    "_native_batch_norm_legit_no_training", "native_batch_norm", "alias",
}  # fmt: skip

_HANDLERS: dict[str, _Handler] = {n: _h_pointwise for n in _POINTWISE}
for _nd in (1, 2, 3):
    _HANDLERS[f"conv{_nd}d"] = _spatial_op(_nd, "conv")
    _HANDLERS[f"conv_transpose{_nd}d"] = _spatial_op(_nd, "convt")
    _HANDLERS[f"max_pool{_nd}d"] = _spatial_op(_nd, "max")
    _HANDLERS[f"max_pool{_nd}d_with_indices"] = _spatial_op(_nd, "max")
    _HANDLERS[f"avg_pool{_nd}d"] = _spatial_op(_nd, "avg")
    _HANDLERS[f"lp_pool{_nd}d"] = _spatial_op(_nd, "lp")
    for _kind in ("avg", "max"):
        _HANDLERS[f"adaptive_{_kind}_pool{_nd}d"] = _adaptive(_nd)
        _HANDLERS[f"adaptive_{_kind}_pool{_nd}d_with_indices"] = _adaptive(_nd)
for _name, _nd in QUANTIZED_CONV.items():  # quantized_conv2d_relu: its relu is pointwise
    _HANDLERS[_name] = (
        _conv_add(_nd)
        if "_add" in _name
        else _spatial_op(_nd, "convt" if "transpose" in _name else "conv")
    )
_HANDLERS.update({n: _h_reduce for n in _REDUCE})
_HANDLERS.update({n: _h_along for n in _ALONG})
for _h, _names in {
    _h_reshape: (
        "view reshape flatten unflatten squeeze unsqueeze view_as reshape_as ravel _unsafe_view"
    ),
    _h_permute: "permute transpose swapaxes swapdims t T H mT mH adjoint movedim moveaxis",
    _h_split: "split split_with_sizes chunk tensor_split unsafe_split unsafe_chunk unbind",
    _h_narrow: "narrow select",
    _h_flip: "flip fliplr flipud",
    _h_cat: "cat concat concatenate stack",
    _h_repeat: "repeat tile",
    _h_pixel_shuffle: "pixel_shuffle pixel_unshuffle",
    _h_matmul: "matmul mm bmm",
    _h_addmm: "addmm",
    _h_convolution: "convolution _convolution",
    _h_interpolate: "interpolate upsample",
    _h_pad: "pad",
    _h_getitem: "getitem",
    _h_roll: "roll",
    _h_linear: " ".join(("linear", *QUANTIZED_LINEAR)),
    _h_grid_sample: "grid_sample",
    _h_setitem: "setitem",
    _h_recurrent: "lstm gru rnn_tanh rnn_relu",
    _h_cell: "lstm_cell gru_cell rnn_tanh_cell rnn_relu_cell",
}.items():
    _HANDLERS.update(dict.fromkeys(_names.split(), _h))


# Ops whose output takes only the shape (or device) of their tensor argument, not its values.
_VALUE_FREE = {
    "zeros_like", "ones_like", "full_like", "empty_like", "rand_like", "randn_like",
    "randint_like", "new_zeros", "new_ones", "new_full", "new_empty", "new_tensor", "size",
}  # fmt: skip


def _base_name(name: str) -> str:
    if name.endswith("_") and not name.endswith("__") and name[:-1] in _HANDLERS:
        return name[:-1]  # in-place variant: relu_, add_
    return name


# --------------------------------------------------------------------------- the walk
def _propagate(
    op: Op, k: int, parents: list[_Parent], out: tuple[int, ...], context: bool
) -> _State | None:
    if any(n == 0 for n in out):
        return None
    exact = all(p.state.exact for p in parents)
    if all(ax.dim is None for p in parents for ax in p.state.axes):
        return _combine(parents, {}, out, exact)  # no spatial dims left: any op sees the hull
    if op.kind == "output":
        return _combine(parents, _h_pointwise(op, k, parents, out) or {}, out, exact, context)
    handler = _HANDLERS.get(_base_name(op.name))
    try:
        maps = handler(op, k, parents, out) if handler is not None else None
    except _Unbound:  # a call its op's signature does not take
        maps = None
    if maps is None:  # unknown: the whole of each spatial axis if its size is kept, else no RF
        maps = _h_unknown(op, k, parents, out)
        exact = False
        if maps is None:
            return None
    return _combine(parents, maps, out, exact, context)


def _pick_input(trace: _OpGraph, label: str | None, waveform: bool = False) -> Op:
    """The input the fields are of; ``waveform`` (``time_axis=1``) also takes a ``(N, T)``
    one, a raw waveform the model gives its one channel itself."""
    dims = (2, 3) if waveform else (3, 4, 5)
    if label is not None:
        op = trace[label]
        if op.kind != "input":
            raise LurkerError(
                f"{label!r} is not a model input of this trace ({op.label} is {op.kind!r})."
            )
    else:
        shaped = [o for o in trace.inputs if o.shape is not None and len(o.shape) in dims]
        # a signal (N, C, T) before a waveform (N, T): another 2-D input (a model's side
        # features) is no waveform when a signal is there
        op = next((o for o in shaped if len(o.shape) == 3), None) if waveform else None
        op = op or next(iter(shaped), None)
        if op is None:
            raise LurkerError(
                "receptive_fields needs a model input of shape (N, C, H, W), (N, C, L) or a "
                "video clip (N, C, D, H, W); this trace's inputs have shapes "
                f"{[o.shape for o in trace.inputs]}."
            )
    if op.shape is None or len(op.shape) not in (*dims, 3, 4, 5):
        raise LurkerError(
            f"input {label!r} has shape {op.shape}; expected (N, C, H, W), (N, C, L) or "
            "(N, C, D, H, W)."
        )
    return op


def _num(v: float) -> float:
    r = round(v)
    return int(r) if abs(v - r) < 1e-6 else float(v)


def _finish(st: _State, size: tuple[int, ...]) -> RF:
    """The public RF of one state; ``size`` is the input's extent along each state axis:
    (H, W), or (D, H, W) for a clip (whose state axes are (t, y, x))."""
    axes = []
    full = True
    for ax, n in zip(st.axes, size):
        empty = ax.lo > ax.hi
        lo = np.where(empty, 0, ax.lo)
        hi = np.where(empty, 0, ax.hi + 1)
        full = full and bool((lo == 0).all() and (hi == n).all())
        axes.append(
            Axis(
                _num(ax.size),
                _num(ax.stride),
                _num(ax.start),
                ax.dim,
                tuple(lo.tolist()),
                tuple(hi.tolist()),
            )
        )
    if len(axes) == 3:
        return RF(axes[1], axes[2], size, full, st.exact, axes[0])
    return RF(axes[0], axes[1], size, full, st.exact)


def receptive_fields(
    graph: _OpGraph,
    input_label: str | None = None,
    *,
    global_context: bool = True,
    time_axis: int | None = None,
    gaps: dict[int, str] | None = None,
) -> dict[int, RF]:
    """Receptive field of every op of ``graph`` (by node index) whose output depends on
    one input.

    ``input_label`` names the input (label or name, e.g. ``'x'``); by default the first
    input of shape (N, C, H, W), (N, C, L) or (N, C, D, H, W) (a video clip: its fields
    have a ``t`` axis over the frames). Ops whose outputs have no spatial dims left
    (flatten, linear, global means) get one box for the whole output. Ops of unknown
    footprint that keep the spatial sizes are taken to mix each spatial axis whole (their
    fields and their descendants' have ``exact=False``); those that change the sizes, and
    everything computed from them, are absent. Reads each op's recorded call (the public ``args``/``kwargs`` where the
    trace kept no more, as with ``save='none'``).

    ``global_context=False`` leaves out, where an op combines a local input with a
    position-independent one (a squeeze-excitation gate, an image-pooling branch), the
    latter: strictly every later position then sees the whole image, which is true but
    hides the local region that shapes a unit's response (what a crop should show).

    ``time_axis``: for a signal input of three axes, the axis that holds time (2, the
    default, for ``(N, C, T)``; 1 for a channels-last ``(N, T, C)`` the model transposes
    or reads per step, and for a raw waveform ``(N, T)`` the model gives its one channel):
    the fields' x axis is then along it.

    ``gaps``, where given, is filled with why each op that depends on the input has no
    field: the op that broke the chain and how (its descendants name the same op), so a
    layer without a crop can say why.
    """
    src = _pick_input(graph, input_label, waveform=time_axis == 1)
    rank = len(src.shape or ())
    waveform = rank == 2 and time_axis == 1
    if time_axis is not None and not ((rank == 3 and time_axis in (1, 2)) or waveform):
        raise LurkerError(
            f"time_axis={time_axis} needs a signal input (N, C, T) or (N, T, C) and an axis 1 "
            f"or 2, or a waveform (N, T) and axis 1; this input has shape {src.shape}"
        )
    shape = tuple(src.shape or ())
    nd = len(shape)
    size = (1, shape[2]) if nd == 3 else tuple(int(n) for n in shape[2:])
    # one axis per input dim after (N, C), each mapped to itself; a 1-D input gets a
    # trivial y axis (one row) so that every field has y and x
    axes = tuple(_Ax(2 + a, 1, 1, 0, np.arange(n), np.arange(n)) for a, n in enumerate(shape[2:]))
    if time_axis == 1:  # a channels-last signal: time on axis 1
        size = (1, shape[1])
        axes = (_Ax(1, 1, 1, 0, np.arange(shape[1]), np.arange(shape[1])),)
    if nd in (2, 3):  # a waveform (N, T) has its time on axis 1 too
        axes = (_Ax(None, 1, 0, 0, np.zeros(1, np.int64), np.zeros(1, np.int64)), *axes)
    states: dict[tuple[int, int], _State] = {(src.index, 0): _State(axes, True)}
    dep = {src.index}
    token = _GRAPH.set(graph)
    try:
        _spread(graph, states, dep, global_context, gaps if gaps is not None else {})
    finally:
        _GRAPH.reset(token)
    return {i: _finish(st, size) for (i, k), st in states.items() if k == 0}


def _spread(
    graph: _OpGraph,
    states: dict[tuple[int, int], _State],
    dep: set[int],
    global_context: bool,
    gaps: dict[int, str],
) -> None:
    """Carry the input's receptive-field state through every op of ``graph``; ``gaps``
    gets, per op left without one, why (an op after a gap inherits its reason)."""
    for op in graph.ops:
        if op.kind not in ("op", "output"):
            continue
        ins = [(j, s, k) for j, (s, k) in enumerate(op._inputs) if isinstance(s, int) and s in dep]
        if not ins or op.name in _VALUE_FREE:
            continue
        dep.add(op.index)
        parents = []
        for j, s, k in ins:
            st = states.get((s, k))
            if st is None:  # depends on something without an RF: so does this op
                gaps[op.index] = gaps.get(s) or f"{graph.ops[s].label} has no receptive field"
                break
            parents.append(_Parent(j, st, tuple(graph.ops[s].outputs[k].shape)))
        else:
            for k, meta in enumerate(op.outputs):
                st = _propagate(op, k, parents, tuple(meta.shape), global_context)
                if st is not None:
                    states[(op.index, k)] = st
                elif k == 0:
                    gaps[op.index] = _gap(op, tuple(meta.shape))


def _gap(op: Op, out: tuple[int, ...]) -> str:
    """Why :func:`_propagate` gave ``op`` no field, naming the op (its label) and its kind."""
    if any(n == 0 for n in out):
        return f"{op.label}: its output {out} is empty"
    if _HANDLERS.get(_base_name(op.name)) is None:
        return (
            f"{op.label}: no receptive-field rule for {op.name}, and it changes the spatial "
            f"sizes (to {out}), so which output position reads which input ones is unknown"
        )
    return f"{op.label}: its {op.name} call moves the spatial positions in a way lurker cannot map"


def follow_axes(
    op: Op, k: int, axes: Sequence[tuple[int, int, tuple[int, ...]]], graph: Any = None
) -> list[tuple[int, np.ndarray] | None]:
    """Where whole parent axes go in output ``k`` of ``op``, by the same per-axis rules as
    :func:`receptive_fields` (other analyses follow an axis of their own this way: the
    probe its unit and token axes).

    ``axes``: per entry, the parent's position among the op's tensor arguments, the axis,
    and the parent's shape. Each entry gives ``(output axis, idx)`` where every output
    position ``i`` along that axis reads the one parent position ``idx[i]`` (``-1``: it
    reads padding or nothing), as through elementwise ops, permutes, reshapes that keep
    the axis, slicing, flips, padding and concatenation; ``None`` where the op mixes,
    splits or drops the axis, or is not known here. ``graph``: the op's graph, where the
    trace kept only the public call (tensor arguments as OpRefs).
    """
    handler = _HANDLERS.get(_base_name(op.name))
    if handler is None:
        return [None] * len(axes)
    token = _GRAPH.set(graph)
    try:
        return _follow(handler, op, k, axes)
    finally:
        _GRAPH.reset(token)


def _follow(
    handler: _Handler, op: Op, k: int, axes: Sequence[tuple[int, int, tuple[int, ...]]]
) -> list[tuple[int, np.ndarray] | None]:
    out = tuple(op.outputs[k].shape)
    found: list[tuple[int, np.ndarray] | None] = []
    for j, axis, shape in axes:
        n = shape[axis]
        ax = _Ax(axis, 1, 1, 0, np.arange(n), np.arange(n))
        none = _Ax(None, 1, 1, 0, np.zeros(1, np.int64), np.zeros(1, np.int64))
        try:
            maps = handler(op, k, [_Parent(j, _State((ax, none), True), shape)], out)
        except Exception:  # arguments the rule does not understand: the axis is not carried
            maps = None
        m = (maps or {}).get(j, {}).get(axis)
        if m is None or m.out_dim is None or m.idx.shape[1] != 1 or m.ratio == 0:
            found.append(None)
            continue
        idx = m.idx[:, 0]
        ok = (idx >= 0) & (idx < n)
        if m.present is not None:
            ok &= m.present[:, 0]
        found.append((m.out_dim, np.where(ok, idx, -1)))
    return found
