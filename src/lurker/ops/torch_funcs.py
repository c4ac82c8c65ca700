"""The catalogue's torch side: facts about torch callables, computed once per callable.

Imported by capture/ only (graph analyses read :mod:`.catalogue`, which is torch-free).
The recorder asks these questions for every intercepted call, so the answers are
memoised in a dict keyed by the callable itself.
"""

from __future__ import annotations

import contextlib
import types
from typing import Any

import torch

from . import catalogue
from .catalogue import OpSpec


def _resolve(qualname: str) -> Any:
    obj: Any = torch
    for part in qualname.split(".")[1:]:
        obj = getattr(obj, part)
    return obj


# Callables that cannot be re-executed from saved values -> the reason.
NOT_REEXECUTABLE: dict[Any, str] = {
    _resolve(q): why for q, why in catalogue.NOT_REEXECUTABLE.items()
}
# Callables whose parameters differ from those of their name's entry.
_VARIANTS: dict[Any, OpSpec] = {_resolve(q): s for q, s in catalogue.VARIANTS.items()}
UNINITIALISED = catalogue.UNINITIALISED


def same_callable(recorded: Any, func: Any) -> bool:
    """Whether ``func`` is the callable a trace recorded. Property getters (``x.T``,
    ``x.real``) reach the mode as a new bound ``__get__`` on every access: equal, not
    identical."""
    return recorded is func or recorded == func


