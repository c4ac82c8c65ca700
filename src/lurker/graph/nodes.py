"""The nodes of a traced graph: one :class:`Op` per recorded tensor operation.

These are plain, torch-free records. The recorder fills the raw fields during the forward
pass, the build after it (:func:`lurker.capture._build.build`) the derived ones (labels,
passes, distances, FLOPs, the public call), and everything downstream (rendering, JSON,
the probe) only reads them. A graph read back from JSON holds the same records.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

# What a node stands for. 'op' is an ordinary operation; 'generated' an op that makes a
# tensor from nothing (zeros, arange, randn); 'readout' a tensor-to-Python conversion
# (bool(x), x.item()) that the model's control flow may depend on.
KINDS = ("input", "output", "op", "generated", "buffer", "constant", "readout", "failed")

#: Bytes per element of each torch dtype, by the name ``TensorMeta.dtype`` holds. The
#: recorder adds any dtype a newer torch has that is missing here when it first meets it.
ITEMSIZE: dict[str, int] = {
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2,
    "complex128": 16, "complex64": 8, "complex32": 4,
    "int64": 8, "int32": 4, "int16": 2, "int8": 1,
    "uint64": 8, "uint32": 4, "uint16": 2, "uint8": 1, "bool": 1,
    "qint8": 1, "quint8": 1, "qint32": 4, "quint4x2": 1, "quint2x4": 1,
    "float8_e4m3fn": 1, "float8_e5m2": 1, "float8_e4m3fnuz": 1, "float8_e5m2fnuz": 1,
    "float8_e8m0fnu": 1,
}  # fmt: skip


class TensorMeta(NamedTuple):
    """Shape, dtype and placement of one output tensor (a tuple: cheap to make per op).

    ``dtype`` is torch's name without the prefix (``"float32"``), ``device`` as torch
    prints it (``"cpu"``, ``"cuda:0"``): plain strings, so a graph needs no torch.
    """

    shape: tuple[int, ...]
    dtype: str
    device: str
    requires_grad: bool = False

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * ITEMSIZE.get(self.dtype, 0)


@dataclass(frozen=True, slots=True)
class ParamRef:
    """A parameter an op used directly (by name in the model). Immutable: the recorder
    makes one per parameter of a model and every op that uses it shares it."""

    name: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


class OpRef(NamedTuple):
    """In an op's ``args``/``kwargs``: output ``output`` of node ``index`` (a tensor).

    A named tuple (cheap: the build makes one per tensor argument), so test for it before
    testing for tuples when walking arguments.
    """

    index: int
    output: int = 0


@dataclass(frozen=True, slots=True)
class Opaque:
    """A constant argument with no JSON form (a ``torch.dtype``, a custom object), as read
    back from JSON: its ``repr``. A live trace keeps the object itself."""

    repr: str


def refs(op: Op) -> list[OpRef | ParamRef]:
    """The tensor arguments of an op's call, in argument order (``args`` then ``kwargs``)."""
    out: list[OpRef | ParamRef] = []
    _refs(op.args, out)
    _refs(op.kwargs, out)
    return out


def refs_in(obj: Any) -> list[OpRef | ParamRef]:
    """The references in part of a call's skeleton (``op.args[:1]``, a dict of keywords)."""
    out: list[OpRef | ParamRef] = []
    _refs(obj, out)
    return out


def _refs(obj: Any, out: list[OpRef | ParamRef]) -> None:
    if type(obj) is OpRef or type(obj) is ParamRef:
        out.append(obj)
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            _refs(o, out)
    elif isinstance(obj, dict):
        for o in obj.values():
            _refs(o, out)


