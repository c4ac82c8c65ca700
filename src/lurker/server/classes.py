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
    from .state import token_length

    # (batch, tokens, classes) on a run of token ids: a language model's logits
    if len(meta.shape) == 3 and meta.shape[1] == token_length(run):
        last = int(meta.shape[1]) - 1
        return (
            f"the model's output is {shape}, a score per class at each of its "
            f"{meta.shape[1]} tokens (a language model's next-token logits), not one "
            "score per class for the input, so there is no top-5 to show; explain one "
            "position's score as a unit of the layer that makes it, "
            f"LAYER:CLASS:0:POSITION (the last of a sample's {meta.shape[1]} tokens: "
            f"LAYER:CLASS:0:{last})"
        )
    return (
        f"the model's output is {shape}, not one score per class for the input, so there "
        "is no top-5 to show (a segmentation map, a detection, features)"
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


#: Ops between the class scores and the model's output that give one value per class of
#: another kind: the units of such an op are still the classes, in those words.
_PER_CLASS = {"softmax": "probability", "log_softmax": "log-probability", "sigmoid": "probability"}
#: Ops that pass each class's value through as it is (what their input is, they are).
_SAME = {"dropout", "clone", "contiguous", "float", "to", "identity", "detach"}


def class_units(run: Any) -> dict[str, str]:
    """The ops whose units are the model's output classes, by op label, each to what its
    units are of their class: ``"score"`` (the logits), ``"probability"``,
    ``"log-probability"``; ``{}`` when the outputs are not the dataset's classes.

    Read from the graph backwards from the model's first output: the op that made it, and
    through a softmax, log-softmax or sigmoid (or an op that passes values through) the op
    before it, so a head's ``Linear`` is the class scores whether or not the model ends in
    a softmax. Every op on that chain keeps the output's ``(batch, classes)`` shape; any
    other op (a hidden layer as wide as the class count) is not named: its unit ``i`` has
    nothing to do with class ``i``.
    """
    if not class_names(run):
        return {}
    graph = run.graph  # (class_names found the graph)
    out = graph.outputs[0]
    shape = tuple(out.outputs[0].shape)
    chain = []
    parents = _tensor_parents(out)
    while len(parents) == 1:
        op = graph.ops[parents[0]]
        if op.kind not in ("op", "generated") or not op.outputs:
            break
        if tuple(op.outputs[0].shape) != shape:
            break
        chain.append(op)
        if op.name not in _PER_CLASS and op.name not in _SAME:
            break  # the scores themselves: a linear, a matmul, an add of a bias
        parents = _tensor_parents(op)
    found: dict[str, str] = {}
    what: str | None = None
    for op in reversed(chain):  # from the scores up to the output
        if op.name in _PER_CLASS:
            what = _PER_CLASS[op.name]
        elif op.name not in _SAME or what is None:
            what = "score"
        found[op.label] = what
    return found


def _tensor_parents(op: Any) -> list[int]:
    """The distinct ops whose tensors ``op`` reads (its arguments, not its parameters)."""
    from lurker.graph.nodes import OpRef, refs

    return list(dict.fromkeys(r.index for r in refs(op) if isinstance(r, OpRef)))


def stored_probability(v: float) -> float | None:
    """A probability the run stores (float32) as the API sends it: its shortest decimal,
    which reads back as the same float32, so the Map page and the Sample page show one
    number for it (None for NaN). Never rounded: 0.99995 to 4 decimals read as 100%."""
    import numpy as np

    f = np.float32(v)
    return None if f != f else float(str(f))
