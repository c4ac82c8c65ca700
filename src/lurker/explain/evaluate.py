"""How faithful is an explanation: the figures users compare methods by.

- **Deletion / insertion** (Petsiuk et al., 2018, RISE, arXiv:1806.07421): change the
  input's features (pixels, or patches) in the order the attribution ranks them, most
  important first, and follow the target class's probability (the softmax of the logits, or
  a final softmax's own output). Deletion replaces
  them by a baseline (a good explanation makes the probability fall fast: low area under
  the curve); insertion starts from the baseline (a blurred image by default) and puts the
  original values back (a good explanation makes it rise fast: high area). All steps of a
  curve go through the model in chunks of ``batch_size`` rows, one forward per chunk.
- **Randomization** (Adebayo et al., 2018, "Sanity checks for saliency maps",
  arXiv:1810.03292): the layers' weights are re-initialised one after the other from the
  output down (cascading), the explanation recomputed after each, and compared with the
  original one (Spearman rank correlation of ``|attribution|``, optionally SSIM). A method
  whose maps stay the same when the weights they should explain are noise explains the
  input, not the model. This works on a deep copy: the model itself is never modified.
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import LurkerError, close_names
from ..models import is_probabilities, probabilities
from .base import (
    METHODS,
    Explanation,
    check_input,
    check_seed,
    input_errors,
    outside_inference_mode,
    training_said,
    untouched,
)
from .integrated_gradients import as_baseline
from .targets import Forward, UnitTarget, parse_target

__all__ = ["METRICS", "Curve", "Evaluation", "Randomization", "evaluate", "spearman", "ssim"]

METRICS = ("deletion", "insertion", "randomization")
BASELINES = ("zeros", "blur", "mean")


@dataclass
class Curve:
    """A deletion or insertion curve of each batch row.

    ``scores[b, k]``: row ``b``'s target probability (:func:`lurker.models.probabilities`) once the fraction
    ``fraction[k]`` of its features was changed, most important first (``fraction[0]`` is 0:
    the input itself for deletion, the baseline for insertion; the last is 1). ``auc[b]``:
    the trapezoid area under ``scores[b]`` over ``fraction``, in [0, 1].
    """

    kind: str
    fraction: Tensor
    scores: Tensor
    auc: Tensor
    baseline: str


@dataclass
class Randomization:
    """Cascading randomization: ``layers[i]`` is the i-th layer re-initialised (from the
    output down; every layer before it stays randomized), ``similarity[i, b]`` the Spearman
    rank correlation of row ``b``'s ``|attribution|`` with the original's at that point, and
    ``ssim[i, b]`` their structural similarity when asked for. NaN where a map is constant
    (a correlation is undefined there)."""

    layers: list[str]
    similarity: Tensor
    ssim: Tensor | None = None
    seed: int = 0


@dataclass
class Evaluation:
    """What :func:`evaluate` computed for one explanation (a metric not asked for is None)."""

    explanation: Explanation
    deletion: Curve | None = None
    insertion: Curve | None = None
    randomization: Randomization | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        """A few lines for a person: AUCs averaged over the batch, the similarity per layer."""
        lines = [f"{self.explanation.method}:"]
        if self.deletion is not None:
            lines.append(f"  deletion AUC  {float(self.deletion.auc.mean()):.4f} (lower is better)")
        if self.insertion is not None:
            lines.append(
                f"  insertion AUC {float(self.insertion.auc.mean()):.4f} (higher is better)"
            )
        if self.randomization is not None:
            r = self.randomization
            lines.append(
                "  randomized from the output down: Spearman |attribution| (lower is better)"
            )
            for name, s in zip(r.layers, r.similarity):
                lines.append(f"    {name or 'the model'}: {float(s.mean()):.4f}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- entry
@outside_inference_mode
def evaluate(
    model: nn.Module,
    x: Tensor,
    target: Any = None,
    method: str | None = None,
    *,
    metrics: Sequence[str] | str = METRICS,
    deletion_baseline: Any = "zeros",
    insertion_baseline: Any = "blur",
    patch: int = 1,
    step: int | None = None,
    rank_by: str = "value",
    batch_size: int = 64,
    blur_sigma: float = 5.0,
    blur_kernel: int = 11,
    layers: Sequence[str] | None = None,
    randomization_seed: int = 0,
    ssim: bool = False,
    **method_options: Any,
) -> Evaluation:
    """Evaluate the explanation of ``model`` on the batch ``x`` by ``method``.

    ``target``: as for :func:`lurker.explain.explain`, or an :class:`Explanation` already
    computed for ``x`` (its method and options are used where the explanation is
    recomputed, for randomization). ``method``: default ``"saliency"``. ``metrics``: any
    of ``"deletion"``, ``"insertion"``, ``"randomization"``.

    Curves: ``deletion_baseline`` / ``insertion_baseline`` is ``"zeros"`` (0 in the model's
    input space), ``"blur"`` (Gaussian, ``blur_kernel`` x ``blur_kernel``, ``blur_sigma``:
    RISE's 11 and 5), ``"mean"`` (each row's channel means), a number or a tensor that
    broadcasts to ``x``. A feature is a pixel (channels summed) of a ``(B, C, H, W)``
    input, an element otherwise; ``patch`` > 1 groups pixels into ``patch`` x ``patch``
    squares ranked by their mean attribution. ``step`` features change per step (default:
    about 100 steps); ``rank_by`` ``"value"`` (most positive first) or ``"magnitude"``
    (largest ``|a|`` first). ``batch_size``: rows per forward.

    Randomization: ``layers`` (module paths, randomized in that order; default every
    module with ``reset_parameters`` that runs, from the output down), each re-initialised
    by its own ``reset_parameters`` with torch's RNG seeded by ``randomization_seed`` (as
    Quantus's MPRT does with its ``seed + 1``; the caller's RNG state is kept);
    ``ssim=True`` adds SSIM.

    ``method_options`` go to the method. The model is left as it was.
    """
    names = _metrics(metrics)
    x = check_input(model, x, "evaluate")
    if "randomization" in names:  # before the curves run: a bad seed loses no work
        # (never None: randomization re-initialises layers the same way on every call)
        randomization_seed = check_seed(
            "evaluate", randomization_seed, "randomization_seed", required=True
        )
    curves = [n for n in names if n != "randomization"]
    if curves:  # options checked before anything runs
        if rank_by not in ("value", "magnitude"):
            raise LurkerError(f"rank_by is 'value' or 'magnitude', got {rank_by!r}")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise LurkerError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if step is not None and (not isinstance(step, int) or isinstance(step, bool) or step < 1):
            raise LurkerError(f"step (features changed per step) must be an int >= 1, got {step!r}")
        if not isinstance(patch, int) or isinstance(patch, bool) or patch < 1:
            raise LurkerError(f"patch must be an int >= 1, got {patch!r}")
        if patch > 1 and x.dim() != 4:
            raise LurkerError(
                f"patch needs image inputs (B, C, H, W); this input is {tuple(x.shape)}: use patch=1"
            )
        for kind in curves:
            spec = deletion_baseline if kind == "deletion" else insertion_baseline
            if isinstance(spec, str) and spec not in BASELINES:
                raise LurkerError(
                    f"unknown baseline {spec!r}; supported: {', '.join(BASELINES)}, a number or "
                    "a tensor"
                )
            if isinstance(spec, str) and spec == "blur" and x.dim() != 4:
                default = " (the default)" if kind == "insertion" else ""
                raise LurkerError(
                    f"{kind} starts from {kind}_baseline='blur'{default}, a blurred image, "
                    f"which needs image inputs (B, C, H, W); this input is {tuple(x.shape)}: "
                    f"pass {kind}_baseline='zeros', 'mean', a number or a tensor"
                )
        goal = target.target if isinstance(target, Explanation) else parse_target(target, len(x))
        if isinstance(goal, UnitTarget):
            raise LurkerError(
                f"deletion and insertion follow a class's probability; the target is a unit "
                f"({goal}): evaluate a class target (an int, one per row, or 'top'), or "
                "ask only for metrics=('randomization',)"
            )
    if method is not None and not isinstance(method, str):
        raise LurkerError(
            f"method is a method's name, got {method!r}; the metrics go by keyword: "
            "metrics=('deletion', ...)"
        )
    if isinstance(target, Explanation):
        e = target
        if method is not None and method != e.method:
            raise LurkerError(
                f"method={method!r}, but the explanation given was made by {e.method!r}: "
                "leave method out to evaluate it"
            )
        if method_options.keys() - _method_params(e.method):
            bad = sorted(method_options.keys() - _method_params(e.method))[0]
            raise LurkerError(
                f"method {e.method!r} has no option {bad!r}; its options are: "
                + (", ".join(sorted(_method_params(e.method))) or "none")
            )
        if tuple(e.attribution.shape) != tuple(x.shape):
            raise LurkerError(
                f"the explanation's attribution {tuple(e.attribution.shape)} does not match the "
                f"input {tuple(x.shape)}: evaluate an explanation with the input it explains"
            )
        method = e.method
        opts = {k: v for k, v in e.options.items() if k in _method_params(e.method)}
        opts.update(method_options)
    else:
        method = "saliency" if method is None else method
        if method not in METHODS:
            raise LurkerError(
                f"unknown explanation method {method!r}; supported: {', '.join(METHODS)}"
            )
        opts = dict(method_options)
        from . import explain

        with training_said():  # said by check_input above
            e = explain(model, x, target, method, **opts)
    options: dict[str, Any] = {"metrics": names, "method_options": opts}
    result = Evaluation(explanation=e, options=options)
    perm = _to_nchw(e, x) if curves or ssim else None
    if curves:
        # a channels-last image is changed pixel by pixel as a (B, C, H, W) one: the curves
        # run on the input moved to that layout, the model given it back in its own
        xc = x if perm is None else x.permute(perm)
        net = model if perm is None else _Permuted(model, perm)
        a = e.attribution.to(x.device)
        rank, n_features = _ranks(
            a if perm is None else a.permute(perm), xc, patch, rank_by == "magnitude"
        )
        if step is None:
            step = max(1, math.ceil(n_features / 100))
        options.update(patch=patch, step=step, rank_by=rank_by, batch_size=batch_size)
        blur = (blur_kernel, blur_sigma)
        defaults = {"deletion": "zeros", "insertion": "blur"}
        for kind in curves:
            spec = deletion_baseline if kind == "deletion" else insertion_baseline
            if perm is None or isinstance(spec, str):
                base = _baseline(spec, xc, blur)
            else:  # a number or a tensor in the input's own layout
                base = as_baseline(spec, x).permute(perm)
            # a model that refuses the baseline (zeros: one dividing by its input's norm)
            # is told which and what to pass instead, not with its own bare error
            own = base if perm is None else base.permute([perm.index(d) for d in range(x.dim())])
            with (
                input_errors(
                    model,
                    x,
                    lambda own=own: own,
                    f"the {kind} curve",
                    which=f"{kind}_baseline="
                    + (_describe(spec, blur) if isinstance(spec, Tensor) else repr(spec))
                    + (", the default" if isinstance(spec, str) and spec == defaults[kind] else ""),
                    fix=_baseline_fix(kind, spec, x),
                ),
                untouched(model),
            ):
                curve = _curve(net, xc, e.target, rank, n_features, step, base, kind, batch_size)
            curve.baseline = _describe(spec, blur)
            setattr(result, kind, curve)
    if "randomization" in names:
        result.randomization = _randomization(
            model, x, e, method, opts, layers, randomization_seed, ssim, perm
        )
        options.update(layers=result.randomization.layers, randomization_seed=randomization_seed)
    return result


def _metrics(metrics: Sequence[str] | str) -> tuple[str, ...]:
    if isinstance(metrics, str):
        metrics = (metrics,)
    try:
        names = tuple(dict.fromkeys(metrics))
    except TypeError:
        names = (metrics,)  # type: ignore[assignment]
    bad = [m for m in names if m not in METRICS]
    if bad or not names:
        raise LurkerError(
            f"unknown metric {bad[0] if bad else '(none given)'!r}; supported: {', '.join(METRICS)}"
        )
    return names


def _method_params(method: str) -> set[str]:
    cls = METHODS.get(method)
    if cls is None:
        raise LurkerError(f"unknown explanation method {method!r}; supported: {', '.join(METHODS)}")
    return {
        p.name
        for p in inspect.signature(cls.compute).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }


# ----------------------------------------------------------------------------- curves
def _to_nchw(e: Explanation, x: Tensor) -> tuple[int, ...] | None:
    """The permutation that lays a 4-D image input out as ``(B, C, H, W)``, from where
    the explanation found its channels (``e.axes``); None where it already is, or is not a
    4-D image. An input whose channel axis lurker could not tell is refused: its pixels
    would be read along the wrong axes."""
    ax = e.axes
    if x.dim() != 4 or ax is None:
        return None
    if ax.found == "unknown":
        raise ax.not_an_image(x.shape, "deletion, insertion and SSIM (which change pixels)")
    if ax.channel in (None, 1) or ax.image is None:
        return None
    return (0, ax.channel, *ax.image)


class _Permuted(nn.Module):
    """``model`` on its input given as ``x.permute(perm)``: the curves' copies go back to
    the model's own layout."""

    def __init__(self, model: nn.Module, perm: tuple[int, ...]) -> None:
        super().__init__()
        self.model = model
        self.back = tuple(perm.index(d) for d in range(len(perm)))

    def forward(self, x: Tensor) -> Any:
        return self.model(x.permute(self.back))