class Op:
    """One node of the graph: an operation, or a model input/output/buffer/constant.

    ``label`` is unique and stable for a given model and input (``conv2d_3``; ``linear_1:2``
    for the second pass of a reused module); ``rolled`` is the label shared by all passes.

    The call, in the manner of ``torch.fx.Node``: ``target`` names the callable
    (``"torch.nn.functional.conv2d"``, ``"torch.Tensor.add"``; ``None`` for inputs,
    outputs, buffers and constants), ``args``/``kwargs`` are its arguments with each tensor
    replaced by an :class:`OpRef` (the node and output it came from) or a :class:`ParamRef`
    and constants kept (an output node's ``args`` is the one tensor it returns). ``meta``
    is where analyses write (``meta["flops"]``, read as ``op.flops``).

    A slotted class rather than a dataclass: one is made per op on the recording hot path,
    and without a per-instance dict the nodes are smaller and closer together in memory,
    which the passes over the graph after a forward (caches cold) feel: measured 3% (resnet18)
    to 12% (a transformer) off a trace. Equality compares the graph fields (not the saved
    activation or gradient), so ops are not hashable.
    """

    index: int
    kind: str  # input, output, op, generated, buffer, constant, readout, failed
    name: str  # function name ('conv2d', 'add') or the input/output name
    label: str
    rolled: str
    pass_num: int
    num_passes: int
    modules: tuple[tuple[str, int], ...]  # enclosing module calls, outer to inner
    module_outputs: list[Any]  # 'features.3', 'cell:2' (module calls it produced)
    parents: list[int]
    children: list[int]
    outputs: list[TensorMeta]
    params: list[ParamRef]
    time: float  # seconds spent in the op during the traced forward
    inplace: bool
    random: bool
    dist_from_input: int | None
    dist_from_output: int | None
    decides_branch: bool  # its value flows into a readout (bool/item) directly
    value: Any  # for readouts: the Python value the model got
    seq: int  # position among recorded calls, used to re-run on new inputs
    target: str | None  # qualified name of the callable
    meta: dict[str, Any]  # what analyses derived: 'flops', ...
    source: str | None  # file:line of the model code that made the call
    activation: Any  # saved tensor (or tuple for multi-output ops), if saved
    grad: Any  # gradient of the output, after a backward pass with grads=True
    stale: bool  # saved activation was modified in place after saving
    _saved: bool  # a graph read from JSON: the trace it came from kept the activation
    _has_grad: bool  # ... and held a gradient for it (no tensors to tell by)
    # private, read by capture/ only: how to re-execute this op (validation, replay)
    _func: Any
    _skel_args: Any  # the raw call arguments (live tensors), kept where saving needs them
    _skel_kwargs: Any
    _inputs: Any  # [(node, output) or (-1, param name)] per tensor argument
    _key: Any  # the recorder's entry for the op's place (a constant: its tensor)
    _snapshots: dict[int, Any] | None  # inputs changed through an alias: their values
    _where: Any  # (module paths, call sites, cut) until the recorder completes it
    _outs: Any  # output tensors whose metadata the build reads
    _extra_parents: Any  # ops that mutated an input through another view
    _provisional: bool  # saved in case it is the output of a module save= names
    _ctx: Any  # autocast, grad mode and RNG state it ran under, where not the default
    _args: tuple[Any, ...] | None  # the public args; None: made from _skel_args when read
    _kwargs: dict[str, Any] | None

    __slots__ = (  # noqa: RUF023 - in the order of the annotations above
        "index", "kind", "name", "label", "rolled", "pass_num", "num_passes", "modules",
        "module_outputs", "parents", "children", "outputs", "params", "time",
        "inplace", "random", "dist_from_input", "dist_from_output", "decides_branch", "value",
        "seq", "target", "meta", "source", "activation", "grad", "stale", "_saved", "_has_grad",
        "_func", "_skel_args", "_skel_kwargs", "_inputs", "_key", "_snapshots", "_where",
        "_outs", "_extra_parents", "_provisional", "_ctx", "_args", "_kwargs", "__weakref__",
    )  # fmt: skip

    #: the fields equality compares (and JSON holds), in this order
    FIELDS = (
        "index", "kind", "name", "label", "rolled", "pass_num", "num_passes", "modules",
        "module_outputs", "parents", "children", "outputs", "params", "time", "inplace",
        "random", "dist_from_input", "dist_from_output", "decides_branch", "value", "seq",
        "target", "args", "kwargs", "meta", "source",
    )  # fmt: skip

    def __init__(
        self,
        index: int,
        kind: str,
        name: str,
        label: str = "",
        rolled: str = "",
        pass_num: int = 1,
        num_passes: int = 1,
        modules: tuple[tuple[str, int], ...] = (),
        parents: list[int] | None = None,
    ):
        self.index = index
        self.kind = kind
        self.name = name
        self.label = label
        self.rolled = rolled
        self.pass_num = pass_num
        self.num_passes = num_passes
        self.modules = modules
        self.module_outputs = []
        self.parents = parents if parents is not None else []
        self.children = []
        self.outputs = []
        self.params = []
        self.time = 0.0
        self.inplace = False
        self.random = False
        self.dist_from_input = None
        self.dist_from_output = None
        self.decides_branch = False
        self.value = None
        self.seq = -1
        self.target = None
        self._args = ()
        self._kwargs = {}
        self.meta = {}
        self.source = None
        self.activation = None
        self.grad = None
        self.stale = False
        self._saved = False
        self._has_grad = False
        self._func = None
        self._skel_args = None
        self._skel_kwargs = None
        self._inputs = ()
        self._key = None
        self._snapshots = None
        self._where = None
        self._outs = None
        self._extra_parents = None
        self._provisional = False
        self._ctx = None

    @classmethod
    def blank(cls, index: int, kind: Any, name: str, modules: tuple[tuple[str, int], ...]) -> Op:
        """``Op(index, kind, name, modules=modules)`` without ``__init__``'s argument
        handling: the recorder makes one per op, between torch kernels. Every slot is set
        as :meth:`__init__` sets it (a test compares the two)."""
        n = _new_object(cls)
        n.index = index
        n.kind = kind
        n.name = name
        n.label = n.rolled = ""
        n.pass_num = n.num_passes = 1
        n.modules = modules
        n.module_outputs = []
        n.parents = []
        n.children = []
        n.outputs = []
        n.params = []
        n.time = 0.0
        n.inplace = n.random = n.decides_branch = n.stale = n._provisional = False
        n._saved = n._has_grad = False
        n.dist_from_input = n.dist_from_output = n.value = n.target = None
        n.seq = -1
        n._args = ()
        n._kwargs = {}
        n.meta = {}
        n.source = n.activation = n.grad = n._func = n._skel_args = n._skel_kwargs = None
        n._inputs = ()
        n._key = n._snapshots = n._where = n._outs = n._extra_parents = n._ctx = None
        return n

    @property
    def args(self) -> tuple[Any, ...]:
        """Positional arguments of the call: tensors as :class:`OpRef`/:class:`ParamRef`."""
        a = self._args
        if a is None:  # a traced op: its skeleton is made from the raw call on first read
            _live_call(self)
            a = self._args
        return a  # type: ignore[return-value]

    @args.setter
    def args(self, value: tuple[Any, ...]) -> None:
        self._args = value

    @property
    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments of the call, tensors replaced as in :attr:`args`."""
        k = self._kwargs
        if k is None:
            _live_call(self)
            k = self._kwargs
        return k  # type: ignore[return-value]

    @kwargs.setter
    def kwargs(self, value: dict[str, Any]) -> None:
        self._kwargs = value

    @property
    def flops(self) -> int | None:
        """Floating-point operations (2 per multiply-add); None where not known."""
        return self.meta.get("flops")

    @flops.setter
    def flops(self, value: int | None) -> None:
        if value is None:
            self.meta.pop("flops", None)
        else:
            self.meta["flops"] = value

    @property
    def saved(self) -> bool:
        """The trace kept this op's activation: a live trace holds it, a graph read back
        from JSON only knows that it did (the ``saved`` field), and writes that again."""
        return self.activation is not None or self._saved

    @property
    def has_grad(self) -> bool:
        """The trace held a gradient for this op (after ``backward()`` with ``grads=True``);
        on a graph read back from JSON, what its ``has_grad`` field said."""
        return self.grad is not None or self._has_grad

    @property
    def module(self) -> str | None:
        """Innermost module path that ran this op (``None`` at the model's top level)."""
        return self.modules[-1][0] if self.modules else None

    @property
    def shape(self) -> tuple[int, ...] | None:
        return self.outputs[0].shape if self.outputs else None

    @property
    def dtype(self) -> str | None:
        """dtype name of the first output (``"float32"``)."""
        return self.outputs[0].dtype if self.outputs else None

    @property
    def device(self) -> str | None:
        """Device of the first output (``"cpu"``, ``"cuda:0"``)."""
        return self.outputs[0].device if self.outputs else None

    @property
    def nbytes(self) -> int:
        return sum(o.nbytes for o in self.outputs)

    @property
    def num_params(self) -> int:
        return sum(p.numel for p in self.params)

    @property
    def has_params(self) -> bool:
        return bool(self.params)

    @property
    def is_input(self) -> bool:
        return self.kind == "input"

    @property
    def is_output(self) -> bool:
        return self.kind == "output"

    @property
    def is_buffer(self) -> bool:
        return self.kind == "buffer"

    @property
    def is_generated(self) -> bool:
        return self.kind == "generated"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Op):
            return NotImplemented
        from .schema import encode  # constants compare as data (a NaN equals a NaN)

        for f in Op.FIELDS:
            a, b = getattr(self, f), getattr(other, f)
            if f in ("args", "kwargs", "value"):
                a, b = encode(a), encode(b)
            if a != b:
                return False
        return True

    __hash__ = None  # type: ignore[assignment]  # mutable, compared by value

    def __repr__(self) -> str:
        shape = "x".join(map(str, self.shape)) if self.shape is not None else "-"
        where = f" in {self.module}" if self.module else ""
        return f"<Op {self.label} {self.kind}{where} [{shape}]>"


