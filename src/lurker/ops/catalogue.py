"""What lurker knows about torch ops, keyed by op name (``Op.name``: 'conv2d', 'add_').

Torch-free, so that graph analyses (FLOPs, receptive fields, layouts) read a call's
arguments by name wherever a graph is read. Each known op's parameters are written as
a Python signature copied from torch (``tests/test_ops.py`` checks every one against
torch's own schema, so they cannot drift); ``*name`` marks a parameter that methods
also take spread out (``x.permute(2, 0, 1)`` as well as ``torch.permute(x, (2, 0, 1))``).
One name can stand for several callables (``torch.add``, ``Tensor.add``): their leading
parameters agree in position, which is what binding relies on; where they do not
(``torch.batch_norm`` against ``F.batch_norm``), :data:`VARIANTS` holds the other
callable's parameters under its qualified name.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping
from dataclasses import dataclass, field
from math import prod
from typing import Any

_REQUIRED: Any = type("_Required", (), {"__repr__": lambda self: "<required>"})()


@dataclass(frozen=True)
class Param:
    name: str
    default: Any = _REQUIRED  # _REQUIRED: no default
    kw_only: bool = False
    spread: bool = False  # methods may pass it as separate positional values

    @property
    def required(self) -> bool:
        return self.default is _REQUIRED


@dataclass(frozen=True)
class OpSpec:
    """One op's parameters in torch's order, and where torch defines them.

    ``source`` names the definition the test compares with: ``aten::name`` (any
    overload, or ``aten::name.overload``) or the dotted path of a Python function;
    None where torch publishes no signature (``Tensor.__getitem__``).
    """

    name: str
    params: tuple[Param, ...]
    source: str | None
    flops: str | None = None  # the FLOPs rule (see flops()); None: not counted
    names: frozenset[str] = frozenset()  # the parameter names, for binding keywords
    # name -> (position, or -1 for keyword-only; default): what arg() reads
    _at: dict[str, tuple[int, Any]] = field(init=False, repr=False, compare=False)
    _npos: int = field(init=False, repr=False, compare=False)
    _spread: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        pos = [p for p in self.params if not p.kw_only]
        at = {p.name: (i, p.default) for i, p in enumerate(pos)}
        at.update({p.name: (-1, p.default) for p in self.params if p.kw_only})
        object.__setattr__(self, "_at", at)
        object.__setattr__(self, "_npos", len(pos))
        object.__setattr__(self, "_spread", bool(pos) and pos[-1].spread)

    def arg(
        self, args: tuple | list, kwargs: Mapping[str, Any] | None, name: str, default: Any = None
    ) -> Any:
        """One argument of a call by name: ``bind(args, kwargs).get(name, default)`` without
        binding the rest (the recorder asks this of every dropout and norm call)."""
        n = self._npos
        if len(args) > n:
            if not self._spread:
                raise TypeError(
                    f"{self.name}() takes {n} positional arguments, the call gave {len(args)}"
                )
            return self.bind(args, kwargs).get(name, default)
        if kwargs:
            alt = _ALIASES.get(name)
            if name in kwargs:
                if name in self.names or alt not in self.names:
                    return kwargs[name]
                return default  # bound under its other spelling, alt
            if alt is not None and alt in kwargs and alt not in self.names:
                return kwargs[alt]
        at = self._at.get(name)
        if at is None:
            return default
        i, d = at
        if 0 <= i < len(args):
            return args[i]
        return default if d is _REQUIRED else d

    def positional(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params if not p.kw_only)

    def bind(self, args: tuple | list, kwargs: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The call's arguments by parameter name, defaults filled in.

        Keywords the signature does not list (``out=``, ``other=`` of ``max(a, other=b)``)
        are kept under their own name; a required parameter the call omitted is absent.
        """
        params = self.params
        pos = [p for p in params if not p.kw_only]
        n = len(pos)
        bound: dict[str, Any] = {}
        if len(args) > n:
            if not pos or not pos[-1].spread:
                raise TypeError(
                    f"{self.name}() takes {n} positional arguments, the call gave {len(args)}"
                )
            args = (*args[: n - 1], tuple(args[n - 1 :]))
        for p, v in zip(pos, args):
            bound[p.name] = v
        if kwargs:
            names = self.names
            for k, v in kwargs.items():
                if k not in names and k in _ALIASES and _ALIASES[k] in names:
                    k = _ALIASES[k]  # torch.sum(input=x) binds aten's 'self'
                if k in bound:
                    raise TypeError(f"{self.name}() got multiple values for argument {k!r}")
                bound[k] = v
        for p in params:
            if p.name not in bound and p.default is not _REQUIRED:
                bound[p.name] = p.default
        return bound


def _parse(name: str, signature: str, source: str | None, flops: str | None = None) -> OpSpec:
    """An OpSpec from a Python parameter list: 'input, weight, bias=None, *, scale=None'."""
    fn = ast.parse(f"def f({signature}): pass").body[0]
    a = fn.args  # type: ignore[attr-defined]
    params: list[Param] = []
    plain = a.posonlyargs + a.args
    defaults = [_REQUIRED] * (len(plain) - len(a.defaults)) + [
        ast.literal_eval(d) for d in a.defaults
    ]
    params += [Param(x.arg, d) for x, d in zip(plain, defaults)]
    if a.vararg is not None:
        params.append(Param(a.vararg.arg, spread=True))
    for x, d in zip(a.kwonlyargs, a.kw_defaults):
        params.append(Param(x.arg, _REQUIRED if d is None else ast.literal_eval(d), kw_only=True))
    return OpSpec(name, tuple(params), source, flops, frozenset(p.name for p in params))


