"""Whether a model is the one a run was probed with, by the fingerprint the run records.

Everything that computes with a run's model after the probe (the explorer's live views,
``lurker images``, its explanations, ``lurker export``'s filters) shows the result beside
the run's stored top images: another model's numbers there (other weights, a random
init of the same architecture) would be silently wrong. Each compares the model it
loaded with the run's ``model_fingerprint`` once; a run that records none (older runs)
is not checked.
"""

from __future__ import annotations

import threading
import weakref
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ..specs import same_spec, same_weights
from .sweep import fingerprint

__all__ = ["fingerprint_of", "model_mismatch"]

_lock = threading.Lock()
#: model -> (its tensors' storage and version counters when fingerprinted, fingerprint)
_known: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[Any, ...], str]] = (
    weakref.WeakKeyDictionary()
)


def _stamp(model: nn.Module) -> tuple[Any, ...]:
    """What changes when the model's weights do, without reading them: each tensor's
    storage address and version counter (an optimizer step, ``load_state_dict`` or any
    in-place write bumps it), so a model trained further is fingerprinted again."""
    out: list[Any] = []
    for name, t in model.state_dict(keep_vars=True).items():
        if isinstance(t, Tensor) and not t.is_quantized and not t.is_inference():
            out.append((name, t.data_ptr(), t._version))
        else:  # a quantized weight, packed params, or an inference tensor (a model built
            # under torch.inference_mode(), which keeps no version counter): no cheap
            # stamp, always read again
            out.append((name, object()))
    return tuple(out)


def fingerprint_of(model: nn.Module) -> str:
    """:func:`~lurker.probe.sweep.fingerprint` of ``model``, kept per model object as long
    as its weights are unchanged: the fingerprint reads a sample of every tensor, too much
    to do per request of a server that checks the model it serves."""
    stamp = _stamp(model)
    with _lock:
        known = _known.get(model)
    if known is not None and known[0] == stamp:
        return known[1]
    found = fingerprint(model)
    with _lock:
        _known[model] = (stamp, found)
    return found


def model_mismatch(
    model: nn.Module,
    meta: dict[str, Any],
    run: str | Path,
    spec: str | None = None,
    weights: str | None = None,
) -> str | None:
    """Why ``model`` is not the model run ``run`` (its ``meta``) was probed with, with the
    fix; None when its fingerprint is the run's, or the run records none (an older run).

    ``spec`` and ``weights`` say where the model came from (None, None: a model object
    given from Python), so that the message can tell a changed weights file and a random
    init built differently here from a model that is simply another one."""
    want = meta.get("model_fingerprint")
    if not want:
        return None
    now = fingerprint_of(model)
    if now == want:
        return None
    cfg = meta.get("config") or {}
    rec_spec, rec_weights = cfg.get("model_spec"), cfg.get("weights")
    if spec is None:
        what = f"the model object given ({type(model).__name__})"
    elif weights:
        what = f"the model {spec} with weights {weights}"
    else:
        what = f"the model {spec} with no weights (random init)"
    head = (
        f"{what} is not the one run {run} was probed with (its fingerprint {now}, the "
        f"run's {want}: other weights, another architecture, or the same weights in "
        "another dtype, model.half() against float32), so nothing is computed with it"
    )
    if spec is not None and same_spec(rec_spec, spec) and same_weights(rec_weights, weights):
        if weights:
            return (
                f"{head}: the weights file {weights} has changed since the probe (trained "
                "again or replaced). Put back the file the probe loaded, or probe the run "
                "again with this one (`lurker probe ... --overwrite`)"
            )
        return (
            f"{head}: the run was probed from a random-init {spec}, no weights file, and a "
            "run stores no weights. lurker builds a model without weights from seed 0, the "
            "same model only where torch, torchvision and the model's code are those of the "
            "probe; here they build another one. Save the model's weights "
            "(torch.save(model.state_dict(), FILE)) and probe with --weights FILE, so that "
            "the run can be served anywhere, or probe the run again here (--overwrite)"
        )
    if rec_spec:
        used = f"--model {rec_spec}" + (
            f" --weights {rec_weights}"
            if rec_weights
            else " without --weights (it was random-init)"
        )
        return f"{head}. Give the model and weights the probe used: {used}"
    return (
        f"{head}. Give the model and weights the probe used (the run does not record them: "
        "it was probed from Python)"
    )
