"""`lurker probe --normalize`: the images an image folder feeds the model are normalised as
the user says, the run records it, and everything that reloads the folder from the run
(`lurker serve`, `lurker images`) feeds the same images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import lurker
from lurker.cli import main
from lurker.probe import UnitImages
from lurker.probe.data import IMAGENET_MEAN, IMAGENET_STD

MODELS = """
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))
"""

SIZE = 16


@pytest.fixture
def setup(tmp_path: Path) -> tuple[str, Path]:
    (tmp_path / "nets.py").write_text(MODELS)
    folder = tmp_path / "images"
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (folder / c).mkdir(parents=True)
        for i in range(3):  # already SIZE x SIZE: the loader's resize and crop keep them
            pixels = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
            Image.fromarray(pixels, "RGB").save(folder / c / f"{i}.png")
    return f"{tmp_path / 'nets.py'}:Net", folder


def _oracle(folder: Path, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """The folder's images in sorted order, read with PIL and normalised with numpy."""
    files = sorted(folder.glob("*/*.png"))
    arr = np.stack([np.asarray(Image.open(f).convert("RGB"), np.float32) / 255 for f in files])
    arr = (arr - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def _probe(spec: str, folder: Path, out: Path, *extra: str):
    args = ["probe", spec, "--data", str(folder), "--out", str(out), "--image-size", str(SIZE)]
    return CliRunner().invoke(main, [*args, "--k", "6", "--device", "cpu", *extra])


def _logits(spec: str, x: torch.Tensor) -> torch.Tensor:
    from lurker.models import load_model

    with torch.no_grad():
        return load_model(spec, None, device="cpu")(x)


@pytest.mark.parametrize(
    ("option", "mean", "std", "said"),
    [
        ((), IMAGENET_MEAN, IMAGENET_STD, "with ImageNet's statistics"),
        (("--normalize", "none"), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "fed in [0, 1]"),
        (
            ("--normalize", "0.5,0.4,0.3/0.2,0.25,0.5"),
            (0.5, 0.4, 0.3),
            (0.2, 0.25, 0.5),
            "mean 0.5, 0.4, 0.3, std 0.2, 0.25, 0.5",
        ),
    ],
)
def test_probe_feeds_the_normalisation_asked_and_reloads_it(
    setup: tuple[str, Path],
    tmp_path: Path,
    option: tuple[str, ...],
    mean: tuple[float, ...],
    std: tuple[float, ...],
    said: str,
) -> None:
    spec, folder = setup
    out = tmp_path / "run"
    r = _probe(spec, folder, out, *option)
    assert r.exit_code == 0, r.output
    # said once, at the start, with how to change it
    assert r.stderr.count("lurker: images ") == 1 and said in r.stderr
    assert "else give --normalize none (images in [0, 1]) or --normalize MEAN/STD" in r.stderr
    x = _oracle(folder, mean, std)
    logits = _logits(spec, x)
    run = lurker.Run.open(out)
    for u in range(2):  # every stored top-k value is the model's on the oracle images
        top = run.unit("fc", u).top("max")
        want = logits[:, u].sort(descending=True)
        assert [e.sample_id for e in top] == want.indices.tolist()
        assert [e.value for e in top] == pytest.approx(want.values.tolist(), abs=1e-5)
    # `lurker images` reloads the folder from the run as the probe fed it
    images = UnitImages(out, device="cpu")
    for i in range(len(x)):
        torch.testing.assert_close(images.dataset[i][0], x[i], atol=1e-5, rtol=0)
    # `lurker map`, collecting features with the model and dataset the run records, too
    from lurker.map import _model_and_data

    _, mapped = _model_and_data(run.meta["config"], SIZE, None, None, "cpu")
    torch.testing.assert_close(mapped[5][0], x[5], atol=1e-5, rtol=0)
    # and so does `lurker serve`: the live view's prediction is the model's on that image
    from fastapi.testclient import TestClient

    from lurker.server.app import create_app

    client = TestClient(create_app(str(out)))
    rid = client.get("/api/runs").json()["runs"][0]["id"]
    live = client.get(f"/api/runs/{rid}/live/sample-4")
    assert live.status_code == 200, live.text
    top = live.json()["predictions"][0]
    assert top["class"] == int(logits[4].argmax())
    assert top["prob"] == pytest.approx(float(logits[4].softmax(0).max()), abs=1e-5)


def test_the_normalisations_differ(setup: tuple[str, Path]) -> None:
    """The oracle tells them apart: a test above passing with the wrong one would fail."""
    spec, folder = setup
    raw = _logits(spec, _oracle(folder, (0.0,) * 3, (1.0,) * 3))
    net = _logits(spec, _oracle(folder, IMAGENET_MEAN, IMAGENET_STD))
    assert (raw - net).abs().max() > 1e-2


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("imagenett", "give imagenet"),
        ("0.5,0.5,0.5", "MEAN/STD"),
        ("0.5,a,0.5/1,1,1", "its mean '0.5,a,0.5' is not a list of numbers"),
        ("0.5,0.5,0.5/1,1", "3 mean values but 2 std values"),
        ("0.5,0.5,0.5/1,0,1", "every std must be positive"),
        ("0.5,nan,0.5/1,1,1", "not a list of numbers"),
        ("0.5/0.25", "gives 1 value(s) each but the model takes 3-channel images"),
    ],
)
def test_bad_normalize_is_refused_before_a_run_exists(
    setup: tuple[str, Path], tmp_path: Path, value: str, why: str
) -> None:
    spec, folder = setup
    out = tmp_path / "run"
    r = _probe(spec, folder, out, "--normalize", value)
    assert r.exit_code != 0 and "Traceback" not in r.output
    assert "--normalize" in r.output and why in r.output, r.output
    assert not out.exists()


