"""An op's call arguments in words, for the graph page: ``dim=1``, ``training=True``.

A call's skeleton (``op.args``/``op.kwargs``) keeps its constants and names its tensors by
where they came from; positional arguments carry no names, and ``nn.BatchNorm2d`` and
``nn.Dropout`` pass ``training`` positionally, so the names of the common functional ops'
parameters are listed here (torch-free: the server reads graphs without torch). An op not
listed shows its positional arguments by value alone. ``training`` is what makes a
``batch_norm`` use the batch's statistics and a ``dropout`` drop values: an eval model
whose op says ``training=True`` computes something else than it was validated on.
"""

from __future__ import annotations

from typing import Any

from .nodes import Op, Opaque, OpRef, ParamRef

_CONV = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_T = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")
_DROPOUT = ("input", "p", "training", "inplace")
_MAX_POOL = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
_AVG_POOL = ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad")
_REDUCE = ("input", "dim", "keepdim")
_SDPA = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")
_NORM = ("input", "running_mean", "running_var", "weight", "bias")

#: Positional parameter names by op name (the functional form's, whose first parameter is
#: the tensor a method is called on too).
NAMES: dict[str, tuple[str, ...]] = {
    "batch_norm": (*_NORM, "training", "momentum", "eps"),
    "instance_norm": (*_NORM, "use_input_stats", "momentum", "eps"),
    "layer_norm": ("input", "normalized_shape", "weight", "bias", "eps"),
    "group_norm": ("input", "num_groups", "weight", "bias", "eps"),
    "rms_norm": ("input", "normalized_shape", "weight", "eps"),
    "local_response_norm": ("input", "size", "alpha", "beta", "k"),
    "normalize": ("input", "p", "dim", "eps"),
    **{n: _DROPOUT for n in ("dropout", "alpha_dropout", "feature_alpha_dropout")},
    **{f"dropout{d}d": _DROPOUT for d in (1, 2, 3)},
    **{n: ("input", "dim") for n in ("softmax", "log_softmax", "softmin")},
    **{f"conv{d}d": _CONV for d in (1, 2, 3)},
    **{f"conv_transpose{d}d": _CONV_T for d in (1, 2, 3)},
    "linear": ("input", "weight", "bias"),
    "bilinear": ("input1", "input2", "weight", "bias"),
    **{f"max_pool{d}d": _MAX_POOL for d in (1, 2, 3)},
    **{f"avg_pool{d}d": _AVG_POOL for d in (1, 2, 3)},
    **{f"adaptive_avg_pool{d}d": ("input", "output_size") for d in (1, 2, 3)},
    **{f"adaptive_max_pool{d}d": ("input", "output_size", "return_indices") for d in (1, 2, 3)},
    "interpolate": ("input", "size", "scale_factor", "mode", "align_corners"),
    "upsample": ("input", "size", "scale_factor", "mode", "align_corners"),
    **{n: ("input", "inplace") for n in ("relu", "relu6", "selu", "silu", "mish", "hardswish")},
    "hardsigmoid": ("input", "inplace"),
    "leaky_relu": ("input", "negative_slope", "inplace"),
    "elu": ("input", "alpha", "inplace"),
    "celu": ("input", "alpha", "inplace"),
    "hardtanh": ("input", "min_val", "max_val", "inplace"),
    "gelu": ("input",),
    "embedding": ("input", "weight", "padding_idx", "max_norm", "norm_type"),
    "pad": ("input", "pad", "mode", "value"),
    "flatten": ("input", "start_dim", "end_dim"),
    "cat": ("tensors", "dim"),
    "concat": ("tensors", "dim"),
    "stack": ("tensors", "dim"),
    "transpose": ("input", "dim0", "dim1"),
    "clamp": ("input", "min", "max"),
    "scaled_dot_product_attention": _SDPA,
    **{n: _REDUCE for n in ("sum", "mean", "amax", "amin", "argmax", "argmin")},
    # torch's positional overload is (input, dim, unbiased, keepdim): ``x.std(-1, False)``
    # is unbiased=False, not keepdim (and ``x.var(False)`` is (input, unbiased): below)
    **{n: ("input", "dim", "unbiased", "keepdim") for n in ("std", "var")},
}

#: Ops whose ``training`` defaults to True when the call leaves it out (``F.dropout(x)``).
_TRAINING_DEFAULT = frozenset(
    {"dropout", "alpha_dropout", "feature_alpha_dropout", "dropout1d", "dropout2d", "dropout3d"}
)