# Keywords that name the same parameter under torch's two spellings (Python function
# against aten schema): bound to whichever the op's signature uses.
_ALIASES = {"input": "self", "self": "input", "train": "training", "training": "train"}


_CONV = "input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1"
_CONVT = "input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1"
_MAXPOOL = (
    "input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False"
)
_AVGPOOL = (
    "self, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True, "
    "divisor_override=None"
)
_LPPOOL = "input, norm_type, kernel_size, stride=None, ceil_mode=False"
_REDUCE = "self, dim=None, keepdim=False, *, dtype=None"
_STATS = "self, dim=None, unbiased=True, keepdim=False"
_DIM_KEEP = "self, dim=None, keepdim=False"
_SOFTMAX = "input, dim=None, _stacklevel=3, dtype=None"
_DROPOUT = "input, p=0.5, training=True, inplace=False"
_ATEN_DROPOUT = "input, p, train"
_SPLIT = "self, {}, dim=0"
_CAT = "tensors, dim=0"
_ADDMM = "self, {}, {}, *, beta=1, alpha=1"
_QCONV = "qx, packed_weight, output_scale, output_zero_point"
_QLINEAR = "X, W_prepack, Y_scale_i, Y_zero_point_i"

# name -> (signature, source, FLOPs rule)
_TABLE: dict[str, tuple[str, str | None, str | None]] = {
    **{f"conv{n}d": (_CONV, f"aten::conv{n}d", "conv") for n in (1, 2, 3)},
    **{f"conv_transpose{n}d": (_CONVT, f"aten::conv_transpose{n}d", "conv_transpose") for n in (1, 2, 3)},
    "convolution": (
        "input, weight, bias, stride, padding, dilation, transposed, output_padding, groups",
        "aten::convolution",
        "convolution",
    ),
    "_convolution": (
        "input, weight, bias, stride, padding, dilation, transposed, output_padding, groups, "
        "benchmark, deterministic, cudnn_enabled, allow_tf32",
        "aten::_convolution",
        "convolution",
    ),
    "linear": ("input, weight, bias=None", "aten::linear", "linear"),
    # torch.ops.quantized.*, what quantized layers run (named apart from aten's ops: see
    # torch_funcs.op_name): their weight, bias, stride, padding, dilation and groups are
    # in one packed TorchScript object; the trace reads them off it (PACKED, below)
    **{
        f"quantized_{n}": (_QCONV, f"quantized::{n}{'' if n.startswith('conv1d') else '.new'}", "packed_conv")
        for n in ("conv1d", "conv2d", "conv3d", "conv1d_relu", "conv2d_relu", "conv3d_relu")
    },
    **{
        f"quantized_{n}": (_QCONV.replace("qx,", "qx, qaccum,"), f"quantized::{n}", "packed_conv")
        for n in ("conv2d_add", "conv2d_add_relu")  # conv(qx) + qaccum
    },
    **{
        f"quantized_conv_transpose{n}d": (
            _QCONV, f"quantized::conv_transpose{n}d", "packed_conv_transpose"
        )
        for n in (1, 2, 3)
    },
    **{
        f"quantized_{n}": (_QLINEAR, f"quantized::{n}", "packed_linear")
        for n in ("linear", "linear_relu", "linear_tanh")
    },
    "quantized_linear_leaky_relu": (
        f"{_QLINEAR}, negative_slope", "quantized::linear_leaky_relu", "packed_linear"
    ),
    # a quantize_dynamic'd nn.Linear: float in, float out
    **{
        f"quantized_{n}": ("X, W_prepack, reduce_range=False", f"quantized::{n}", "packed_linear")
        for n in ("linear_dynamic", "linear_relu_dynamic")
    },
    **{
        f"quantized_{n}": ("X, W_prepack", f"quantized::{n}", "packed_linear")
        for n in ("linear_dynamic_fp16", "linear_relu_dynamic_fp16")
    },
    "matmul": ("self, other", "aten::matmul", "matmul"),
    "linalg_matmul": ("self, other", "aten::linalg_matmul", "matmul"),  # torch.linalg.matmul
    "rmatmul": ("self, other", None, "rmatmul"),  # Tensor.__rmatmul__: other @ self
    "mm": ("self, mat2", "aten::mm", "matmul"),
    "bmm": ("self, mat2", "aten::bmm", "matmul"),
    "addmm": (_ADDMM.format("mat1", "mat2"), "aten::addmm", "addmm"),
    "baddbmm": (_ADDMM.format("batch1", "batch2"), "aten::baddbmm", "addmm"),
    "addbmm": (_ADDMM.format("batch1", "batch2"), "aten::addbmm", "addbmm"),
    # einsum's operands bind as one tuple (varargs) or the list a call passed
    "einsum": ("equation, *tensors, path=None", "aten::einsum", "einsum"),
    "tensordot": ("a, b, dims=2, out=None", "torch.functional.tensordot", "tensordot"),
    "scaled_dot_product_attention": (
        "query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, *, scale=None, "
        "enable_gqa=False",
        "aten::scaled_dot_product_attention",
        "attention",
    ),
    **{f"max_pool{n}d": (_MAXPOOL, f"torch.nn.functional._max_pool{n}d", None) for n in (1, 2, 3)},
    **{
        f"max_pool{n}d_with_indices": (_MAXPOOL, f"torch.nn.functional.max_pool{n}d_with_indices", None)
        for n in (1, 2, 3)
    },
    "avg_pool1d": (
        "self, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True",
        "aten::avg_pool1d",
        None,
    ),
    "avg_pool2d": (_AVGPOOL, "aten::avg_pool2d", None),
    "avg_pool3d": (_AVGPOOL, "aten::avg_pool3d", None),
    **{f"lp_pool{n}d": (_LPPOOL, f"torch.nn.functional.lp_pool{n}d", None) for n in (1, 2, 3)},
    "interpolate": (
        "input, size=None, scale_factor=None, mode='nearest', align_corners=None, "
        "recompute_scale_factor=None, antialias=False",
        "torch.nn.functional.interpolate",
        None,
    ),
    "upsample": (
        "input, size=None, scale_factor=None, mode='nearest', align_corners=None",
        "torch.nn.functional.upsample",
        None,
    ),
    "pad": ("input, pad, mode='constant', value=None", "torch.nn.functional.pad", None),
    "permute": ("self, *dims", "aten::permute", None),
    "flip": ("self, *dims", "aten::flip", None),
    "view": ("self, *size", "aten::view", None),
    "reshape": ("self, *shape", "aten::reshape", None),
    "transpose": ("self, dim0, dim1", "aten::transpose.int", None),
    "swapaxes": ("self, axis0, axis1", "aten::swapaxes", None),
    "swapdims": ("self, dim0, dim1", "aten::swapdims", None),
    "movedim": ("self, source, destination", "aten::movedim", None),
    "moveaxis": ("self, source, destination", "aten::moveaxis", None),
    "roll": ("self, shifts, dims=()", "aten::roll", None),
    "getitem": ("self, index", None, None),  # Tensor.__getitem__: no published signature
    "cat": (_CAT, "aten::cat", None),
    "concat": (_CAT, "aten::concat", None),
    "concatenate": (_CAT, "aten::concatenate", None),
    "stack": (_CAT, "aten::stack", None),
    "split": ("tensor, split_size_or_sections, dim=0", "torch.split", None),
    "split_with_sizes": (_SPLIT.format("split_sizes"), "aten::split_with_sizes", None),
    "unsafe_split": (_SPLIT.format("split_size"), "aten::unsafe_split", None),
    "chunk": (_SPLIT.format("chunks"), "aten::chunk", None),
    "unsafe_chunk": (_SPLIT.format("chunks"), "aten::unsafe_chunk", None),
    "tensor_split": (_SPLIT.format("sections"), "aten::tensor_split.sections", None),
    "unbind": ("self, dim=0", "aten::unbind.int", None),
    "narrow": ("self, dim, start, length", "aten::narrow", None),
    "select": ("self, dim, index", "aten::select.int", None),
    "mean": (_REDUCE, "aten::mean.dim", None),
    "sum": (_REDUCE, "aten::sum.dim_IntList", None),
    "nansum": (_REDUCE, "aten::nansum", None),
    "nanmean": (_REDUCE, "aten::nanmean", None),
    "prod": (_REDUCE, "aten::prod.dim_int", None),
    "amax": ("self, dim=(), keepdim=False", "aten::amax", None),
    "amin": ("self, dim=(), keepdim=False", "aten::amin", None),
    "max": (_DIM_KEEP, "aten::max.dim", None),  # max(a, b) binds b as 'dim' (a tensor)
    "min": (_DIM_KEEP, "aten::min.dim", None),
    "std": (_STATS, "aten::std.dim", None),
    "var": (_STATS, "aten::var.dim", None),
    "std_mean": (_STATS, "aten::std_mean.dim", None),
    "var_mean": (_STATS, "aten::var_mean.dim", None),
    "norm": (
        "input, p='fro', dim=None, keepdim=False, out=None, dtype=None", "torch.norm", None
    ),
    "logsumexp": ("self, dim, keepdim=False", "aten::logsumexp", None),
    "median": (_DIM_KEEP, "aten::median.dim", None),
    "nanmedian": (_DIM_KEEP, "aten::nanmedian.dim", None),
    "mode": ("self, dim=-1, keepdim=False", "aten::mode", None),
    "all": (_DIM_KEEP, "aten::all.dim", None),
    "any": (_DIM_KEEP, "aten::any.dim", None),
    "argmax": (_DIM_KEEP, "aten::argmax", None),
    "argmin": (_DIM_KEEP, "aten::argmin", None),
    "count_nonzero": ("self, dim=None", "aten::count_nonzero", None),
    "aminmax": ("self, *, dim=None, keepdim=False", "aten::aminmax", None),
    "softmax": (_SOFTMAX, "torch.nn.functional.softmax", None),
    "log_softmax": (_SOFTMAX, "torch.nn.functional.log_softmax", None),
    "softmin": (_SOFTMAX, "torch.nn.functional.softmin", None),
    "normalize": (
        "input, p=2.0, dim=1, eps=1e-12, out=None", "torch.nn.functional.normalize", None
    ),
    "sort": ("self, dim=-1, descending=False", "aten::sort", None),
    "argsort": ("self, dim=-1, descending=False", "aten::argsort", None),
    "cumsum": ("self, dim, *, dtype=None", "aten::cumsum", None),
    "cumprod": ("self, dim, *, dtype=None", "aten::cumprod", None),
    "cummax": ("self, dim", "aten::cummax", None),
    "cummin": ("self, dim", "aten::cummin", None),
    "logcumsumexp": ("self, dim", "aten::logcumsumexp", None),
    "layer_norm": (
        "input, normalized_shape, weight=None, bias=None, eps=1e-05",
        "torch.nn.functional.layer_norm",
        None,
    ),
    "rms_norm": (
        "input, normalized_shape, weight=None, eps=None", "torch.nn.functional.rms_norm", None
    ),
    "batch_norm": (
        "input, running_mean, running_var, weight=None, bias=None, training=False, "
        "momentum=0.1, eps=1e-05",
        "torch.nn.functional.batch_norm",
        None,
    ),
    "instance_norm": (
        "input, running_mean=None, running_var=None, weight=None, bias=None, "
        "use_input_stats=True, momentum=0.1, eps=1e-05",
        "torch.nn.functional.instance_norm",
        None,
    ),
    "fused_moving_avg_obs_fake_quant": (
        "self, observer_on, fake_quant_on, running_min, running_max, scale, zero_point, "
        "averaging_const, quant_min, quant_max, ch_axis, per_row_fake_quant=False, "
        "symmetric_quant=False",
        "aten::fused_moving_avg_obs_fake_quant",
        None,
    ),
    **{
        n: (_DROPOUT, f"torch.nn.functional.{n}", None)
        for n in ("dropout", "dropout1d", "dropout2d", "dropout3d")
    },
    "alpha_dropout": (
        "input, p=0.5, training=False, inplace=False", "torch.nn.functional.alpha_dropout", None
    ),
    "feature_alpha_dropout": (
        "input, p=0.5, training=False, inplace=False",
        "torch.nn.functional.feature_alpha_dropout",
        None,
    ),
    **{
        n: (_ATEN_DROPOUT.replace("input", "self"), f"aten::{n}", None)
        for n in ("dropout_", "alpha_dropout_", "feature_alpha_dropout_", "feature_dropout_")
    },
    "feature_dropout": (_ATEN_DROPOUT, "aten::feature_dropout", None),
    "native_dropout": (_ATEN_DROPOUT, "aten::native_dropout", None),
}  # fmt: skip

