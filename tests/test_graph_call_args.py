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