def _ranks(a: Tensor, x: Tensor, patch: int, magnitude: bool) -> tuple[Tensor, int]:
    """Each input position's rank (0 = changed first) in the shape of ``x`` without its
    channels (images) or of ``x`` (other inputs), and the number of features."""
    if not isinstance(patch, int) or isinstance(patch, bool) or patch < 1:
        raise LurkerError(f"patch must be an int >= 1, got {patch!r}")
    if a.shape != x.shape:
        raise LurkerError(f"attribution {tuple(a.shape)} does not match the input {tuple(x.shape)}")
    a = a.detach().double()
    if magnitude:
        a = a.abs()
    B = x.shape[0]
    if x.dim() == 4:
        s = a.sum(1)  # (B, H, W): a pixel is all its channels
        H, W = s.shape[1:]
        if patch > 1:
            s = F.avg_pool2d(s[:, None], patch, patch, ceil_mode=True)[:, 0]
    else:
        if patch != 1:
            raise LurkerError(
                f"patch needs image inputs (B, C, H, W); this input is {tuple(x.shape)}: use patch=1"
            )
        s = a
    flat = s.reshape(B, -1)
    n = flat.shape[1]
    order = torch.argsort(-flat, dim=1, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(n, device=flat.device).expand(B, n))
    rank = rank.view(s.shape)
    if x.dim() == 4 and patch > 1:
        rank = rank.repeat_interleave(patch, 1).repeat_interleave(patch, 2)[:, :H, :W]
    return rank, n


