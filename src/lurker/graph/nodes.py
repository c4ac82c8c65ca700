"""The nodes of a traced graph: one :class:`Op` per recorded tensor operation.

These are plain records. The recorder fills the raw fields during the forward pass, the
post-processing fills the derived ones (labels, passes, distances, FLOPs), and everything
downstream (rendering, validation, JSON, the probe) only reads them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

# What a node stands for. 'op' is an ordinary operation; 'generated' an op that makes a
# tensor from nothing (zeros, arange, randn); 'readout' a tensor-to-Python conversion
# (bool(x), x.item()) that the model's control flow may depend on.
KINDS = ("input", "output", "op", "generated", "buffer", "constant", "readout", "failed")


class TensorMeta(NamedTuple):
    """Shape, dtype and placement of one output tensor (a tuple: cheap to make per op)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    requires_grad: bool = False

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * _itemsize(self.dtype)


def _itemsize(dtype: torch.dtype) -> int:
    try:
        return dtype.itemsize
    except AttributeError:  # torch < 2.1
        return torch.empty((), dtype=dtype).element_size()


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


class Op:
    """One node of the graph: an operation, or a model input/output/buffer/constant.

    ``label`` is unique and stable for a given model and input (``conv2d_3``; ``linear_1:2``
    for the second pass of a reused module); ``rolled`` is the label shared by all passes.
    A slotted class rather than a dataclass: one is made per op on the recording hot path,
    and without a per-instance dict the nodes are smaller and closer together in memory,
    which the passes over the graph after a forward (caches cold) feel: measured 3% (resnet18)
    to 12% (a transformer) off a trace.
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
    flops: int | None
    inplace: bool
    random: bool
    dist_from_input: int | None
    dist_from_output: int | None
    decides_branch: bool  # its value flows into a readout (bool/item) directly
    value: Any  # for readouts: the Python value the model got
    seq: int  # position among recorded calls, used to re-run on new inputs
    activation: Any  # saved tensor (or tuple for multi-output ops), if saved
    grad: Any  # gradient of the output, after a backward pass with grads=True
    stale: bool  # saved activation was modified in place after saving
    # private: how to re-execute this op (validation, replay)
    _func: Any
    _skel_args: Any
    _skel_kwargs: Any
    _inputs: Any  # [(node, output) or (-1, param name)] per tensor argument
    _key: Any  # the recorder's entry for the op's place (a constant: its tensor)
    _snapshots: dict[int, Any] | None  # inputs changed through an alias: their values
    _where: Any  # (module paths, call sites, cut) until the recorder finalizes it
    _outs: Any  # output tensors whose metadata finalize() reads
    _extra_parents: Any  # ops that mutated an input through another view
    _provisional: bool  # saved in case it is the output of a module save= names
    _source: Any  # the source, or the call sites it is found from (on first use)
    _ctx: Any  # autocast, grad mode and RNG state it ran under, where not the default

    __slots__ = (  # noqa: RUF023 - in the order of the annotations above
        "index", "kind", "name", "label", "rolled", "pass_num", "num_passes", "modules",
        "module_outputs", "parents", "children", "outputs", "params", "time", "flops",
        "inplace", "random", "dist_from_input", "dist_from_output", "decides_branch", "value",
        "seq", "activation", "grad", "stale", "_func", "_skel_args", "_skel_kwargs", "_inputs",
        "_key", "_snapshots", "_where", "_outs", "_extra_parents", "_provisional", "_source",
        "_ctx", "__weakref__",
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
        self.flops = None
        self.inplace = False
        self.random = False
        self.dist_from_input = None
        self.dist_from_output = None
        self.decides_branch = False
        self.value = None
        self.seq = -1
        self.activation = None
        self.grad = None
        self.stale = False
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
        self._source = None
        self._ctx = None

    @property
    def source(self) -> str | None:
        """``file.py:42`` of the model code that made the call."""
        s = self._source
        if type(s) is list:  # the recorder's call sites, resolved on first use
            from ..capture._recorder import _source

            s = self._source = _source(s)
        return s

    @source.setter
    def source(self, value: str | None) -> None:
        self._source = value

    @property
    def module(self) -> str | None:
        """Innermost module path that ran this op (``None`` at the model's top level)."""
        return self.modules[-1][0] if self.modules else None

    @property
    def shape(self) -> tuple[int, ...] | None:
        return self.outputs[0].shape if self.outputs else None

    @property
    def dtype(self) -> torch.dtype | None:
        return self.outputs[0].dtype if self.outputs else None

    @property
    def device(self) -> torch.device | None:
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

    def __repr__(self) -> str:
        shape = "x".join(map(str, self.shape)) if self.shape is not None else "-"
        where = f" in {self.module}" if self.module else ""
        return f"<Op {self.label} {self.kind}{where} [{shape}]>"


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
