"""Probing a model that takes channels-last (N, H, W, C) images: ``channel_dim=`` and
``lurker probe --channel-dim``, recorded in the run for its unit images and the explorer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from fastapi.testclient import TestClient
from PIL import Image
from torch import nn

import lurker
from lurker.cli import main
from lurker.errors import LurkerError
from lurker.probe import UnitImages
from lurker.probe.data import image_folder

MODELS = '''
import torch
from torch import nn


class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 6, 3)
        )
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


class NHWC(nn.Module):
    """A Keras-style model: (N, H, W, C) in."""

    def __init__(self):
        super().__init__()
        self.inner = Inner()

    def forward(self, x):
        return self.inner(x.permute(0, 3, 1, 2))
'''


@pytest.fixture
def models(tmp_path: Path) -> Path:
    path = tmp_path / "models.py"
    path.write_text(MODELS)
    return path


def _load(path: Path, name: str) -> nn.Module:
    scope: dict = {}
    exec(compile(path.read_text(), str(path), "exec"), scope)
    return scope[name]()


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Two classes of small images of different sizes, and one corrupt file."""
    rng = np.random.default_rng(0)
    root = tmp_path / "imgs"
    for c, name in enumerate(["a", "b"]):
        (root / name).mkdir(parents=True)
        for i in range(5):
            h, w = 12 + 3 * i, 20 - 2 * i
            arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / name / f"{c}{i}.png")
    (root / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    return root


def _tops(run: lurker.Run) -> dict:
    """Every unit's top lists (sample, value, peak), by layer name without the wrapper's
    ``inner.`` prefix, and each layer's receptive field."""
    out = {}
    for layer in run.layers:
        name = layer.name.removeprefix("inner.")
        lists = [
            [(e.sample_id, e.value, e.y, e.x) for e in run.unit(layer.name, u).top(which)]
            for u in range(layer.num_units)
            for which in ("max", "mean")
        ]
        out[name] = (lists, layer.rf)
    return out


def test_channels_last_model_probes_as_its_channels_first_inner_model(
    models: Path, folder: Path, tmp_path: Path
) -> None:
    """Oracle: the NHWC wrapper probed with channel_dim=-1 gives the inner model's top-k
    units, samples, values, peaks and receptive fields, probed directly."""
    inner, nhwc = _load(models, "Inner"), _load(models, "NHWC")
    data = image_folder(folder, 16)
    want = lurker.probe(inner, data, out=tmp_path / "inner", k=3, batch_size=4, progress=False)
    got = lurker.probe(
        nhwc, data, out=tmp_path / "nhwc", k=3, batch_size=4, progress=False, channel_dim=-1
    )
    assert got.meta["config"]["channel_dim"] == -1
    assert want.meta["config"]["channel_dim"] is None
    tops = _tops(got)
    assert list(tops) == ["features.0", "features.1", "features.3", "fc"]
    assert tops == _tops(want)
    assert all(m.training for m in nhwc.modules())  # given back in its own mode
    # the unit images feed the run's model as the probe did: the same gradient image
    images = UnitImages(got, model=nhwc, dataset=data)
    reference = UnitImages(want, model=inner, dataset=data)
    a = images.gradients("inner.features.3", 1, which="max")
    b = reference.gradients("features.3", 1, which="max")
    assert [np.asarray(Image.open(p)).tolist() for p in a] == [
        np.asarray(Image.open(p)).tolist() for p in b
    ]
    # a feature visualization from the run optimises (C, H, W) images fed the same way
    fv = lurker.featviz(nhwc, "inner.features.3", [1], steps=3, run=got, transforms=False)
    ref = lurker.featviz(inner, "features.3", [1], steps=3, run=want, transforms=False)
    assert torch.equal(fv.images, ref.images)


def test_a_layout_that_does_not_fit_names_the_option(
    models: Path, folder: Path, tmp_path: Path
) -> None:
    data = image_folder(folder, 16)
    with pytest.raises(LurkerError, match=r"channels last \(N, H, W, C\).*channel_dim=-1"):
        lurker.probe(_load(models, "NHWC"), data, out=tmp_path / "r1", progress=False)
    with pytest.raises(LurkerError, match=r"channels on axis 1, not -1; leave channel_dim unset"):
        lurker.probe(
            _load(models, "Inner"), data, out=tmp_path / "r2", progress=False, channel_dim=-1
        )
    with pytest.raises(LurkerError, match=r"channel_dim=4: an image batch has axes 0"):
        lurker.probe(
            _load(models, "Inner"), data, out=tmp_path / "r3", progress=False, channel_dim=4
        )
    clips = torch.utils.data.TensorDataset(torch.zeros(2, 3, 2, 8, 8), torch.zeros(2).long())
    with pytest.raises(LurkerError, match=r"not \(C, H, W\) images"):
        lurker.probe(
            _load(models, "Inner"), clips, out=tmp_path / "r4", progress=False, channel_dim=-1
        )


def test_cli_channel_dim_is_recorded_and_served(models: Path, folder: Path, tmp_path: Path) -> None:
    """`lurker probe --channel-dim -1` on an image folder, then `lurker serve`'s API: the
    live view and unit images run the channels-last model on the run's images."""
    out = tmp_path / "run"
    args = [
        "probe", f"{models}:NHWC", "--data", str(folder), "--out", str(out),
        "--image-size", "16", "-b", "4", "--k", "3",
    ]  # fmt: skip
    refused = CliRunner().invoke(main, args)
    assert refused.exit_code == 2 and "Traceback" not in refused.output
    assert "probe it with --channel-dim -1" in refused.output
    assert not out.exists()
    done = CliRunner().invoke(main, [*args, "--channel-dim", "-1"])
    assert done.exit_code == 0, done.output
    # every file accounted for: the corrupt one is named with its reason
    assert "skipped 1 unreadable image" in done.output and "broken.jpg (" in done.output
    run = lurker.Run.open(out)
    assert run.meta["config"]["channel_dim"] == -1 and run.num_samples == 10
    from lurker.server.app import create_app

    client = TestClient(create_app(str(out)))
    rid = client.get("/api/runs").json()["runs"][0]["id"]
    live = client.get(f"/api/runs/{rid}/live/sample-3")
    assert live.status_code == 200, live.text
    # the served model's prediction is the model's own on the image laid out (N, H, W, C)
    x = image_folder(folder, 16)[3][0].unsqueeze(0)
    with torch.no_grad():
        logits = _load(models, "NHWC")(x.permute(0, 2, 3, 1))[0]
    top = live.json()["predictions"][0]
    assert top["class"] == int(logits.argmax())
    assert top["prob"] == pytest.approx(float(logits.softmax(0).max()), abs=1e-5)
    ops = client.get(f"/api/runs/{rid}/live/sample-3/ops/conv2d_2")
    assert ops.status_code == 200 and ops.json()["output"]["channels"] == 6
    grad = client.get(f"/api/runs/{rid}/layers/inner.features.3/units/1/max/0/grad.png")
    assert grad.status_code == 200 and grad.headers["content-type"] == "image/png"


def test_cli_channel_dim_on_a_channels_first_model_says_to_leave_it_out(
    models: Path, folder: Path, tmp_path: Path
) -> None:
    args = [
        "probe", f"{models}:Inner", "--data", str(folder), "--out", str(tmp_path / "run"),
        "--image-size", "16", "--channel-dim", "-1",
    ]  # fmt: skip
    refused = CliRunner().invoke(main, args)
    assert refused.exit_code == 2 and "Traceback" not in refused.output
    assert "leave out --channel-dim" in refused.output


def test_one_layout_spelled_two_ways_is_one_probe(
    models: Path, folder: Path, tmp_path: Path
) -> None:
    """-1 and 3 name one axis (1 and None the default): a finished run is not swept again
    (which would drop the images made from it) for another spelling of its layout."""
    data = image_folder(folder, 16)
    nhwc, out = _load(models, "NHWC"), tmp_path / "run"
    lurker.probe(nhwc, data, out=out, k=2, progress=False, channel_dim=-1).close()
    with pytest.warns(UserWarning, match="nothing to sweep"):
        lurker.probe(nhwc, data, out=out, k=2, progress=False, channel_dim=3)
    assert lurker.Run.open(out).meta["config"]["channel_dim"] == -1
    inner, out1 = _load(models, "Inner"), tmp_path / "run1"
    lurker.probe(inner, data, out=out1, k=2, progress=False, channel_dim=1).close()
    assert lurker.Run.open(out1).meta["config"]["channel_dim"] is None
    with pytest.warns(UserWarning, match="nothing to sweep"):
        lurker.probe(inner, data, out=out1, k=2, progress=False)


class _NHWCNet(nn.Module):
    """(N, H, W, C) in: a conv after a permute."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x.permute(0, 3, 1, 2)).mean((2, 3))


class _Rebuilds(_NHWCNet):
    """A model whose own copy hook rebuilds a submodule (which a view must not run)."""

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.conv = nn.Conv2d(3, 4, 3)


class _Defaults(_NHWCNet):
    """A model whose __getattr__ answers every unknown name with 0."""

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return 0


def test_view_moves_the_channels_or_refuses_the_model_clearly() -> None:
    from lurker.models import channels_first_view

    x = torch.rand(2, 3, 8, 8)
    for cls in (_NHWCNet, _Rebuilds, _Defaults):
        model = cls().eval()
        conv = model.conv
        view = channels_first_view(model, -1)
        # oracle: the model itself on the batch laid out as it takes it
        assert torch.equal(view(x), model(x.permute(0, 2, 3, 1)))
        assert model.conv is conv and type(model) is cls  # the user's model untouched
    model = _NHWCNet()
    model.forward = model.forward  # set on the instance, as torch.compile's wrapper does
    with pytest.raises(LurkerError, match="sets forward on the instance"):
        channels_first_view(model, -1)
    model = _NHWCNet()
    model.register_forward_pre_hook(lambda m, args: None)
    with pytest.raises(LurkerError, match="forward pre-hooks"):
        channels_first_view(model, -1)


def test_a_trace_failure_unrelated_to_the_layout_does_not_blame_it(
    folder: Path, tmp_path: Path
) -> None:
    """A model that runs on the batch as fed, whose trace fails for another reason, is not
    told to change its channel axis."""

    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3 * 16 * 16, 2)
            self.traced = False

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if torch.overrides._get_current_function_mode_stack():  # only when recorded
                raise RuntimeError("this model cannot be traced")
            return self.fc(x.flatten(1))

    with pytest.raises(LurkerError) as err:
        lurker.probe(Odd(), image_folder(folder, 16), out=tmp_path / "r", progress=False)
    assert "cannot be traced" in str(err.value) and "channel_dim" not in str(err.value)
