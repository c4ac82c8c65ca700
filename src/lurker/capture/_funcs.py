"""Facts about torch callables, computed once per callable and cached.

The recorder asks these questions for every intercepted call, so the answers are memoised
in a dict keyed by the callable itself.
"""

from __future__ import annotations

import contextlib
import types
from typing import Any

import torch

_RENAMES = {"truediv": "div", "rtruediv": "rdiv", "floordiv": "floor_divide"}

# In-place dunder operators: they mutate their first argument.
_INPLACE_DUNDERS = {
    "iadd", "isub", "imul", "itruediv", "ifloordiv", "imod", "ipow", "imatmul",
    "iand", "ior", "ixor", "ilshift", "irshift", "setitem",
}  # fmt: skip

# Ops whose output depends on the random generator: the recorder keeps the RNG state they
# ran with, and validation re-executes them under it.
_RANDOM = {
    "rand", "randn", "randint", "rand_like", "randn_like", "randint_like", "randperm",
    "normal", "normal_", "uniform_", "bernoulli", "bernoulli_", "multinomial", "poisson",
    "exponential_", "geometric_", "cauchy_", "log_normal_", "random_", "rrelu", "rrelu_",
    "gumbel_softmax", "fractional_max_pool2d", "fractional_max_pool3d",
    "fractional_max_pool2d_with_indices", "fractional_max_pool3d_with_indices",
    # torch.nn.init, recorded whole when a model builds a layer inside its forward
    "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_", "xavier_normal_",
    "trunc_normal_", "orthogonal_", "sparse_",
    *("empty", "empty_like", "new_empty", "empty_strided", "new_empty_strided"),
}  # fmt: skip
# Uninitialised memory: no re-execution can reproduce it (flagged random, never compared).
UNINITIALISED = {"empty", "empty_like", "new_empty", "empty_strided", "new_empty_strided"}
# Random only for some arguments: dropout with training=True and p > 0, attention with
# dropout_p > 0. name -> (position of p, its keyword, its default, position of the
# training flag or None).
_DROPOUTS = {
    **{
        n: (1, "p", 0.5, 2)
        for n in (
            "dropout", "dropout_", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout",
            "alpha_dropout_", "feature_alpha_dropout", "feature_alpha_dropout_",
            "feature_dropout", "feature_dropout_", "native_dropout",
        )
    },
    "scaled_dot_product_attention": (4, "dropout_p", 0.0, None),
}  # fmt: skip
# Ops that cannot be re-executed from saved values: the reason, shown in validation reports.
_NEEDS_GRAPH = "needs the autograd graph of the forward, which saved values do not carry"
NOT_REEXECUTABLE: dict[Any, str] = {
    torch.autograd.grad: f"autograd.grad {_NEEDS_GRAPH}",
    torch.autograd.backward: f"backward {_NEEDS_GRAPH}",
    torch.Tensor.backward: f"backward {_NEEDS_GRAPH}",
}


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

# Conversions of tensor data to Python values: the model's control flow may depend on them.
READOUTS = {
    "__bool__", "item", "__int__", "__float__", "__index__", "tolist", "__contains__",
    "equal", "allclose", "is_nonzero",
}  # fmt: skip

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
    norm: bool  # batch/instance norm: may update running statistics in place

    __slots__ = ("name", "inplace_first", "readout", "random", "dropout", "norm")  # noqa: RUF023

    def __init__(
        self, name: str, inplace_first: bool, readout: bool, random: bool, dropout: bool, norm: bool
    ):
        self.name = name
        self.inplace_first = inplace_first
        self.readout = readout
        self.random = random
        self.dropout = dropout
        self.norm = norm

    def __repr__(self) -> str:
        flags = [
            f for f in ("inplace_first", "readout", "random", "dropout", "norm") if getattr(self, f)
        ]
        return f"FuncInfo({self.name!r}{', ' if flags else ''}{', '.join(flags)})"


def op_name(func: Any) -> str:
    """A readable, stable name for a torch callable."""
    name = getattr(func, "__name__", None) or type(func).__name__
    if name == "__get__":  # a Tensor property such as .T or .data
        owner = getattr(func, "__self__", None)
        name = getattr(owner, "__name__", "get")
    if name.startswith("__") and name.endswith("__") and len(name) > 4:
        name = name[2:-2]
    return _RENAMES.get(name, name)


# callable -> FuncInfo. Never holds DECOMPOSE entries or Tensor.__iter__, so a hit
# tells the recorder that a callable needs no special handling.
INFO: dict[Any, FuncInfo] = {}


def func_info(func: Any) -> FuncInfo:
    info = INFO.get(func)
    if info is None:
        raw = getattr(func, "__name__", "") or ""
        name = op_name(func)
        inplace = (name.endswith("_") and not name.endswith("__")) or name in _INPLACE_DUNDERS
        info = FuncInfo(
            name=name,
            inplace_first=inplace,
            readout=raw in READOUTS,
            random=name in _RANDOM,
            dropout=name in _DROPOUTS,
            norm=name in ("batch_norm", "instance_norm"),
        )
        with contextlib.suppress(TypeError):  # unhashable callable: just don't cache
            if func not in DECOMPOSE and func is not torch.Tensor.__iter__:
                INFO[func] = info
    return info


def mutated_buffers(info: FuncInfo, args: tuple, kwargs: dict) -> list[Any]:
    """Running statistics a normalisation op updates in place (training mode only)."""
    if info.name == "batch_norm":
        training = kwargs.get("training", args[5] if len(args) > 5 else False)
    elif info.name == "instance_norm":
        training = kwargs.get("use_input_stats", args[5] if len(args) > 5 else True)
    else:
        return []
    if not training:
        return []
    stats = [kwargs.get("running_mean"), kwargs.get("running_var")]
    stats = [a for a in (*args[1:3], *stats) if isinstance(a, torch.Tensor)]
    return stats


def is_random_call(info: FuncInfo, args: tuple, kwargs: dict) -> bool:
    """Whether this particular call draws random numbers."""
    if info.random:
        return True
    if info.dropout:
        p_pos, p_key, p_default, t_pos = _DROPOUTS[info.name]
        p = kwargs.get(p_key, args[p_pos] if len(args) > p_pos else p_default)
        if t_pos is not None:
            default = args[t_pos] if len(args) > t_pos else True
            if not kwargs.get("training", kwargs.get("train", default)):
                return False
        return p != 0
    return False