def _curve(
    model: nn.Module,
    x: Tensor,
    classes: Any,
    rank: Tensor,
    n: int,
    step: int,
    base: Tensor,
    kind: str,
    batch_size: int,
) -> Curve:
    """Every step of every row, ``batch_size`` rows per forward (no gradients)."""
    B = x.shape[0]
    counts = torch.tensor(
        [min(k * step, n) for k in range(math.ceil(n / step) + 1)], device=x.device
    )
    S = len(counts)
    fw = Forward(model, x, classes)
    rows = torch.arange(B, device=x.device).repeat_interleave(S)
    ks = torch.arange(S, device=x.device).repeat(B)
    out = torch.empty(B * S, dtype=torch.float64, device=x.device)
    own: bool | None = None
    with torch.no_grad():
        for start in range(0, B * S, batch_size):
            r = rows[start : start + batch_size]
            c = counts[ks[start : start + batch_size]]
            changed = rank[r] < c.view(-1, *([1] * (rank.dim() - 1)))
            if x.dim() == 4:
                changed = changed[:, None]
            xb = (
                torch.where(changed, base[r], x[r])
                if kind == "deletion"
                else (torch.where(changed, x[r], base[r]))
            )
            scored = fw(xb, r)
            assert scored.output is not None and fw.classes is not None
            if own is None:  # a final softmax's output is taken as it is: decided once
                own = is_probabilities(scored.output, 1)
            p = probabilities(scored.output, 1, own).double()
            out[start : start + len(r)] = p.gather(1, fw.classes[r][:, None].to(p.device))[:, 0]
    scores = out.view(B, S)
    fraction = counts.double() / n
    auc = torch.trapezoid(scores, fraction, dim=1)
    return Curve(kind, fraction.cpu(), scores.cpu(), auc.cpu(), "")


