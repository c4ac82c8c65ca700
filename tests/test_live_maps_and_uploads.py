"""Live view: constant maps are shown as constant, and uploads are prepared as the probe's
image-folder loader prepares the same file (transparency included), and say so.

Oracles: forward hooks on the model (a map's values), numpy over the PNG's pixels, and the
probe's own dataset loader (``load_dataset`` on a folder holding the uploaded file).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastapi.testclient import TestClient
from PIL import Image

from lurker.probe import probe
from lurker.probe.data import load_dataset
from lurker.server import create_app


class _Dead(torch.nn.Module):
    """A conv whose channel 1 never fires after its ReLU (bias -50, no weight) and whose
    channel 2 is 0.75 everywhere (bias only), beside channels that vary."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.relu = torch.nn.ReLU()
        self.head = torch.nn.Linear(4, 10)
        with torch.no_grad():
            self.conv.weight[1:3] = 0.0
            self.conv.bias[1] = -50.0
            self.conv.bias[2] = 0.75

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.relu(self.conv(x)).mean((2, 3)))


def _client(model: torch.nn.Module, data: Any, out: Path, spec: str) -> TestClient:
    probe(model, data, out=out, k=2, progress=False, meta={"data": spec}).close()
    return TestClient(create_app(out, model_obj=model))


def _hooked_output(model: torch.nn.Module, x: torch.Tensor, name: str) -> np.ndarray:
    seen: list[torch.Tensor] = []
    handle = dict(model.named_modules())[name].register_forward_hook(
        lambda _m, _a, out: seen.append(out.detach().clone())
    )
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return seen[0][0].numpy()


def test_constant_maps_are_mid_grey_and_named_with_their_value(tmp_path: Path):
    torch.manual_seed(0)
    model = _Dead().eval()
    data = load_dataset("digits:test", 16, channels=3)
    x = data[3][0][None]
    with _client(model, data, tmp_path / "runs" / "r", "digits:test") as client:
        base = "/api/runs/r/live/sample-3/ops"
        conv = client.get(f"{base}/conv").json()
        relu = client.get(f"{base}/relu").json()
        for op, info, module in (("conv", conv, "conv"), ("relu", relu, "relu")):
            want = _hooked_output(model, x, module)  # (4, 16, 16)
            flat = {c: float(want[c].flat[0]) for c in range(4) if want[c].min() == want[c].max()}
            got = {int(c): v for c, v in info["output"]["constant"].items()}
            assert got.keys() == flat.keys()
            assert all(abs(got[c] - flat[c]) < 1e-6 for c in flat)
            for c in range(4):
                png = client.get(f"{base}/{op}/output/{c}.png")
                pix = np.asarray(Image.open(io.BytesIO(png.content)))
                if c in flat:  # no range: flat mid-grey, not black (the map's "lowest")
                    assert (pix == 128).all(), (op, c, np.unique(pix))
                    assert float(png.headers["X-Lurker-Min"]) == flat[c]
                else:  # scaled to its own range, as before
                    assert (pix.min(), pix.max()) == (0, 255)
        # what the hooks say, in words: the ReLU's channel 1 is 0 everywhere, channel 2 0.75
        assert set(relu["output"]["constant"]) == {"1", "2"}
        assert relu["output"]["constant"]["1"] == 0.0
        assert relu["output"]["constant"]["2"] == 0.75
        assert set(conv["output"]["constant"]) == {"1", "2"}
        assert conv["output"]["constant"]["1"] == -50.0


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def test_a_transparent_upload_is_what_the_folder_loader_gives_and_says_so(tmp_path: Path):
    """An RGBA PNG whose transparent half holds red: the model sees the file as the
    probe's image-folder loader reads it (alpha dropped, the stored red kept), and the
    answer says that the transparency was dropped; an opaque file says nothing."""
    rng = np.random.default_rng(0)
    rgba = np.zeros((30, 40, 4), np.uint8)
    rgba[..., :3] = rng.integers(0, 256, (30, 40, 3))
    rgba[:, 20:, :3] = (255, 0, 0)  # stored under alpha 0: what "dropped" keeps
    rgba[..., 3] = 255
    rgba[:, 20:, 3] = 0
    opaque = rgba.copy()
    opaque[..., 3] = 255
    root = tmp_path / "folder"
    for cls, name, arr in (("a", "clear.png", rgba), ("b", "opaque.png", opaque)):
        (root / cls).mkdir(parents=True)
        Image.fromarray(arr, "RGBA").save(root / cls / name)
    data = load_dataset(str(root), 16, channels=3)
    by_name = {Path(p).name: i for i, p in enumerate(data.paths)}
    torch.manual_seed(0)
    model = _Dead().eval()
    with _client(model, data, tmp_path / "runs" / "r", str(root)) as client:
        for name, arr, noted in (("clear.png", rgba, True), ("opaque.png", opaque, False)):
            up = client.post(
                "/api/runs/r/live/images",
                files={"file": (name, _png(Image.fromarray(arr, "RGBA")), "image/png")},
            )
            assert up.status_code == 200, up.text
            body = up.json()
            again = client.get(f"/api/runs/r/live/{body['image']}").json()
            for doc in (body, again):
                if noted:
                    assert "transparency" in doc["input_note"]
                    assert "50% of its pixels" in doc["input_note"]
                else:
                    assert doc["input_note"] is None
            # the model's input as the live view prepared it, channel by channel, against
            # the probe loader's tensor for the same file
            want = data[by_name[name]][0].numpy()
            op = f"/api/runs/r/live/{body['image']}/ops/conv/input"
            got = np.stack(
                [np.asarray(client.get(f"{op}/{c}.json").json()["values"]) for c in range(3)]
            )
            assert np.allclose(got, want, atol=1e-5)
            # and it holds the stored red where the file is transparent (not white, not
            # a background colour): the right half of the crop
            assert (got[0, :, 12:] > got[1, :, 12:]).all()
