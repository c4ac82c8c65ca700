"""``lurker explain`` reads an image: given a model or run of token ids or feature vectors
it failed with the model's complaint about the picture and a fix that cannot help
(``--image-size``); now it says the input is not an image and where such inputs are
explained, and the command it names works."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from torch import nn
from torch.utils.data import TensorDataset

import lurker
from lurker.cli import main
from lurker.probe import probe


class Text(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(20, 6)
        self.fc = nn.Linear(6, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.embedding(ids)).mean(1))


class Tabular(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _data(kind: str) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    if kind == "Text":
        return TensorDataset(torch.randint(1, 20, (4, 7), generator=g), torch.tensor([0, 1, 2, 0]))
    return TensorDataset(torch.randn(4, 5, generator=g), torch.tensor([0, 1, 0, 1]))


def text_data() -> TensorDataset:
    return _data("Text")


def tabular_data() -> TensorDataset:
    return _data("Tabular")


def _image(tmp_path: Path) -> Path:
    Image.new("RGB", (16, 16), (120, 30, 200)).save(tmp_path / "x.png")
    return tmp_path / "x.png"


@pytest.mark.parametrize(
    ("kind", "words"), [("Text", "sequences of 7 token ids"), ("Tabular", "vectors of 5 features")]
)
def test_a_run_that_is_not_images_names_where_it_is_explained(
    tmp_path: Path, kind: str, words: str
) -> None:
    """Was '... fails on the image as loaded ... pass it with --image-size'. Oracle: the
    command it names makes lurker.explain's scores."""
    torch.manual_seed(0)
    model, data = {"Text": Text, "Tabular": Tabular}[kind]().eval(), _data(kind)
    torch.save(model.state_dict(), tmp_path / "w.pt")
    meta = {
        "model_spec": f"{__name__}:{kind}",
        "weights": str(tmp_path / "w.pt"),
        "data": f"{__name__}:{kind.lower()}_data",
    }
    run = tmp_path / "r"
    probe(model, data, out=run, k=2, batch_size=2, progress=False, meta=meta).close()
    res = CliRunner().invoke(main, ["explain", str(run), "--image", str(_image(tmp_path))])
    assert res.exit_code != 0
    said = " ".join(res.output.split())
    assert f"run {run}'s inputs are {words}, not images" in said
    assert "--image-size" not in said and "Traceback" not in res.output
    assert f"`lurker images {run} --explanations N`" in said
    res = CliRunner().invoke(
        main, ["images", str(run), "--explanations", "1", "--methods", "input_x_gradient"]
    )
    assert res.exit_code == 0, res.output
    got = np.load(run / "cache" / "explain" / "sample-0" / "input_x_gradient-top.npy")
    want = lurker.explain(model, data.tensors[0][:1], method="input_x_gradient").attribution
    np.testing.assert_allclose(got[0], want[0].numpy(), rtol=1e-5, atol=1e-7)


def test_a_text_model_is_not_told_to_change_the_image_size(tmp_path: Path) -> None:
    """A model spec of token ids: no image size makes it read a picture, so the paragraph
    says where text is explained instead of suggesting --image-size."""
    res = CliRunner().invoke(
        main, ["explain", f"{__name__}:Text", "--image", str(_image(tmp_path)), "--image-size", "8"]
    )
    assert res.exit_code != 0
    said = " ".join(res.output.split())
    assert said.startswith("error: Text fails on the image as loaded")
    assert "--image-size;" not in said and "lurker explain reads an image" in said
    assert "lurker.explain(model, x)" in said


class PositionalVit(nn.Module):
    """A ViT-like image model built for 8 px images that holds an ``nn.Embedding`` of its
    patch positions (looked up by ``arange``, never by the input)."""

    def __init__(self) -> None:
        super().__init__()
        self.patches = nn.Conv2d(3, 6, 4, stride=4)
        self.positions = nn.Embedding(4, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patches(x).flatten(2).transpose(1, 2)
        return self.head((tokens + self.positions(torch.arange(4))).mean(1))


def test_an_image_model_holding_an_embedding_is_told_the_image_size(tmp_path: Path) -> None:
    """Was: any nn.Embedding in the model dropped the --image-size hint, so a ViT with a
    positional embedding, given the wrong size, was told only that lurker explain reads
    images. Oracle: the size the hint points to makes the command work."""
    spec = f"{__name__}:PositionalVit"
    img = str(_image(tmp_path))
    res = CliRunner().invoke(main, ["explain", spec, "--image", img, "--image-size", "12"])
    assert res.exit_code != 0
    said = " ".join(res.output.split())
    assert said.startswith("error: PositionalVit fails on the image as loaded"), said
    assert "(1, 3, 12, 12)" in said and "Traceback" not in res.output
    assert "pass it with --image-size" in said and "--channel-dim -1" in said
    out = tmp_path / "o.png"
    res = CliRunner().invoke(
        main, ["explain", spec, "--image", img, "--image-size", "8", "--out", str(out)]
    )
    assert res.exit_code == 0, res.output
    assert out.exists()


def test_a_text_model_casting_its_ids_is_not_told_the_image_size(tmp_path: Path) -> None:
    """A text model that casts and reshapes its ids before a functional lookup still reads
    token ids: no --image-size hint."""
    res = CliRunner().invoke(
        main, ["explain", f"{__name__}:CastText", "--image", str(_image(tmp_path))]
    )
    assert res.exit_code != 0
    said = " ".join(res.output.split())
    assert said.startswith("error: CastText fails on the image as loaded"), said
    assert "--image-size;" not in said and "lurker explain reads an image" in said


class CastText(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(20, 6))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.long().reshape(ids.shape[0], -1)
        return torch.nn.functional.embedding(flat, self.table).mean(1)
