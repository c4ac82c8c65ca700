"""Layer-wise relevance propagation (Bach et al., 2015) over lurker's trace.

Why not Zennit's hooks: Zennit attaches rules to *modules*, so a functional op (ResNet's
``out += identity``, a ViT's ``x + pos_embedding``, ``scaled_dot_product_attention``)
needs a hand-written canonizer per architecture, and it has no transformer rules at all.
The trace sees every op, module or not, so here each op gets its rule from what it is:

- ``conv*d`` / ``linear``: the composite's rule (``epsilon_plus_flat``: flat on the first
  layer, z+ on convolutions, epsilon on dense layers; ``epsilon_gamma_box``: z-box on the
  first convolution, gamma on convolutions, epsilon on dense layers; ``alpha2_beta1``:
  alpha-beta (2, 1) on convolutions, epsilon on dense layers; ``epsilon``: epsilon
  everywhere), with an eval-mode BatchNorm that directly follows it merged into its
  weights (Zennit's canonizers do the same by module order; the graph makes it exact,
  e.g. DenseNet's ``norm5`` follows a concatenation, not the last convolution);
- additions (skip connections), average pools and means: the z-rule (Zennit's ``Norm``);
- element-wise activations and a BatchNorm that follows no linear layer: passed through;
- transformers (Ali et al., 2022, "XAI for Transformers: better explanations through
  conservative propagation"; Achtibat et al., 2024, AttnLRP): LayerNorm's standard
  deviation is a constant of the backward (epsilon rule over its input), a product of two
  activations splits the relevance in halves (AttnLRP's uniform rule), and softmax
  attention weights are either constants too (``attention="cp"``: attention is linear in
  the values, relevance is conserved) or pass relevance on to the scores, hence to queries
  and keys (``attention="attnlrp"``: AttnLRP's softmax rule, which absorbs a share);
- reshapes, concatenations, max pools, dropout in eval mode, indexing: the gradient,
  which routes the relevance unchanged.

The relevance is carried as the gradient (as in Zennit): each rule is an autograd function
whose forward returns the op's own output and whose backward maps the relevance of the
output to its inputs. Every rule records the relevance it received and passed on, so a
leak (relevance not conserved by an op that should conserve it) is reported by op.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import LurkerError, warn
from ..graph.nodes import Op, OpRef, ParamRef
from .base import QUANTIZED_FIX, Explanation, Method, check_real, quantized_layer, register
from .targets import (
    UNIT_HINT,
    UnitTarget,
    by_unit,
    check_unit,
    class_output_error,
    parse_target,
    unit_position,
)

__all__ = [
    "ATTENTION_RULES",
    "COMPOSITES",
    "LRP",
    "NoRule",
    "Relevance",
    "lrp_relevance",
    "no_rule",
]

#: How relevance crosses softmax attention: ``cp`` holds the attention weights constant
#: (Ali et al., 2022; conservative), ``attnlrp`` gives the scores their share by AttnLRP's
#: softmax rule (Achtibat et al., 2024, Proposition 3.1), so queries and keys get some.
ATTENTION_RULES = ("cp", "attnlrp")

#: composite -> rule for convolutions, dense layers and the first layer (None: no special
#: first layer; "conv" in the name: applies only if the first layer is a convolution)
COMPOSITES: dict[str, dict[str, str | None]] = {
    "epsilon_plus_flat": {"conv": "zplus", "linear": "epsilon", "first": "flat"},
    "epsilon_gamma_box": {"conv": "gamma", "linear": "epsilon", "first": "zbox_conv"},
    "alpha2_beta1": {"conv": "alpha2_beta1", "linear": "epsilon", "first": None},
    "epsilon": {"conv": "epsilon", "linear": "epsilon", "first": None},
}

_LINEAR = {"conv1d", "conv2d", "conv3d", "linear"}
_PASS = {
    "relu6", "hardtanh", "hardtanh_", "leaky_relu", "leaky_relu_", "elu",
    "elu_", "selu", "celu", "gelu", "silu", "mish", "sigmoid", "tanh", "softplus",
    "hardswish", "hardsigmoid", "threshold", "threshold_", "neg", "__neg__",
    "normalize",  # x / ||x|| with the norm a constant of the backward, as LayerNorm's std
    "rms_norm",  # x / rms(x) * weight, the rms a constant: a diagonal scale
    "square", "square_",
}  # fmt: skip
_ADD = {"add", "add_", "__add__", "__iadd__", "__radd__", "sub", "sub_", "__sub__", "__isub__"}
_NORM = {
    "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
    "adaptive_avg_pool3d", "mean", "sum",
    "interpolate",  # (nearest, bilinear, ...: a linear map of the input)
}  # fmt: skip
_PRODUCT = {"mul", "mul_", "__mul__", "__rmul__", "__imul__", "div", "div_", "__truediv__",
            "matmul", "__matmul__", "bmm"}  # fmt: skip
_DIV = {"div", "div_", "__truediv__", "__itruediv__"}
_ROUTE = {
    "relu", "relu_", "max_pool1d", "max_pool2d", "max_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d",
    "flatten", "view", "reshape", "permute", "transpose", "contiguous", "cat", "concat",
    "stack", "unsqueeze", "squeeze", "unflatten", "getitem", "dropout", "dropout1d",
    "dropout2d", "clone", "expand", "unbind", "split", "chunk", "narrow", "select", "t",
    "to", "type_as", "float", "identity", "max_pool2d_with_indices",
    "pad", "roll", "flip", "reshape_as", "view_as", "movedim", "swapaxes", "swapdims",
    "expand_as", "repeat_interleave", "unfold", "amax",
}  # fmt: skip
_ATTENTION = {"scaled_dot_product_attention"}
# new tensors shaped like an activation but not made of its values (Swin's attention
# mask): constants of the backward
_FACTORY = {
    "new_zeros", "new_ones", "new_full", "new_empty", "new_tensor", "zeros_like",
    "ones_like", "full_like", "empty_like", "rand_like", "randn_like", "randint_like",
}  # fmt: skip
_CONSTANT = {"softmax", "log_softmax"}
# element-wise maps that keep 0 at 0 only for some arguments (see _keeps_zero): a ReLU's
# zeros made non-zero would take relevance the ReLU's gradient then drops
_CLAMP = {"clamp", "clamp_", "clip"}

SUPPORTED = (
    "convolutions and linear layers (composite rules), BatchNorm (merged into the preceding "
    "convolution or linear layer, else passed through), LayerNorm and GroupNorm, "
    "F.normalize, element-wise "
    "activations, additions (skip connections), average pools and means, products of two "
    "activations, scaled_dot_product_attention and softmax attention, max pools, "
    "reshapes, padding, rolls and flips, interpolation, concatenation, indexing and dropout"
)


def stabilize(z: Tensor, eps: float) -> Tensor:
    """``z + eps * sign(z)`` with sign(0) = 1: Zennit's stabilizer, so equal numbers."""
    return z + ((z == 0).to(z) + z.sign()) * eps


