"""The nodes of a traced graph: one :class:`Op` per recorded tensor operation.

These are plain records. The recorder fills the raw fields during the forward pass, the
post-processing fills the derived ones (labels, passes, distances, FLOPs), and everything
downstream (rendering, validation, JSON, the probe) only reads them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
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


@dataclass(slots=True)
class ParamRef:
    """A parameter an op used directly (by name in the model)."""

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
    for the second pass of a reused layer); ``rolled`` is the label shared by all passes.
    A plain class rather than a dataclass: one is made per op on the recording hot path,
    so only per-instance state is set in ``__init__``; the rest are class-level defaults.
    """

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
    time: float = 0.0  # seconds spent in the op during the traced forward
    flops: int | None = None
    inplace: bool = False
    random: bool = False
    dist_from_input: int | None = None
    dist_from_output: int | None = None
    decides_branch: bool = False  # its value flows into a readout (bool/item) directly
    value: Any = None  # for readouts: the Python value the model got
    seq: int = -1  # position among recorded calls, used to re-run on new inputs
    activation: Any = None  # saved tensor (or tuple for multi-output ops), if saved
    grad: Any = None  # gradient of the output, after a backward pass with grads=True
    stale: bool = False  # saved activation was modified in place after saving
    # private: how to re-execute this op (validation, replay)
    _func: Any = None
    _skel_args: Any = None
    _skel_kwargs: Any = None
    _inputs: list[tuple[int, Any]] = ()  # type: ignore[assignment]  # (node, out) / (-1, param)
    _key: Any = None  # the recorder's entry for the op's place (a constant: its tensor)
    _snapshots: dict[int, Any] | None = None  # inputs changed through an alias: their values
    _where: Any = None  # (module paths, call sites, cut) until the recorder finalizes it
    _outs: Any = None  # output tensors whose metadata finalize() reads
    _extra_parents: Any = None  # ops that mutated an input through another view
    _provisional: bool = False  # saved in case it is the output of a module save= names
    _source: Any = None  # the source, or a function that finds it (looked up on demand)

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
        self.name = name  # function name ('conv2d', 'add') or the input/output name
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

    @property
    def source(self) -> str | None:
        """``file.py:42`` of the model code that made the call."""
        s = self._source
        if callable(s):
            s = self._source = s()
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


@dataclass(slots=True)
class ModuleInfo:
    """One submodule of the traced model and what its calls contained."""

    path: str  # '' for the model itself
    type: str  # class name
    parent: str | None
    children: list[str] = field(default_factory=list)
    num_passes: int = 0
    num_params: int = 0  # parameters owned by this module and its submodules
    ops: list[int] = field(default_factory=list)  # node indices run inside (any pass)
    outputs: dict[int, list[int]] = field(default_factory=dict)  # pass -> producing nodes

    @property
    def depth(self) -> int:
        return 0 if not self.path else self.path.count(".") + 1
