"""A video model's run in the explorer and ``lurker images``: a clip is shown as one frame,
the one a claim names (the middle for a sample, the peak's for a unit's crop and gradient),
checked against the dataset's frames and a forward hook on the model's own layer."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

import lurker
from lurker.graph.receptive import receptive_fields
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


def _oracle(
    model: torch.nn.Module, clip: torch.Tensor, layer: str, unit: int
) -> tuple[int, tuple[int, int, int, int, int, int]]:
    """Brute force, from the dataset's clip and a fresh receptive-field analysis: the
    unit's first maximum on the clip (a forward hook on the model's own layer) and the
    ``(t0, t1, y0, y1, x0, x1)`` input volume it sees (``RF.volume``); returns its frame
    in the layer's output and that volume."""
    module = getattr(model, layer)
    got: list[torch.Tensor] = []
    h = module.register_forward_hook(lambda _m, _i, o: got.append(o.detach()))
    with torch.no_grad():
        model(clip[None])
    h.remove()
    hh, ww = got[0][0].shape[-2:]
    at = int(got[0][0, unit].flatten().argmax())
    f, r, c = at // (hh * ww), (at // ww) % hh, at % ww
    trace = lurker.trace(model, clip[None])
    rf = receptive_fields(trace)[trace[layer].index]
    return f, rf.volume(f, r, c, clip_to=(D, 8, 8))


def _crop_equals(png: bytes, clip: torch.Tensor, frame: int, box: tuple[int, ...]) -> bool:
    """Whether a crop (enlarged k times, nearest neighbour) is ``box`` of ``frame``."""
    y0, y1, x0, x1 = box
    px = _pixels(png)
    k = px.shape[0] // (y1 - y0)
    if px.shape[:2] != (k * (y1 - y0), k * (x1 - x0)):
        return False
    return np.array_equal(px[::k, ::k], _frame_pixels(clip, frame)[y0:y1, x0:x1])