def _baseline(spec: Any, x: Tensor, blur: tuple[int, float]) -> Tensor:
    """The values a deleted feature takes (deletion) or the start (insertion)."""
    if isinstance(spec, str):
        if spec == "zeros":
            return torch.zeros_like(x)
        if spec == "mean":
            dims = tuple(range(2, x.dim())) if x.dim() > 2 else (1,)
            return x.mean(dims, keepdim=True).expand_as(x)
        if spec == "blur":
            return gaussian_blur(x, *blur)
        raise LurkerError(
            f"unknown baseline {spec!r}; supported: {', '.join(BASELINES)}, a number or a tensor"
        )
    return as_baseline(spec, x)


def _baseline_fix(kind: str, spec: Any, x: Tensor) -> str:
    """The ``{kind}_baseline=`` values to try where the model refuses ``spec``."""
    zero = isinstance(spec, (int, float)) and spec == 0  # zeros already, as a number
    others = [
        repr(b)
        for b in BASELINES
        if b != spec and (b != "blur" or x.dim() == 4) and not (b == "zeros" and zero)
    ]
    return f"{kind}_baseline={' or '.join(others)}, a number or a tensor"


def _describe(spec: Any, blur: tuple[int, float]) -> str:
    if isinstance(spec, str):
        return f"blur (kernel {blur[0]}, sigma {blur[1]:g})" if spec == "blur" else spec
    if isinstance(spec, Tensor):
        return f"tensor {tuple(spec.shape)}"
    return repr(spec)


