"""`lurker probe --normalize`: the images an image folder feeds the model are normalised as
the user says, the run records it, and everything that reloads the folder from the run
(`lurker serve`, `lurker images`) feeds the same images."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

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


class Raw(nn.Module):
    # takes raw uint8 images (0..255) and scales and normalises them itself

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = x.float() / 255
        x = (x - 0.45) / 0.225
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


class Gray(Net):
    # the same net on 1-channel images

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(1, 4, 3)
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
    assert "else give --normalize none (images in [0, 1]), --normalize raw" in r.stderr
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
    assert recorded_normalize({}) is None  # none recorded: the channel rule's default


def test_a_python_run_over_an_image_folder_records_it_for_serve_and_export(
    setup: tuple[str, Path], tmp_path: Path
) -> None:
    """`lurker.probe(model, image_folder(FOLDER, ...))` recorded no dataset, so `lurker
    serve` and `lurker export` showed "no image" on every unit page (with no option to give
    the folder but Python's create_app). The run records the folder, as `--data FOLDER`
    does; a Subset of it (whose sample ids are not the folder's) is not recorded. Oracle:
    the folder's files read with PIL."""
    from io import BytesIO

    from fastapi.testclient import TestClient
    from torch.utils.data import Subset

    from lurker.models import load_model
    from lurker.probe.data import image_folder
    from lurker.server.app import create_app
    from lurker.server.export import export_site

    spec, folder = setup
    net = load_model(spec, None, device="cpu")
    out = tmp_path / "run"
    lurker.probe(net, image_folder(folder, SIZE), out=out, k=3, progress=False, device="cpu")
    assert lurker.Run.open(out).meta["config"]["data"] == str(folder.absolute())
    pixels = [np.asarray(Image.open(f).convert("RGB")) for f in sorted(folder.glob("*/*.png"))]
    client = TestClient(create_app(str(out), live=False))
    for sid in (0, 4):
        r = client.get(f"/api/runs/run/samples/{sid}/image.png")
        assert r.status_code == 200, r.text
        assert np.array_equal(
            np.asarray(Image.open(BytesIO(r.content)).convert("RGB")), pixels[sid]
        )
    site = export_site(out, tmp_path / "site", progress=False)
    exported = sorted((site / "data" / "runs" / "run" / "samples").glob("*/image.png"))
    assert exported  # every top-k sample's image, from the recorded folder
    for f in exported:
        sid = int(f.parent.name)
        assert np.array_equal(np.asarray(Image.open(f).convert("RGB")), pixels[sid])
    sub = tmp_path / "subset"
    lurker.probe(
        net, Subset(image_folder(folder, SIZE), [5, 1]), out=sub, k=2, progress=False, device="cpu"
    )
    assert "data" not in lurker.Run.open(sub).meta["config"]


def test_an_empty_class_folder_is_warned_about_once_per_probe_not_per_reload(
    setup: tuple[str, Path], tmp_path: Path
) -> None:
    """The probe warns that a class folder holds no images when it reads the folder for
    its sweep; `lurker images`, `lurker map` and `lurker serve` reload the run's folder
    and repeated the warning each time (a user saw it again on every command)."""
    import warnings

    from fastapi.testclient import TestClient

    from lurker.map import _model_and_data
    from lurker.server.app import create_app

    spec, folder = setup
    (folder / "c").mkdir()  # sorts last: a class without samples
    out = tmp_path / "run"

    def said(action: Any) -> int:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # every warning, however often the same
            action()
        return sum("1 class folder (c) holds no images" in str(w.message) for w in caught)

    def probe() -> None:
        r = _probe(spec, folder, out)
        assert r.exit_code == 0, r.output

    assert said(probe) == 1  # where a user needs it: the probe's read of the folder
    run = lurker.Run.open(out)
    assert run.classes == ["a", "b", "c"]

    def reload_images() -> None:
        assert len(UnitImages(out, device="cpu").dataset) == 6

    def reload_map() -> None:
        assert len(_model_and_data(run.meta["config"], SIZE, None, None, "cpu")[1]) == 6

    def reload_serve() -> None:
        client = TestClient(create_app(str(out)))
        rid = client.get("/api/runs").json()["runs"][0]["id"]
        assert client.get(f"/api/runs/{rid}/live/sample-4").status_code == 200

    assert (said(reload_images), said(reload_map), said(reload_serve)) == (0, 0, 0)


#: the one rule, written out: ImageNet's statistics for 3 channels, images in [0, 1] for 1
RULE = {3: (IMAGENET_MEAN, IMAGENET_STD), 1: ((0.0,), (1.0,))}


@pytest.mark.parametrize("channels", [1, 3])
def test_probe_explain_and_featviz_feed_one_image_as_one_tensor(
    setup: tuple[str, Path], tmp_path: Path, channels: int
) -> None:
    """The same image of the same model was a different input in `lurker probe` (a
    1-channel model got ImageNet's mean of three), `lurker explain` and `lurker featviz`
    (0 and 1): a silently different number between pages of one tool. Now one rule
    (probe.data.default_normalize) everywhere; `lurker explain RUN` feeds the run's own
    normalisation. Oracle: numpy arithmetic on the PIL image."""
    import json

    from lurker.explain.cli import load_image
    from lurker.models import load_model

    spec, _ = setup
    if channels == 1:
        spec = spec.replace(":Net", ":Gray")
    mode = "RGB" if channels == 3 else "L"
    folder = tmp_path / f"one{channels}"
    (folder / "a").mkdir(parents=True)
    rng = np.random.default_rng(channels)
    shape = (SIZE, SIZE, 3) if channels == 3 else (SIZE, SIZE)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(folder / "a/x.png")
    image = folder / "a" / "x.png"
    mean, std = RULE[channels]

    def oracle(mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
        arr = np.asarray(Image.open(image).convert(mode), np.float32).reshape(SIZE, SIZE, -1)
        arr = (arr / 255 - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
        return torch.from_numpy(arr).permute(2, 0, 1)[None]

    want = oracle(mean, std)
    net = load_model(spec, None, device="cpu")

    # the probe: what it fed (its stored value is the model's on the oracle) and reloads
    out = tmp_path / "run"
    r = _probe(spec, folder, out)
    assert r.exit_code == 0, r.output
    run = lurker.Run.open(out)
    assert run.meta["config"]["mean"] == pytest.approx(mean)
    with torch.no_grad():
        logits = net(want)[0]
    assert run.unit("fc", 1).top("max")[0].value == pytest.approx(float(logits[1]), abs=1e-5)
    torch.testing.assert_close(UnitImages(out, device="cpu").dataset[0][0], want[0])

    # lurker explain: its loader, and the command's heatmap of that input
    x, shown = load_image(image, SIZE, channels)
    torch.testing.assert_close(x, want)
    heat = tmp_path / "heat.png"
    method = ["--method", "input_x_gradient", "-t", "1", "-o", str(heat)]
    r = CliRunner().invoke(main, ["explain", spec, "--image", str(image), "--image-size",
                                  str(SIZE), *method])  # fmt: skip
    assert r.exit_code == 0, r.output
    e = lurker.explain(net, want, 1, "input_x_gradient")
    assert Image.open(heat).tobytes() == e.overlay(0, image=shown).tobytes()

    # lurker featviz and lurker.featviz: the [0, 1] image normalised by the same statistics
    fv = tmp_path / "fv"
    r = CliRunner().invoke(main, ["featviz", spec, "--layer", "conv", "-u", "0", "-n", "1",
                                  "--image-size", str(SIZE), "-o", str(fv),
                                  "--device", "cpu"])  # fmt: skip
    assert r.exit_code == 0, r.output
    settings = json.loads((fv / "activations.json").read_text())["settings"]
    assert (settings["mean"], settings["std"]) == (list(mean), list(std))
    py = lurker.featviz(net, "conv", [0], steps=1, size=SIZE).settings
    assert (py["mean"], py["std"]) == (list(mean), list(std))


def test_explain_of_a_run_feeds_the_image_as_the_runs_probe_did(
    setup: tuple[str, Path], tmp_path: Path
) -> None:
    """`lurker explain RUN --image F`: the run's model, image size and normalisation (here
    one given to the probe), not the default; --normalize still says otherwise."""
    spec, folder = setup
    out = tmp_path / "run"
    r = _probe(spec, folder, out, "--normalize", "0.5,0.4,0.3/0.2,0.25,0.5")
    assert r.exit_code == 0, r.output
    image = sorted(folder.glob("*/*.png"))[2]
    x = _oracle(folder, (0.5, 0.4, 0.3), (0.2, 0.25, 0.5))[2:3]
    heat = tmp_path / "heat.png"
    args = ["explain", str(out), "--image", str(image), "--method", "input_x_gradient", "-t", "0"]
    r = CliRunner().invoke(main, [*args, "-o", str(heat)])
    assert r.exit_code == 0, r.output
    from lurker.models import load_model

    net = load_model(spec, None, device="cpu")
    shown = torch.from_numpy(np.asarray(Image.open(image), np.float32) / 255).permute(2, 0, 1)
    e = lurker.explain(net, x, 0, "input_x_gradient")
    assert Image.open(heat).tobytes() == e.overlay(0, image=shown).tobytes()
    r = CliRunner().invoke(main, [*args, "-o", str(heat), "--normalize", "none"])
    assert r.exit_code == 0, r.output
    plain = lurker.explain(net, _oracle(folder, (0.0,) * 3, (1.0,) * 3)[2:3], 0, "input_x_gradient")
    assert Image.open(heat).tobytes() == plain.overlay(0, image=shown).tobytes()
    assert plain.overlay(0, image=shown).tobytes() != e.overlay(0, image=shown).tobytes()
    r = CliRunner().invoke(main, [*args, "-o", str(heat), "--normalize", "0.5/0.25"])
    assert r.exit_code == 2 and "--normalize" in r.output and "3-channel" in r.output, r.output
    # the model spec with the older --mean/--std: the same input as the run's
    older = ["explain", spec, *args[2:], "--image-size", str(SIZE), "-o", str(heat)]
    r = CliRunner().invoke(main, [*older, "--mean", "0.5,0.4,0.3", "--std", "0.2,0.25,0.5"])
    assert r.exit_code == 0, r.output
    assert Image.open(heat).tobytes() == e.overlay(0, image=shown).tobytes()
    r = CliRunner().invoke(main, [*older, "--mean", "0.5,0.4,0.3"])
    assert r.exit_code == 2 and "--normalize MEAN/STD" in r.output, r.output


def test_the_rule_for_other_channel_counts() -> None:
    """None is the rule (ImageNet's for 3 channels, [0, 1] for any other count); an explicit
    imagenet for 1 channel is ImageNet's mean of three (what 1-channel runs recorded with
    the earlier default were fed, and are reloaded with), and for 4 channels, which it has
    no values for, is refused (it gave 3 values for 4 channels)."""
    from lurker.errors import LurkerError
    from lurker.probe.data import normalize_stats

    assert normalize_stats(None, 3) == (IMAGENET_MEAN, IMAGENET_STD)
    assert normalize_stats(None, 1) == ((0.0,), (1.0,))
    assert normalize_stats(None, 4) == ((0.0,) * 4, (1.0,) * 4)
    (m,), (s,) = normalize_stats("imagenet", 1)
    assert (m, s) == pytest.approx((np.mean(IMAGENET_MEAN), np.mean(IMAGENET_STD)))
    with pytest.raises(LurkerError, match=r"ImageNet's mean and std are for 3-channel.*4 values"):
        normalize_stats("imagenet", 4)


def _raw_images(folder: Path) -> torch.Tensor:
    """The folder's images in sorted order as PIL reads them: uint8 (N, 3, H, W), 0..255."""
    files = sorted(folder.glob("*/*.png"))
    arr = np.stack([np.asarray(Image.open(f).convert("RGB"), np.uint8) for f in files])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def test_a_model_that_scales_raw_pixels_itself_is_probed_with_normalize_raw(
    setup: tuple[str, Path], tmp_path: Path
) -> None:
    """A model whose forward begins `x.float() / 255` probed from an image folder got
    ImageNet-normalised floats, which it divided by 255 again: every number wrong, with no
    word. `--normalize raw` feeds the folder's uint8 0..255 values; the run records it and
    everything that reloads the folder (`lurker images`, `lurker serve`, `lurker explain
    RUN`, `lurker featviz RUN`) feeds the same. Oracle: forward hooks on the model fed the
    uint8 images PIL reads."""
    import json

    from lurker.models import load_model

    spec, folder = setup
    spec = spec.replace(":Net", ":Raw")
    raw = _raw_images(folder)
    net = load_model(spec, None, device="cpu")
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        getattr(net, name).register_forward_hook(
            lambda _m, _i, o, name=name: seen.__setitem__(name, o.detach())
        )
        for name in ("conv", "fc")
    ]
    with torch.no_grad():
        logits = net(raw)
    for h in hooks:
        h.remove()

    out = tmp_path / "run"
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        r = _probe(spec, folder, out, "--normalize", "raw")
    assert r.exit_code == 0, r.output
    assert "fed raw: uint8 tensors of their 0..255 values" in r.stderr
    assert "255" not in " ".join(str(w) for w in warned)
    run = lurker.Run.open(out)
    assert run.meta["config"]["normalize"] == "raw"
    for u in range(2):
        top = run.unit("fc", u).top("max")
        want = seen["fc"][:, u].sort(descending=True)
        assert [e.sample_id for e in top] == want.indices.tolist()
        assert [e.value for e in top] == pytest.approx(want.values.tolist(), abs=1e-5)
    for u in range(4):  # a conv unit's maximum over positions, per image
        top = run.unit("conv", u).top("max")
        want = seen["conv"][:, u].amax((1, 2)).sort(descending=True)
        assert [e.value for e in top] == pytest.approx(want.values.tolist(), abs=1e-5)
    # reloaded from the run: the same uint8 images
    images = UnitImages(out, device="cpu")
    for i in range(len(raw)):
        assert torch.equal(images.dataset[i][0], raw[i])
    # `lurker serve`: a sample's live prediction, and an upload of the same file
    from fastapi.testclient import TestClient

    from lurker.server.app import create_app

    client = TestClient(create_app(str(out)))
    rid = client.get("/api/runs").json()["runs"][0]["id"]
    live = client.get(f"/api/runs/{rid}/live/sample-4")
    assert live.status_code == 200, live.text
    assert live.json()["predictions"][0]["prob"] == pytest.approx(
        float(logits[4].softmax(0).max()), abs=1e-5
    )
    # `lurker explain RUN`: the image as the probe fed it (its 0..255 values, as float)
    image = sorted(folder.glob("*/*.png"))[2]
    heat = tmp_path / "heat.png"
    args = ["explain", str(out), "--image", str(image), "--method", "input_x_gradient", "-t", "0"]
    r = CliRunner().invoke(main, [*args, "-o", str(heat)])
    assert r.exit_code == 0, r.output
    e = lurker.explain(net, raw[2:3].float(), 0, "input_x_gradient")
    shown = raw[2].float() / 255
    assert Image.open(heat).tobytes() == e.overlay(0, image=shown).tobytes()
    # `lurker featviz RUN`: the model fed 0..255 values (its [0, 1] image / (1/255))
    fv = tmp_path / "fv"
    r = CliRunner().invoke(main, ["featviz", str(out), "--layer", "conv", "-u", "0", "-n", "1",
                                  "--device", "cpu"])  # fmt: skip
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["featviz", spec, "--layer", "conv", "-u", "0", "-n", "1",
                                  "--image-size", str(SIZE), "-o", str(fv), "--device", "cpu",
                                  "--normalize", "raw"])  # fmt: skip
    assert r.exit_code == 0, r.output
    settings = json.loads((fv / "activations.json").read_text())["settings"]
    assert settings["std"] == pytest.approx([1 / 255] * 3) and settings["mean"] == [0.0] * 3


def test_a_model_that_scales_raw_pixels_fed_normalised_floats_is_warned_about(
    setup: tuple[str, Path], tmp_path: Path
) -> None:
    """Without --normalize raw, such a model gets ImageNet-normalised floats (the default):
    the probe runs, so it says, from the trace, that the model divides its input by 255,
    and names --normalize raw. Models that do not scale their input are not warned about."""
    spec, folder = setup
    for name, warned in ((":Raw", True), (":Net", False)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            r = _probe(spec.replace(":Net", name), folder, tmp_path / name[1:])
        assert r.exit_code == 0, r.output
        told = " ".join(str(w.message) for w in caught)
        assert ("the model's forward divides its input by 255" in told) == warned, told
        assert ("--normalize raw" in told) == warned


def test_a_raw_runs_pictures_are_its_images_and_its_gradients_are_autograds(
    setup: tuple[str, Path], tmp_path: Path
) -> None:
    """A raw run's sample pictures came out black-and-white (its uint8 values denormalised
    in uint8 arithmetic, every pixel clamped to 0 or 1) and its gradient images raised
    (requires_grad on uint8), so `lurker images RUN` stopped with a traceback. Oracles:
    the folder's PNG files themselves, and autograd on the images' 0..255 values as
    floats (the conv unit's gradient passes no ReLU: guided backprop is plain autograd)."""
    from lurker.models import load_model
    from lurker.probe.images import gradient_pixels

    spec, folder = setup
    spec = spec.replace(":Net", ":Raw")
    out = tmp_path / "run"
    r = _probe(spec, folder, out, "--normalize", "raw")
    assert r.exit_code == 0, r.output
    raw = _raw_images(folder)  # the files are SIZE x SIZE: the probe's resize/crop keep them
    images = UnitImages(out, device="cpu")
    for i in (0, 4):
        with Image.open(images.sample_image(i)) as got:
            assert np.array_equal(np.asarray(got.convert("RGB")), raw[i].permute(1, 2, 0).numpy())

    net = load_model(spec, None, device="cpu")
    entries = images.run.unit("conv", 1).top("max")
    paths = images.gradients("conv", 1)
    assert len(paths) == len(entries)
    seen: list[torch.Tensor] = []
    net.conv.register_forward_hook(lambda _m, _i, o: seen.append(o))
    for e, path in zip(entries, paths):
        x = raw[e.sample_id : e.sample_id + 1].float().requires_grad_(True)
        net(x)
        unit = seen.pop()[0, 1].flatten()
        peak = unit.detach().argmax()
        (grad,) = torch.autograd.grad(unit[peak], x)
        assert float(unit[peak].detach()) == pytest.approx(e.value, abs=1e-5)
        want = gradient_pixels(grad).numpy()[0]
        with Image.open(path) as got:
            diff = np.abs(np.asarray(got.convert("RGB")).astype(int) - want.astype(int))
        assert diff.max() <= 1  # a rounding step at most
    # `lurker images RUN` makes every picture of the raw run
    r = CliRunner().invoke(main, ["images", str(out), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "images made" in r.output


def test_image_folder_raw_from_python_defaults_to_its_own_statistics(
    setup: tuple[str, Path], tmp_path: Path
) -> None:
    """`image_folder(FOLDER, size, raw=True)`, the call the warning recommends, raised for
    every 3-channel folder (its mean/std defaulted to ImageNet's, which raw then refused).
    It feeds the files' own uint8 values; given statistics are refused before the folder
    is scanned (an empty directory says so, not that it holds no images)."""
    from lurker.errors import LurkerError
    from lurker.probe.data import image_folder

    _, folder = setup
    ds = image_folder(folder, SIZE, raw=True)
    raw = _raw_images(folder)
    assert ds.raw and len(ds) == len(raw)
    for i in range(len(raw)):
        assert torch.equal(ds[i][0], raw[i])
    ds1 = image_folder(folder, SIZE, raw=True, channels=1)
    assert ds1[0][0].dtype == torch.uint8 and ds1[0][0].shape == (1, SIZE, SIZE)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LurkerError, match="give no mean and std with raw=True"):
        image_folder(empty, SIZE, raw=True, mean=IMAGENET_MEAN, std=IMAGENET_STD)


def test_a_raw_run_probed_from_python_is_reloaded_raw(
    setup: tuple[str, Path], tmp_path: Path
) -> None:
    """A raw dataset probed from Python recorded only mean 0 and std 1, so everything that
    reloads the run (load_run_dataset, the explorer's samples, `lurker images`, featviz of
    the run) read it back as [0, 1] floats, which the model divided by 255 again. The run
    records normalize "raw" whoever probed it. Oracle: the files' uint8 values."""
    from lurker.models import load_model
    from lurker.probe.data import image_folder, load_run_dataset, recorded_normalize

    spec, folder = setup
    net = load_model(spec.replace(":Net", ":Raw"), None, device="cpu")
    out = tmp_path / "pyrun"
    ds = image_folder(folder, SIZE, raw=True)
    lurker.probe(net, ds, out=out, k=6, device="cpu", meta={"data": str(folder)})
    cfg = lurker.Run.open(out).meta["config"]
    assert cfg["normalize"] == "raw" and recorded_normalize(cfg) == "raw"
    again = load_run_dataset(cfg, SIZE)
    raw = _raw_images(folder)
    assert torch.equal(again[3][0], raw[3])
    assert torch.equal(UnitImages(out, model=net, device="cpu").dataset[5][0], raw[5])


class _Scales(torch.nn.Module):
    """A conv net whose forward begins with ``first`` (how it scales its input)."""

    def __init__(self, first: Any) -> None:
        super().__init__()
        self.first = first
        self.conv = torch.nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.first(x))


@pytest.mark.parametrize(
    ("form", "first"),
    [
        ("x.flip(1) / 255", lambda x: x.flip(1) / 255),
        ("x[:, [2, 1, 0]] / 255", lambda x: x[:, [2, 1, 0]] / 255),
        (
            "x.index_select(1, bgr) / 255",
            lambda x: x.index_select(1, torch.tensor([2, 1, 0])) / 255,
        ),
        ("torch.div(x, other=255.)", lambda x: torch.div(x, other=255.0)),
        ("x * np.float32(1 / 255)", lambda x: x * np.float32(1 / 255)),
        ("x * 0.00392157", lambda x: x * 0.00392157),
        (
            "x.reshape(...).transpose(2, 3) / 255",
            lambda x: x.reshape(x.shape).transpose(2, 3) / 255,
        ),
    ],
)
def test_every_form_of_scaling_by_255_is_recognised(form: str, first: Any) -> None:
    """The warning missed channel reorders, layout ops, keyword divisors, numpy numbers
    and a rounded 1/255: each reads the input's pixels scaled by 255."""
    from lurker.capture import settled_trace
    from lurker.probe.sweep import raw_scaling

    tr = settled_trace(_Scales(first).eval(), torch.rand(1, 3, 8, 8))
    assert raw_scaling(tr) is not None, form


def test_a_channels_last_model_that_scales_raw_pixels_is_warned_about(
    setup: tuple[str, Path], tmp_path: Path
) -> None:
    """`--channel-dim -1` feeds the model through a movedim, and a channels-last model
    permutes back before it scales: the warning followed neither and said nothing."""
    spec, folder = setup
    path = Path(spec.partition(":")[0])
    path.write_text(
        path.read_text()
        + """

class RawLast(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):  # (N, H, W, C) images of 0..255 values
        return self.conv(x.permute(0, 3, 1, 2).float() / 255).mean((2, 3))
"""
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = _probe(f"{path}:RawLast", folder, tmp_path / "run", "--channel-dim", "-1")
    assert r.exit_code == 0, r.output
    told = " ".join(str(w.message) for w in caught)
    assert "the model's forward divides its input by 255" in told, told


def test_ordinary_models_are_not_said_to_scale_raw_pixels() -> None:
    """Following layout ops and rounded numbers must not misfire on models that do not
    scale their input: torchvision's resnet18, vit_b_16 and mobilenet_v3_small, and the
    test zoo's models."""
    import torchvision

    import models_zoo as zoo
    from lurker.capture import settled_trace
    from lurker.probe.sweep import raw_scaling

    torch.manual_seed(0)
    cases = [
        (torchvision.models.resnet18(), torch.randn(1, 3, 64, 64)),
        (torchvision.models.vit_b_16(image_size=32), torch.randn(1, 3, 32, 32)),
        (torchvision.models.mobilenet_v3_small(), torch.randn(1, 3, 64, 64)),
        (zoo.Small(), torch.randn(2, 4)),
        (zoo.Branchy(), torch.ones(1, 4)),
        (zoo.RNNLoop(), torch.randn(4, 2, 3)),
        (zoo.LSTMNet(), torch.randn(2, 7, 6)),
        (zoo.Pyramid(decode=True), torch.randn(2, 4)),
        (zoo.Generates(), torch.randn(2, 5)),
        (zoo.InPlace(), torch.randn(3, 4)),
        (zoo.Twice(), torch.randn(2, 4)),
        (zoo.DigitsViT(), torch.rand(1, 1, 16, 16)),
        (zoo.digits_net_float64(), torch.rand(1, 1, 16, 16, dtype=torch.float64)),
    ]
    for model, x in cases:
        assert raw_scaling(settled_trace(model.eval(), x)) is None, type(model).__name__


MEAN3, STD3 = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


class _Table(torch.utils.data.Dataset):
    """A dataset class with ``mean()``/``std()`` methods (as a pandas DataFrame subclass
    has), its images normalised by a Normalize in its transform."""

    def __init__(self, images: torch.Tensor, mean: list[float], std: list[float]) -> None:
        from torchvision import transforms

        self.images = images
        self.transform = transforms.Compose([transforms.Normalize(mean, std)])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[i]), 0

    def mean(self) -> float:
        return float(self.images.mean())

    def std(self) -> float:
        return float(self.images.std())


def test_a_datasets_mean_and_std_methods_are_not_read_as_its_normalisation() -> None:
    """``mean``/``std`` attributes were read as the normalisation numbers whatever they
    were: a class with mean()/std() methods crashed wrap() ("'method' object is not
    iterable"). They are passed over, the transform's Normalize is found, and the sample's
    picture is its image again; numbers in other forms (a (3, 1, 1) array, one float)
    are still read."""
    from lurker.probe.data import input_image, wrap

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2, 3, 6, 6), generator=g).float() / 255
    mean, std = MEAN3, STD3
    ds = wrap(_Table(images, mean, std))
    assert ds.mean == pytest.approx(mean) and ds.std == pytest.approx(std)
    picture = np.asarray(input_image(ds, 1), dtype=np.float64)
    want = images[1].permute(1, 2, 0).numpy() * 255  # the image before its Normalize
    assert np.abs(picture - want).max() <= 1

    class Arrays(torch.utils.data.TensorDataset):
        mean = np.array(MEAN3, dtype=np.float32).reshape(3, 1, 1)
        std = torch.tensor(STD3)

    found = wrap(Arrays(images))
    assert found.mean == pytest.approx(mean) and found.std == pytest.approx(std)

    class Scalars(torch.utils.data.TensorDataset):
        mean, std = 0.5, np.float32(0.25)

    assert (wrap(Scalars(images)).mean, wrap(Scalars(images)).std) == ((0.5,), (0.25,))
