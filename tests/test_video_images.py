"""A video model's run in the explorer and ``lurker images``: a clip is shown as one frame,
the one a claim names (the middle for a sample, the peak's for a unit's crop and gradient),
checked against the dataset's frames and a forward hook on the model's own layer."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from lurker.probe import UnitImages, probe
from lurker.probe.data import wrap
from lurker.server.app import create_app
from test_probe_layout import CLASSES, K, N, _Video

D = 4  # frames of a clip


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    clips = torch.rand(N, 3, D, 8, 8, generator=g)  # in [0, 1]: pixels are the values
    ds = torch.utils.data.TensorDataset(clips, torch.arange(N) % CLASSES)
    model = _Video().eval()
    out = tmp_path_factory.mktemp("video") / "run"
    run = probe(model, ds, out=out, k=K, batch_size=7, progress=False)
    return model, ds, clips, run, out


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def _frame_pixels(clip: torch.Tensor, f: int) -> np.ndarray:
    return (clip[:, f].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def _which_frame(png: bytes, clip: torch.Tensor) -> list[int]:
    """The clip's frames equal to the image (a crop is the whole 8x8 frame, enlarged 8x)."""
    px = _pixels(png)
    px = px[:: px.shape[0] // 8, :: px.shape[1] // 8]
    return [f for f in range(D) if np.array_equal(px, _frame_pixels(clip, f))]


def _conv1_peaks(model: torch.nn.Module, clips: torch.Tensor, unit: int) -> list[int]:
    """Per sample, the frame of conv1's unit's first maximum: a forward hook's argmax."""
    got: list[torch.Tensor] = []
    h = model.conv1.register_forward_hook(lambda _m, _i, o: got.append(o.detach()))
    with torch.no_grad():
        model(clips)
    h.remove()
    flat = got[0][:, unit].flatten(1)  # (N, D*H*W), frame-major
    return (flat.argmax(1) // (8 * 8)).tolist()


def test_sample_image_is_the_clip_middle_frame(video: tuple) -> None:
    """A clip sample's image (and its live input) is its middle frame, D // 2 (a 409
    from to_pil before)."""
    model, ds, clips, _, out = video
    with TestClient(create_app(out, model_obj=model, dataset=wrap(ds))) as c:
        for sid in (0, 5):
            r = c.get(f"/api/runs/run/samples/{sid}/image.png")
            assert r.status_code == 200, r.text
            assert _which_frame(r.content, clips[sid]) == [D // 2]
            live = c.get(f"/api/runs/run/live/sample-{sid}/input.png")
            assert live.status_code == 200, live.text
            assert _which_frame(live.content, clips[sid]) == [D // 2]
        # the sample page's prediction: the model's own on the whole clip
        r = c.get("/api/runs/run/samples/3")
        assert r.json()["prediction_error"] is None
        with torch.no_grad():
            want = int(model(clips[3:4]).argmax())
        assert r.json()["prediction"][0]["class"] == want


def test_crop_and_grad_are_on_the_frame_where_the_unit_peaked(video: tuple) -> None:
    """A max-list crop of a 3-D conv is the frame of the entry's peak (conv1 keeps the
    clip's frames, so that frame is the peak's own), found by a forward hook; its gradient
    image is on that frame too: conv1 is the first layer, so the guided gradient of the
    peak is the plain autograd one."""
    model, ds, clips, run, out = video
    seen = set()
    with TestClient(create_app(out, model_obj=model, dataset=wrap(ds))) as c:
        for u in range(run.layer("conv1").num_units):
            peaks = _conv1_peaks(model, clips, u)
            for e in run.unit("conv1", u).top("max"):
                f = peaks[e.sample_id]
                seen.add(f)
                r = c.get(f"/api/runs/run/layers/conv1/units/{u}/max/{e.rank}/crop.png")
                assert r.status_code == 200, r.text
                assert f in _which_frame(r.content, clips[e.sample_id])
                x = clips[e.sample_id : e.sample_id + 1].clone().requires_grad_()
                at = model.conv1(x)[0, u].flatten().argmax()
                model.conv1(x)[0, u].flatten()[at].backward()
                g = x.grad[0, :, f]
                want = ((g / g.abs().max() * 0.5 + 0.5).clamp(0, 1) * 255).round()
                r = c.get(f"/api/runs/run/layers/conv1/units/{u}/max/{e.rank}/grad.png")
                assert r.status_code == 200, r.text
                got = _pixels(r.content).astype(np.int16)
                assert np.abs(got - want.permute(1, 2, 0).numpy()).max() <= 1
    assert seen - {D // 2}  # some peaks away from the middle frame: the test can tell


def test_unit_images_crop_is_the_peak_frame(video: tuple, tmp_path: Path) -> None:
    """`lurker images` (UnitImages) cuts the same frame as the explorer."""
    model, ds, clips, run, _ = video
    images = UnitImages(run, model=model, dataset=ds)
    for u in range(run.layer("conv1").num_units):
        peaks = _conv1_peaks(model, clips, u)
        for e in run.unit("conv1", u).top("max"):
            png = Path(images.get("crop", "conv1", u, e.rank)).read_bytes()
            assert peaks[e.sample_id] in _which_frame(png, clips[e.sample_id])
    # the probe's images also write (no to_pil error on a clip)
    assert images.write_all(layers="conv*", progress=False).total > 0


def test_upload_to_a_video_model_says_why(video: tuple) -> None:
    model, ds, _, _, out = video
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "PNG")
    with TestClient(create_app(out, model_obj=model, dataset=wrap(ds))) as c:
        r = c.post("/api/runs/run/live/images", files={"file": ("a.png", buf.getvalue())})
    assert r.status_code == 409
    assert "video clips (3, 4, 8, 8)" in r.json()["detail"]


def test_unit_page_of_a_3d_layer_says_its_crop_is_the_peak_frame(browser, video) -> None:
    """A 3-D layer has no receptive field: its crop toggle and caption say the image is
    the clip's frame where the unit peaked, not "the part of the input the peak sees"."""
    from explorer_fixtures import skip_without_browser, strict_page
    from lurker.server.serve import background

    skip_without_browser()
    model, ds, _clips, _run, out = video
    app = create_app(out, model_obj=model, dataset=wrap(ds))
    with background(app) as url, strict_page(browser) as pg:
        pg.goto(url + "#/r/run/unit/conv1/0?tab=max&crop=1")
        pg.wait_for_selector(".topk .top-entry")
        toolbar = pg.inner_text(".toolbar")
        assert "peak frame" in toolbar and "frame where the unit peaked" in toolbar
        assert "receptive field)" not in toolbar
        pg.goto(url + "#/r/run/unit/conv1/0?tab=max&crop=0")
        pg.wait_for_selector(".topk .top-entry")
        assert "box: none (no receptive field over frames)" in pg.inner_text(".toolbar")