# ---------------------------------------------------------------------------- bookkeeping
@dataclass
class Flow:
    """Relevance an op received (``out``) and passed to its inputs (``into``), per batch
    row; ``absorbs``: the rule may legitimately keep some (a bias, a constant operand)."""

    label: str
    what: str
    out: Tensor
    into: Tensor
    absorbs: bool
    #: how far ``out`` and ``into`` may differ by rounding alone (see :func:`_rounding`)
    rounding: Tensor | None = None


@dataclass
class Relevance:
    """One LRP backward: the input relevance, the model output, the relevance the
    backward started from (per row) and each rule op's :class:`Flow` by op label."""

    input: Tensor
    output: Tensor | None
    start: Tensor
    flows: dict[str, Flow] = field(default_factory=dict)
    layer: Tensor | None = None  # relevance arriving at ``at`` (concepts), when asked
    #: relevance arriving at each op of ``record`` (by the key it was asked with)
    recorded: dict[str, Tensor] = field(default_factory=dict)

    def leaks(self, tolerance: float) -> list[tuple[Flow, float]]:
        """Ops that should conserve but lost or created more than ``tolerance`` of the
        starting relevance, beyond what their dtype's rounding explains (largest first)."""
        start = self.start.detach().double().abs()
        rows = start.clamp(min=1e-12)
        total = start.sum().clamp(min=1e-12)
        found = []
        for f in self.flows.values():
            if f.absorbs:
                continue
            scale = rows if f.out.shape == rows.shape else total  # totals: see _flow_rows
            gap = (f.out - f.into).abs()
            noise = torch.zeros_like(gap) if f.rounding is None else f.rounding
            if bool((gap > tolerance * scale + noise).any()):
                found.append((f, float((gap / scale).max())))
        return sorted(found, key=lambda t: -t[1])


class _Rule(torch.autograd.Function):
    """Forward: the op's own output. Backward: ``rule(relevance, inputs)``."""

    @staticmethod
    def forward(ctx: Any, rule: Callable, out: Tensor, *inputs: Tensor) -> Tensor:  # type: ignore[override]
        ctx.rule = rule
        ctx.save_for_backward(*inputs)
        return out.detach().clone()

    @staticmethod
    def backward(ctx: Any, r: Tensor) -> Any:  # type: ignore[override]
        rel = ctx.rule(r, ctx.saved_tensors)
        return (None, None, *rel)


def _masker(mask: Tensor | None, keep: list) -> Callable[[Tensor], Tensor]:
    """A tensor hook: hands the relevance arriving at a layer to ``keep`` and lets only
    the part where ``mask`` is 1 go on (conditional relevance). A hook on the tensor, not
    a replacement of it, so an in-place op's output can carry it too."""

    def hook(r: Tensor) -> Tensor:
        keep.append(r.detach())
        return r if mask is None else r * mask.to(r)

    return hook


#: dtypes whose rounding is as large as the leaks looked for: summed in float64, with an
#: allowance for rounding (:func:`_rounding`)
_LOW = (torch.float16, torch.bfloat16)


def _flow_rows(r: Tensor, rel: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor | None]:
    """An op's relevance received and passed on, and how far they may differ by rounding
    alone (:func:`_rounding`; None at float32 and wider), per batch row; as totals (one
    value) where its output and inputs do not share their first axis (an op that moves
    the batch off axis 0, into a sequence-first layout, or back). A half-precision op's
    are summed in float64: a bfloat16 sum is rounded to bfloat16, off by as much as the
    leaks looked for."""
    low = any(t.is_floating_point() and t.dtype in _LOW for t in (r, *rel))
    rows = _rows64 if low else _rows
    out = rows(r)
    ins = [rows(t) for t in rel]
    per_row = all(i.shape == out.shape for i in ins)
    # float32 and wider: the allowance would be ~1e-6 of the relevance, far under any
    # tolerance, and computing it costs passes over every relevance tensor
    noise = _rounding(r, rel, per_row) if low else None
    if per_row:
        return out, sum(ins, torch.zeros_like(out)), noise
    return out.sum().reshape(1), sum(i.sum() for i in ins).reshape(1), noise


#: Rounding allowance, in eps of the relevance's 2-norm. Round-to-nearest leaves each
#: element a rule computes (z, r / z, the gradient, x * g) off by at most eps/2 of
#: itself, independently across elements, so a sum drifts by about eps * ||r||_2 (the
#: worst case, eps * ||r||_1, is far looser where relevance of both signs cancels).
#: Measured at most 1.33 on bfloat16 and float16 VGG, ResNet, MobileNet, DenseNet and ViTs
#: (each composite); 3 leaves a margin and still reports a 3% leak where bfloat16's
#: allowance is largest (near the head, where relevance sits in few elements: 8 hid
#: leaks of 2-4% there). Only half-precision flows get an allowance (see _flow_rows).
ROUNDING_EPS = 3.0


def _rounding(r: Tensor, rel: Sequence[Tensor], per_row: bool) -> Tensor:
    """``ROUNDING_EPS * eps * ||r||_2`` over an op's relevance received and passed on
    (eps of the coarsest dtype among them). Non-zero elements under the dtype's smallest
    normal number (float16 relevance spread over many pixels) have an absolute
    resolution, ``eps * tiny``, whose roundings do not average out: each such element
    counts in full, four roundings of half of it."""
    ts = [t.detach().double().abs() for t in (r, *rel) if t.is_floating_point()]
    if not ts:
        return torch.zeros(1, dtype=torch.float64)
    fi = max(
        (torch.finfo(t.dtype) for t in (r, *rel) if t.is_floating_point()), key=lambda f: f.eps
    )
    sq = [_rows(t.square()) for t in ts]
    sub = [_rows(((t > 0) & (t < fi.tiny)).double()) for t in ts]
    if not per_row:
        sq, sub = [q.sum().reshape(1) for q in sq], [q.sum().reshape(1) for q in sub]
    norm = sum(sq, torch.zeros_like(sq[0])).sqrt()
    return fi.eps * (ROUNDING_EPS * norm + 2 * fi.tiny * sum(sub, torch.zeros_like(sub[0])))


def _rows(t: Tensor) -> Tensor:
    return t.detach().reshape(t.shape[0], -1).sum(1) if t.dim() else t.detach().reshape(1)


def _rows64(t: Tensor) -> Tensor:
    return _rows(t.detach().double())


def _vjp(fn: Callable[..., Tensor], xs: Sequence[Tensor], r: Tensor, eps: float):
    """z-rule core: ``x_i * d/dx_i <fn(x), r / stab(fn(x))>`` for every x_i."""
    with torch.enable_grad():
        leaves = [x.detach().requires_grad_(True) for x in xs]
        z = fn(*leaves)
        gs = torch.autograd.grad(z, leaves, r / stabilize(z.detach(), eps), allow_unused=True)
    return [x * g if g is not None else torch.zeros_like(x) for x, g in zip(leaves, gs)]