#: The longest text of one argument (a ``cat`` of a hundred tensors is cut, said with …).
MAX_TEXT = 80


def call_args(op: Op, labels: list[str]) -> str:
    """``op``'s call as one line, ``"conv2d_1, features.4.weight, stride=(1, 1)"``: its
    positional arguments, a constant named where :data:`NAMES` knows the op's parameters,
    then its keywords; a tensor is the label of the op that made it, a parameter its name
    (neither named: what they are shows). One string, not pairs, so a 10,000-op graph's
    document stays small. Empty for inputs, outputs, buffers and constants, and for a call
    of tensors alone (``add``, ``tanh``, a ``linear`` of its module's weight and bias),
    which the graph's edges and the module's parameters show."""
    if op.target is None:
        return ""
    if all(_is_tensor(a) for a in op.args) and all(
        _is_tensor(v) or str(k).startswith("_") for k, v in op.kwargs.items()
    ):
        # tensors alone (add_1(relu_1, conv2d_2), linear_1(x, self.weight, self.bias)): the
        # graph's edges and the module's parameters say it, and a 10,000-op graph stays small
        return ""
    names = NAMES.get(op.name, ())
    if op.name in ("std", "var") and len(op.args) > 1 and type(op.args[1]) is bool:
        names = ("input", "unbiased")  # torch.std(input, unbiased): a bool is never a dim
    # a parameter of the op's own module as `self.weight` (the page names the module)
    own = (op.module or "").split(":")[0]
    own = own + "." if own else ""
    parts = []
    for i, a in enumerate(op.args):
        name = names[i] if i < len(names) and not _is_tensor(a) else ""
        parts.append(f"{name}={_text(a, labels, own)}" if name else _text(a, labels, own))
    # (torch's own plumbing, F.softmax's ``_stacklevel``, says nothing of the call)
    parts += [
        f"{k}={_text(v, labels, own)}" for k, v in op.kwargs.items() if not str(k).startswith("_")
    ]
    return ", ".join(parts)


def _is_tensor(a: Any) -> bool:
    return type(a) is OpRef or type(a) is ParamRef


def in_training(op: Op) -> bool:
    """Whether ``op`` ran as in training: a ``batch_norm`` or ``dropout`` called with
    ``training=True`` (a dropout's default), which an eval model never asks for. A
    ``batch_norm`` without running statistics (``track_running_stats=False``) is not:
    the batch's are the only ones it has, in eval mode too, as its module was built."""
    if op.name != "batch_norm" and op.name not in _TRAINING_DEFAULT:
        return False
    names = NAMES[op.name]
    if op.name == "batch_norm":
        at = names.index("running_mean")
        stats = op.kwargs.get("running_mean", op.args[at] if len(op.args) > at else None)
        if stats is None:
            return False
    at = names.index("training")
    value: Any = op.kwargs.get("training", op.args[at] if len(op.args) > at else None)
    if value is None and "training" not in op.kwargs:
        return op.name in _TRAINING_DEFAULT
    return value is True


def _text(a: Any, labels: list[str], own: str) -> str:
    text = _repr(a, labels, own)
    return text if len(text) <= MAX_TEXT else text[: MAX_TEXT - 1] + "…"


def _repr(a: Any, labels: list[str], own: str) -> str:
    """``a`` as Python would write it; tensors by reference, ``own`` (the op's module
    path and a dot) dropped from its own parameters' names for ``self.``."""
    if type(a) is OpRef:
        label = labels[a.index] if 0 <= a.index < len(labels) else f"op {a.index}"
        return label if a.output == 0 else f"{label}[{a.output}]"
    if type(a) is ParamRef:
        return "self." + a.name[len(own) :] if own and a.name.startswith(own) else a.name
    if isinstance(a, Opaque):
        return a.repr
    if isinstance(a, tuple):
        inner = ", ".join(_repr(x, labels, own) for x in a)
        return f"({inner},)" if len(a) == 1 else f"({inner})"
    if isinstance(a, list):
        return "[" + ", ".join(_repr(x, labels, own) for x in a) + "]"
    if isinstance(a, dict):
        return "{" + ", ".join(f"{k!r}: {_repr(v, labels, own)}" for k, v in a.items()) + "}"
    if isinstance(a, slice):
        parts = ["" if x is None else _repr(x, labels, own) for x in (a.start, a.stop, a.step)]
        return ":".join(parts[:2] if a.step is None else parts)
    if a is Ellipsis:
        return "..."
    return repr(a)
