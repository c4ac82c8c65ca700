"""Whether a model's outputs are the run's dataset classes.

A model's output ``i`` is the dataset's class ``i`` only when it has one output per class:
a 1000-class ImageNet head probed over a folder of three classes predicts ImageNet
classes, and naming its output 2 after the third folder (or calling it right or wrong
against that folder's label) would be a guess shown as a fact.
"""

from __future__ import annotations

from typing import Any

from lurker.store import MissingFromRunError


def _first_output(run: Any) -> Any:
    """The metadata of the model's first output tensor (where predictions are read), from
    the run's graph; None when the run holds no graph."""
    try:
        outs = run.graph.outputs
    except MissingFromRunError:
        return None
    return outs[0].outputs[0] if outs and outs[0].outputs else None


def model_outputs(run: Any) -> int | None:
    """The model's number of class scores: the last axis of its first output when that is
    ``(batch, classes)``; None when the run holds no graph or the output is not such a
    tensor."""
    meta = _first_output(run)
    return int(meta.shape[1]) if meta is not None and len(meta.shape) == 2 else None


def no_scores(run: Any) -> str | None:
    """Why the model gives no top-5 (its output is not one score per class: a segmentation
    map, a detection list), or None when it does or the run does not tell."""
    meta = _first_output(run)
    if meta is None or len(meta.shape) == 2:
        return None
    shape = "x".join(str(d) for d in meta.shape)
    return (
        f"the model's output is {shape}, not one score per class for the image, so there is "
        "no top-5 to show (a segmentation map, a detection, features)"
    )


def class_names(run: Any, outputs: int | None = None) -> list[str]:
    """The dataset's class names as names of the model's outputs, or ``[]`` when they are
    not (``outputs``: the model's output count where the caller knows it)."""
    if outputs is None:
        outputs = model_outputs(run)
    classes = list(run.classes)
    return classes if outputs == len(classes) else []


def name_of(names: list[str], c: int) -> str:
    """Output ``c``'s name: its class name, else its index."""
    return names[c] if 0 <= c < len(names) else str(c)