@pytest.mark.parametrize("layer", ["conv1", "conv2"])
def test_crop_is_the_peak_box_on_a_frame_the_peak_sees(video: tuple, layer: str) -> None:
    """A clip unit's crop (max and mean lists) is the clip cut by ``RF.volume`` at the
    unit's peak: the box, on one frame of the frames it sees, which the entry names
    (``frame``, ``frames``); its input image is that frame, whole, so the box drawn on it
    is where the crop came from. conv1 keeps the clip's frames with a centred kernel: the
    frame is the peak's own (also at the clip's ends); conv2 sees all 4 frames."""
    model, ds, clips, run, out = video
    seen = set()
    with TestClient(create_app(out, model_obj=model, dataset=wrap(ds))) as c:
        for u in range(run.layer(layer).num_units):
            doc = c.get(f"/api/runs/run/layers/{layer}/units/{u}").json()
            assert doc["clip_frames"] == D
            for which in ("max", "mean"):
                for e in doc["top"][which]:
                    sid, rank = e["sample_id"], e["rank"]
                    f, (t0, t1, y0, y1, x0, x1) = _oracle(model, clips[sid], layer, u)
                    assert e["frames"] == [t0, t1] and e["box"] == [y0, y1, x0, x1]
                    assert t0 <= e["frame"] < t1
                    if layer == "conv1":
                        assert e["frame"] == f
                    seen.add(e["frame"])
                    base = f"/api/runs/run/layers/{layer}/units/{u}/{which}/{rank}"
                    r = c.get(f"{base}/crop.png")
                    assert r.status_code == 200, r.text
                    assert _crop_equals(r.content, clips[sid], e["frame"], (y0, y1, x0, x1))
                    assert (y1 - y0, x1 - x0) != (8, 8)  # a box, not the whole frame
                    r = c.get(f"{base}/input.png")
                    assert r.status_code == 200, r.text
                    assert _which_frame(r.content, clips[sid]) == [e["frame"]]
                    frame = c.get(f"/api/runs/run/samples/{sid}/frames/{e['frame']}.png")
                    assert frame.content == r.content
    if layer == "conv1":
        assert seen - {D // 2}  # some peaks away from the middle frame: the test can tell
    # a frame that is not in the clip: a clear 404
    with TestClient(create_app(out, model_obj=model, dataset=wrap(ds))) as c:
        r = c.get(f"/api/runs/run/samples/0/frames/{D}.png")
        assert r.status_code == 404 and f"not in a clip of {D} frames" in r.json()["detail"]


def test_grad_is_on_the_frame_where_the_unit_peaked(video: tuple) -> None:
    """A max-list gradient image of a 3-D conv is on the frame its crop is cut from (conv1
    keeps the clip's frames, so that frame is the peak's own), found by a forward hook:
    conv1 is the first layer, so the guided gradient of the peak is the plain autograd one."""
    model, ds, clips, run, out = video
    with TestClient(create_app(out, model_obj=model, dataset=wrap(ds))) as c:
        for u in range(run.layer("conv1").num_units):
            peaks = _conv1_peaks(model, clips, u)
            for e in run.unit("conv1", u).top("max"):
                f = peaks[e.sample_id]
                x = clips[e.sample_id : e.sample_id + 1].clone().requires_grad_()
                at = model.conv1(x)[0, u].flatten().argmax()
                model.conv1(x)[0, u].flatten()[at].backward()
                g = x.grad[0, :, f]
                want = ((g / g.abs().max() * 0.5 + 0.5).clamp(0, 1) * 255).round()
                r = c.get(f"/api/runs/run/layers/conv1/units/{u}/max/{e.rank}/grad.png")
                assert r.status_code == 200, r.text
                got = _pixels(r.content).astype(np.int16)
                assert np.abs(got - want.permute(1, 2, 0).numpy()).max() <= 1


def test_unit_images_crop_is_the_peak_box_on_its_frame(video: tuple, tmp_path: Path) -> None:
    """`lurker images` (UnitImages) cuts the same crop as the explorer, from the same
    frame, and writes that frame as the entry's input (the explorer's frames/ file)."""
    model, ds, clips, run, _ = video
    images = UnitImages(run, model=model, dataset=ds)
    for layer in ("conv1", "conv2"):
        for u in range(run.layer(layer).num_units):
            for e in run.unit(layer, u).top("max"):
                _, (t0, t1, y0, y1, x0, x1) = _oracle(model, clips[e.sample_id], layer, u)
                png = Path(images.get("crop", layer, u, e.rank)).read_bytes()
                shown = Path(images.get("input", layer, u, e.rank)).read_bytes()
                [frame] = _which_frame(shown, clips[e.sample_id])
                assert t0 <= frame < t1
                assert _crop_equals(png, clips[e.sample_id], frame, (y0, y1, x0, x1))
    # the probe's images also write (no to_pil error on a clip), the frames among them
    assert images.write_all(layers="conv*", progress=False).total > 0
    assert list((run.path / "cache" / "frames").glob("*.png"))


def test_static_export_shows_a_clip_entry_on_its_frame(video: tuple, tmp_path: Path) -> None:
    """The static site holds each clip entry's frame (the browser cuts its crop from it,
    with the entry's box) and the layer grid's thumbnails name it."""
    from lurker.server import export_site, static_path

    _model, ds, clips, _run, out = video
    static = tmp_path / "static"
    (static / "assets").mkdir(parents=True)
    (static / "index.html").write_text("<!doctype html><html><head></head><body></body></html>")
    site = export_site(out, tmp_path / "site", static_dir=static, dataset=ds, progress=False)
    data = site / "data"
    units = data / static_path("runs/run/layers/conv1/units")
    docs = [json.loads(f.read_text()) for f in sorted(units.glob("chunk-*.json"))]
    entries = [(d, e) for doc in docs for d in doc["units"] for e in d["top"]["max"]]
    assert entries
    for _d, e in entries:
        assert e["frame"] is not None
        frame = data / static_path(f"runs/run/samples/{e['sample_id']}/frames/{e['frame']}.png")
        assert _which_frame(frame.read_bytes(), clips[e["sample_id"]]) == [e["frame"]]
    index = json.loads((units / "index.json").read_text())
    tops = {d["unit"]: d["top"]["max"][0] for doc in docs for d in doc["units"]}
    assert [t["frame"] for t in index["thumbs"]] == [tops[u]["frame"] for u in range(len(tops))]


def test_upload_to_a_video_model_says_why(video: tuple) -> None:
    model, ds, _, _, out = video
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "PNG")
    with TestClient(create_app(out, model_obj=model, dataset=wrap(ds))) as c:
        r = c.post("/api/runs/run/live/images", files={"file": ("a.png", buf.getvalue())})
    assert r.status_code == 409
    assert "video clips (3, 4, 8, 8)" in r.json()["detail"]