SPECS: dict[str, OpSpec] = {n: _parse(n, *row) for n, row in _TABLE.items()}

_ATEN_BATCH_NORM = _parse(
    "batch_norm",
    "input, weight, bias, running_mean, running_var, training, momentum, eps, cudnn_enabled",
    "aten::batch_norm",
)
_ATEN_INSTANCE_NORM = _parse(
    "instance_norm",
    "input, weight, bias, running_mean, running_var, use_input_stats, momentum, eps, cudnn_enabled",
    "aten::instance_norm",
)
_ATEN_SOFTMAX = "self, dim, dtype=None"

# Callables recorded under a name whose parameters differ from SPECS[name]'s, by
# qualified name: torch.batch_norm takes (input, weight, bias, running_mean, ...). The
# aten operators a graph of torch.export or make_fx calls are named as their eager calls
# (torch_funcs.op_name); those whose schema differs from the entry's are here, as torch
# writes them (the test checks that every other aten overload of an entry's name binds
# as the entry does).
VARIANTS: dict[str, OpSpec] = {
    "torch.batch_norm": _ATEN_BATCH_NORM,
    "torch.instance_norm": _ATEN_INSTANCE_NORM,
    "torch.ops.aten.batch_norm.default": _ATEN_BATCH_NORM,
    "torch.ops.aten.instance_norm.default": _ATEN_INSTANCE_NORM,
    "torch.ops.aten.softmax.int": _parse("softmax", _ATEN_SOFTMAX, "aten::softmax.int"),
    "torch.ops.aten.log_softmax.int": _parse("log_softmax", _ATEN_SOFTMAX, "aten::log_softmax.int"),
    "torch.ops.aten.layer_norm.default": _parse(
        "layer_norm",
        "input, normalized_shape, weight=None, bias=None, eps=1e-05, cudnn_enable=True",
        "aten::layer_norm",
    ),
    "torch.ops.aten.tensordot.default": _parse(
        "tensordot", "self, other, dims_self, dims_other", "aten::tensordot"
    ),
    # a product in another output dtype: out_dtype after the matrices
    **{
        f"torch.ops.aten.{n}.dtype": _parse(n, f"self, {m}, out_dtype", f"aten::{n}.dtype")
        for n, m in (("mm", "mat2"), ("bmm", "mat2"))
    },
    **{
        f"torch.ops.aten.{n}.dtype": _parse(
            n, _ADDMM.format(*m).replace(", *", ", out_dtype, *"), f"aten::{n}.dtype"
        )
        for n, m in (("addmm", ("mat1", "mat2")), ("baddbmm", ("batch1", "batch2")))
    },
    # x.std(False): unbiased, where the entry's (dim) comes first
    **{
        f"torch.ops.aten.{n}.default": _parse(n, "self, unbiased=True", f"aten::{n}")
        for n in ("std", "var", "std_mean", "var_mean")
    },
}