def test_digits_refuse_a_normalisation_they_would_ignore(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["probe", "lurker.examples:DigitsNet", "--data", "digits:test", "--out", str(out)]
    r = CliRunner().invoke(main, [*args, "--image-size", "16", "--normalize", "0.1/0.3"])
    assert r.exit_code != 0 and "--normalize applies to image folders" in r.output
    assert "Traceback" not in r.output and not out.exists()


def test_a_python_run_reloads_with_the_statistics_it_was_probed_with(
    setup: tuple[str, Path], tmp_path: Path
) -> None:
    """A run probed from Python with a folder normalised by its own statistics records no
    --normalize, but its mean and std: `lurker images` and `lurker serve` reload the folder
    with those (they used to reload it with ImageNet's), and a digits run with none."""
    from fastapi.testclient import TestClient

    from lurker.models import load_model
    from lurker.probe.data import image_folder, recorded_normalize
    from lurker.server.app import create_app

    spec, folder = setup
    mean, std = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)
    out = tmp_path / "run"
    run = lurker.probe(
        load_model(spec, None, device="cpu"),
        image_folder(folder, SIZE, mean=mean, std=std),
        out=out,
        k=3,
        progress=False,
        meta={"model_spec": spec, "data": str(folder)},
    )
    assert run is not None and "normalize" not in run.meta["config"]
    x = _oracle(folder, mean, std)
    images = UnitImages(out, device="cpu")
    for i in range(len(x)):
        torch.testing.assert_close(images.dataset[i][0], x[i], atol=1e-5, rtol=0)
    logits = _logits(spec, x)
    client = TestClient(create_app(str(out)))
    rid = client.get("/api/runs").json()["runs"][0]["id"]
    top = client.get(f"/api/runs/{rid}/live/sample-2").json()["predictions"][0]
    assert top["prob"] == pytest.approx(float(logits[2].softmax(0).max()), abs=1e-5)
    assert recorded_normalize({"mean": [0.0], "std": [1.0]}) == "none"
    assert recorded_normalize({}) is None  # a run from before: ImageNet's, as it was fed