def test_unit_page_of_a_3d_layer_names_the_frames_and_boxes_the_frame_shown(browser, video) -> None:
    """A 3-D layer's unit page says its crop is the receptive field, names under each
    image the frame shown and the frames the peak sees (the API's, numbered from 0), and
    draws the peak's box on the entry's input image: the peak's frame (input.png)."""
    from explorer_fixtures import skip_without_browser, strict_page
    from lurker.server.serve import background

    skip_without_browser()
    model, ds, _clips, _run, out = video
    with TestClient(create_app(out, model_obj=model, dataset=wrap(ds))) as c:
        doc = c.get("/api/runs/run/layers/conv1/units/0").json()
    app = create_app(out, model_obj=model, dataset=wrap(ds))
    with background(app) as url, strict_page(browser) as pg:
        pg.goto(url + "#/r/run/unit/conv1/0?tab=max&crop=1")
        pg.wait_for_selector(".topk .top-entry")
        toolbar = pg.inner_text(".toolbar")
        assert "receptive-field crop" in toolbar and "peak's frame" in toolbar
        assert "whole" not in toolbar and "no receptive field" not in toolbar
        pg.goto(url + "#/r/run/unit/conv1/0?tab=max&crop=0")
        pg.wait_for_selector(".topk .top-entry .peak:not([hidden])")
        assert "box: the peak's receptive field, drawn on the clip's frame" in pg.inner_text(
            ".toolbar"
        )
        figures = pg.query_selector_all(".topk .top-entry")
        assert len(figures) == len(doc["top"]["max"])
        for fig, e in zip(figures, doc["top"]["max"]):
            t0, t1 = e["frames"]
            caption = fig.query_selector("figcaption .frames").inner_text()
            assert caption == f"frame {e['frame']} · sees frames {t0}\u2013{t1 - 1} of {D}"
            src = fig.query_selector("img").get_attribute("src")
            assert f"/units/0/max/{e['rank']}/input.png" in src
            y0, y1, x0, x1 = e["box"]
            style = fig.query_selector(".peak").get_attribute("style")
            assert (
                f"top:{100 * y0 / 8:.2f}%" in style
                and f"height:{100 * (y1 - y0) / 8:.2f}%" in style
            )
            assert (
                f"left:{100 * x0 / 8:.2f}%" in style
                and f"width:{100 * (x1 - x0) / 8:.2f}%" in style
            )


def test_static_unit_page_shows_a_clip_entry_on_its_frame(browser, video, tmp_path) -> None:
    """The exported unit page shows a clip entry's frame (not the sample's middle one),
    with its box drawn on it and its crop cut from it, and names the frames it sees."""
    from explorer_fixtures import skip_without_browser, static_server, strict_page
    from lurker.server import export_site

    skip_without_browser()
    model, ds, _clips, _run, out = video
    with TestClient(create_app(out, model_obj=model, dataset=wrap(ds))) as c:
        doc = c.get("/api/runs/run/layers/conv1/units/1").json()
    site = export_site(out, tmp_path / "site", dataset=ds, progress=False)
    with static_server(site) as url, strict_page(browser) as pg:
        pg.goto(url + "#/r/run/unit/conv1/1?tab=max&crop=0")
        pg.wait_for_selector(".topk .top-entry .peak:not([hidden])")
        for fig, e in zip(pg.query_selector_all(".topk .top-entry"), doc["top"]["max"]):
            src = fig.query_selector("img").get_attribute("src")
            assert f"/samples/{e['sample_id']}/frames/{e['frame']}.png" in src
            assert fig.query_selector(".peak") is not None
            t0, t1 = e["frames"]
            assert f"sees frames {t0}\u2013{t1 - 1} of {D}" in fig.inner_text()
        pg.goto(url + "#/r/run/unit/conv1/1?tab=max&crop=1")
        pg.wait_for_selector(".topk .top-entry canvas")
        assert len(pg.query_selector_all(".topk .top-entry canvas")) == len(doc["top"]["max"])