_new_object = object.__new__


def _live_call(op: Op) -> None:
    """Set ``op.args``/``op.kwargs`` from the raw call a trace kept (live tensors).

    Replaced by capture/ when it is imported (only a trace has ops that need it); the
    build leaves the skeleton of a saved op's call until it is read, since most traces
    are never asked for it and making it costs about a microsecond per op.
    """
    raise RuntimeError(f"{op.label}: its call was not recorded")


class ModuleInfo:
    """One submodule of the traced model and what its calls contained."""

    path: str  # '' for the model itself
    type: str  # class name
    parent: str | None
    children: list[str]
    num_passes: int
    num_params: int  # parameters owned by this module and its submodules
    ops: list[int]  # node indices run inside (any pass)
    outputs: dict[int, list[int]]  # pass -> producing nodes

    # a plain slotted class rather than a dataclass: the
    # recorder counts passes on it for every module call
    __slots__ = (  # noqa: RUF023 - in the order of the annotations above
        "path", "type", "parent", "children", "num_passes", "num_params", "ops", "outputs",
    )  # fmt: skip

    def __init__(
        self,
        path: str,
        type: str,
        parent: str | None,
        children: list[str] | None = None,
        num_passes: int = 0,
        num_params: int = 0,
        ops: list[int] | None = None,
        outputs: dict[int, list[int]] | None = None,
    ):
        self.path = path
        self.type = type
        self.parent = parent
        self.children = children if children is not None else []
        self.num_passes = num_passes
        self.num_params = num_params
        self.ops = ops if ops is not None else []
        self.outputs = outputs if outputs is not None else {}

    def _fields(self) -> tuple[Any, ...]:
        return (
            self.path, self.type, self.parent, self.children, self.num_passes,
            self.num_params, self.ops, self.outputs,
        )  # fmt: skip

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ModuleInfo):
            return NotImplemented
        return self._fields() == other._fields()

    def __repr__(self) -> str:
        return (
            f"ModuleInfo(path={self.path!r}, type={self.type!r}, parent={self.parent!r}, "
            f"children={self.children!r}, num_passes={self.num_passes}, "
            f"num_params={self.num_params}, ops={self.ops!r}, outputs={self.outputs!r})"
        )

    @property
    def depth(self) -> int:
        return 0 if not self.path else self.path.count(".") + 1