def gaussian_blur(x: Tensor, kernel: int = 11, sigma: float = 5.0) -> Tensor:
    """A separable Gaussian blur of each channel of ``(B, C, H, W)`` images, edges
    replicated (zero padding would darken them)."""
    if x.dim() != 4:
        raise LurkerError(
            f"a blur baseline needs image inputs (B, C, H, W); this input is {tuple(x.shape)}: "
            "use 'zeros', 'mean', a number or a tensor"
        )
    if not isinstance(kernel, int) or kernel < 1 or kernel % 2 == 0 or not sigma > 0:
        raise LurkerError(
            f"blur_kernel must be an odd int >= 1 and blur_sigma > 0, got {kernel!r}, {sigma!r}"
        )
    C = x.shape[1]
    t = torch.arange(kernel, dtype=torch.float64, device=x.device) - kernel // 2
    g = torch.exp(-(t**2) / (2 * sigma**2))
    g = (g / g.sum()).to(x.dtype)
    h = kernel // 2
    y = F.pad(x, (h, h, h, h), mode="replicate")
    y = F.conv2d(y, g.view(1, 1, 1, -1).expand(C, 1, 1, kernel), groups=C)
    return F.conv2d(y, g.view(1, 1, -1, 1).expand(C, 1, kernel, 1), groups=C)


# ----------------------------------------------------------------------- randomization
def _randomization(
    model: nn.Module,
    x: Tensor,
    e: Explanation,
    method: str,
    opts: dict[str, Any],
    layers: Sequence[str] | None,
    seed: int,
    with_ssim: bool,
    perm: tuple[int, ...] | None = None,
) -> Randomization:
    from . import explain

    target = e.target
    original = e.attribution.to(x.device)
    try:
        twin = copy.deepcopy(model)
    except Exception as err:
        raise LurkerError(
            "randomization re-initialises layers of a deep copy of the model (the model "
            f"itself is never changed), and this model cannot be copied: "
            f"{type(err).__name__}: {err}"
        ) from None
    named = dict(twin.named_modules())
    order = _layer_order(twin, x, named) if layers is None else _check_layers(layers, named)
    if not order:
        raise LurkerError(
            "randomization found no layer to re-initialise: no module with reset_parameters "
            "runs in this model's forward; name the layers with layers=[...]"
        )
    devices = sorted({p.device.index or 0 for p in twin.parameters() if p.device.type == "cuda"})
    sims, ssims = [], []
    for name in order:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            named[name].reset_parameters()  # type: ignore[operator]
        with training_said():  # said once by evaluate, not once per layer
            a = explain(twin, x, target, method, **opts).attribution
        sims.append(spearman(original.abs().flatten(1), a.abs().flatten(1)))
        if with_ssim:
            a0, a1 = (t if perm is None else t.permute(perm) for t in (original, a))
            ssims.append(ssim(a0.abs(), a1.abs()))
    return Randomization(
        layers=list(order),
        similarity=torch.stack(sims).cpu(),
        ssim=torch.stack(ssims).cpu() if with_ssim else None,
        seed=seed,
    )


