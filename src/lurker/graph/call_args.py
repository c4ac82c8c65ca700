"""An op's call arguments in words, for the graph page: ``dim=1``, ``training=True``.

A call's skeleton (``op.args``/``op.kwargs``) keeps its constants and names its tensors by
where they came from; positional arguments carry no names, and ``nn.BatchNorm2d`` and
``nn.Dropout`` pass ``training`` positionally, so they are named by the op catalogue's
parameters (torch-free: the server reads graphs without torch). An op it does not know
shows its positional arguments by value alone. ``training`` is what makes a
``batch_norm`` use the batch's statistics and a ``dropout`` drop values: an eval model
whose op says ``training=True`` computes something else than it was validated on.
"""

from __future__ import annotations

from typing import Any

from ..ops.catalogue import spec
from .nodes import Op, Opaque, OpRef, ParamRef

#: Positional parameter names of common ops the op catalogue (:mod:`lurker.ops.catalogue`,
#: which names the rest) does not know (the functional form's).
_MORE: dict[str, tuple[str, ...]] = {
    "group_norm": ("input", "num_groups", "weight", "bias", "eps"),
    "local_response_norm": ("input", "size", "alpha", "beta", "k"),
    "bilinear": ("input1", "input2", "weight", "bias"),
    **{f"adaptive_avg_pool{d}d": ("input", "output_size") for d in (1, 2, 3)},
    **{f"adaptive_max_pool{d}d": ("input", "output_size", "return_indices") for d in (1, 2, 3)},
    **{n: ("input", "inplace") for n in ("relu", "relu6", "selu", "silu", "mish", "hardswish")},
    "hardsigmoid": ("input", "inplace"),
    "leaky_relu": ("input", "negative_slope", "inplace"),
    "elu": ("input", "alpha", "inplace"),
    "celu": ("input", "alpha", "inplace"),
    "hardtanh": ("input", "min_val", "max_val", "inplace"),
    "gelu": ("input",),
    "embedding": ("input", "weight", "padding_idx", "max_norm", "norm_type"),
    "flatten": ("input", "start_dim", "end_dim"),
    "clamp": ("input", "min", "max"),
}


def _names(op: Op) -> tuple[str, ...]:
    """The names of ``op``'s positional parameters, in order: the op catalogue's (the
    one record of torch ops' parameters that FLOPs, receptive fields and replay read),
    else :data:`_MORE`; none where neither knows the op."""
    s = spec(op.name, op.target)
    if s is not None:
        return tuple(p.name for p in s.params if not p.kw_only and not p.spread)
    return _MORE.get(op.name, ())


#: Ops whose ``training`` defaults to True when the call leaves it out (``F.dropout(x)``).
_TRAINING_DEFAULT = frozenset(
    {"dropout", "alpha_dropout", "feature_alpha_dropout", "dropout1d", "dropout2d", "dropout3d"}
)

#: The longest text of one argument (a ``cat`` of a hundred tensors is cut, said with …).
MAX_TEXT = 80


def call_args(op: Op, labels: list[str]) -> str:
    """``op``'s call as one line, ``"conv2d_1, features.4.weight, stride=(1, 1)"``: its
    positional arguments, a constant named where the op catalogue (or :data:`_MORE`) knows the op's parameters,
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
    names = _names(op)
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
    names = _names(op)

    def arg(name: str) -> Any:
        at = names.index(name) if name in names else len(op.args)
        return op.kwargs.get(name, op.args[at] if len(op.args) > at else None)

    if op.name == "batch_norm" and arg("running_mean") is None:
        return False
    value = arg("training")
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