# ---------------------------------------------------------------------------- linear rules
def _linear_rule(
    name: str, call: Callable, x: Tensor, w: Tensor, b: Tensor | None, r: Tensor, p: dict
) -> Tensor:
    """Input relevance of ``call(x, w, b)`` (a conv or linear) for output relevance ``r``."""
    eps, stab = p["epsilon"], p["stabilizer"]
    pos = lambda t: None if t is None else t.clamp(min=0)  # noqa: E731
    neg = lambda t: None if t is None else t.clamp(max=0)  # noqa: E731
    with torch.enable_grad():
        if name == "epsilon":
            return _vjp(lambda v: call(v, w, b), [x], r, eps)[0]
        if name == "flat":
            ones = torch.ones_like(x).requires_grad_(True)
            z = call(ones, torch.ones_like(w), None)
            (g,) = torch.autograd.grad(z, ones, r / stabilize(z.detach(), stab))
            return g
        xp = x.detach().clamp(min=0).requires_grad_(True)
        xn = x.detach().clamp(max=0).requires_grad_(True)
        if name == "zplus":
            z = call(xp, pos(w), pos(b)) + call(xn, neg(w), None)
            gp, gn = torch.autograd.grad(z, [xp, xn], r / stabilize(z.detach(), stab))
            return xp * gp + xn * gn
        if name == "alpha2_beta1":
            zp = call(xp, pos(w), pos(b)) + call(xn, neg(w), None)
            zn = call(xp, neg(w), neg(b)) + call(xn, pos(w), None)
            sp = r / stabilize(zp.detach(), stab)
            sn = r / stabilize(zn.detach(), stab)
            gp = torch.autograd.grad(zp, [xp, xn], sp)
            gn = torch.autograd.grad(zn, [xp, xn], sn)
            return 2.0 * (xp * gp[0] + xn * gp[1]) - 1.0 * (xp * gn[0] + xn * gn[1])
        if name == "gamma":
            g_ = p["gamma"]
            gw = lambda t, f: None if t is None else t + g_ * f(t)  # noqa: E731
            z = call(x.detach(), w, b)
            o0 = call(xp, gw(w, pos), gw(b, pos))
            o1 = call(xn, gw(w, neg), None)
            o2 = call(xp, gw(w, neg), gw(b, neg))
            o3 = call(xn, gw(w, pos), None)
            s01 = (z > 0).to(r) * r / stabilize((o0 + o1).detach(), stab)
            s23 = (z < 0).to(r) * r / stabilize((o2 + o3).detach(), stab)
            a = torch.autograd.grad(o0 + o1, [xp, xn], s01)
            c = torch.autograd.grad(o2 + o3, [xp, xn], s23)
            return xp * (a[0] + c[0]) + xn * (a[1] + c[1])
        if name == "zbox_conv":
            low = _bound(p["low"], x, True)
            high = _bound(p["high"], x, False)
            xl = low.requires_grad_(True)
            xh = high.requires_grad_(True)
            xx = x.detach().requires_grad_(True)
            z = call(xx, w, b) - call(xl, pos(w), pos(b)) - call(xh, neg(w), neg(b))
            gx, gl, gh = torch.autograd.grad(z, [xx, xl, xh], r / stabilize(z.detach(), stab))
            return xx * gx + xl * gl + xh * gh  # (gl, gh carry the minus signs of z)
    raise LurkerError(f"unknown LRP rule {name!r}")


def _bound(v: Any, x: Tensor, lowest: bool) -> Tensor:
    """The z-box bound broadcast to ``x``: a float, per-channel values, or (None) each
    row's own minimum / maximum, so that the box holds the input."""
    if v is None:
        dims = tuple(range(1, x.dim()))
        t = x.detach().amin(dims, keepdim=True) if lowest else x.detach().amax(dims, keepdim=True)
    else:
        t = torch.as_tensor(v, dtype=x.dtype, device=x.device)
        if t.dim() == 1 and x.dim() > 2:
            t = t.reshape(1, -1, *([1] * (x.dim() - 2)))
    return t.expand_as(x).clone()


# ---------------------------------------------------------------------------- the engine
def _resolve(target: str, inplace: bool) -> Callable:
    """The callable an op's ``target`` names; the out-of-place twin of an in-place op."""
    parts = target.split(".")
    obj: Any = importlib.import_module(parts[0])
    for i, p in enumerate(parts[1:]):
        if inplace and i == len(parts) - 2:
            p = {"__iadd__": "__add__", "__isub__": "__sub__", "__imul__": "__mul__"}.get(
                p, p[:-1] if p.endswith("_") and not p.endswith("__") else p
            )
        obj = getattr(obj, p)
    return obj


def _keeps_zero(op: Op) -> bool:
    """Whether a clamp or a power maps 0 to 0 (bounds that are numbers around 0, a
    positive number as exponent): only then may relevance pass through it 1:1."""
    if op.name == "pow":
        e = _arg(op, 1, "exponent")
        return isinstance(e, (int, float)) and not isinstance(e, bool) and e > 0
    lo, hi = _arg(op, 1, "min"), _arg(op, 2, "max")
    number = (int, float)
    return (lo is None or (isinstance(lo, number) and lo <= 0)) and (
        hi is None or (isinstance(hi, number) and hi >= 0)
    )


def _fills(op: Op) -> bool:
    """Whether a pad writes a non-zero value (its cells then take relevance, as a bias)."""
    mode = _arg(op, 2, "mode", "constant")
    value = _arg(op, 3, "value", None)
    return mode == "constant" and value is not None and value != 0


def _arg(op: Op, pos: int, name: str, default: Any = None) -> Any:
    if len(op.args) > pos:
        return op.args[pos]
    return op.kwargs.get(name, default)


class NoRule(LurkerError):
    """LRP has no rule for an op of the model (an LSTM): no input can change that, so
    callers tell it from other failures by type (concept relevance says it in its own words,
    the explorer before anyone asks)."""

    def __init__(self, where: str, plain: str = ""):
        self.where = where
        #: the op in plain words (``an LSTM layer ('lstm')``), for the explorer's lists
        self.plain = plain or where
        super().__init__(self.said(("input_x_gradient", "integrated_gradients")))

    def said(self, methods: tuple[str, ...]) -> str:
        """The refusal, suggesting the gradient ``methods`` instead: a caller that knows
        the model refuses one (the explorer, whose integrated gradients starts from zeros
        only) names those that run."""
        named = ", ".join(repr(m) for m in methods)
        return (
            f"LRP has no rule for {self.where}. Supported: {SUPPORTED}. Explain this model "
            f"with a gradient method (method={named}) instead."
        )