def spec(name: str, target: str | None = None) -> OpSpec | None:
    """The parameters of op ``name`` (of the callable ``target`` where that differs)."""
    if target is not None:
        v = VARIANTS.get(target)
        if v is not None:
            return v
    return SPECS.get(name)


def bind(
    name: str,
    args: tuple | list,
    kwargs: Mapping[str, Any] | None = None,
    target: str | None = None,
) -> dict[str, Any]:
    """A recorded call's arguments by parameter name: ``bind('conv2d', (x, w), {'stride': 2})``
    gives ``{'input': x, 'weight': w, 'stride': 2, 'bias': None, 'padding': 0, ...}``.

    Raises KeyError for an op the catalogue does not know (its parameter names are then
    unknown, and a guess by position is what this replaces)."""
    s = spec(name, target)
    if s is None:
        raise KeyError(f"the op catalogue does not know the parameters of {name!r}")
    return s.bind(args, kwargs)


# --------------------------------------------------------------------------- op kinds
# Names as lurker records them (capture's op_name): dunders lose their underscores.
RENAMES = {"truediv": "div", "rtruediv": "rdiv", "floordiv": "floor_divide"}

# In-place dunder operators: they mutate their first argument.
INPLACE_DUNDERS = frozenset({
    "iadd", "isub", "imul", "itruediv", "ifloordiv", "imod", "ipow", "imatmul",
    "iand", "ior", "ixor", "ilshift", "irshift", "setitem",
})  # fmt: skip


