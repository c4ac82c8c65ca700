"""The units of the model's output layer are its class scores: the layer and unit
documents name each unit's class, and no other layer's (a hidden layer as wide as the
class count is not the classes).

Oracle: a hand-made model whose head we know (which op makes the output, through a
softmax or not) and the dataset's folder names.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from torch import nn

from lurker.probe import probe
from lurker.probe.data import load_dataset
from lurker.server import create_app

NAMES = ["ant", "bee", "cat"]


class Head(nn.Module):
    """conv -> pool -> a hidden Linear of 3 units (as many as the classes) -> ReLU ->
    the class scores, then optionally a softmax (the output is then probabilities)."""

    def __init__(self, softmax: bool, outputs: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.hidden = nn.Linear(4, 3)
        self.act = nn.ReLU()
        self.scores = nn.Linear(3, outputs)
        self.softmax = nn.Softmax(dim=1) if softmax else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.scores(self.act(self.hidden(self.pool(self.conv(x)).flatten(1))))
        return self.softmax(x) if self.softmax is not None else x


def _client(tmp_path: Path, net: nn.Module) -> TestClient:
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for name in NAMES:
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(3):
            px = (torch.rand(12, 12, generator=g) * 255).byte().numpy()
            Image.fromarray(px, "L").save(tmp_path / "data" / name / f"{i}.png")
    data = load_dataset(str(tmp_path / "data"), 12, channels=1)
    layers = ["conv", "hidden", "act", "scores"] + (["softmax"] if net.softmax else [])
    probe(net, data, out=tmp_path / "run", layers=layers, k=2, progress=False).close()
    return TestClient(create_app(tmp_path / "run", model_obj=net, dataset=data))


def _classes(client: TestClient, layer: str) -> tuple[str | None, list[str] | None, list]:
    doc = client.get(f"/api/runs/run/layers/{layer}").json()
    units = [
        client.get(f"/api/runs/run/layers/{layer}/units/{u}").json()["output_class"]
        for u in range(doc["layer"]["num_units"])
    ]
    return doc["layer"]["class_value"], doc["class_names"], units


@pytest.mark.parametrize("softmax", [False, True])
def test_output_layer_units_are_named_by_class_and_hidden_ones_are_not(
    tmp_path: Path, softmax: bool
) -> None:
    torch.manual_seed(0)
    client = _client(tmp_path, Head(softmax).eval())
    summary = client.get("/api/runs/run").json()
    by_name = {layer["name"]: layer["class_value"] for layer in summary["layers"]}
    # the scores' Linear is the class scores, whether or not a softmax follows it
    value, names, units = _classes(client, "scores")
    assert value == "score" and names == NAMES
    assert units == [{"class": c, "name": NAMES[c], "value": "score"} for c in range(3)]
    assert by_name["scores"] == "score"
    # the hidden Linear has 3 units too, but unit 1 of it is not the class "bee"
    for hidden in ("hidden", "act"):
        assert _classes(client, hidden) == (None, None, [None] * 3)
        assert by_name[hidden] is None
    if softmax:  # the softmax's units are the classes' probabilities
        value, names, units = _classes(client, "softmax")
        assert value == "probability" and names == NAMES
        assert units[2] == {"class": 2, "name": "cat", "value": "probability"}


def test_a_head_that_is_not_the_datasets_classes_is_not_named(tmp_path: Path) -> None:
    torch.manual_seed(0)
    client = _client(tmp_path, Head(False, outputs=5).eval())  # 5 outputs, 3 folders
    assert _classes(client, "scores") == (None, None, [None] * 5)