def test_static_gradient_crop_is_cut_from_the_peak_frames_gradient(
    browser, video, tmp_path
) -> None:
    """With the gradients made (``lurker images RUN``'s default), the exported unit page
    cuts a clip entry's gradient crop from its exported gradient (the peak's frame) by the
    entry's box: pixel for pixel the server's ``grad_crop.png``, made with the model."""
    import shutil

    from explorer_fixtures import canvas_pixels, skip_without_browser, static_server, strict_page
    from lurker.server import export_site

    skip_without_browser()
    model, ds, _clips, _run, out = video
    run = tmp_path / "run"
    shutil.copytree(out, run, ignore=shutil.ignore_patterns("cache"))
    UnitImages(run, model, wrap(ds)).write_all(layers=["conv1"], kinds=["grad"], progress=False)
    site = export_site(run, tmp_path / "site", dataset=ds, progress=False)
    assert not list(site.glob("data/**/grad_crop.png"))
    with TestClient(create_app(run, model_obj=model, dataset=wrap(ds))) as c:
        want = [
            _pixels(c.get(f"/api/runs/run/layers/conv1/units/1/max/{rank}/grad_crop.png").content)
            for rank in range(K)
        ]
    with static_server(site) as url, strict_page(browser) as pg:
        pg.goto(url + "#/r/run/unit/conv1/1?tab=max&img=grad&crop=1")
        shots = canvas_pixels(pg, ".top-entry canvas")
    assert len(shots) == K
    for rank, cut in enumerate(shots):
        assert np.array_equal(cut, want[rank]), rank


def test_run_without_clip_fields_shows_the_whole_peak_frame(video, tmp_path) -> None:
    """A run whose clip layer has no receptive field (one probed before they were stored):
    its crop is the whole frame at the peak's place in time, its input that frame, and its
    entries name the frame but no range (nothing made up)."""
    import shutil
    import sqlite3

    model, ds, clips, _run, out = video
    old = tmp_path / "old" / "run"
    shutil.copytree(out, old, ignore=shutil.ignore_patterns("cache"))
    with sqlite3.connect(old / "run.db") as db:
        db.execute("UPDATE layers SET rf = NULL WHERE name = 'conv1'")
    db.close()
    with TestClient(create_app(old, model_obj=model, dataset=wrap(ds))) as c:
        for u in (0, 1):
            peaks = _conv1_peaks(model, clips, u)
            doc = c.get(f"/api/runs/run/layers/conv1/units/{u}").json()
            for e in doc["top"]["max"]:
                f = peaks[e["sample_id"]]
                assert (e["frame"], e["frames"], e["box"]) == (f, None, None)
                base = f"/api/runs/run/layers/conv1/units/{u}/max/{e['rank']}"
                for kind in ("crop", "input"):
                    png = c.get(f"{base}/{kind}.png").content
                    assert _which_frame(png, clips[e["sample_id"]]) == [f]


def _frames_seen(model: torch.nn.Module, layer: str) -> int:
    """Autograd oracle: the most clip frames one output frame of ``layer`` has a non-zero
    gradient on (positive weights, ReLUs as identity: no gradient cancels or vanishes)."""
    import copy

    twin = copy.deepcopy(model)
    with torch.no_grad():
        for m in twin.modules():
            if isinstance(m, torch.nn.Conv3d):
                m.weight.copy_(m.weight.abs() + 0.1)
    x = torch.rand(1, 3, D, 8, 8, requires_grad=True)
    out = twin.conv1(x) if layer == "conv1" else twin.conv2(twin.conv1(x))
    most = 0
    for t in range(out.shape[2]):
        (g,) = torch.autograd.grad(out[0, :, t].sum(), x, retain_graph=True)
        most = max(most, int((g.abs().sum((0, 1, 3, 4)) != 0).sum()))
    return most


def test_layer_page_says_the_frames_a_unit_sees_of_the_clip(browser, video, tmp_path) -> None:
    """The layer page's receptive field names the frames a unit sees of a clip of the
    probed length (conv2's window is 5 frames long, padding counted, on 4-frame clips: it
    sees all 4), the unclipped window only labelled as such; served and exported alike."""
    from explorer_fixtures import skip_without_browser, static_server, strict_page
    from lurker.server import export_site
    from lurker.server.serve import background

    skip_without_browser()
    model, ds, _clips, _run, out = video
    want = {
        "conv1": f"sees up to {_frames_seen(model, 'conv1')} of a clip's {D} frames",
        "conv2": f"sees all {D} frames of a clip (its window unclipped: 5 frames)",
    }
    assert _frames_seen(model, "conv2") == D and _frames_seen(model, "conv1") == 3
    site = export_site(out, tmp_path / "site", dataset=ds, progress=False)
    app = create_app(out, model_obj=model, dataset=wrap(ds))
    with background(app) as served, static_server(site) as static, strict_page(browser) as pg:
        for url in (served, static):
            for layer, text in want.items():
                pg.goto(url + f"#/r/run/layer/{layer}")
                pg.wait_for_selector(".layer-head")
                facts = pg.inner_text(".layer-head")
                assert text in facts, repr(facts[facts.index("receptive field") :][:200])
                assert "over 5 frames" not in facts and "over 3 frames" not in facts