class QuantizedNoRule(NoRule):
    """A quantized layer (``quantize_dynamic``, ``convert``): it runs quantized kernels on
    packed weights, with no gradient for LRP's rules to follow and no rule of its own, so
    LRP stops there. A gradient method cannot stand in (its gradients are as absent): the
    float model, or occlusion, can."""

    def __init__(self, where: str, kind: str):
        layer = f"the quantized layer {where!r} ({kind})"
        super().__init__(
            f"{layer}: it runs quantized kernels on packed weights, with no gradient", layer
        )

    def said(self, methods: tuple[str, ...] = ()) -> str:
        """The refusal, with the fixes that work on a quantized model (not ``methods``)."""
        return f"LRP has no rule for {self.where}. {QUANTIZED_FIX}"


def check_quantized(model: nn.Module) -> None:
    """Raise :class:`QuantizedNoRule` for a model with a quantized layer: LRP (the probe's
    relevance lists, concept relevance) cannot pass it, whichever op it meets first."""
    found = quantized_layer(model)
    if found is not None:
        raise QuantizedNoRule(*found)


class Engine:
    """Rules for every op of one traced model; :meth:`run` is one LRP forward+backward."""

    def __init__(
        self,
        model: nn.Module,
        x: Tensor,
        composite: str | None = None,
        attention: str = "cp",
        **params: Any,
    ) -> None:
        from ..capture import settled_trace as _trace

        for name in ("epsilon", "stabilizer", "gamma"):  # before the model is traced
            if name in params:
                params[name] = check_real("LRP", name, params[name])
        if attention not in ATTENTION_RULES:
            raise LurkerError(
                f"unknown LRP attention rule {attention!r}; supported: "
                + ", ".join(ATTENTION_RULES)
                + " (cp: attention weights constant, conservative; attnlrp: AttnLRP's "
                "softmax rule, relevance to queries and keys)"
            )
        self.attention_rule = attention
        self._layouts: dict[str, Any] = {}  # unit_layout's cache for this trace
        check_quantized(model)  # (not its QuantStub, the first op with no rule)

        self.model = model
        from ..errors import TraceError

        try:
            with torch.enable_grad():  # (attention takes another path without gradients)
                self.trace = _trace(model, x[:1].clone().requires_grad_(True), save="none")
        except TraceError as e:
            cause = e.__cause__
            if isinstance(cause, Exception) and not isinstance(cause, LurkerError):
                # the model's own error, as the other methods raise it (the trace's
                # account of where it happened goes along as a note)
                if hasattr(cause, "add_note"):
                    cause.add_note(f"(while tracing the model for LRP) {e}")
                raise cause from None
            raise
        ops = self.trace.ops
        #: (the softmax, a reference to its input) where the model returns softmax or
        #: log_softmax over its classes: a class's relevance starts at its logit, the
        #: softmax's input (no rule carries relevance through a softmax; from its output
        #: every class would get none)
        self.head = _head_softmax(ops)
        head = self.head[0] if self.head else -1
        self.attention = any(
            op.name in _ATTENTION | _CONSTANT | {"layer_norm"} and op.index != head for op in ops
        )
        if composite is None:
            composite = "epsilon" if self.attention else "epsilon_plus_flat"
        if composite not in COMPOSITES:
            raise LurkerError(
                f"unknown LRP composite {composite!r}; supported: {', '.join(COMPOSITES)}"
            )
        self.composite = composite
        self.params = {"epsilon": 1e-6, "stabilizer": 1e-6, "gamma": 0.25, **params}
        self.inputs = [op.index for op in ops if op.kind == "input"]
        if len(self.inputs) != 1:
            raise LurkerError(
                f"LRP needs a model with one tensor input; this one has {len(self.inputs)}"
            )
        self.plan: dict[int, tuple[str, Any]] = {}
        self._plan()

    # ------------------------------------------------------------------ planning
    def _module(self, op: Op) -> tuple[str, str] | None:
        """The path and class name of the innermost module ``op`` ran in (``?`` where the
        model no longer has it), or None for a function call in the forward."""
        if not op.modules:
            return None
        path = op.modules[-1][0]
        try:
            return path, type(self.model.get_submodule(path)).__name__
        except AttributeError:
            return path, "?"

    def _where(self, op: Op) -> str:
        found = self._module(op)
        if found is None:
            return f"{op.label} ({op.name}, a function call in the model's forward)"
        return f"{op.label} ({op.name} in '{found[0]}', {found[1]})"

    def _plain(self, op: Op) -> str:
        """The op in a first-time reader's words: ``an LSTM layer ('lstm')``."""
        found = self._module(op)
        if found is None:
            return f"the function {op.name} in the model's forward"
        path, kind = found
        if kind == "?":
            return f"{op.name} in '{path}'"
        return f"{'an' if kind[:1] in 'AEIOU' else 'a'} {kind} layer ('{path}')"

    def _on_path(self, op: Op) -> bool:
        return op.kind == "op" and op.dist_from_input is not None

    def _live_args(self, op: Op, n: int) -> list[int]:
        """Which of the first ``n`` arguments relevance can reach (by position)."""
        return [
            i
            for i, a in enumerate(op.args[:n])
            if type(a) is OpRef and self._carries(self.trace.ops[a.index])
        ]

    def _carries(self, op: Op) -> bool:
        """Whether relevance can reach this node: the input, or an op on a path from it."""
        return op.kind == "input" or self._on_path(op)

    def _plan(self) -> None:
        ops = self.trace.ops
        rules = COMPOSITES[self.composite]
        first_done = rules["first"] is None
        merged: set[int] = set()
        self.constant: set[int] = set()  # ops whose value is a constant of the backward
        # producer -> the op that later writes into its output in place
        self.inplace_fed = {
            op.args[0].index: op
            for op in ops
            if op.inplace and op.args and type(op.args[0]) is OpRef
        }
        for op in ops:
            if op.kind != "op" or op.seq < 0:
                continue
            name = op.name
            parents = [ops[i] for i in op.parents]
            derived = (  # made only from constants (Swin's mask, filled in place): no rule
                parents
                and all(p.index in self.constant for p in parents if self._carries(p))
                and any(p.index in self.constant for p in parents)
            )
            if name in _FACTORY or (name in _CONSTANT and not self._softmax_rule(name)):
                self.constant.add(op.index)
            elif derived:
                self.constant.add(op.index)
                continue
            if not self._on_path(op):
                continue
            if name in _LINEAR:
                kind = "conv" if name.startswith("conv") else "linear"
                rule = rules[kind]
                if not first_done:
                    first = rules["first"]
                    if first == "flat" or (first == "zbox_conv" and kind == "conv"):
                        rule, first_done = ("flat" if first == "flat" else "zbox_conv"), True
                bn = self._mergeable_bn(op)
                if bn is not None:
                    merged.add(bn.index)
                    self.plan[bn.index] = ("linear", (rule, op, bn))
                else:
                    self.plan[op.index] = ("linear", (rule, op, None))
            elif name == "batch_norm":
                if op.index not in merged:
                    self.plan[op.index] = ("pass", None)
            elif name in ("layer_norm", "group_norm"):
                self.plan[op.index] = (name, None)
            elif name in _PASS:
                self.plan[op.index] = ("pass", None)
            elif name in _ADD or name in _NORM:
                self.plan[op.index] = ("norm", None)
            elif name in _PRODUCT:
                self.plan[op.index] = ("product", None)
            elif name in _ATTENTION:
                self.plan[op.index] = ("attention", None)
            elif self._softmax_rule(name):
                self.plan[op.index] = ("softmax", None)
            elif name in _CONSTANT:
                self.plan[op.index] = ("constant", None)
            elif name == "pow" and self._live_args(op, 2) == [0] and _keeps_zero(op):
                self.plan[op.index] = ("pass", None)  # x ** 2 (StarReLU): an activation
            elif name in _CLAMP and _keeps_zero(op):
                self.plan[op.index] = ("pass", None)
            elif name == "addcmul" and len(self._live_args(op, 3)) == 1:
                self.plan[op.index] = ("norm", None)  # bias + scale * x: an affine map
            elif name == "pad" and _fills(op):
                self.plan[op.index] = ("norm", None)  # a copy plus constant cells: z-rule
            elif name in _ROUTE or name in _FACTORY:
                pass
            else:
                raise NoRule(self._where(op), self._plain(op))

    def _softmax_rule(self, name: str) -> bool:
        """Whether this op gets AttnLRP's softmax rule (else it is a constant)."""
        return name == "softmax" and self.attention_rule == "attnlrp"

    def _mergeable_bn(self, op: Op) -> Op | None:
        """The eval-mode BatchNorm that is ``op``'s only consumer, reading it as input."""
        ops = self.trace.ops
        if len(op.children) != 1:
            return None
        bn = ops[op.children[0]]
        if bn.name != "batch_norm" or _arg(bn, 5, "training", False):
            return None
        x = _arg(bn, 0, "input")
        if type(x) is not OpRef or x.index != op.index:
            return None
        # BatchNorm scales axis 1; a linear layer's units are its output's last axis, the
        # same axis only for a (B, C) output (on tokens (B, L, C), BatchNorm1d(L) scales
        # the tokens: merged into the weights' rows it would scale the wrong axis)
        if op.name == "linear" and len(op.shape or ()) != 2:
            return None
        return bn

    # ------------------------------------------------------------------ values
    def _value(self, ref: Any, live: dict[int, Any]) -> Any:
        if type(ref) is ParamRef:
            return self.model.get_parameter(ref.name)
        if type(ref) is OpRef:
            if ref.index in live:
                v = live[ref.index]
                return v[ref.output] if isinstance(v, (tuple, list)) else v
            op = self.trace.ops[ref.index]
            if op.kind == "buffer":
                return self.model.get_buffer(op.name)
            if op.kind == "constant":  # (LeViT's cached attention biases)
                return self.trace.constant(op.index)
            raise LurkerError(f"LRP: no value for {op.label} ({op.kind})")
        if isinstance(ref, (tuple, list)):
            return type(ref)(self._value(v, live) for v in ref)
        return ref

    def _call(self, op: Op, live: dict[int, Any], subs: dict[int, Tensor]) -> Callable:
        """``f(*tensors)`` recomputing ``op`` with its graph inputs (those in ``subs``, by
        position in ``op.args``) replaced."""
        fn = _resolve(op.target, op.inplace)
        args = [self._value(a, live) for a in op.args]
        kwargs = {k: self._value(v, live) for k, v in op.kwargs.items() if k != "inplace"}
        where = list(subs)

        def call(*ts: Tensor) -> Tensor:
            a = list(args)
            for i, t in zip(where, ts):
                a[i] = t
            return fn(*a, **kwargs)

        return call

    # ------------------------------------------------------------------ rules
    def _rule(
        self,
        op: Op,
        out: Tensor,
        live: dict[int, Any],
        flows: dict[str, Flow],
        plan: dict[int, tuple[str, Any]],
    ) -> Tensor | None:
        kind, info = plan[op.index]
        p = self.params
        graph = {
            i: self._value(a, live)
            for i, a in enumerate(op.args)
            if type(a) is OpRef and self._carries(self.trace.ops[a.index])
        }
        graph = {i: t for i, t in graph.items() if isinstance(t, Tensor) and t.requires_grad}
        if kind == "linear":
            rule, lin, bn = info
            x = self._value(lin.args[0], live)
            w = self._value(_arg(lin, 1, "weight"), live)
            b = self._value(_arg(lin, 2, "bias"), live)
            if bn is not None:
                w, b = _merge(w, b, bn, lambda r: self._value(r, live))
            extra = [self._value(a, live) for a in lin.args[3:]]
            extra_kw = {
                k: self._value(v, live)
                for k, v in lin.kwargs.items()
                if k not in ("input", "weight", "bias")
            }
            fn = F.linear if lin.name == "linear" else getattr(F, lin.name)
            wd, bd = w.detach(), None if b is None else b.detach()

            def call(v: Tensor, ww: Tensor, bb: Tensor | None) -> Tensor:
                return fn(v, ww, bb, *extra, **extra_kw)

            def fwd(r: Tensor, ins: tuple) -> tuple:
                return (_linear_rule(rule, call, ins[0], wd, bd, r, p),)

            # a bias keeps its share; so does the epsilon rule's epsilon, by design
            absorbs = rule == "epsilon" or (bd is not None and bool(bd.abs().max() > 0))
            return self._apply(op, out, [x], fwd, flows, absorbs, f"{lin.name} ({rule})")
        if not graph:
            return None
        idx, ins = list(graph), list(graph.values())
        if kind == "pass":
            main = ins[0]
            fwd = lambda r, ins_: (r.reshape(ins_[0].shape) if r.shape == out.shape else r,)  # noqa: E731
            if main.shape != out.shape:  # (a broadcast exponent or bound)
                raise LurkerError(
                    f"LRP has no rule for {self._where(op)}: its output "
                    f"{list(out.shape)} is not the shape of its input {list(main.shape)}"
                )
            return self._apply(op, out, [main], fwd, flows, False, "pass")
        if kind == "norm":
            call = self._call(op, live, graph)
            # an addition with a constant, a parameter or a number keeps that operand's
            # share, as do the cells a padding fills with a value
            absorbs = (op.name in _ADD and len(graph) < 2) or op.name in ("pad", "addcmul")
            fwd = lambda r, ins_: _vjp(call, ins_, r, p["stabilizer"])  # noqa: E731
            return self._apply(op, out, ins, fwd, flows, absorbs, "z-rule")
        if kind == "product":
            live_ops = [i for i in idx if op.args[i].index not in self.constant]
            if op.name in _DIV and 0 in graph:
                live_ops = [0]  # a divisor is a constant of the backward, as LayerNorm's std
            if len(live_ops) == 1 or len(ins) == 1:
                keep = live_ops[:1] or idx[:1]
                sub = {i: graph[i] for i in keep}
                call = self._call(op, live, sub)
                fwd = lambda r, ins_: _vjp(call, ins_, r, p["epsilon"])  # noqa: E731
                return self._apply(op, out, list(sub.values()), fwd, flows, False, "epsilon")
            call = self._call(op, live, graph)
            fwd = lambda r, ins_: [0.5 * t for t in _vjp(call, ins_, r, p["epsilon"])]  # noqa: E731
            return self._apply(op, out, ins, fwd, flows, False, "uniform")
        if kind == "constant":
            # inside attention no relevance reaches it (products treat it as a constant);
            # anywhere else (a softmax output explained) what reaches it is lost: a leak
            fwd = lambda r, ins_: [torch.zeros_like(t) for t in ins_]  # noqa: E731
            return self._apply(op, out, ins, fwd, flows, False, "constant")
        if kind == "softmax":
            dim = _arg(op, 1, "dim")
            if dim is None:
                raise LurkerError(f"LRP: {self._where(op)} has no dim: name it")
            fwd = lambda r, ins_: (_softmax_relevance(ins_[0], out.detach(), r, dim),)  # noqa: E731
            # the rule linearizes softmax at its input, bias included: that share is absorbed
            return self._apply(op, out, ins[:1], fwd, flows, True, "AttnLRP softmax")
        if kind in ("layer_norm", "group_norm"):
            # the standard deviation a constant of the backward: linear in the input
            x = ins[0]
            w = self._value(_arg(op, 2, "weight"), live)
            b = self._value(_arg(op, 3, "bias"), live)
            eps = _arg(op, 4, "eps", 1e-5)
            if kind == "layer_norm":  # over the trailing normalized_shape; affine as is
                n = len(_arg(op, 1, "normalized_shape"))
                group: Callable[[Tensor], Tensor] = lambda v: v.flatten(-n)  # noqa: E731
                affine: tuple[int, ...] | None = None
            else:  # over each group of channels; weight and bias per channel
                groups = int(_arg(op, 1, "num_groups"))
                group = lambda v: v.reshape(v.shape[0], groups, -1)  # noqa: E731
                affine = (1, -1) + (1,) * (x.dim() - 2)
            std = (group(x.detach()).var(-1, unbiased=False, keepdim=True) + eps).sqrt()

            def norm(v: Tensor) -> Tensor:
                g = group(v)
                y = ((g - g.mean(-1, keepdim=True)) / std).reshape(v.shape)
                if w is not None:
                    y = y * (w.detach() if affine is None else w.detach().reshape(affine))
                if b is not None:
                    y = y + (b.detach() if affine is None else b.detach().reshape(affine))
                return y

            absorbs = b is not None and bool(b.detach().abs().max() > 0)
            fwd = lambda r, ins_: _vjp(norm, ins_[:1], r, p["epsilon"])  # noqa: E731
            what = f"{kind.replace('_', ' ')}, std constant"
            return self._apply(op, out, [x], fwd, flows, absorbs, what)
        if kind == "attention":
            q, k, v = (
                self._value(_arg(op, i, n), live) for i, n in enumerate(("query", "key", "value"))
            )
            mask = self._value(_arg(op, 3, "attn_mask"), live)
            causal = bool(_arg(op, 5, "is_causal", False))
            scale = _arg(op, 6, "scale")
            if self.attention_rule == "attnlrp":
                pos = [i for i in (0, 1, 2) if i in graph]
                if not pos:
                    return None
                qkv = [t.detach() if isinstance(t, Tensor) else t for t in (q, k, v)]

                def attn(r: Tensor, ins_: tuple) -> list[Tensor]:
                    for i, t in zip(pos, ins_):
                        qkv[i] = t
                    rel = _attnlrp(*qkv, mask, causal, scale, r, p["epsilon"])
                    return [rel[i] for i in pos]

                ins = [graph[i] for i in pos]
                return self._apply(op, out, ins, attn, flows, True, "AttnLRP attention")
            a = _attention_weights(q.detach(), k.detach(), mask, causal, scale)
            fwd = lambda r, ins_: _vjp(lambda vv: a @ vv, ins_[:1], r, p["epsilon"])  # noqa: E731
            if not v.requires_grad:
                return None
            return self._apply(op, out, [v], fwd, flows, False, "attention weights constant")
        return None

    def _apply(self, op, out, ins, rule, flows, absorbs, what) -> Tensor:
        label = op.label

        def backward(r: Tensor, saved: tuple) -> tuple:
            rel = list(rule(r, saved))
            got, passed, noise = _flow_rows(r, rel)
            flows[label] = Flow(label, f"{op.name}: {what}", got, passed, absorbs, noise)
            return tuple(t.detach() for t in rel)

        return _Rule.apply(backward, out, *ins)

    # ------------------------------------------------------------------ run
    def run(
        self,
        x: Tensor,
        target: Any,
        at: str | None = None,
        mask: Tensor | None = None,
        record: Sequence[str] = (),
        known: Tensor | None = None,
    ) -> tuple[Relevance, list[int] | UnitTarget]:
        """Relevance of ``x`` for ``target``; ``at``/``mask``: the input relevance that
        flows through op ``at``'s output where ``mask`` is 1 (conditional relevance: the
        relevance arriving at ``at`` is masked, and only it goes on to the input, not
        what reaches the input around ``at``, by a skip connection or another branch);
        ``record``: layers (module paths or trace labels) whose arriving relevance is
        kept, unmasked, in :attr:`Relevance.recorded` (one backward for all of them);
        ``known``: with ``mask``, the relevance arriving at ``at`` when a run has already
        found it (concepts' unmasked run): the backward from the output is then skipped,
        only the masked one from the layer runs."""
        ops = self.trace.ops
        parsed = parse_target(target, x.shape[0])
        unit_op = None
        if isinstance(parsed, UnitTarget):
            unit_op = self._one_op(parsed.layer, merged=False)
        plan = dict(self.plan)
        if unit_op is not None and unit_op.index not in plan:
            # a unit of a convolution merged with its BatchNorm: the relevance starts at
            # the convolution's own output, so for this run it keeps its own weights
            for c in unit_op.children:
                kind, info = plan.get(c, ("", None))
                if kind == "linear" and info[1] is unit_op:
                    plan[unit_op.index] = ("linear", (info[0], unit_op, None))
                    plan[c] = ("pass", None)
        at_op = self._one_op(at) if at is not None else None
        recording: dict[int, list[tuple[str, list[Tensor]]]] = {}
        for key in record:
            recording.setdefault(self._one_op(key).index, []).append((key, []))
        live: dict[int, Any] = {}
        flows: dict[str, Flow] = {}
        kept: list[Tensor] = []
        at_val: list[Tensor] = []
        xi = x.detach().clone().requires_grad_(True)
        live[self.inputs[0]] = xi

        def hook(op: Op, out: Any) -> Any:
            new = None
            if op.index in plan and isinstance(out, Tensor):
                new = self._rule(op, out, live, flows, plan)
            val = new if new is not None else out
            if at_op is not None and op.index == at_op.index and isinstance(val, Tensor):
                if not val.requires_grad:
                    raise LurkerError(f"layer {at!r} does not depend on the input")
                # the relevance arriving at the layer: a hook on the tensor, not a grad
                # with respect to it, which an in-place op on it (relu_, +=) would move to
                # the in-place op's output; the clone (read by no op) is the layer's
                # output as the op made it, to start the masked backward from
                val.register_hook(_masker(None, kept))
                if mask is not None:
                    at_val.append(val.clone())
            for _, keep in recording.get(op.index, ()):
                if isinstance(val, Tensor) and val.requires_grad:
                    val.register_hook(_masker(None, keep))
            writer = self.inplace_fed.get(op.index)
            if writer is None:
                live[op.index] = val
                return new
            if writer.index in self.plan and len(op.children) == 1:
                # the in-place op gets a rule (from ``live``): let it write into a tensor
                # outside autograd, or its saved tensors would be overwritten by the
                # replacement before the backward reads them
                live[op.index] = val
                return val.detach() if op.inplace else val.detach().clone()
            if new is None:  # keep the value from before the in-place write
                live[op.index] = out.clone() if isinstance(out, Tensor) else out
                return None
            live[op.index] = new
            return new if op.inplace else new.clone()

        hooks = {op.index: hook for op in ops if op.kind in ("op", "generated") and op.seq >= 0}
        result = self.trace.run(xi, save="none", hooks=hooks)
        output = result.output
        if unit_op is not None:
            assert isinstance(parsed, UnitTarget)
            act = live[unit_op.index]
            unit_layout = self.layout(parsed.layer, parsed.unit_dim, UNIT_HINT)
            r0 = _unit_relevance(act, parsed, unit_layout)
            score_t = act
            start = _rows(r0.movedim(unit_layout.batch, 0))  # per batch row
        else:
            if not isinstance(output, Tensor) or output.dim() != 2:
                from .tokens import Embedded

                raise class_output_error(output, token_ids=isinstance(self.model, Embedded))
            if output.shape[0] != x.shape[0]:  # a batch on another axis: rows mixed up
                raise class_output_error(output, x.shape[0], tuple(x.shape))
            classes = output.detach().argmax(1).tolist() if parsed is None else parsed
            big = max(classes)
            if big >= output.shape[1]:
                raise LurkerError(
                    f"target class {big} is out of range: the model has {output.shape[1]} "
                    f"outputs (classes 0 to {output.shape[1] - 1})"
                )
            score_t = output if self.head is None else self._value(self.head[1], live)
            onehot = torch.zeros_like(score_t)
            onehot[torch.arange(len(classes)), torch.tensor(classes)] = 1
            r0 = onehot * score_t.detach()
            start = _rows(r0)
            parsed = classes
        if not score_t.requires_grad:
            raise LurkerError("LRP: the target does not depend on the input")
        if known is None:
            (rx,) = torch.autograd.grad(
                score_t, xi, r0, allow_unused=True, retain_graph=mask is not None
            )
            layer = kept[0] if kept else None
        else:  # the layer's relevance is known (concepts' unmasked run): no full backward
            rx, layer = None, known
        if mask is not None and at_val:
            # then from the layer alone to the input, its relevance masked: masking it on
            # the way from the output would let the relevance that bypasses the layer (a
            # residual's identity, another branch) reach the input, in every unit's map
            rx = None  # (no relevance reaches the layer: none flows through it)
            if layer is not None:
                (rx,) = torch.autograd.grad(
                    at_val[0], xi, layer * mask.to(layer), allow_unused=True
                )
        if rx is None:
            rx = torch.zeros_like(xi)
        rel = Relevance(
            input=rx.detach(),
            output=output.detach() if isinstance(output, Tensor) else None,
            start=start,
            flows=flows,
            layer=layer,
            recorded={
                key: keep[0] if keep else torch.zeros(0)
                for found in recording.values()
                for key, keep in found
            },
        )
        return rel, parsed

    def layout(
        self,
        layer: str,
        unit_dim: int | None = None,
        hint: str = "name the axis with unit_dim= (counting the batch axis)",
    ) -> Any:
        """Which axis of ``layer``'s output holds its units (see
        :func:`lurker.probe.layout.layer_layout`)."""
        from ..probe.layout import layer_layout  # (probe imports explain's guided ReLU)

        return layer_layout(self.trace, layer, unit_dim, self._layouts, hint=hint)

    def _one_op(self, key: str, merged: bool = True) -> Op:
        from ..errors import OpKeyError

        try:
            idx = [op.index for op in self.trace.hook_ops(key)]
        except OpKeyError as e:
            inside = [op for op in self.trace.ops if op.module == key]
            if inside and all(op.dist_from_output is None for op in inside):
                # (the trace names no op for a module whose result nothing reads)
                raise LurkerError(
                    f"layer {key!r} ran, but the model's output does not use its result "
                    f"({', '.join(op.label for op in inside[:3])}): no relevance reaches "
                    "it; name a layer between the input and the output"
                ) from e
            raise LurkerError(
                f"layer {key!r} is not in the model: name a module path "
                f"(model.named_modules()) or a trace label (lurker.trace(model, x)). {e}"
            ) from e
        if len(idx) != 1:
            raise LurkerError(f"layer {key!r} names {len(idx)} passes; name one by its trace label")
        op = self.trace.ops[idx[0]]
        # a merged BatchNorm's conv carries no relevance of its own: use the BatchNorm
        if merged and op.index not in self.plan and len(op.children) == 1:
            child = self.trace.ops[op.children[0]]
            if (
                self.plan.get(child.index, ("", None))[0] == "linear"
                and self.plan[child.index][1][1] is op
            ):
                op = child
        return op