def _layer_order(model: nn.Module, x: Tensor, named: dict[str, nn.Module]) -> list[str]:
    """Modules with ``reset_parameters`` in the order they first run, output first."""
    seen: list[str] = []
    handles = []

    def hook(name: str) -> Any:
        def fn(mod: nn.Module, inp: Any, out: Any) -> None:
            if name not in seen:
                seen.append(name)

        return fn

    try:
        for name, mod in named.items():
            if callable(getattr(mod, "reset_parameters", None)):
                handles.append(mod.register_forward_hook(hook(name)))
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return seen[::-1]


def _check_layers(layers: Sequence[str], named: dict[str, nn.Module]) -> list[str]:
    if isinstance(layers, str):
        layers = [layers]
    out = []
    for name in layers:
        if not isinstance(name, str) or name not in named:
            close = close_names(str(name), named)
            hint = f" Close names: {', '.join(close)}." if close else ""
            raise LurkerError(
                f"layer {name!r} is not a module of the model: randomization re-initialises "
                f"modules, named by their path (model.named_modules()).{hint}"
            )
        if not callable(getattr(named[name], "reset_parameters", None)):
            raise LurkerError(
                f"layer {name!r} ({type(named[name]).__name__}) has no reset_parameters, so "
                "it cannot be re-initialised: name a layer with weights of its own (Conv, "
                "Linear, BatchNorm, LayerNorm, ...)"
            )
        out.append(name)
    return out


def _ranks_avg(v: Tensor) -> Tensor:
    """Ranks of each row (0-based), ties sharing their average rank (as scipy's
    ``rankdata``, which Spearman's correlation uses)."""
    s, idx = v.sort(dim=1, stable=True)
    out = torch.empty_like(v, dtype=torch.float64)
    for b in range(v.shape[0]):
        _, inv, counts = torch.unique_consecutive(s[b], return_inverse=True, return_counts=True)
        ends = counts.cumsum(0).double()
        avg = ends - (counts.double() + 1) / 2
        out[b, idx[b]] = avg[inv]
    return out


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman rank correlation of each row of ``a`` and ``b`` (``(B, N)``): Pearson's
    correlation of their ranks. NaN for a constant row."""
    ra, rb = _ranks_avg(a.detach().double()), _ranks_avg(b.detach().double())
    ra = ra - ra.mean(1, keepdim=True)
    rb = rb - rb.mean(1, keepdim=True)
    return (ra * rb).sum(1) / (ra.norm(dim=1) * rb.norm(dim=1))


def ssim(a: Tensor, b: Tensor, win: int = 7) -> Tensor:
    """Structural similarity of each row's heatmaps (channels summed), each scaled to
    [0, 1] by its own maximum, as scikit-image's ``structural_similarity`` with its
    defaults (a ``win`` x ``win`` uniform window, sample covariances, data range 1)."""
    if a.dim() != 4:
        raise LurkerError(f"SSIM compares image heatmaps (B, C, H, W); got {tuple(a.shape)}")
    a, b = (t.detach().double().sum(1, keepdim=True) for t in (a, b))
    a, b = (t / t.flatten(1).amax(1).clamp_min(1e-300).view(-1, 1, 1, 1) for t in (a, b))
    H, W = a.shape[2:]
    win = min(win, H, W)
    win -= 1 - win % 2  # odd
    n = win * win
    mu_a, mu_b = F.avg_pool2d(a, win, 1), F.avg_pool2d(b, win, 1)
    cov = n / (n - 1) if n > 1 else 1.0
    va = (F.avg_pool2d(a * a, win, 1) - mu_a**2) * cov
    vb = (F.avg_pool2d(b * b, win, 1) - mu_b**2) * cov
    vab = (F.avg_pool2d(a * b, win, 1) - mu_a * mu_b) * cov
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_a * mu_b + c1) * (2 * vab + c2)) / ((mu_a**2 + mu_b**2 + c1) * (va + vb + c2))
    return s.flatten(1).mean(1)