def is_inplace(name: str) -> bool:
    """Whether op ``name`` writes into its first argument (``relu_``, ``iadd``, ``setitem``)."""
    return (name.endswith("_") and not name.endswith("__")) or name in INPLACE_DUNDERS


# Uninitialised memory: no re-execution can reproduce it (flagged random, never compared).
UNINITIALISED = frozenset(
    {"empty", "empty_like", "new_empty", "empty_strided", "new_empty_strided"}
)

# Ops whose output depends on the random generator: the recorder keeps the RNG state they
# ran with, and validation re-executes them under it.
RANDOM = frozenset({
    "rand", "randn", "randint", "rand_like", "randn_like", "randint_like", "randperm",
    "normal", "normal_", "uniform_", "bernoulli", "bernoulli_", "multinomial", "poisson",
    "exponential_", "geometric_", "cauchy_", "log_normal_", "random_", "rrelu", "rrelu_",
    "gumbel_softmax", "fractional_max_pool2d", "fractional_max_pool3d",
    "fractional_max_pool2d_with_indices", "fractional_max_pool3d_with_indices",
    # torch.nn.init, recorded whole when a model builds a layer inside its forward
    "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_", "xavier_normal_",
    "trunc_normal_", "orthogonal_", "sparse_",
    *UNINITIALISED,
})  # fmt: skip

# Random only for some arguments: name -> (the probability parameter, the training flag
# or None). The defaults come from the op's parameters (alpha_dropout: training=False).
DROPOUTS: dict[str, tuple[str, str | None]] = {
    **{
        n: ("p", "train" if SPECS[n].params[-1].name == "train" else "training")
        for n in (
            "dropout", "dropout_", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout",
            "alpha_dropout_", "feature_alpha_dropout", "feature_alpha_dropout_",
            "feature_dropout", "feature_dropout_", "native_dropout",
        )
    },
    "scaled_dot_product_attention": ("dropout_p", None),
}  # fmt: skip


# torch's recurrent kernels (nn.LSTM, nn.GRU, nn.RNN): while training, dropout between
# layers. Several overloads and no published signature, so no entry in SPECS: their calls
# are read by position, as nn.RNNBase makes them
RECURRENT = frozenset({"lstm", "gru", "rnn_tanh", "rnn_relu"})

# The ops a quantized nn.Linear runs in place of ``linear`` (``quantize_dynamic``, int8 or
# float16; ``convert``, fused with its activation or not): units on the last axis, as a
# float Linear's.
QUANTIZED_LINEAR = frozenset(n for n, s in SPECS.items() if s.flops == "packed_linear")
# The ops a statically quantized conv runs (``convert``) in place of ``conv2d``... -> their
# spatial dims: units on the axis after the batch, as a float conv's.
QUANTIZED_CONV = {
    n: int(next(c for c in n if c.isdigit()))
    for n, s in SPECS.items()
    if s.flops in ("packed_conv", "packed_conv_transpose")
}
# The parameter that holds the packed weight, per op that takes one
PACKED = {
    n: "W_prepack" if s.flops == "packed_linear" else "packed_weight"
    for n, s in SPECS.items()
    if n in QUANTIZED_LINEAR or n in QUANTIZED_CONV
}