def no_rule(model: nn.Module, x: Tensor) -> NoRule | None:
    """The op of ``model`` LRP has no rule for, as its error, or None. Found by tracing
    ``x`` and planning the rules, without an attribution, so a caller can say it before
    anyone asks for one (the Explain page's method list). Any other failure is None: the
    model's own on ``x`` may not recur on real input."""
    from .base import untouched

    try:
        with untouched(model), torch.enable_grad():
            Engine(model, x)
    except NoRule as e:
        return e
    except Exception:
        return None
    return None


def _merge(w: Tensor, b: Tensor | None, bn: Op, value: Callable) -> tuple[Tensor, Tensor]:
    """Weights and bias of a linear layer followed by an eval-mode BatchNorm, as one."""
    mean = value(_arg(bn, 1, "running_mean"))
    var = value(_arg(bn, 2, "running_var"))
    gamma = value(_arg(bn, 3, "weight"))
    beta = value(_arg(bn, 4, "bias"))
    eps = _arg(bn, 7, "eps", 1e-5)
    scale = 1 / (var + eps) ** 0.5  # (as Zennit's canonizer computes it: equal numbers)
    if gamma is not None:
        scale = gamma * scale
    w2 = w * scale.reshape(-1, *([1] * (w.dim() - 1)))
    b2 = ((b if b is not None else torch.zeros_like(mean)) - mean) * scale
    if beta is not None:
        b2 = b2 + beta
    return w2.detach(), b2.detach()


