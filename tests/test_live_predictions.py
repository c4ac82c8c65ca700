"""The live model's top-5: ranked by the logits, and named by the dataset's classes only
where the model's outputs are those classes."""

from __future__ import annotations

import pytest
import torch
from fastapi.testclient import TestClient

from lurker.examples import DigitsNet
from lurker.probe import probe
from lurker.probe.data import load_dataset
from lurker.server import create_app


def _served(tmp_path, net):
    """A run over an image folder of three named classes."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for name in ("ant", "bee", "cat"):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(4):
            px = (torch.rand(16, 16, generator=g) * 255).byte().numpy()
            Image.fromarray(px, "L").save(tmp_path / "data" / name / f"{i}.png")
    data = load_dataset(str(tmp_path / "data"), 16, channels=1)
    layers = "classifier.1" if hasattr(net, "classifier") else None
    probe(net, data, out=tmp_path / "run", layers=layers, progress=False).close()
    return TestClient(create_app(tmp_path / "run", model_obj=net, dataset=data)), data


def test_top5_of_a_head_that_is_not_the_datasets_classes(tmp_path):
    torch.manual_seed(2)
    net = DigitsNet().eval()
    net.classifier[3] = torch.nn.Linear(64, 12)
    with torch.no_grad():  # logits so small that float32's softmax is uniform
        net.classifier[3].weight.mul_(1e-7)
        net.classifier[3].bias.zero_()
    client, data = _served(tmp_path, net)
    doc = client.get("/api/runs/run/live/sample-3").json()
    with torch.no_grad():
        logits = net(data[3][0][None])[0]
    want = logits.topk(5).indices.tolist()
    assert [p["class"] for p in doc["predictions"]] == want
    # output 1 of a 12-output head is not the folder "bee": no dataset name on it
    assert [p["name"] for p in doc["predictions"]] == [None] * 5
    assert all(abs(p["prob"] - 1 / 12) < 1e-6 for p in doc["predictions"])


def test_top5_named_by_the_classes_when_outputs_are_the_classes(tmp_path):
    torch.manual_seed(0)
    net = DigitsNet().eval()
    net.classifier[3] = torch.nn.Linear(64, 3)
    client, data = _served(tmp_path, net)
    doc = client.get("/api/runs/run/live/sample-3").json()
    with torch.no_grad():
        probs = torch.softmax(net(data[3][0][None])[0], 0)
    top = probs.topk(3)
    assert [p["class"] for p in doc["predictions"]] == top.indices.tolist()
    names = ["ant", "bee", "cat"]
    assert [p["name"] for p in doc["predictions"]] == [names[c] for c in top.indices.tolist()]
    assert [p["prob"] for p in doc["predictions"]] == [float(v) for v in top.values]


def test_top5_of_a_model_that_ends_in_a_softmax_are_its_own_probabilities(tmp_path):
    """A model whose last op is a softmax gives probabilities: the top-5 shows them as
    they are (a second softmax flattened a 0.9 to about 0.4 over three classes)."""
    torch.manual_seed(0)
    net = DigitsNet().eval()
    net.classifier[3] = torch.nn.Sequential(torch.nn.Linear(64, 3), torch.nn.Softmax(-1))
    with torch.no_grad():
        net.classifier[3][0].weight.mul_(1000)  # confident: far from uniform
    client, data = _served(tmp_path, net)
    doc = client.get("/api/runs/run/live/sample-3").json()
    with torch.no_grad():
        probs = net(data[3][0][None])[0]  # the oracle: the model's own output
    assert max(probs) > 0.6
    top = probs.topk(3)
    assert [p["class"] for p in doc["predictions"]] == top.indices.tolist()
    assert [p["prob"] for p in doc["predictions"]] == [float(v) for v in top.values]


class _Segmenter(torch.nn.Module):
    """A per-pixel classifier: its output is a (B, 3, H, W) map, not scores per image."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 3, 3, padding=1)

    def forward(self, x):
        return self.conv(x)


def test_a_model_without_scores_per_image_says_why_it_has_no_top5(tmp_path):
    torch.manual_seed(0)
    client, _ = _served(tmp_path, _Segmenter().eval())
    doc = client.get("/api/runs/run/live/sample-3").json()
    assert doc["predictions"] == []
    assert doc["predictions_note"].startswith("the model's output is 1x3x16x16, not one score")
    sample = client.get("/api/runs/run/samples/3").json()
    assert sample["prediction"] == [] and "1x3x16x16" in sample["prediction_error"]


def test_a_language_models_live_input_gives_the_next_token_at_the_last_position(tmp_path):
    """A language model's output is a score per class at every token, ``(1, L, V)``: the
    top-5 is the next token's, at the last position (the softmax of that row), and each
    entry says the position and the Explain target of its score (not "for the image ...
    a segmentation map")."""
    from test_explain_tokens import VOCAB, CharLM

    torch.manual_seed(0)
    model = CharLM().eval()
    ids = torch.randint(0, VOCAB, (12, 6), generator=torch.Generator().manual_seed(0))
    data = torch.utils.data.TensorDataset(ids, ids[:, -1])
    probe(model, data, out=tmp_path / "run", layers=["qkv"], progress=False).close()
    client = TestClient(create_app(tmp_path / "run", model_obj=model, dataset=data))
    r = client.post("/api/runs/run/live/inputs", json={"ids": [1, 2, 3, 4, 5, 6]})
    assert r.status_code == 200, r.text
    doc = r.json()
    with torch.no_grad():
        p = model(torch.tensor([[1, 2, 3, 4, 5, 6]]))[0, -1].softmax(-1)
    top = p.topk(5)
    assert [q["class"] for q in doc["predictions"]] == top.indices.tolist()
    assert [q["prob"] for q in doc["predictions"]] == pytest.approx(top.values.tolist(), rel=1e-5)
    assert {q["position"] for q in doc["predictions"]} == {5} and doc["predictions_note"] is None
    assert [q["target"] for q in doc["predictions"]] == [
        f"head:{c}:0:5" for c in top.indices.tolist()
    ]