def packed_call(name: str, packed: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A quantized conv's or Linear's arguments as its float op's (``conv2d``'s
    ``weight``, ``stride``, ``padding``, ``dilation``, ``groups``...; ``weight`` a shape),
    from what the trace read off its packed weight (``op.meta["packed"]``), so that rules
    written for the float op read them; None where the trace read nothing."""
    if name not in PACKED or not packed or "weight" not in packed:
        return None
    call = {k: tuple(v) if isinstance(v, list) else v for k, v in packed.items()}
    call["weight"] = _Shape(call["weight"])
    return call


@dataclass(frozen=True)
class _Shape:
    """A weight known by its shape (what analyses read of weights)."""

    shape: tuple[int, ...]


# Op names an older lurker wrote into runs and graph documents -> this lurker's. A
# quantize_dynamic'd Linear's op was ``linear_dynamic`` (labels ``linear_dynamic_1``)
# until torch's quantized operators were named apart from aten's (torch_funcs.op_name):
# read under the old name, a stored graph's op is one no analysis knows (receptive fields
# stop there) and a stored layer's label matches no op of a live trace.
FORMER_NAMES = {
    n.removeprefix("quantized_"): n
    for n in (
        "quantized_linear_dynamic", "quantized_linear_dynamic_fp16",
        "quantized_linear_relu_dynamic", "quantized_linear_relu_dynamic_fp16",
    )
}  # fmt: skip


def current_label(label: str) -> str:
    """An op name or label as this lurker writes it: ``linear_dynamic_2:3`` (written by an
    older lurker, :data:`FORMER_NAMES`) is ``quantized_linear_dynamic_2:3``; any other
    name or label is itself."""
    if label in FORMER_NAMES:
        return FORMER_NAMES[label]
    rolled, colon, pass_num = label.partition(":")
    name, _, number = rolled.rpartition("_")
    if name in FORMER_NAMES and number.isdigit():
        return f"{FORMER_NAMES[name]}_{number}{colon}{pass_num}"
    return label


def _recurrent_draws(args: tuple | list) -> bool:
    """Whether an RNN kernel call drops out between layers: ``(input, hx, params,
    has_biases, num_layers, dropout, train, ...)``, or packed ``(data, batch_sizes, hx,
    params, ...)`` with the same after ``params``."""
    at = 5 if len(args) > 3 and isinstance(args[3], (list, tuple)) else 4
    if len(args) < at + 3:
        raise TypeError(f"a recurrent call of {len(args)} arguments")
    num_layers, p, train = args[at : at + 3]
    return bool(train) and p != 0 and num_layers > 1


def draws_random(
    name: str, args: tuple | list, kwargs: Mapping[str, Any] | None, op: OpSpec | None = None
) -> bool:
    """Whether a call of ``name`` with these arguments draws random numbers (``op``: its
    parameters where they differ from the name's entry)."""
    if name in RANDOM:
        return True
    if name in RECURRENT:
        return _recurrent_draws(args)
    rule = DROPOUTS.get(name)
    if rule is None:
        return False
    op = op or SPECS[name]
    p_name, train_name = rule
    if train_name is not None:
        train = op.arg(args, kwargs, train_name, True)
        if train is not None and not train:  # native_dropout(train=None): training
            return False
    return op.arg(args, kwargs, p_name) != 0


# Ops whose output keeps its input's positions one to one: element ``i`` of the output is
# made from element ``i`` of each tensor argument (broadcast aside) and nothing else, so an
# output of the input's shape has its input's channels and time steps (the explorer names
# an op's units by the dataset's channels through a chain of them). The per-channel
# normalisations are here too: each channel scaled by statistics of its own. Anything that
# reads along an axis (a softmax, a cumsum, a flip, a shuffle, a layer norm over channels)
# is not. In-place variants (``relu_``, ``iadd``) are matched by :func:`is_elementwise`.
ELEMENTWISE = frozenset({
    # arithmetic, operands in either order
    "add", "sub", "subtract", "mul", "multiply", "div", "divide", "true_divide", "radd",
    "rsub", "rmul", "rdiv", "neg", "negative", "pos", "positive", "abs", "absolute", "pow",
    "square", "sqrt", "rsqrt", "reciprocal", "exp", "expm1", "log", "log1p", "sign",
    "clamp", "clip", "clamp_min", "clamp_max", "maximum", "minimum", "nan_to_num",
    # activations
    "relu", "relu6", "leaky_relu", "elu", "selu", "celu", "gelu", "silu", "mish", "sigmoid",
    "tanh", "hardswish", "hardsigmoid", "hardtanh", "softplus", "softsign", "logsigmoid",
    "prelu", "threshold", "tanhshrink", "hardshrink", "softshrink",
    # dropouts (identity in eval; in training they zero single values or whole channels)
    "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout",
    "feature_alpha_dropout", "feature_dropout",
    # copies
    "contiguous", "clone", "detach", "to", "type", "type_as", "float", "double", "half",
    "bfloat16", "cpu", "cuda",
    # normalisation of each channel by its own statistics
    "batch_norm", "instance_norm",
})  # fmt: skip


#: The elementwise ops that normalise each index of axis 1 by its own statistics: one to
#: one only where axis 1 holds the channels.
PER_CHANNEL_NORMS = frozenset({"batch_norm", "instance_norm"})
#: Ops whose tensor arguments after the first give only a dtype and device
#: (``p.type_as(x)``): their values come from the first alone.
_DTYPE_FROM = frozenset({"to", "type", "type_as"})


def value_refs(op: Any) -> list[Any]:
    """The references of ``op``'s call (see :func:`lurker.graph.nodes.refs`) whose values
    its output is made from: not ``out=``, which it writes, nor the second tensor of
    ``to``/``type``/``type_as``, which gives a dtype and device."""
    from ..graph.nodes import refs_in

    if op.name in _DTYPE_FROM:
        return refs_in(op.args[:1])
    return refs_in((op.args, {k: v for k, v in op.kwargs.items() if k != "out"}))


def is_elementwise(name: str) -> bool:
    """Whether op ``name`` (as recorded; an in-place ``relu_`` or ``iadd`` as its plain
    op) is in :data:`ELEMENTWISE`."""
    if name.endswith("_") and not name.endswith("__"):
        name = name[:-1]
    elif name in INPLACE_DUNDERS and name[1:] in ELEMENTWISE:
        name = name[1:]
    elif name == "itruediv":
        name = "div"
    return name in ELEMENTWISE


# Ops that update running statistics in place while training (normalisations, QAT observers):
# name -> (the flag that says so, the statistics it updates).
NORMS: dict[str, tuple[str, tuple[str, ...]]] = {
    "batch_norm": ("training", ("running_mean", "running_var")),
    "instance_norm": ("use_input_stats", ("running_mean", "running_var")),
    # quantisation-aware training's fused FakeQuantize: while its observer is on (a
    # tensor flag), it updates the running range and the scale it quantises with
    "fused_moving_avg_obs_fake_quant": (
        "observer_on",
        ("running_min", "running_max", "scale", "zero_point"),
    ),
}

# Conversions of tensor data to Python values (by the callable's raw name): the model's
# control flow may depend on them.
READOUTS = frozenset({
    "__bool__", "item", "__int__", "__float__", "__index__", "tolist", "__contains__",
    "equal", "allclose", "is_nonzero",
})  # fmt: skip

# Callables that cannot be re-executed from saved values, by qualified name: the reason
# shown in validation reports.
_NEEDS_GRAPH = "needs the autograd graph of the forward, which saved values do not carry"
NOT_REEXECUTABLE: dict[str, str] = {
    "torch.autograd.grad": f"autograd.grad {_NEEDS_GRAPH}",
    "torch.autograd.backward": f"backward {_NEEDS_GRAPH}",
    "torch.Tensor.backward": f"backward {_NEEDS_GRAPH}",
}


# --------------------------------------------------------------------------- FLOPs
Shape = tuple[int, ...]


def flops(name: str, shapes: Mapping[str, Any], out: Shape) -> int | None:
    """Floating-point operations (2 per multiply-add) of a conv, linear or matmul-like op.

    ``shapes``: the op's bound arguments with each tensor replaced by its shape (other
    arguments as bound); ``out``: the first output's shape. None for other ops.
    """
    s = SPECS.get(name)
    rule = s.flops if s is not None else None
    if rule is None:
        return None
    n_out = prod(out)
    try:
        if rule == "convolution":
            rule = "conv_transpose" if shapes.get("transposed") else "conv"
        if rule == "conv":
            return 2 * n_out * prod(shapes["weight"][1:])
        if rule == "conv_transpose":  # each input value is scattered by every tap
            return 2 * prod(shapes["input"]) * prod(shapes["weight"][1:])
        if rule == "linear":
            return 2 * n_out * shapes["weight"][-1]
        if rule == "packed_linear":  # W_prepack: the packed weight's shape (out, in)
            return 2 * n_out * shapes["W_prepack"][-1]
        if rule == "packed_conv":  # (a quantized conv1d's kernel has an axis of 1 more)
            return 2 * n_out * prod(shapes["packed_weight"][1:])
        if rule == "packed_conv_transpose":
            return 2 * prod(shapes["qx"]) * prod(shapes["packed_weight"][1:])
        if rule == "matmul":
            return 2 * n_out * shapes["self"][-1]
        if rule == "rmatmul":
            return 2 * n_out * shapes["other"][-1]
        if rule == "addmm":
            first = shapes["mat1"] if "mat1" in shapes else shapes["batch1"]
            return 2 * n_out * first[-1]
        if rule == "addbmm":  # the batch is summed into one matrix
            b = shapes["batch1"]
            return 2 * n_out * b[0] * b[-1]
        if rule == "attention":
            q, k, v = shapes["query"], shapes["key"], shapes["value"]
            return 2 * prod(q[:-2]) * q[-2] * k[-2] * (q[-1] + v[-1])
        if rule == "einsum":
            return einsum_flops(shapes["equation"], shapes["tensors"], out)
        if rule == "tensordot":
            if "dims_self" in shapes:  # aten::tensordot: the two lists of axes apart
                dims = (shapes["dims_self"], shapes["dims_other"])
                return tensordot_flops(shapes["self"], shapes["other"], dims)
            return tensordot_flops(shapes["a"], shapes["b"], shapes["dims"])
    except (KeyError, IndexError, TypeError, ValueError):  # an argument missing or not a tensor
        return None
    raise AssertionError(f"unknown FLOPs rule {rule!r} of {name}")


def einsum_flops(equation: str, operands: Any, out: Shape) -> int | None:
    """``einsum`` of two operands, as the batched matmul it is: 2 FLOPs per multiply-add
    over the indices it multiplies over (those of both operands, or of the output; an
    index summed out of one operand alone costs no multiplication), a broadcast index at
    its larger size; an ellipsis stands for the axes it covers, broadcast from the right.
    None for one operand (a sum or a transpose), an outer or element-wise product (nothing
    contracted: not a matmul) or more than two operands (the cost depends on the
    contraction order: :func:`einsum_contracts` tells that apart).

    ``operands``: their shapes, or one operand's shape (``einsum(eq, x)`` binds it alone).
    """
    if operands and all(type(n) is int for n in operands):
        operands = [operands]
    if len(operands) != 2:
        return None
    parsed = _einsum_letters(equation, operands)
    if parsed is None:
        return None
    subs, rhs = parsed
    sizes = _einsum_sizes(subs, operands)
    if sizes is None:
        return None
    size: dict[str, int] = {}
    for each in sizes:
        for c, n in each.items():
            size[c] = max(size.get(c, 1), n)
    both = _multiplied(subs, sizes, rhs)
    if not both - set(rhs):  # nothing contracted: an outer or element-wise product
        return None
    return 2 * prod(n for c, n in size.items() if c in both or c in rhs)


def _einsum_sizes(subs: list[str], operands: Any) -> list[dict[str, int]] | None:
    """Each operand's size per index letter; None where a subscript does not fit its shape."""
    sizes = []
    for letters, shape in zip(subs, operands, strict=True):
        if len(letters) != len(shape):
            return None
        sizes.append(dict(zip(letters, shape, strict=True)))
    return sizes


def _multiplied(subs: list[str], sizes: list[dict[str, int]], rhs: str) -> set[str]:
    """The letters of two operands or more that einsum multiplies over: an index the output
    leaves out where all operands but one have it of size 1 (broadcast) is summed out of
    that one alone, before any product, as torch does; it costs no multiplication."""
    found = set()
    for c in set("".join(subs)):
        held = [s[c] for s in sizes if c in s]
        if len(held) >= 2 and (c in rhs or sum(n != 1 for n in held) != 1):
            found.add(c)
    return found


def _einsum_letters(equation: str, operands: Any) -> tuple[list[str], str] | None:
    """The operands' index letters and the output's, an ellipsis spelled out as one
    letter per axis it covers (right-aligned across operands, as einsum broadcasts it) and
    an implicit output made explicit (the ellipsis' axes, then the letters that appear
    once, sorted). None where the equation does not fit the shapes."""
    eq = equation.replace(" ", "")
    lhs, arrow, rhs = eq.partition("->")
    subs = lhs.split(",")
    if len(subs) != len(operands):
        return None
    spans = []
    for letters, shape in zip(subs, operands):
        if "..." in letters:
            n = len(shape) - (len(letters) - 3)
            if n < 0:
                return None
            spans.append(n)
        else:
            spans.append(0)
    width = max(spans)
    # letters no equation uses (einsum's are a-z and A-Z)
    axes = [chr(0x3B1 + i) for i in range(width)]
    subs = [
        letters.replace("...", "".join(axes[width - n :])) if "..." in letters else letters
        for letters, n in zip(subs, spans)
    ]
    if not arrow:  # implicit output: the ellipsis' axes, then the letters met once, in order
        every = "".join(subs)
        rhs = "".join(axes) + "".join(
            sorted(c for c in set(every) if every.count(c) == 1 and c not in axes)
        )
    else:
        rhs = rhs.replace("...", "".join(axes))
    return subs, rhs


def einsum_contracts(equation: str, operands: int | list[Shape]) -> bool:
    """Whether an ``einsum`` of ``operands`` operands contracts an index (one of two or
    more operands' that the output leaves out): a matmul-like op with a cost, whether or
    not :func:`einsum_flops` can count it. A sum, a transpose, an outer or element-wise
    product does not.

    ``operands``: their shapes where known (an ellipsis then covers the axes it does, and
    an index of size 1 in all operands but one is summed out of that one, as in
    :func:`einsum_flops`), else how many there are (an ellipsis is then read as one more
    index, which may cover no axis: a guess that errs towards "contracts")."""
    if not isinstance(operands, int):
        parsed = _einsum_letters(equation, operands)
        sizes = None if parsed is None else _einsum_sizes(parsed[0], operands)
        if parsed is not None and sizes is not None:
            subs, rhs = parsed
            return len(subs) >= 2 and bool(_multiplied(subs, sizes, rhs) - set(rhs))
        operands = len(operands)
    # the ellipsis as one more index: summed where the output leaves it out
    eq = equation.replace(" ", "").replace("...", "\u00b7")
    lhs, arrow, rhs = eq.partition("->")
    subs = lhs.split(",")
    if operands < 2 or len(subs) != operands:
        return False
    every = "".join(subs)
    if not arrow:  # implicit: the letters met once, and the ellipsis
        rhs = "\u00b7" + "".join(c for c in set(every) if every.count(c) == 1)
    return any(sum(c in letters for letters in subs) >= 2 and c not in rhs for c in set(every))


def tensordot_flops(a: Shape, b: Shape, dims: Any = 2) -> int:
    """``tensordot``: a matmul of the free axes of ``a`` and ``b`` over the contracted ones
    (``dims``: how many last axes of ``a``, or the two lists of axes)."""
    if isinstance(dims, int):
        contracted = prod(a[len(a) - dims :]) if dims else 1
    else:
        contracted = prod(a[d] for d in dims[0])
    return 2 * prod(a) * prod(b) // max(contracted, 1)