def _head_softmax(ops: list[Op]) -> tuple[int, OpRef] | None:
    """(softmax op, the reference to its input) where the model's one output is a softmax
    or log_softmax of a ``(batch, classes)`` tensor over the classes; else None."""
    from ..ops.catalogue import bind

    outs = [op for op in ops if op.kind == "output"]
    if len(outs) != 1 or not outs[0].parents:
        return None
    op = ops[outs[0].parents[0]]
    if op.kind != "op" or op.name not in _CONSTANT or len(op.shape or ()) != 2:
        return None
    try:
        call = bind(op.name, op.args, op.kwargs, op.target)
    except (KeyError, TypeError):
        return None
    src = call.get("input")
    if call.get("dim") not in (1, -1) or type(src) is not OpRef:
        return None
    return op.index, src


def _softmax_relevance(x: Tensor, s: Tensor, r: Tensor, dim: int) -> Tensor:
    """AttnLRP's softmax rule (Proposition 3.1): ``x * (r - s * sum(r))`` along ``dim``,
    with masked (-inf) inputs taken as 0 (they get none)."""
    x = torch.where(torch.isneginf(x), torch.zeros_like(x), x.detach())
    return x * (r - s * r.sum(dim, keepdim=True))


def _attnlrp(
    q: Tensor, k: Tensor, v: Tensor, mask: Any, causal: bool, scale: Any, r: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Relevance of ``scaled_dot_product_attention``'s query, key and value by AttnLRP:
    the uniform rule on ``A @ v`` and on ``q @ k^T``, the softmax rule between them."""
    _no_gqa(q, k)
    s = (1.0 / math.sqrt(q.shape[-1])) if scale is None else scale
    z = (q @ k.transpose(-2, -1)) * s
    scores = _masked(z, mask, causal)
    a = scores.softmax(-1)
    ra, rv = (0.5 * t for t in _vjp(lambda aa, vv: aa @ vv, [a, v], r, eps))
    rs = _softmax_relevance(scores, a, ra, -1)
    if isinstance(mask, Tensor) and mask.dtype != torch.bool:  # z-rule: the mask keeps its share
        finite = torch.isfinite(scores)
        rs = torch.where(finite, rs * z / stabilize(torch.where(finite, scores, z), eps), 0.0)
    qk = lambda qq, kk: (qq @ kk.transpose(-2, -1)) * s  # noqa: E731
    rq, rk = (0.5 * t for t in _vjp(qk, [q, k], rs, eps))
    return rq, rk, rv


def _no_gqa(q: Tensor, k: Tensor) -> None:
    if k.shape[-3:-2] != q.shape[-3:-2] and q.dim() == 4:  # grouped-query attention
        raise LurkerError("LRP: grouped-query attention is not supported")


def _masked(scores: Tensor, mask: Any, causal: bool) -> Tensor:
    if causal:
        n, m = scores.shape[-2:]
        keep = torch.ones(n, m, dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if isinstance(mask, Tensor):
        scores = (
            scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        )
    return scores


def _attention_weights(q: Tensor, k: Tensor, mask: Any, causal: bool, scale: Any) -> Tensor:
    s = (1.0 / math.sqrt(q.shape[-1])) if scale is None else scale
    scores = _masked((q @ k.transpose(-2, -1)) * s, mask, causal)
    _no_gqa(q, k)
    return scores.softmax(-1)


def _unit_relevance(act: Tensor, u: UnitTarget, layout: Any) -> Tensor:
    """The starting relevance of a unit target: its activation where the score reads it
    (its mean over positions, or one position), laid out as the layer's output."""
    if act.dim() < 2:
        raise LurkerError(f"unit target {u}: {u.layer}'s output {tuple(act.shape)} has no units")
    r = torch.zeros_like(act)
    a, rv = by_unit(act.detach(), layout), by_unit(r, layout)  # (B, C, *positions) views
    check_unit(u, a.shape[1])
    if u.y is None:
        per = a[:, u.channel]
        rv[:, u.channel] = per / max(per[0].numel(), 1)
    else:
        at = (slice(None), u.channel, *unit_position(u, a.shape[2:]))
        rv[at] = a[at]
    return r


def lrp_relevance(
    model: nn.Module,
    x: Tensor,
    target: Any = None,
    composite: str | None = None,
    tolerance: float = 1e-3,
    **params: Any,
) -> tuple[Relevance, list[int] | UnitTarget]:
    """One LRP pass (no guard: :class:`LRP` and :func:`~.relevance.concepts` wrap it)."""
    tolerance = check_real("LRP", "tolerance", tolerance)
    eng = Engine(model, x, composite, **params)
    rel, tgt = eng.run(x, target)
    _warn_leaks(rel, tolerance)
    return rel, tgt


def _warn_leaks(rel: Relevance, tolerance: float) -> None:
    leaks = rel.leaks(tolerance)
    if leaks:
        f, frac = leaks[0]
        more = f" (and {len(leaks) - 1} more ops)" if len(leaks) > 1 else ""
        warn(
            f"LRP relevance is not conserved at {f.label} ({f.what}): it received "
            f"{float(f.out.sum()):.6g} and passed on {float(f.into.sum()):.6g}, "
            f"{frac:.2%} of the target's relevance{more}"
        )


@register
class LRP(Method):
    name = "lrp"
    signed = True
    summary = (
        "layer-wise relevance propagation (Bach et al., 2015) with Zennit's composites on "
        "CNNs and conservative (or AttnLRP) attention/LayerNorm rules on transformers"
    )

    def compute(
        self,
        model: nn.Module,
        x: Tensor,
        target: Any,
        *,
        composite: str | None = None,
        attention: str = "cp",
        epsilon: float = 1e-6,
        stabilizer: float = 1e-6,
        gamma: float = 0.25,
        low: Any = None,
        high: Any = None,
        tolerance: float = 1e-3,
    ) -> Explanation:
        tolerance = check_real("LRP", "tolerance", tolerance)  # before the pass, not after
        eng = Engine(
            model,
            x,
            composite,
            attention,
            epsilon=epsilon,
            stabilizer=stabilizer,
            gamma=gamma,
            low=low,
            high=high,
        )
        rel, tgt = eng.run(x, target)
        _warn_leaks(rel, tolerance)
        flows = {k: (float(f.out.sum()), float(f.into.sum())) for k, f in rel.flows.items()}
        options = {
            "composite": eng.composite,
            "attention": attention,
            "epsilon": epsilon,
            "stabilizer": stabilizer,
            "gamma": gamma,
            "low": low,
            "high": high,
            "relevance_start": rel.start.tolist(),
            "relevance_input": _rows(rel.input).tolist(),
            "flows": flows,
        }
        return Explanation(
            attribution=rel.input,
            method=self.name,
            target=tgt,
            options=options,
            output=rel.output,
            signed=True,
        )