def _without_mean_peaks(out: Path, dest: Path) -> Path:
    """A copy of the run as a lurker before the mean lists kept their peaks wrote it."""
    import shutil

    from explorer_fixtures import forget_mean_peaks

    shutil.copytree(out, dest, ignore=shutil.ignore_patterns("cache"))
    forget_mean_peaks(dest)
    return dest


def test_old_run_mean_entry_is_shown_on_its_peak_frame_not_the_middle(video, tmp_path) -> None:
    """A run that does not record its mean list's peaks: the entry's input image is the
    frame its peak is on, found with the model (a forward hook's argmax), the frame its crop
    is cut from, and the peaks answer names it; without a model the image is the middle
    frame, which the unit page says (it names no frame the run does not know)."""
    model, ds, clips, run, out = video
    old = _without_mean_peaks(out, tmp_path / "old" / "run")
    moved = 0
    with TestClient(create_app(old, model_obj=model, dataset=wrap(ds))) as c:
        for u in range(run.layer("conv1").num_units):
            peaks = _conv1_peaks(model, clips, u)
            doc = c.get(f"/api/runs/run/layers/conv1/units/{u}").json()
            assert all(e["y"] is None and e["frame"] is None for e in doc["top"]["mean"])
            found = c.get(f"/api/runs/run/layers/conv1/units/{u}/mean/peaks").json()
            want = [peaks[e["sample_id"]] for e in doc["top"]["mean"]]
            assert found["frames"] == want
            for e, f in zip(doc["top"]["mean"], want):
                base = f"/api/runs/run/layers/conv1/units/{u}/mean/{e['rank']}"
                shown = c.get(f"{base}/input.png")
                assert shown.status_code == 200, shown.text
                assert _which_frame(shown.content, clips[e["sample_id"]]) == [f]
                moved += f != D // 2
    assert moved  # some peaks away from the middle frame: the test can tell
    with TestClient(create_app(old, dataset=wrap(ds))) as c:  # no model: the middle frame
        r = c.get("/api/runs/run/layers/conv1/units/0/mean/0/input.png")
        e = c.get("/api/runs/run/layers/conv1/units/0").json()["top"]["mean"][0]
        assert _which_frame(r.content, clips[e["sample_id"]]) == [D // 2]
        assert c.get("/api/runs/run/layers/conv1/units/0/mean/peaks").status_code == 409


def test_unit_page_of_an_old_run_names_no_unknown_frame(browser, video, tmp_path) -> None:
    """The unit page's mean list of a run without its peaks: with the model, each entry is
    captioned with the frame the model found (its image's); without, that the frame is not
    recorded and the image is the clip's middle frame."""
    from explorer_fixtures import skip_without_browser, strict_page, watch
    from lurker.server.serve import background

    skip_without_browser()
    model, ds, clips, _run, out = video
    old = _without_mean_peaks(out, tmp_path / "old" / "run")
    peaks = _conv1_peaks(model, clips, 1)
    with TestClient(create_app(old, model_obj=model, dataset=wrap(ds))) as c:
        entries = c.get("/api/runs/run/layers/conv1/units/1").json()["top"]["mean"]
    app = create_app(old, model_obj=model, dataset=wrap(ds))
    with background(app) as url, strict_page(browser) as pg:
        pg.goto(url + "#/r/run/unit/conv1/1?tab=mean&crop=0")
        pg.wait_for_selector(".topk .top-entry figcaption .frames:has-text('found with')")
        captions = [f.inner_text() for f in pg.query_selector_all(".topk .frames")]
        want = [f"frame {peaks[e['sample_id']]} of {D} · found with the model" for e in entries]
        assert captions == want
    ctx, pg, errors = watch(browser)
    with background(create_app(old, dataset=wrap(ds))) as url:  # no model: peaks are a 409
        pg.goto(url + "#/r/run/unit/conv1/1?tab=mean&crop=0")
        pg.wait_for_selector(".topk .top-entry figcaption .frames:has-text('middle')")
        captions = [f.inner_text() for f in pg.query_selector_all(".topk .frames")]
    ctx.close()
    assert all("/mean/peaks" in e or "409 (Conflict)" in e for e in errors), errors
    want = f"peak's frame not recorded · image: middle frame {D // 2} of {D}"
    assert captions == [want] * len(entries)
