"""Explanations of a run's dataset samples, computed ahead into the run's ``cache/``.

``lurker images RUN --explanations top|N`` fills ``cache/explain/sample-N/`` through the
Explain endpoints' own code (:mod:`lurker.server.routes.explain`), with the run's own
model, for the top predicted class (the Explain page's default target; a language model's
next token at the last position, :func:`sample_target`): a later server
answers from those files without running the model, and ``lurker export`` writes them into the
static site. Beside the explanations each sample keeps what the page shows with them and
what only the model can give: its predictions (``live.json``, the live endpoint's
document) and its input as the model saw it (``input.png``).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from lurker.errors import LurkerError
from lurker.store.files import cache_trusted

if TYPE_CHECKING:
    from lurker.explain.lrp import NoRule

#: The target precomputed explanations are made for (the Explain page's default), but on
#: a language model, whose sample's target is its next token's (:func:`sample_target`).
TARGET = "top"
#: The name that asks precompute for concept relevance beside the attribution methods.
CONCEPTS = "concepts"


@dataclass
class Precomputed:
    samples: int
    made: int
    existing: int
    seconds: float
    #: methods left out (not asked for by name) because the run's model cannot give
    #: them, each with why (Grad-CAM on a model with no map along time, LRP on an LSTM)
    skipped: dict[str, str] = field(default_factory=dict)
    #: what the explanations explain, in words ("the top class", or a language model's
    #: next token at the last position with its target)
    explains: str = "the top class"


def sample_folder(run_path: Path, image: str) -> Path:
    return run_path / "cache" / "explain" / image


def cached_file(s: Any, image: str, name: str) -> Path | None:
    """``live.json`` or ``input.png`` the run's cache keeps for a dataset sample, or None
    (none kept, not a sample, or a foreign model attached: its answers are not these)."""
    if not (image.startswith("sample-") and image[7:].isdigit()) or s.foreign_model:
        return None
    if not s.cache_trusted():  # made before lurker recorded by which model: not the run's
        return None
    path = sample_folder(s.entry.path, image) / name
    return path if path.is_file() else None


def sample_target(s: Any, image: str) -> str:
    """The target a dataset sample is precomputed for, as the Explain page defaults to it:
    the top class (``"top"``), but on a language model (``(1, L, V)`` logits over token
    ids), whose ``"top"`` is refused, the top next token's score at the last position,
    ``LAYER:CLASS:0:L-1`` (the prediction's ``target``); runs the model once."""
    if s.token_length() is None:
        return TARGET
    preds = s.predictions(s.live_input(image), top=1)
    return str(preds[0].get("target") or TARGET) if preds else TARGET


def held_target(live: Any) -> str:
    """The target a sample's explanations were precomputed for, read from its kept
    ``live.json`` (its top prediction's ``target``, a language model's), else ``"top"``."""
    preds = live.get("predictions") if isinstance(live, dict) else None
    top = preds[0] if isinstance(preds, list) and preds and isinstance(preds[0], dict) else None
    target = top.get("target") if top is not None else None
    return target if isinstance(target, str) and target else TARGET


def pictureless(s: Any) -> bool:
    """Whether the run's inputs are token ids, feature vectors or 1-D signals: explained
    per token, feature or time step (scores, no heatmap image), and no input picture."""
    return bool(
        s.token_length() is not None
        or s.vector_length() is not None
        or s.signal_shape() is not None
    )


def explained_index(s: Any) -> dict[str, Any]:
    """Which samples the run's cache holds explanations of, with which methods (the
    ``/explained`` document, and ``explained.json`` of a static export); never runs the
    model. Only what is on disk for the run's own model is listed: a foreign model's
    answers are not the run's, and an unreadable sample folder is left out."""
    from lurker.explain import METHODS

    from .routes.explain import stored_concepts, stored_result

    listed: list[dict[str, Any]] = []
    if s.foreign_model:
        return {"target": TARGET, "samples": listed}
    flat = pictureless(s)
    for image in explained_samples(s.entry.path, s.fingerprint):
        folder = sample_folder(s.entry.path, image)
        if not flat and not (folder / "input.png").is_file():
            continue
        try:
            live = json.loads((folder / "live.json").read_text("utf-8"))
            preds = live.get("predictions") if isinstance(live, dict) else None
            top = preds[0] if isinstance(preds, list) and preds else None
        except (OSError, ValueError):
            continue  # no or a damaged live.json: the page could not show the sample
        target = held_target(live)  # the top class, or a language model's next token
        methods = [m for m in METHODS if stored_result(s, image, m, target) is not None]
        concepts = stored_concepts(s, image, target)
        if not methods and concepts is None:
            continue
        listed.append(
            {
                "image": image,
                "sample": int(image[7:]),
                "methods": methods,
                "concepts": concepts,
                "top": top,
                "target": target,
            }
        )
    return {"target": TARGET, "samples": listed}


def precompute(
    run: str | os.PathLike[str],
    samples: str | int = "top",
    methods: list[str] | None = None,
    *,
    device: str | None = None,
    dataset: Any = None,
    progress: bool = True,
) -> Precomputed:
    """Explain ``samples`` (``"top"``: the samples some unit ranks in its top-k, those a
    static export holds; an int N: samples 0..N-1) with ``methods`` (default: every method
    the Explain page shows, and ``"concepts"``: the concept relevance it shows first, the
    top units of the default layer with their heatmaps, where the run has such a layer)
    for the top class (a language model's: its top next token at the last position, see
    :func:`sample_target`), into the run's ``cache/``. Resumable: what is cached already
    is kept."""
    from starlette.requests import Request

    from lurker.explain import METHODS

    from .app import create_app
    from .deps import session
    from .errors import ApiError
    from .routes.explain import (
        CONCEPT_TOP,
        concept_ranking,
        keep_result,
        no_rule_reasons,
        refusals,
        stored_result,
        unkept_result,
        zeros_refused,
    )
    from .routes.live import image_id
    from .state import RunEntry

    every = [*METHODS, CONCEPTS]
    asked = methods
    methods = list(methods or every)
    unknown = [m for m in methods if m not in every]
    if unknown:
        raise LurkerError(
            f"unknown explanation method {unknown[0]!r}; supported: {', '.join(every)}"
        )
    app = create_app(run, device=device, dataset=dataset)
    from .routes.explain import methods as methods_doc

    entries: list[RunEntry] = [e for e in app.state.registry.entries.values() if e.run is not None]
    if len(entries) != 1:
        app.state.registry.close()
        raise LurkerError(f"{run} is not one run directory: name the run to explain")
    e = entries[0]
    request = Request({"type": "http", "app": app, "method": "GET", "headers": []})
    start = time.perf_counter()
    made = existing = 0
    targets: set[str] = set()
    try:
        s = session(request, e)
        if isinstance(samples, int):
            if samples < 1:
                raise LurkerError(f"--explanations N needs N >= 1, got {samples}")
            ids = list(range(min(samples, e.last_sample_id() + 1)))
        elif samples == "top":
            ids = [int(i) for i in np.unique(e.appearances().sample)]
        else:
            raise LurkerError(f"samples: 'top' or a number, not {samples!r}")
        try:
            s.model()
            if s.foreign_model:  # cannot happen through create_app(run) alone; said anyway
                raise LurkerError("the attached model is not the run's own")
        except ApiError:
            if s.mismatch is not None:  # another model than the run's: nothing is written
                raise LurkerError(
                    f"cannot precompute the explanations of run {e.path}: {s.mismatch}"
                ) from None
            # the server's 409 says to serve with --model, which precomputes nothing
            raise LurkerError(
                f"cannot precompute the explanations of run {e.path}: "
                f"{s.model_reason() or 'its model cannot be loaded'}. They are made with "
                "the model the run records (the spec and weights `lurker probe` was given; a "
                "run made from Python records none: probe it from the command line); "
                "`lurker serve RUN --model SPEC` explains on request instead, without keeping "
                "them"
            ) from None
        flat = pictureless(s)
        if flat:  # scores per token, feature or time step: the methods its page shows
            shown = [m.name for m in methods_doc(request, e.id).methods]
            if s.signal_shape() is not None and _has_concepts(s):
                shown.append(CONCEPTS)  # a signal's page shows concept relevance too
            if asked is None:
                if not shown:
                    raise LurkerError(
                        f"cannot precompute explanations for run {e.path}: its inputs have "
                        "no picture and its Explain page shows no method (no nn.Embedding "
                        "reads its ids)"
                    )
                methods = shown
            elif [m for m in methods if m not in shown]:
                bad = next(m for m in methods if m not in shown)
                raise LurkerError(
                    f"cannot precompute {bad!r} for run {e.path}: its inputs have no picture "
                    "and its Explain page shows "
                    + (", ".join(shown) or "no method (no nn.Embedding reads its ids)")
                    + "; name those in --methods, or leave it out"
                )
        elif asked is None and CONCEPTS in methods and not _has_concepts(s):
            methods.remove(CONCEPTS)  # not asked for, and this run cannot have them
        # what the model cannot give, asked up front as the Explain page does (its trace:
        # Grad-CAM's map layers, LRP's rules), not learnt by failing on the first sample.
        # Each reason's "use ... instead" is said once the first sample has settled which
        # methods are still made (integrated gradients may be left out for its baseline)
        skipped: dict[str, str] = {}
        refused: dict[str, str] = {}
        for method, why in refusals(s).items():
            if method not in methods:
                continue
            if asked is not None:  # named by the user: said, nothing made
                # never suggesting integrated gradients where the model refuses its zeros
                zeros = zeros_refused(s)
                runs = [m for m in _GRADIENT if zeros is None or m != "integrated_gradients"]
                raise LurkerError(
                    f"cannot precompute {method!r} for run {e.path}: {why}; leave it out of "
                    f"--methods ({_instead(runs)})"
                )
            methods.remove(method)
            refused[method] = why

        def left_out(method: str, err: ApiError, n: int, sid: int) -> bool:
            """Whether ``method``'s failure on sample ``sid`` leaves it out: a method the
            model cannot give that the trace did not tell (refusals), not named by the user,
            found on the first sample is left out, said; one named whose baseline the model
            refuses is refused with both fixes. The model's own failure (out of memory, a
            bug: model_failed) stops it."""
            if asked is None and n == 0 and err.status == 400 and not err.model_failed:
                methods.remove(method)
                rule = _no_rule(err)  # (a model that fails on the zeros it was traced on:
                if rule is None:  # refusals could not tell)
                    skipped[method] = str(err.detail)
                else:
                    refused[method] = no_rule_reasons(rule)[method]
                return True
            if asked is not None and _baseline_refused(err):
                raise LurkerError(_no_baseline(err, method, sid, n, methods, flat)) from None
            return False

        for n, sid in enumerate(ids):
            image = f"sample-{sid}" if flat else image_id(s, f"sample-{sid}")
            folder = sample_folder(e.path, image)
            try:
                target = sample_target(s, image)  # "top", or a language model's next token
                targets.add(target)
                # every method of the sample is made before any of its files is written:
                # one that fails (a model refusing integrated gradients' zeros, concept
                # relevance meeting an op LRP has no rule for on this input's path) leaves
                # no sample half explained, and a command naming it writes nothing at all
                kept: list[tuple[Any, Any]] = []
                for method in [m for m in methods if m != CONCEPTS]:
                    # (not an older lurker's default layer: made again at today's)
                    if stored_result(s, image, method, target, older=False) is not None:
                        existing += 1
                        continue
                    try:
                        kept.append(unkept_result(s, image, method, target, None))
                    except ApiError as err:
                        if not left_out(method, err, n, sid):
                            raise
                if CONCEPTS in methods:  # the ranking the page shows first, its maps: made
                    try:  # last and kept by itself, so the first file written is its own
                        ranking = concept_ranking(s, image, target, None, CONCEPT_TOP)
                    except ApiError as err:
                        if not left_out(CONCEPTS, err, n, sid):
                            raise
                    else:
                        existing += int(ranking.cached)
                        made += int(not ranking.cached)
                _live_files(s, image, folder)
                for key, result in kept:
                    keep_result(s, key, result)
                made += len(kept)
            except ApiError as err:
                raise LurkerError(f"sample {sid}: {err.detail}") from None
            if progress:
                print(f"explain: {n + 1}/{len(ids)} samples", file=sys.stderr, flush=True)
        # what is left out is settled (on the first sample): what still explains the model
        skipped.update({m: f"{why}; {_instead(methods)}" for m, why in refused.items()})
    finally:
        app.state.registry.close()
    explains = "the top class"
    if targets - {TARGET}:  # a language model's: each sample's top next token
        shown = sorted(targets - {TARGET})
        explains = (
            "the top next token's score at the last position ("
            + ", ".join(shown[:3])
            + (", ..." if len(shown) > 3 else "")
            + ")"
        )
    return Precomputed(len(ids), made, existing, time.perf_counter() - start, skipped, explains)


#: what explains a model that Grad-CAM or LRP cannot (by method name), first named first
_GRADIENT = (
    "integrated_gradients",
    "input_x_gradient",
    "saliency",
    "smoothgrad",
    "guided_backprop",
    "deconvnet",
)


def _instead(methods: list[str]) -> str:
    """The gradient methods among ``methods`` (those still made) that explain a model
    Grad-CAM or LRP cannot: never one left out (integrated gradients, where the model
    refuses its zeros baseline)."""
    still = [m for m in _GRADIENT if m in methods]
    if not still:
        return "lurker.explain's gradient methods explain it in Python"
    if len(still) <= 2:
        return f"{' and '.join(still)} still explain{'s' if len(still) == 1 else ''} it"
    return f"{still[0]}, {still[1]} and the other gradient methods still explain it"


E = TypeVar("E", bound=BaseException)


def _baseline_refused(err: BaseException) -> bool:
    """Whether the explorer's error says the model refuses a method's baseline
    (:class:`lurker.explain.base.BaselineError`, kept as its context)."""
    from lurker.explain.base import BaselineError

    return _in_context(err, BaselineError) is not None


def _in_context(err: BaseException, kind: type[E]) -> E | None:
    """The first exception of ``kind`` in ``err``'s chain of contexts (the explorer's
    ApiError keeps the method's own error as its context), or None."""
    e: BaseException | None = err
    while e is not None:
        if isinstance(e, kind):
            return e
        e = e.__context__
    return None


def _no_baseline(err: Any, method: str, sid: int, n: int, methods: list[str], flat: bool) -> str:
    """Why ``method``, named in ``--methods``, cannot be precomputed for a model that
    refuses its baseline, with both fixes: leave it out (naming what still explains the
    model), or run it from a baseline the model accepts where one can be given (``flat``:
    token ids, feature vectors or signals, which ``lurker explain`` does not read)."""
    from lurker.explain.base import BaselineError

    refusal = _in_context(err, BaselineError)
    why, kinds = (refusal.why, refusal.fix) if refusal is not None else (str(err.detail), "")
    # what else was asked that explains the model, else the gradient methods but this one
    still = [m for m in methods if m in _GRADIENT and m != method]
    left = _instead(still or [m for m in _GRADIENT if m != method])
    written = "nothing was written" if n == 0 else f"the samples before {sid} are kept"
    cli = (
        ""
        if flat
        else f"`lurker explain MODEL --image FILE --method {method} --option baseline=VALUE` or "
    )
    return (
        f"cannot precompute {method!r} (sample {sid}): {why}. `lurker images --explanations` "
        f"runs it from that baseline only, as the explorer does ({written}): leave {method} "
        f"out of --methods ({left}). To explain it from a baseline the model accepts"
        + (f" ({kinds})" if kinds else "")
        + f", use {cli}lurker.explain(model, x, method={method!r}, baseline=...) in Python."
    )


def _no_rule(err: BaseException) -> NoRule | None:
    """LRP's refusal of an op (:class:`lurker.explain.lrp.NoRule`) behind the explorer's
    error, kept as its context, or None."""
    from lurker.explain.lrp import NoRule

    return _in_context(err, NoRule)


def _has_concepts(s: Any) -> bool:
    """Whether concept relevance can run on this run: lurker has it and the run has a
    probed spatial layer for its default."""
    import lurker.explain as xp

    from .routes.explain import default_concept_layer

    return hasattr(xp, "concepts") and default_concept_layer(s, TARGET) is not None


def _live_files(s: Any, image: str, folder: Path) -> None:
    """``live.json`` (the live endpoint's document: the predictions the target chooser
    shows) and ``input.png`` (the input endpoint's image)."""
    from lurker.probe.images import png_bytes
    from lurker.store import atomic_write_bytes

    from .schemas import LiveImage

    flat = pictureless(s)
    s.claim_cache()  # (what an older lurker or another model left is not this model's)
    if (folder / "live.json").is_file() and (flat or (folder / "input.png").is_file()):
        return
    x = s.live_input(image)
    if flat:  # no picture to keep; the predictions name the top class it is explained for
        doc = {"image": image, "predictions": s.predictions(x)}
        atomic_write_bytes(folder / "live.json", json.dumps(doc).encode(), durable=False)
        return
    doc = LiveImage(
        image=image,
        predictions=s.predictions(x),
        width=int(x.shape[-1]),
        height=int(x.shape[-2]),
    )
    atomic_write_bytes(folder / "input.png", png_bytes(s.input_pil(image)), durable=False)
    atomic_write_bytes(
        folder / "live.json",
        json.dumps(doc.model_dump(mode="json", by_alias=True)).encode(),
        durable=False,
    )


def explained_samples(run_path: Path, fingerprint: str | None) -> list[str]:
    """The ``sample-N`` folders of the run's explanation cache that hold ``live.json``,
    by sample number; none where the cache is not the run's model's (``fingerprint``, the
    run's: see :func:`lurker.store.files.cache_trusted`)."""
    if not cache_trusted(run_path, fingerprint):
        return []
    root = run_path / "cache" / "explain"
    try:
        names = [p.name for p in root.iterdir() if (p / "live.json").is_file()]
    except OSError:
        return []
    return sorted(
        (n for n in names if n.startswith("sample-") and n[7:].isdigit()), key=lambda n: int(n[7:])
    )
