"""The graph view document's call arguments (node ``A``) and training-mode mark (``T``):
the graph page shows them, so a softmax over the wrong ``dim``, or a ``batch_norm`` or
``dropout`` with ``training=True`` in an eval model, can be seen there. Oracles: the
model's own modules (``training``, ``eps``, ``stride``, ``p``)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from explorer_fixtures import explorer_run, served_explorer_run  # noqa: F401


class _Evalish(nn.Module):
    """An eval model with one BatchNorm left in training mode, a dropout, a strided conv
    and a softmax over the batch axis (dim 0): the mistakes the graph page must show."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(4, eps=1e-3)
        self.drop = nn.Dropout(0.25)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.drop(self.bn(self.conv(x))).flatten(1), 0)


def test_the_graph_view_holds_each_op_s_call_and_marks_training_mode() -> None:
    import lurker
    from lurker.graph.view import graph_view

    model = _Evalish().eval()
    model.bn.train()
    with pytest.warns(UserWarning, match="training mode"):
        trace = lurker.trace(model, torch.randn(2, 1, 8, 8))
    doc = graph_view(trace)
    nodes = {n["t"]: n for n in doc["nodes"] if "k" not in n}
    args = {t: n.get("A", "") for t, n in nodes.items()}
    # the modules' own settings, named (positional in torch's own calls)
    assert f"training={model.bn.training}" in args["batch_norm"] and model.bn.training
    assert f"eps={model.bn.eps}" in args["batch_norm"]
    assert "weight=self.weight" in args["batch_norm"]  # its module's parameter, by name
    assert f"training={model.drop.training}" in args["dropout"] and not model.drop.training
    assert f"p={model.drop.p}" in args["dropout"]
    assert f"stride={model.conv.stride}" in args["conv2d"]
    assert args["conv2d"].startswith("input_1, ")  # a tensor by the op that made it
    assert args["softmax"].split(", ")[1] == "dim=0"
    # only the op that ran as in training is marked
    assert [t for t, n in nodes.items() if n.get("T")] == ["batch_norm"]
    # inputs and outputs are no call
    ends = [n for n in doc["nodes"] if n.get("k") in ("input", "output")]
    assert len(ends) == 2 and not any("A" in n for n in ends)


def test_the_served_graph_names_the_run_s_batch_norm_arguments(
    served: dict[str, Any],
) -> None:
    import json
    import urllib.request

    model = served["run"].model
    doc = json.loads(urllib.request.urlopen(served["api"] + "/graph").read())
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    nodes = [n for n in doc["nodes"] if n["t"] == "batch_norm"]
    assert bns and len(nodes) == len(bns)
    for n, bn in zip(nodes, bns, strict=True):
        assert f"training={bn.training}" in n["A"] and not bn.training and "T" not in n
        assert f"eps={bn.eps}" in n["A"] and f"momentum={bn.momentum}" in n["A"]


class _Stats(nn.Module):
    """A BatchNorm built without running statistics, and std/var called positionally."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(4, track_running_stats=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(x)
        return y.std(-1, False).sum() + y.var(False) + y.std(1, True, True).sum()


def test_positional_std_and_var_arguments_are_named_as_torch_reads_them() -> None:
    """``x.std(-1, False)`` is torch's ``(input, dim, unbiased)`` overload and
    ``x.var(False)`` its ``(input, unbiased)``: the graph must not call that bool
    ``keepdim`` or ``dim``. Oracle: torch's own results for the keyword forms."""
    import lurker
    from lurker.graph.view import graph_view

    x = torch.randn(3, 4, 5)
    assert torch.equal(x.std(-1, False), x.std(-1, unbiased=False))
    assert x.std(-1, False).shape == (3, 4)  # not keepdim
    assert torch.equal(x.var(False), x.var(unbiased=False))
    assert torch.equal(x.std(1, True, True), x.std(1, unbiased=True, keepdim=True))
    doc = graph_view(lurker.trace(_Stats().eval(), x))
    calls = [n["A"] for n in doc["nodes"] if n.get("t") in ("std", "var")]
    assert calls == [
        "batch_norm_1, dim=-1, unbiased=False",
        "batch_norm_1, unbiased=False",
        "batch_norm_1, dim=1, unbiased=True, keepdim=True",
    ]


def test_a_batch_norm_without_running_statistics_is_not_marked_as_training() -> None:
    """``track_running_stats=False``: the module, in eval mode, normalises by the batch's
    statistics by design (it has no others), so torch calls ``batch_norm`` with
    ``training=True``; the graph's "train" mark (an eval model's op run as in training)
    would be a false alarm there. Oracle: the eval module's output is the batch-statistics
    normalisation, and the module is in eval mode."""
    import lurker
    from lurker.graph.view import graph_view

    model = _Stats().eval()
    x = torch.randn(3, 4, 5)
    mean, var = x.mean((0, 2), keepdim=True), x.var((0, 2), unbiased=False, keepdim=True)
    w, b = model.bn.weight[:, None], model.bn.bias[:, None]
    want = (x - mean) / (var + model.bn.eps).sqrt() * w + b
    torch.testing.assert_close(model.bn(x), want)
    assert not model.bn.training
    doc = graph_view(lurker.trace(model, x))
    (bn,) = [n for n in doc["nodes"] if n.get("t") == "batch_norm"]
    assert "running_mean=None" in bn["A"] and "training=True" in bn["A"]
    assert "T" not in bn
    assert not any(n.get("T") for n in doc["nodes"])