def _unchecked(fn: Any) -> Any:
    """A copy of a torch.nn.functional composite whose torch-function check is off.

    Such a function first asks ``has_torch_function`` and, under a mode, hands itself to
    the mode again; the copy skips that question so that, run inside the recorder, its
    parts (projections, the attention softmax) are recorded as ops of their own.
    """
    g = dict(fn.__globals__)
    g["has_torch_function"] = lambda *a, **k: False
    g["has_torch_function_unary"] = lambda *a, **k: False
    g["has_torch_function_variadic"] = lambda *a, **k: False
    copy = types.FunctionType(fn.__code__, g, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    return copy


# Python-level composites worth seeing inside: callable -> its unchecked copy.
DECOMPOSE: dict[Any, Any] = {
    f: _unchecked(f) for f in (torch.nn.functional.multi_head_attention_forward,)
}

# Callables seen returning plain Python values (shapes, dtypes, flags): no tensor in, no
# tensor out, so later calls skip all bookkeeping. Learned at run time, shared by traces.
PASSTHROUGH: set[Any] = set()


class FuncInfo:
    """What the recorder needs to know about one callable (made once per callable)."""

    name: str  # readable op name: 'conv2d', 'add', 'getitem', 'relu_'
    inplace_first: bool  # mutates its first tensor argument
    readout: bool  # converts tensor data to a Python value (bool/int/float)
    random: bool  # depends on the RNG (dropout only when training=True)
    dropout: bool
    # may write tensors other than its first argument in place: running statistics (batch
    # norm, fake quantisation's range), or the arguments an operator's schema marks as
    # written (a custom op's); mutated_buffers() finds which, per call
    mutates_buffers: bool
    spec: OpSpec | None  # its parameters, where the catalogue knows them
    writes: tuple[tuple[int, str], ...]  # (position, name) of arguments its schema writes

    __slots__ = (  # noqa: RUF023 - in the order of the annotations above
        "name", "inplace_first", "readout", "random", "dropout", "mutates_buffers", "spec",
        "writes",
    )  # fmt: skip

    def __init__(
        self,
        name: str,
        inplace_first: bool,
        readout: bool,
        random: bool,
        dropout: bool,
        mutates_buffers: bool,
        spec: OpSpec | None = None,
        writes: tuple[tuple[int, str], ...] = (),
    ):
        self.name = name
        self.inplace_first = inplace_first
        self.readout = readout
        self.random = random
        self.dropout = dropout
        self.mutates_buffers = mutates_buffers
        self.spec = spec
        self.writes = writes

    def __repr__(self) -> str:
        flags = [
            f
            for f in ("inplace_first", "readout", "random", "dropout", "mutates_buffers")
            if getattr(self, f)
        ]
        return f"FuncInfo({self.name!r}{', ' if flags else ''}{', '.join(flags)})"


# torch's operator types -> whether the type is a packet (else one overload of a packet)
_OPERATOR_TYPES = {torch._ops.OpOverloadPacket: True, torch._ops.OpOverload: False}


def op_name(func: Any) -> str:
    """A readable, stable name for a torch callable. An operator of torch's ``quantized``
    namespace (what a quantized layer runs) is ``quantized_conv2d``: its name alone is
    aten's (``conv2d``), whose parameters are other ones, and every analysis that knows
    aten's op would read its arguments wrongly (the output zero-point as the stride).
    An aten operator (``torch.ops.aten.conv2d.default``, what a graph of
    ``torch.export`` or ``make_fx`` calls) is named as the eager call that runs it
    (``conv2d``): the same op, whose overloads whose parameters differ from the name's
    entry have their own (``catalogue.VARIANTS``), so that analyses bind its schema."""
    is_packet = _OPERATOR_TYPES.get(type(func))
    if is_packet is not None:
        packet = func if is_packet else func._overloadpacket
        qualified = packet._qualified_op_name  # quantized::conv2d
        if qualified.startswith("quantized::"):
            return "quantized_" + qualified[len("quantized::") :]
    name = getattr(func, "__name__", None) or type(func).__name__
    if is_packet is not None and qualified.startswith("aten::"):
        name = qualified[len("aten::") :]  # (aten::__and__ as Tensor.__and__: 'and')
    if name == "__get__":  # a Tensor property such as .T or .data
        owner = getattr(func, "__self__", None)
        name = getattr(owner, "__name__", "get")
    if name.startswith("__") and name.endswith("__") and len(name) > 4:
        name = name[2:-2]
    return catalogue.RENAMES.get(name, name)


# callable -> FuncInfo. Never holds DECOMPOSE entries or Tensor.__iter__, so a hit
# tells the recorder that a callable needs no special handling.
INFO: dict[Any, FuncInfo] = {}


def func_info(func: Any) -> FuncInfo:
    info = INFO.get(func)
    if info is None:
        raw = getattr(func, "__name__", "") or ""
        name = op_name(func)
        spec = None
        with contextlib.suppress(TypeError):  # an unhashable callable
            spec = _VARIANTS.get(func)
        writes = schema_writes(func)
        info = FuncInfo(
            name=name,
            inplace_first=catalogue.is_inplace(name),
            readout=raw in catalogue.READOUTS,
            random=name in catalogue.RANDOM,
            dropout=name in catalogue.DROPOUTS or name in catalogue.RECURRENT,
            mutates_buffers=name in catalogue.NORMS or bool(writes),
            spec=spec or catalogue.SPECS.get(name),
            writes=writes,
        )
        with contextlib.suppress(TypeError):  # unhashable callable: just don't cache
            if func not in DECOMPOSE and func is not torch.Tensor.__iter__:
                INFO[func] = info
    return info


def schema_writes(func: Any) -> tuple[tuple[int, str], ...]:
    """The arguments an operator (``torch.ops.ns.name.overload``, as a custom op reaches
    the recorder) declares it writes (``Tensor(a!)``; ``out=`` is handled as such): what
    the recorder must copy before the call, as it does for running statistics, since its
    name need not end in ``_``. Torch functions carry no schema; the catalogue names
    those that write arguments other than their first."""
    schema = getattr(func, "_schema", None)
    if not isinstance(schema, torch._C.FunctionSchema):
        return ()
    return tuple(
        (i, a.name)
        for i, a in enumerate(schema.arguments)
        if a.alias_info is not None and a.alias_info.is_write and a.name != "out"
    )


def mutated_buffers(info: FuncInfo, args: tuple, kwargs: dict) -> list[Any]:
    """Running statistics a normalisation op updates in place (training mode only), and
    the range and scale a fused fake-quantisation op updates while its observer is on."""
    rule = catalogue.NORMS.get(info.name)
    if rule is None:
        found: list[Any] = []
        for i, n in info.writes:
            t = args[i] if i < len(args) else kwargs.get(n)
            found += t if isinstance(t, (list, tuple)) else [t]  # Tensor(a!)[]
        return [t for t in found if isinstance(t, torch.Tensor)]
    flag, stats = rule
    spec = info.spec
    assert spec is not None  # NORMS names are catalogue entries
    try:
        on = spec.arg(args, kwargs, flag)
        if isinstance(on, torch.Tensor):  # observer_on: a one-element tensor, on at 1
            on = on.numel() > 0 and int(on.reshape(-1)[0]) == 1
        if not on:
            return []
        found = [spec.arg(args, kwargs, s) for s in stats]
    except TypeError:  # a same-named callable of other parameters: guard every tensor
        return [t for t in (*args[1:], *kwargs.values()) if isinstance(t, torch.Tensor)]
    return [t for t in found if isinstance(t, torch.Tensor)]


def is_random_call(info: FuncInfo, args: tuple, kwargs: dict) -> bool:
    """Whether this particular call draws random numbers."""
    if info.random:
        return True
    if info.dropout:
        try:
            return catalogue.draws_random(info.name, args, kwargs, info.spec)
        except TypeError:  # a same-named callable of other parameters: keep its RNG state
            return True
    return False
