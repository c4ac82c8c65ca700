"""The live endpoints: predictions, feature maps and kernels equal the model's own values.

Oracle: the model run directly in the test with PyTorch forward hooks on its modules
(not through lurker's trace), and its parameters read directly.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from explorer_fixtures import (  # noqa: F401
    ExplorerRun,
    explorer_run,
    forget_mean_peaks,
    strict_page,
    summary_rank_behind,
)
from lurker.probe.data import load_dataset, to_pil
from lurker.server import create_app


@pytest.fixture(scope="module")
def client(explorer_run: ExplorerRun) -> TestClient:  # noqa: F811
    app = create_app(explorer_run.path, model_obj=explorer_run.model, upload_limit=200_000)
    with TestClient(app) as c:
        yield c


@pytest.fixture(scope="module")
def digit_png() -> bytes:
    """A test digit, upscaled to 48x48, as PNG bytes (what a user would upload)."""
    ds = load_dataset("digits:test", 48, channels=1)
    buf = io.BytesIO()
    to_pil(ds[11][0]).save(buf, format="PNG")
    return buf.getvalue()


def _input(png: bytes) -> torch.Tensor:
    """The upload as the run's dataset prepares images: grayscale, 16x16, mean 0, std 1."""
    im = Image.open(io.BytesIO(png)).convert("L").resize((16, 16), Image.BILINEAR)
    return torch.from_numpy(np.asarray(im, np.float32) / 255.0)[None, None]


def _hooked(model: torch.nn.Module, x: torch.Tensor, modules: list[str]) -> dict[str, Any]:
    """Inputs and outputs of ``modules`` on ``x``, copied when the hook fires (a later
    in-place ReLU must not change them)."""
    seen: dict[str, Any] = {}
    handles = []
    named = dict(model.named_modules())
    for name in modules:

        def hook(_m: Any, args: tuple, out: torch.Tensor, name: str = name) -> None:
            seen[name] = (args[0].detach().clone(), out.detach().clone())

        handles.append(named[name].register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return seen


def _upload(client: TestClient, data: bytes, name: str = "digit.png") -> Any:
    return client.post("/api/runs/digits/live/images", files={"file": (name, data, "image/png")})


def test_upload_predictions(client: TestClient, digit_png: bytes, explorer_run: ExplorerRun):  # noqa: F811
    r = _upload(client, digit_png)
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["image"]) == 16 and (body["width"], body["height"]) == (48, 48)
    with torch.no_grad():
        probs = torch.softmax(explorer_run.model(_input(digit_png))[0], 0)
    values, idx = probs.topk(5)
    assert [p["class"] for p in body["predictions"]] == idx.tolist()
    assert [p["name"] for p in body["predictions"]] == [str(i) for i in idx.tolist()]
    assert [p["prob"] for p in body["predictions"]] == pytest.approx(values.tolist(), abs=1e-4)
    again = client.get(f"/api/runs/digits/live/{body['image']}").json()
    assert again["predictions"] == body["predictions"]
    # the same bytes give the same id
    assert _upload(client, digit_png).json()["image"] == body["image"]
    png = client.get(f"/api/runs/digits/live/{body['image']}/input.png")
    assert png.status_code == 200 and Image.open(io.BytesIO(png.content)).size == (16, 16)


@pytest.mark.parametrize(
    ("op", "module", "channels"),
    [
        ("conv2d_1", "features.0", 16),  # input: the model's input
        ("conv2d_2", "features.4", 32),  # input: max_pool2d_1's output
        ("conv2d_3", "features.8", 32),  # its output is then changed in place by a ReLU
        ("linear_2", "classifier.3", 1),  # a vector: one 1xN map
    ],
)
def test_feature_maps_equal_the_models(
    client: TestClient,
    digit_png: bytes,
    explorer_run: ExplorerRun,  # noqa: F811
    op: str,
    module: str,
    channels: int,
):
    image = _upload(client, digit_png).json()["image"]
    x = _input(digit_png)
    want_in, want_out = _hooked(explorer_run.model, x, [module])[module]
    info = client.get(f"/api/runs/digits/live/{image}/ops/{op}").json()
    assert info["op"] == op
    assert info["output"]["shape"] == list(want_out.shape)
    assert info["output"]["channels"] == channels
    assert info["input"]["shape"] == list(want_in.shape)
    for side, want in (("input", want_in), ("output", want_out)):
        for c in (0, info[side]["channels"] - 1):
            got = client.get(f"/api/runs/digits/live/{image}/ops/{op}/{side}/{c}.json").json()
            ref = want[0, c].numpy() if want.dim() == 4 else want[0].numpy()[None]
            assert got["shape"] == list(ref.shape)
            assert np.allclose(got["values"], ref, atol=1e-5, rtol=1e-5)
            assert got["min"] == pytest.approx(float(ref.min()), abs=1e-5)
            assert got["max"] == pytest.approx(float(ref.max()), abs=1e-5)
            r = client.get(f"/api/runs/digits/live/{image}/ops/{op}/{side}/{c}.png")
            assert r.status_code == 200 and r.headers["content-type"] == "image/png"
            # made by the attached model: other weights may answer this URL next time
            assert r.headers["cache-control"] == "no-cache"
            pixels = np.asarray(Image.open(io.BytesIO(r.content)))
            lo, hi = float(r.headers["x-lurker-min"]), float(r.headers["x-lurker-max"])
            scale = int(r.headers["x-lurker-scale"])
            assert lo == pytest.approx(float(ref.min()), abs=1e-5)
            assert scale == math.ceil(64 / max(ref.shape))
            a = np.asarray(got["values"], np.float64)  # the server's raw values, as sent
            expect = (
                np.zeros(a.shape, np.uint8)
                if hi == lo
                else np.rint(255 * (a - lo) / (hi - lo)).astype(np.uint8)
            )
            expect = np.repeat(np.repeat(expect, scale, 0), scale, 1)
            assert np.array_equal(pixels, expect)
            # and against the model's own values: within one grey level
            own = np.rint(255 * (ref - ref.min()) / (ref.max() - ref.min() or 1))
            assert np.abs(pixels[::scale, ::scale].astype(int) - own).max() <= 1


def test_kernels_equal_the_weights(client: TestClient, explorer_run: ExplorerRun):  # noqa: F811
    weight = explorer_run.model.features[4].weight.detach()
    info = client.get("/api/runs/digits/live/sample-0/ops/conv2d_2").json()
    assert info["kernel"] == {
        "shape": [32, 16, 3, 3],
        "param": "features.4.weight",
        "groups": 1,
        "transposed": False,
        "in_channels": 16,
        "out_channels": 32,
    }
    for out, inp in ((0, 0), (31, 15), (7, 3)):
        got = client.get(f"/api/runs/digits/live/sample-0/ops/conv2d_2/kernels/{out}/{inp}.json")
        body = got.json()
        assert body["shape"] == [3, 3]
        assert np.allclose(body["values"], weight[out, inp].numpy(), atol=1e-7)
        assert body["min"] == pytest.approx(float(weight[out, inp].min()))
    # the client's JSON paths carry no ".json": the same documents answer there
    base = "/api/runs/digits/live/sample-0/ops/conv2d_2"
    assert client.get(f"{base}/kernels/7/3").json() == client.get(f"{base}/kernels/7/3.json").json()
    assert client.get(f"{base}/input/2").json() == client.get(f"{base}/input/2.json").json()
    r = client.get("/api/runs/digits/live/sample-0/ops/conv2d_2/kernels/32/0.json")
    assert r.status_code == 404 and "[32, 16, 3, 3]" in r.json()["detail"]
    r = client.get("/api/runs/digits/live/sample-0/ops/relu_1/kernels/0/0.json")
    assert r.status_code == 404 and "no convolution kernel" in r.json()["detail"]
    assert client.get("/api/runs/digits/live/sample-0/ops/relu_1").json()["kernel"] is None


def test_dataset_sample_as_live_image(client: TestClient, explorer_run: ExplorerRun):  # noqa: F811
    ds = load_dataset("digits:test", 16, channels=1)
    x = ds[3][0][None]
    body = client.get("/api/runs/digits/live/sample-3").json()
    with torch.no_grad():
        top = torch.softmax(explorer_run.model(x)[0], 0).topk(5)
    assert [p["class"] for p in body["predictions"]] == top.indices.tolist()
    out = _hooked(explorer_run.model, x, ["features.0"])["features.0"][1]
    got = client.get("/api/runs/digits/live/sample-3/ops/features.0/output/5.json").json()
    assert np.allclose(got["values"], out[0, 5].numpy(), atol=1e-5)


def test_live_errors(client: TestClient, digit_png: bytes):
    r = _upload(client, b"this is not an image at all", "notes.txt")
    assert r.status_code == 400 and "not an image" in r.json()["detail"]
    r = _upload(client, digit_png[: len(digit_png) // 2], "cut.png")
    assert r.status_code == 400 and "corrupt or truncated" in r.json()["detail"]
    r = _upload(client, b"", "empty.png")
    assert r.status_code == 400 and "empty" in r.json()["detail"]
    big = b"\x89PNG" + b"0" * 300_000
    r = _upload(client, big, "big.png")
    assert r.status_code == 413 and "limit" in r.json()["detail"]
    r = client.post("/api/runs/digits/live/images")
    assert r.status_code == 422
    r = client.get("/api/runs/digits/live/0123abcd0123abcd/ops/conv2d_1")
    assert r.status_code == 404 and "upload it" in r.json()["detail"]
    r = client.get("/api/runs/digits/live/sample-0/ops/nope")
    assert r.status_code == 404 and "conv2d_1" in r.json()["detail"]
    r = client.get("/api/runs/digits/live/sample-0/ops/conv2d_1/output/16.png")
    assert r.status_code == 404 and "0..15" in r.json()["detail"]
    r = client.get("/api/runs/digits/live/sample-99999/ops/conv2d_1")
    assert r.status_code == 404 and "no sample 99999" in r.json()["detail"]
    r = client.get("/api/runs/digits/live/..%2f..%2frun.db")
    assert r.status_code == 404


def test_a_busy_model_does_not_block_other_requests(
    explorer_run: ExplorerRun,  # noqa: F811
):
    app = create_app(explorer_run.path, model_obj=explorer_run.model)
    with TestClient(app) as c:
        assert c.get("/api/runs/digits/live/sample-1").status_code == 200
        lock = app.state.source.lock  # the model's lock: held as by a long forward
        done: list[int] = []
        with lock:
            t = threading.Thread(
                target=lambda: done.append(c.get("/api/runs/digits/live/sample-2").status_code)
            )
            t.start()
            time.sleep(0.2)
            t0 = time.perf_counter()
            assert c.get("/api/runs/digits").status_code == 200
            assert c.get("/api/runs/digits/layers/features.0").status_code == 200
            assert time.perf_counter() - t0 < 5
            assert not done  # still waiting for the model
        t.join(10)
        assert done == [200]


def test_model_spec_from_the_command_line(explorer_run: ExplorerRun):  # noqa: F811
    app = create_app(
        explorer_run.path, model="lurker.examples:DigitsNet", weights=str(explorer_run.weights)
    )
    with TestClient(app) as c:
        body = c.get("/api/runs/digits/live/sample-4").json()
        x = load_dataset("digits:test", 16, channels=1)[4][0][None]
        with torch.no_grad():
            want = torch.softmax(explorer_run.model(x)[0], 0).topk(5).indices.tolist()
        assert [p["class"] for p in body["predictions"]] == want


def test_requests_waiting_for_the_model_hold_no_worker_thread(
    explorer_run: ExplorerRun,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
):
    """60 slow model requests in flight (more than the 40 worker threads): a run-summary
    request sent after them still answers before all but a few of them."""

    from lurker.server.session import Session

    started = threading.Event()

    def slow(self: Session, x: torch.Tensor, top: int = 5) -> list:
        with self.model_lock:  # as a forward pass holds the model
            started.set()
            time.sleep(0.05)
        return []

    app = create_app(explorer_run.path, model_obj=explorer_run.model)
    monkeypatch.setattr(Session, "predictions", slow)
    url = "/api/runs/digits/live/sample-{}".format
    assert summary_rank_behind(app, lambda i: url(i % 16), started) < 10


def test_live_image_ids_are_validated(client: TestClient, explorer_run: ExplorerRun):  # noqa: F811
    n = 360  # the run's samples: digits:test
    for bad in ("sample-99999999999999999999", f"sample-{n}", "sample-1e3", "sample--1"):
        r = client.get(f"/api/runs/digits/live/{bad}/input.png")
        assert r.status_code == 404, (bad, r.text)
        assert r.headers["content-type"].startswith("application/json")
    r = client.get(f"/api/runs/digits/live/sample-{n}")
    assert r.status_code == 404 and f"0..{n - 1}" in r.json()["detail"]
    for bad in ("٣٤", "ABCDEF0123456789", "abc", "g" * 16, "0123456789abcdef0"):
        r = client.get(f"/api/runs/digits/live/{bad}/input.png")
        assert r.status_code == 404, (bad, r.text)
        assert "16 hex digits" in r.json()["detail"]
    assert client.get(f"/api/runs/digits/live/sample-{n - 1}/input.png").status_code == 200
    r = client.get("/api/runs/digits/live/0123456789abcdef/input.png")
    assert r.status_code == 404 and "upload it" in r.json()["detail"]  # well-formed, not kept


_BOUNDARY = "lurkerboundary"


def _chunked_form(chunks: int, sent: list[int], chunk: int = 65536) -> Any:
    """A multipart upload of ``chunks`` x ``chunk`` bytes made on the fly (no length known
    up front), counting in ``sent`` the chunks taken from it."""
    yield (
        f'--{_BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="big.png"'
        "\r\nContent-Type: image/png\r\n\r\n"
    ).encode() + b"\x89PNG"
    for _ in range(chunks):
        sent[0] += 1
        yield b"0" * chunk
    yield f"\r\n--{_BOUNDARY}--\r\n".encode()


def test_a_chunked_upload_over_the_limit_is_refused_as_it_arrives(
    explorer_run: ExplorerRun,  # noqa: F811
):
    """Through the real server: a 256 MB chunked upload to a 200 KB limit gets 413 after
    about the limit has arrived; the server never takes in the rest."""
    import http.client
    from urllib.parse import urlsplit

    from lurker.server.limits import FORM_SLACK
    from lurker.server.serve import background

    limit, chunk, chunks = 200_000, 65536, 4096
    app = create_app(explorer_run.path, model_obj=explorer_run.model, upload_limit=limit)
    taken = [0]  # body bytes the app read from the server

    async def counting(scope: Any, receive: Any, send: Any) -> None:
        async def counted() -> Any:
            message = await receive()
            if message["type"] == "http.request":
                taken[0] += len(message.get("body", b""))
            return message

        await app(scope, counted, send)

    with background(counting) as url:
        where = urlsplit(url)
        for _ in range(2):  # the connection is closed after a refusal: a second one works too
            sent, taken[0] = [0], 0
            conn = http.client.HTTPConnection(where.hostname, where.port, timeout=60)
            # the server closes the connection while the client is still sending
            with contextlib.suppress(OSError):
                conn.request(
                    "POST",
                    "/api/runs/digits/live/images",
                    body=_chunked_form(chunks, sent, chunk),
                    headers={"Content-Type": f"multipart/form-data; boundary={_BOUNDARY}"},
                    encode_chunked=True,
                )
            r = conn.getresponse()
            body = json.loads(r.read())
            conn.close()
            assert r.status == 413, body
            assert "limit of 195 KB" in body["detail"] and "smaller image" in body["detail"]
            assert r.getheader("connection") == "close"
            # the server read at most the limit, the form's framing and one read more...
            assert limit < taken[0] <= limit + FORM_SLACK + 4 * chunk, taken[0]
            # ...and the client could not send more than socket buffers hold past that
            assert sent[0] < chunks // 8, sent[0]


def test_the_upload_limit_reads_no_more_than_one_chunk_past_it(
    explorer_run: ExplorerRun,  # noqa: F811
):
    """At the ASGI level: an endless chunked body is read up to the limit plus one chunk,
    then answered with 413 (nothing from the app after that)."""
    import asyncio
    import concurrent.futures

    from lurker.server.limits import FORM_SLACK

    limit, chunk = 200_000, 10_000
    app = create_app(explorer_run.path, model_obj=explorer_run.model, upload_limit=limit)
    reads = [0]
    sent: list[dict] = []

    async def receive() -> dict:
        reads[0] += 1
        if reads[0] > 10_000:
            raise AssertionError("the whole endless body was read")
        if reads[0] == 1:  # the form's framing, then the file's bytes without end
            return {"type": "http.request", "body": next(_chunked_form(0, [0])), "more_body": True}
        return {"type": "http.request", "body": b"0" * chunk, "more_body": True}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/api/runs/digits/live/images",
        "raw_path": b"/api/runs/digits/live/images",
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"t"),
            (b"content-type", f"multipart/form-data; boundary={_BOUNDARY}".encode()),
            (b"transfer-encoding", b"chunked"),
        ],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # see the waiting-requests test
        pool.submit(asyncio.run, app(scope, receive, send)).result()
    assert reads[0] == 1 + (limit + FORM_SLACK) // chunk + 1, sent
    starts = [m for m in sent if m["type"] == "http.response.start"]
    assert [m["status"] for m in starts] == [413]
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    assert "over the limit" in json.loads(body)["detail"]


class _ChannelsLast(torch.nn.Module):
    """A conv stem, then a linear layer on channels-last maps ``(B, H, W, C)``, as Swin
    and ConvNeXt run theirs."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 4, stride=4)
        self.mix = torch.nn.Linear(8, 6)
        self.head = torch.nn.Linear(6, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.mix(self.stem(x).permute(0, 2, 3, 1))
        return self.head(f.mean((1, 2)))


def _live_client(model: torch.nn.Module, tmp_path: Any) -> Any:
    """A probed run of ``model`` on 16 px digits (3 channels), served with the model."""
    from lurker.probe import probe

    data = load_dataset("digits:test", 16, channels=3)
    out = tmp_path / "runs" / "r"
    probe(model, data, out=out, k=2, progress=False, meta={"data": "digits:test"}).close()
    return TestClient(create_app(out, model_obj=model))


def _unit_map(client: TestClient, op: str, side: str, unit: int) -> np.ndarray:
    got = client.get(f"/api/runs/r/live/sample-3/ops/{op}/{side}/{unit}.json")
    assert got.status_code == 200, got.text
    return np.asarray(got.json()["values"], np.float64)


def test_live_maps_are_per_unit_on_every_layout(tmp_path: Any):
    """A ViT's tokens and a channels-last linear layer: one map per unit (not per token
    or per row), each unit's tokens placed on their patch grid and the class token's
    value at every unit beside them; an op whose unit axis lurker cannot tell says so.
    Oracle: forward hooks and the in-projection by hand."""
    from torchvision.models import VisionTransformer

    import lurker

    torch.manual_seed(0)
    vit = VisionTransformer(
        image_size=16, patch_size=4, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32,
        num_classes=10,
    ).eval()  # fmt: skip
    x = load_dataset("digits:test", 16, channels=3)[3][0][None]
    block = "encoder.layers.encoder_layer_0"
    seen = _hooked(vit, x, [block, f"{block}.ln_1"])
    tokens = seen[block][1][0]  # (17, 16): the class token, then 4x4 patches row by row
    # the attention's in-projection, seq-first (17, 1, 48) inside nn.MultiheadAttention
    attn = vit.encoder.layers[0].self_attention
    qkv = seen[f"{block}.ln_1"][1][0] @ attn.in_proj_weight.detach().T + attn.in_proj_bias
    tr = lurker.trace(vit, x)
    in_proj = next(
        o for o in tr.ops if o.name == "linear" and o.module == f"{block}.self_attention"
    )
    sdpa = next(o for o in tr.ops if o.name == "scaled_dot_product_attention")
    with _live_client(vit, tmp_path / "vit") as client:
        info = client.get(f"/api/runs/r/live/sample-3/ops/{block}").json()
        out = info["output"]
        assert (out["shape"], out["channels"], out["map_shape"]) == ([1, 17, 16], 16, [4, 4])
        assert out["unit_axis"] == 2 and "4x4 grid of image patches" in out["note"]
        assert "token 0" in out["note"]
        for unit in (0, 7, 15):
            want = tokens[1:, unit].reshape(4, 4).numpy()
            assert np.allclose(_unit_map(client, block, "output", unit), want, atol=1e-5)
        # the class token, left out of the maps, is shown apart: its value at every unit
        (cls,) = out["patchless"]
        assert cls["token"] == 0 and len(cls["values"]) == 16
        assert np.allclose(cls["values"], tokens[0].numpy(), atol=1e-5)
        info = client.get(f"/api/runs/r/live/sample-3/ops/{in_proj.label}").json()
        assert info["output"]["shape"] == [17, 1, 48] and info["output"]["channels"] == 48
        (cls,) = info["output"]["patchless"]  # seq-first: still token 0, per unit
        assert cls["token"] == 0
        assert np.allclose(cls["values"], qkv[0].detach().numpy(), atol=1e-5)
        for unit in (0, 47):
            want = qkv[1:, unit].reshape(4, 4).detach().numpy()
            got = _unit_map(client, in_proj.label, "output", unit)
            assert np.allclose(got, want, atol=1e-5)
        info = client.get(f"/api/runs/r/live/sample-3/ops/{sdpa.label}").json()
        assert info["output"]["unit_axis"] is None
        assert "Shown as stored" in info["output"]["note"]
        assert info["output"]["patchless"] == []
        # the mean list's peaks (where its crops are cut), found with the model: each is
        # its sample's first maximum over the 17 tokens of the probed MLP activation (the
        # class token included, the probe's mean is over all of them)
        data = load_dataset("digits:test", 16, channels=3)
        gelu = f"{block}.mlp.1"
        for unit in range(32):
            top = client.get(f"/api/runs/r/layers/{gelu}/units/{unit}").json()["top"]["mean"]
            got = client.get(f"/api/runs/r/layers/{gelu}/units/{unit}/mean/peaks").json()
            xs = torch.stack([data[e["sample_id"]][0] for e in top])
            want = _hooked(vit, xs, [gelu])[gelu][1][:, :, unit].argmax(1)
            assert got == {"which": "mean", "peaks": [[0, int(t)] for t in want], "frames": None}

    torch.manual_seed(0)
    model = _ChannelsLast().eval()
    mixed = _hooked(model, x, ["mix"])["mix"][1][0]  # (4, 4, 6)
    with _live_client(model, tmp_path / "cl") as client:
        info = client.get("/api/runs/r/live/sample-3/ops/mix").json()
        out = info["output"]
        assert (out["shape"], out["channels"], out["map_shape"]) == ([1, 4, 4, 6], 6, [4, 4])
        assert out["unit_axis"] == 3 and out["note"] is None
        for unit in (0, 5):
            got = _unit_map(client, "mix", "output", unit)
            assert np.allclose(got, mixed[:, :, unit].numpy(), atol=1e-5)


def test_mean_list_peaks_and_crops_need_no_model(tmp_path: Any):
    """A ViT run served without its model: the mean list's peaks are the stored ones (the
    oracle: a forward hook over the dataset, each sample's first maximum over its 17 tokens),
    and its crops are cut from the dataset alone (a class-token peak's crop is the whole
    image). A run of an older lurker (mean-list y/x -1) still opens and asks the model for
    them, which a server without one refuses with a reason."""
    from torchvision.models import VisionTransformer

    from lurker.probe import probe
    from lurker.probe.images import crop

    torch.manual_seed(0)
    vit = VisionTransformer(
        image_size=16, patch_size=4, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32,
        num_classes=10,
    ).eval()  # fmt: skip
    data = load_dataset("digits:test", 16, channels=3)
    out = tmp_path / "runs" / "r"
    block = "encoder.layers.encoder_layer_0"  # its output: class-token peaks are common
    run = probe(
        vit, data, out=out, k=3, layers=[block], progress=False, meta={"data": "digits:test"}
    )
    run.close()
    xs = torch.stack([data[i][0] for i in range(len(data))])
    peak = _hooked(vit, xs, [block])[block][1].argmax(1)  # (N, units): first maximal token
    client = TestClient(create_app(out, live=False))
    cls_seen = 0
    for unit in range(16):
        top = client.get(f"/api/runs/r/layers/{block}/units/{unit}").json()["top"]["mean"]
        want = [[0, int(peak[e["sample_id"], unit])] for e in top]
        assert [[e["y"], e["x"]] for e in top] == want, unit
        got = client.get(f"/api/runs/r/layers/{block}/units/{unit}/mean/peaks")
        assert got.status_code == 200, got.text
        assert got.json() == {"which": "mean", "peaks": want, "frames": None}
        for e, (_, token) in zip(top, want):
            i, j = divmod(token - 1, 4)  # patch tokens row by row after the class token
            box = None if token == 0 else [4 * i, 4 * i + 4, 4 * j, 4 * j + 4]
            assert e["box"] == box, (unit, e)
            cls_seen += token == 0
        # the crop of the first entry peaking at the class token, else of rank 0
        rank = next((r for r, (_, t) in enumerate(want) if t == 0), 0)
        e = top[rank]
        got = client.get(f"/api/runs/r/layers/{block}/units/{unit}/mean/{rank}/crop.png")
        assert got.status_code == 200, got.text
        sample = client.get(f"/api/runs/r/samples/{e['sample_id']}/image.png").content
        with Image.open(io.BytesIO(sample)) as im, Image.open(io.BytesIO(got.content)) as made:
            want_crop = crop(im.convert("RGB"), e["box"] or (0, 16, 0, 16))
            assert np.array_equal(np.asarray(made), np.asarray(want_crop)), (unit, rank)
    assert cls_seen  # some samples peak at the class token: their crops are whole images

    forget_mean_peaks(out)
    client = TestClient(create_app(out, live=False))
    top = client.get(f"/api/runs/r/layers/{block}/units/0").json()["top"]["mean"]
    assert top and all(e["y"] is None and e["box"] is None for e in top)
    got = client.get(f"/api/runs/r/layers/{block}/units/0/mean/peaks")
    assert got.status_code in (404, 409) and "model" in got.json()["detail"], got.text
    # with the model, the old run's peaks are found by running it, as before
    with TestClient(create_app(out, model_obj=vit)) as client:
        got = client.get(f"/api/runs/r/layers/{block}/units/0/mean/peaks").json()
        assert got["peaks"] == [[0, int(peak[e["sample_id"], 0])] for e in top]


def test_explain_page_of_a_vit_run_offers_its_blocks(tmp_path: Any):
    """On a ViT run the Explain page's layers (Grad-CAM, concept relevance) are the layers
    whose units make maps, blocks of patch tokens included (not only the patch embedding),
    and Grad-CAM and concept relevance at a block answer: the Grad-CAM map is the token
    grid's, 4x4 for 16 px and 4 px patches, equal to the library's."""
    from torchvision.models import VisionTransformer

    import lurker

    torch.manual_seed(0)
    vit = VisionTransformer(16, 4, 1, 2, 16, 32, num_classes=10).eval()
    torch.nn.init.normal_(vit.heads.head.weight)  # torchvision starts it at zero: no signal
    with _live_client(vit, tmp_path) as client:
        doc = client.get("/api/runs/r/explain/methods").json()
        runs_layers = client.get("/api/runs/r").json()["layers"]
        assert doc["layers"] == [layer["name"] for layer in runs_layers]  # all make maps
        # concept relevance by default before the last attention: after it, the patch
        # tokens no longer reach the class token the head reads (their relevance is zero);
        # Grad-CAM by default where lurker.explain puts it (the last block's first norm)
        assert doc["concept_layer"] == "conv_proj" and doc["default_layer"] is None
        r = client.get("/api/runs/r/live/sample-3/explain/gradcam?target=3")
        assert r.status_code == 200 and r.json()["max"] > 0, r.text
        assert r.json()["layer_module"] == "encoder.layers.encoder_layer_0.ln_1"
        block = doc["layers"][-1]
        assert block.startswith("encoder.layers.encoder_layer_0")
        r = client.get(f"/api/runs/r/live/sample-3/explain/gradcam?target=3&layer={block}")
        assert r.status_code == 200, r.text
        x = load_dataset("digits:test", 16, channels=3)[3][0][None]
        want = lurker.explain(vit, x, target=3, method="gradcam", layer=block)
        assert r.json()["max"] == pytest.approx(float(want.attribution.max()), rel=1e-5)
        r = client.get(f"/api/runs/r/live/sample-3/explain/concepts?target=3&layer={block}&top=4")
        assert r.status_code == 200, r.text
        ranked = r.json()
        assert len(ranked["units"]) == 4
        # the layer's units (its 32 hidden features, the last axis), by the library's ranking
        c = lurker.explain.concepts(vit, x, target=3, layer=_module_of(client, block), top=4)
        assert [u["unit"] for u in ranked["units"]] == c.units[0].tolist()
        assert ranked["units"][0]["relevance"] == pytest.approx(
            float(c.unit_relevance[0, 0]), rel=1e-4
        )


def _module_of(client: TestClient, layer: str) -> str:
    info = next(x for x in client.get("/api/runs/r").json()["layers"] if x["name"] == layer)
    return info["module"] or info["op"]


class _SecondOutput(torch.nn.Module):
    """An op fed by the second output of a chunk, on channels-last maps."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 4, stride=4)
        self.head = torch.nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.stem(x).permute(0, 2, 3, 1).chunk(2, -1)
        return self.head((b * a).mean((1, 2)))


def test_live_maps_of_a_second_output_say_they_are_shown_as_stored(tmp_path: Any):
    """lurker finds the layout of an op's first output only: a map of a second output is
    shown as stored and says so, never labelled as units."""
    torch.manual_seed(0)
    with _live_client(_SecondOutput().eval(), tmp_path) as client:
        info = client.get("/api/runs/r/live/sample-3/ops/mul_1").json()
        assert info["input"]["unit_axis"] is None
        assert "output 1 of chunk_1" in info["input"]["note"]
        assert info["output"]["unit_axis"] == 3 and info["output"]["note"] is None


def test_the_explorer_explains_the_probes_unit(tmp_path: Any):
    """A layer probed with unit_dim (here a ViT block's tokens as its units): the explorer's
    unit LAYER:3 is the run's unit 3 (token 3), as the library's UnitTarget with that axis
    explains it, not feature 3."""
    from torchvision.models import VisionTransformer

    import lurker
    from lurker.probe import probe

    torch.manual_seed(0)
    vit = VisionTransformer(16, 4, 1, 2, 16, 32, num_classes=10).eval()
    block = "encoder.layers.encoder_layer_0"
    data = load_dataset("digits:test", 16, channels=3)
    out = tmp_path / "runs" / "r"
    meta = {"data": "digits:test"}
    probe(
        vit, data, out=out, layers=[block], unit_dim={block: 1}, k=2, progress=False, meta=meta
    ).close()
    x = data[3][0][None]
    token = lurker.explain(vit, x, lurker.explain.UnitTarget(block, 3, unit_dim=1), "saliency")
    feature = lurker.explain(vit, x, (block, 3), "saliency")
    token, feature = token.heatmap(0), feature.heatmap(0)  # what the server keeps
    assert not torch.allclose(token, feature)
    with TestClient(create_app(out, model_obj=vit)) as client:
        r = client.get(f"/api/runs/r/live/sample-3/explain/saliency?target={block}:3")
        assert r.status_code == 200, r.text
        assert r.json()["max"] == pytest.approx(float(token.max()), rel=1e-5)
        assert r.json()["sum"] == pytest.approx(float(token.sum()), rel=1e-4)


class _Grouped(torch.nn.Module):
    """Grouped, depthwise and grouped transposed convolutions with non-square kernels, one
    called as ``F.conv2d(x, w, groups=3)`` on a parameter not named ``weight``; then a
    1x1 convolution on the pooled ``(1, 6, 1, 1)`` features (as a squeeze-and-excitation
    block has) and a linear head, its logits a vector."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.grouped = torch.nn.Conv2d(8, 12, (3, 1), padding=(1, 0), groups=2)  # [12, 4, 3, 1]
        self.depthwise = torch.nn.Conv2d(12, 12, 3, padding=1, groups=12)  # [12, 1, 3, 3]
        self.up = torch.nn.ConvTranspose2d(12, 6, (2, 3), stride=2, groups=3)  # [12, 2, 2, 3]
        self.mix = torch.nn.Parameter(torch.randn(6, 2, 1, 3))  # groups=3: in 6, out 6
        self.squeeze = torch.nn.Conv2d(6, 5, 1)  # on 1x1 maps: a vector in, a vector out
        self.head = torch.nn.Linear(5, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.up(torch.relu(self.depthwise(self.grouped(self.stem(x)))))
        x = torch.nn.functional.conv2d(x, self.mix, padding=(0, 1), groups=3)
        return self.head(self.squeeze(x.mean((2, 3), keepdim=True)).flatten(1))


def _conv_oracle(f: Any, cin: int, k: tuple[int, int], pad: tuple[int, int]) -> np.ndarray:
    """``(out, in, kh, kw)``: for every pair, how input map ``in`` feeds output map
    ``out`` of the (stride 1) convolution ``f``: the gradient of output ``out``'s centre
    value with respect to input map ``in`` (autograd), cut to the window the centre sees;
    all zero where the input does not feed the output. The rest of each gradient is
    checked to be zero."""
    x = torch.zeros(1, cin, 9, 9, requires_grad=True)
    y = f(x)
    cy, cx = y.shape[2] // 2, y.shape[3] // 2
    out = np.zeros((y.shape[1], cin, *k))
    for o in range(y.shape[1]):
        (g,) = torch.autograd.grad(y[0, o, cy, cx], x, retain_graph=True)
        g = g[0].double()
        win = g[:, cy - pad[0] : cy - pad[0] + k[0], cx - pad[1] : cx - pad[1] + k[1]]
        assert torch.equal(win.abs().sum((1, 2)), g.abs().sum((1, 2)))  # nothing outside
        out[o] = win.numpy()
    return out


def _transposed_oracle(f: Any, cin: int, k: tuple[int, int], stride: int) -> np.ndarray:
    """``(out, in, kh, kw)`` for a transposed convolution ``f`` (no padding): the
    response of output map ``out`` to a unit impulse at (2, 2) of input map ``in`` (less
    the response to zeros: the bias), cut to where the impulse lands."""
    with torch.no_grad():
        zero = f(torch.zeros(1, cin, 5, 5))
        out = np.zeros((zero.shape[1], cin, *k))
        for i in range(cin):
            x = torch.zeros(1, cin, 5, 5)
            x[0, i, 2, 2] = 1.0
            y = (f(x) - zero)[0].double()
            win = y[:, 2 * stride : 2 * stride + k[0], 2 * stride : 2 * stride + k[1]]
            assert torch.allclose(win.abs().sum((1, 2)), y.abs().sum((1, 2)))
            out[:, i] = win.numpy()
    return out


def _grouped_cases(model: _Grouped) -> dict[str, tuple[np.ndarray, str, int, bool]]:
    """Per convolution op of ``_Grouped``: (its oracle kernels ``(out, in, kh, kw)``, its
    weight's name, groups, transposed)."""
    mix = lambda x: torch.nn.functional.conv2d(x, model.mix, padding=(0, 1), groups=3)  # noqa: E731
    return {
        "conv2d_2": (_conv_oracle(model.grouped, 8, (3, 1), (1, 0)), "grouped.weight", 2, False),
        "conv2d_3": (_conv_oracle(model.depthwise, 12, (3, 3), (1, 1)), "depthwise.weight", 12, False),
        "conv_transpose2d_1": (_transposed_oracle(model.up, 12, (2, 3), 2), "up.weight", 3, True),
        "conv2d_4": (_conv_oracle(mix, 6, (1, 3), (0, 1)), "mix", 3, False),
        "conv2d_5": (_conv_oracle(model.squeeze, 6, (1, 1), (0, 0)), "squeeze.weight", 1, False),
    }  # fmt: skip


def _fed_by(connected: np.ndarray) -> str:
    """The inputs an output's row of ``connected`` marks, as the server names them."""
    idx = np.flatnonzero(connected)
    assert len(idx) and np.array_equal(idx, np.arange(idx[0], idx[-1] + 1))  # contiguous
    if len(idx) == 1:
        return f"is fed by input {idx[0]} only"
    return f"is fed by inputs {idx[0]}..{idx[-1]} only"


def test_grouped_and_transposed_kernels_are_what_connects_the_maps(tmp_path: Any):
    """For every (output, input) map pair of grouped, depthwise, grouped transposed and
    keyword-grouped convolutions, the kernel endpoint answers the weights through which
    that input feeds that output, equal to the gradient (impulse response, transposed)
    the model computes; a pair that is not connected gets a 404 naming the inputs that
    feed the output. Oracle: autograd on the modules themselves, not lurker's weights."""
    torch.manual_seed(0)
    model = _Grouped().eval()
    cases = _grouped_cases(model)
    with _live_client(model, tmp_path) as client:
        base = "/api/runs/r/live/sample-3/ops"
        # output 10 of 8 -> 12 in 2 groups is fed by inputs 4..7, through weight[10, i - 4]:
        # weight[10, 1] is input 5's kernel, not input 1's
        assert client.get(f"{base}/conv2d_2/kernels/10/1.json").status_code == 404
        got = client.get(f"{base}/conv2d_2/kernels/10/5.json").json()["values"]
        assert np.allclose(got, cases["conv2d_2"][0][10, 5], atol=1e-6)
        for op, (want, param, groups, transposed) in cases.items():
            n_out, n_in = want.shape[:2]
            connected = np.abs(want).sum((2, 3)) > 0
            for o in range(n_out):
                for i in range(n_in):
                    r = client.get(f"{base}/{op}/kernels/{o}/{i}.json")
                    if connected[o, i]:
                        assert r.status_code == 200, (op, o, i, r.text)
                        body = r.json()
                        assert body["shape"] == list(want.shape[2:]), (op, o, i)
                        assert np.allclose(body["values"], want[o, i], atol=1e-6), (op, o, i)
                    else:
                        assert r.status_code == 404, (op, o, i, r.text)
                        detail = r.json()["detail"]
                        assert f"input {i} does not feed output {o}" in detail, detail
                        assert f"with {groups} groups" in detail and _fed_by(connected[o]) in detail
            assert (body["param"], body["groups"], body["transposed"]) == (
                param,
                groups,
                transposed,
            )
            info = client.get(f"{base}/{op}").json()
            assert info["kernel"] == {
                "shape": list(dict(model.named_parameters())[param].shape),
                "param": param,
                "groups": groups,
                "transposed": transposed,
                "in_channels": n_in,
                "out_channels": n_out,
            }, op
            if op == "conv2d_5":  # 1x1 maps: each side one vector of values
                sides = (info["input"]["map_shape"], info["output"]["map_shape"])
                assert sides == ([1, n_in], [1, n_out])
            else:
                assert (info["input"]["channels"], info["output"]["channels"]) == (n_in, n_out)
            r = client.get(f"{base}/{op}/kernels/{n_out}/0.json")
            assert r.status_code == 404 and f"0..{n_out - 1}" in r.json()["detail"]
        # not convolutions: no kernel, however their parameters are shaped
        for op in ("relu_1", "linear_1", "mean_1"):
            assert client.get(f"{base}/{op}").json()["kernel"] is None
            r = client.get(f"{base}/{op}/kernels/0/0.json")
            assert r.status_code == 404 and "no convolution kernel" in r.json()["detail"]


def test_live_input_output_and_vector_notes(tmp_path: Any):
    """The model's input node is an op of the live view (its maps: the image's channels),
    the output node's input is its producer's output, and the note of a vector shown as
    stored says what is shown (one map of its values) and names no option the page lacks."""

    class Sliced(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = torch.nn.Conv2d(3, 8, 4, stride=4)
            self.head = torch.nn.Linear(16, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            tokens = self.stem(x).flatten(2).transpose(1, 2)  # (B, 16, 8)
            return self.head(tokens.reshape(len(x), 128)[:, :16])

    torch.manual_seed(0)
    model = Sliced().eval()
    x = load_dataset("digits:test", 16, channels=3)[3][0][None]
    with torch.no_grad():
        logits = model(x)[0].numpy()
    with _live_client(model, tmp_path) as client:
        base = "/api/runs/r/live/sample-3/ops"
        info = client.get(f"{base}/input_1").json()
        assert info["kind"] == "input" and info["input"] is None
        assert (info["output"]["shape"], info["output"]["channels"]) == ([1, 3, 16, 16], 3)
        for c in range(3):
            assert np.allclose(_unit_map(client, "input_1", "output", c), x[0, c], atol=1e-6)
        info = client.get(f"{base}/output_1").json()
        assert info["kind"] == "output" and info["input_op"] == "linear_1"
        for side in ("input", "output"):
            assert info[side]["shape"] == [1, 10] and info[side]["channels"] == 1
            assert np.allclose(_unit_map(client, "output_1", side, 0), logits[None], atol=1e-5)
        info = client.get(f"{base}/getitem_1").json()
        out = info["output"]
        assert (out["shape"], out["channels"], out["map_shape"]) == ([1, 16], 1, [1, 16])
        assert out["unit_axis"] is None
        assert "its 16 values in order, one vector (a single 1x16 map)" in out["note"], out["note"]
        assert "map per index" not in out["note"] and "unit-dim" not in out["note"]
        assert "unit_dim" not in out["note"]


def test_live_maps_of_one_value_are_vectors(tmp_path: Any):
    """A global pool's ``(1, C, 1, 1)`` output and a 1x1 convolution on it are read as one
    vector of C values (each map is scaled to its own range: C maps of one value would be
    C flat squares that show nothing), whether the probe's layout is known or not, and a
    layout lurker cannot tell keeps its reason in the note. Oracle: forward hooks."""
    from lurker.probe.layout import Skip
    from lurker.server.session import as_maps

    torch.manual_seed(0)
    model = _Grouped().eval()
    x = load_dataset("digits:test", 16, channels=3)[3][0][None]
    pooled, squeezed = _hooked(model, x, ["squeeze"])["squeeze"]
    with _live_client(model, tmp_path) as client:
        base = "/api/runs/r/live/sample-3/ops"
        for op, side, want in (
            ("mean_1", "output", pooled),
            ("conv2d_5", "input", pooled),
            ("conv2d_5", "output", squeezed),
        ):
            got = client.get(f"{base}/{op}").json()[side]
            n = want.shape[1]
            assert (got["channels"], got["map_shape"], got["unit_axis"]) == (1, [1, n], None)
            assert got["one_value_maps"] is True  # position i is channel i: pickable
            assert f"its {n} maps have one position each (1x1)" in got["note"], got["note"]
            assert np.allclose(_unit_map(client, op, side, 0), want.reshape(1, n), atol=1e-6)
    # read as stored (no layout), and with a layout lurker cannot tell
    t = torch.randn(1, 7, 1, 1)
    for v, layout in ((t, None), (t[..., 0], None), (t, Skip("its unit axis is unknown"))):
        maps = as_maps(v, layout)
        assert maps.maps.shape == (1, 1, 7) and maps.unit_axis is None
        assert torch.equal(maps.maps.reshape(7), t.reshape(7))
        assert "its 7 maps have one position each (" in maps.note
    assert maps.note.startswith("Its unit axis is unknown. Shown as stored: its 7 maps"), maps.note
    one = as_maps(torch.randn(1, 1, 1, 1))  # a single value stays a single 1x1 map
    assert one.maps.shape == (1, 1, 1) and one.note is None
    # one map of 16 positions is also one row, but its positions are no channels
    row = as_maps(torch.randn(1, 1, 1, 16))
    assert row.maps.shape == (1, 1, 16) and not row.one_value_maps
    assert maps.one_value_maps and not as_maps(torch.randn(1, 10)).one_value_maps


# --- the live page in a real browser (Debian's chromium, as tests/test_explorer_browser.py)


@pytest.fixture(scope="module")
def grouped_site(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A probed run of ``_Grouped`` served with its model by uvicorn in a thread."""
    from lurker.probe import probe
    from lurker.server.serve import background

    static = Path(__file__).resolve().parents[1] / "src" / "lurker" / "server" / "static"
    if not (static / "index.html").exists():
        pytest.skip(f"the explorer's front end is not built ({static}): run `make web`")
    pytest.importorskip("uvicorn")
    torch.manual_seed(0)
    model = _Grouped().eval()
    out = tmp_path_factory.mktemp("grouped") / "runs" / "r"
    data = load_dataset("digits:test", 16, channels=3)
    probe(model, data, out=out, k=2, progress=False, meta={"data": "digits:test"}).close()
    with background(create_app(out, model_obj=model)) as url:
        yield {"url": url, "model": model, "x": data[3][0][None]}


@pytest.fixture
def page(browser: Any) -> Any:
    """A 1280x900 page that fails the test on any console error, uncaught exception or
    HTTP error answer."""
    with strict_page(browser) as pg:
        yield pg


def _open_op(page: Any, site: dict[str, Any], op: str) -> None:
    page.goto(f"{site['url']}#/r/r/live?image=sample-3&op={op}")
    page.wait_for_selector(f'.live-maps h2 code:text-is("{op}")')


def _kernel_shown(page: Any, out: int, inp: int) -> tuple[np.ndarray, str]:
    fig = page.locator(f'.kernel[data-out="{out}"][data-in="{inp}"]')
    fig.locator("td").first.wait_for()
    cells = fig.locator("td").all()
    values = np.array([float(c.get_attribute("data-value")) for c in cells])
    return values, fig.locator("figcaption").inner_text()


def test_live_page_grouped_kernels(page: Any, grouped_site: dict[str, Any]) -> None:
    """Choosing an output map of a grouped convolution marks the inputs that feed it;
    an input that does not is said so (no request, no broken box); a connected pair shows
    the kernel that connects them (oracle: autograd on the model's modules); a depthwise
    output picks its one input; a transposed convolution's pair reads ``weight[in, out]``."""
    want = {op: w for op, (w, *_rest) in _grouped_cases(grouped_site["model"]).items()}
    fmap = '.fmaps[data-side="{}"] .fmap[data-channel="{}"]'.format
    _open_op(page, grouped_site, "conv2d_2")  # 8 -> 12 in 2 groups: output 10 <- inputs 4..7
    page.locator(fmap("output", 10)).click()
    page.wait_for_selector(".kernel-feeds")
    assert "output 10 is fed by inputs 4\u20137 only" in page.locator(".kernel-feeds").inner_text()
    linked = [page.locator(fmap("input", c)).get_attribute("data-linked") for c in range(8)]
    assert linked == ["0"] * 4 + ["1"] * 4
    page.locator(fmap("input", 1)).click()
    msg = page.locator(".kernel-box .notice").inner_text()
    assert "Input 1 does not feed output 10" in msg and "inputs 4\u20137" in msg
    assert page.locator(".kernel td").count() == 0
    page.locator(fmap("input", 5)).click()
    values, caption = _kernel_shown(page, 10, 5)
    np.testing.assert_allclose(values, want["conv2d_2"][10, 5].ravel(), atol=1e-6)
    assert "grouped.weight[10, 1]" in caption

    _open_op(page, grouped_site, "conv2d_3")  # depthwise: output 5 <- input 5 alone
    page.locator(fmap("output", 5)).click()
    values, caption = _kernel_shown(page, 5, 5)
    np.testing.assert_allclose(values, want["conv2d_3"][5, 5].ravel(), atol=1e-6)
    assert "depthwise.weight[5, 0]" in caption
    assert "sel" in (page.locator(fmap("input", 5)).get_attribute("class") or "")

    _open_op(page, grouped_site, "conv_transpose2d_1")  # 12 -> 6 in 3 groups
    page.locator(fmap("input", 7)).click()
    page.locator(fmap("output", 3)).click()
    values, caption = _kernel_shown(page, 3, 7)
    np.testing.assert_allclose(values, want["conv_transpose2d_1"][3, 7].ravel(), atol=1e-6)
    assert "up.weight[7, 1]" in caption and "transposed" in caption


def test_live_page_vectors_and_nodes(page: Any, grouped_site: dict[str, Any]) -> None:
    """A Linear's input and logits are shown as vectors (their range, every value by
    index with hover, the highest values with their indices), with no kernel boxes; the
    output node shows its producer's output; the model's input is in the op list."""
    model, x = grouped_site["model"], grouped_site["x"]
    seen = _hooked(model, x, ["head"])["head"]
    feats, logits = seen[0][0].numpy(), seen[1][0].numpy()
    _open_op(page, grouped_site, "linear_1")
    for side, v in (("input", feats), ("output", logits)):
        view = page.locator(f'.vector-view[data-side="{side}"]')
        view.locator("svg.vector-strip").wait_for()
        assert view.locator("svg.vector-strip").get_attribute("data-n") == str(len(v))
        assert view.locator("svg.vector-strip .bars rect").count() == len(v)
        rng = view.locator(".vec-range").inner_text()
        assert f"max {_fmt(v.max())} at index {int(v.argmax())}" in rng, rng
        assert f"min {_fmt(v.min())} at index {int(v.argmin())}" in rng, rng
        top = view.locator("svg.bars-h text.label").evaluate_all(
            "els => els.map(e => e.firstChild.nodeValue)"  # the label, not its <title>
        )
        order = np.argsort(-v, kind="stable")[:10]
        assert top == [f"index {i}" for i in order]
        shown = [float(t) for t in view.locator("svg.bars-h text.value").all_text_contents()]
        np.testing.assert_allclose(shown, v[order], rtol=5e-3, atol=1e-6)
    # hovering the strip names the index under the pointer and its value
    strip = page.locator('.vector-view[data-side="output"] svg.vector-strip rect.hover')
    box = strip.bounding_box()
    page.mouse.move(box["x"] + box["width"] * 7.5 / 10, box["y"] + box["height"] / 2)
    readout = page.locator('.vector-view[data-side="output"] .vec-readout')
    assert readout.get_attribute("data-index") == "7"
    assert float(readout.inner_text().split(":")[1]) == pytest.approx(logits[7], rel=1e-4)
    assert page.locator(".pair, .big-map, .fmaps").count() == 0  # no kernel boxes, no thumbnails
    assert "kernel" not in page.locator(".live-maps").inner_text().lower()

    _open_op(page, grouped_site, "output_1")
    text = page.locator(".live-maps").inner_text()
    assert "no tensor" not in text and "the output of linear_1" in text
    page.locator('.vector-view[data-side="input"] svg.vector-strip').wait_for()
    page.locator(".op-list li[data-op=input_1]").click()
    page.wait_for_selector('.live-maps h2 code:text-is("input_1")')
    assert "the model's input" in page.locator('.card[data-side="input"]').inner_text()
    page.locator('.fmaps[data-side="output"] .fmap').nth(2).wait_for()
    assert page.locator('.fmaps[data-side="output"] .fmap').count() == 3


def test_live_page_kernels_between_vectors(page: Any, grouped_site: dict[str, Any]) -> None:
    """A 1x1 convolution on pooled features: both sides are charts of values, a click on
    an index in each chooses the pair, whose values are shown, and the kernel between them
    is the weight that connects them (oracle: the module's weight, and forward hooks)."""
    model, x = grouped_site["model"], grouped_site["x"]
    pooled, squeezed = (t[0].flatten().numpy() for t in _hooked(model, x, ["squeeze"])["squeeze"])
    _open_op(page, grouped_site, "conv2d_5")
    assert "an index in a chart of values" in page.locator(".live-maps").inner_text()
    assert page.locator(".fmaps").count() == 0  # no thumbnails of flat 1x1 maps
    for side, index, n in (("output", 3, 5), ("input", 4, 6)):
        strip = page.locator(f'.vector-view[data-side="{side}"] svg.vector-strip')
        strip.wait_for()
        box = strip.locator("rect.hover").bounding_box()
        page.mouse.click(box["x"] + box["width"] * (index + 0.5) / n, box["y"] + box["height"] / 2)
        page.wait_for_selector(f'.vector-view[data-side="{side}"] svg[data-picked="{index}"]')
    values, caption = _kernel_shown(page, 3, 4)
    np.testing.assert_allclose(values, [model.squeeze.weight[3, 4, 0, 0].item()], atol=1e-6)
    assert "squeeze.weight[3, 4]" in caption
    for side, index, v in (("input", 4, pooled), ("output", 3, squeezed)):
        big = page.locator(f'.big-value[data-side="{side}"]')
        assert f"{side} {index} (one value)" in big.inner_text()
        assert big.locator(".value").inner_text() == _fmt(v[index])


def _fmt(v: float) -> str:
    """The page's number format (web/src/dom.ts fmt) for values of moderate size."""
    a = abs(v)
    if a != 0 and a < 1e-3:
        return f"{v:.2e}"
    return str(float(f"{v:.3g}")).removesuffix(".0") if a < 1e4 else str(v)


def test_live_view_names_register_tokens_as_such(tmp_path: Path) -> None:
    """A ViT with register tokens beside its class token has several tokens with no patch:
    all are shown apart, and the note does not call them "a class token"."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=16, patch_size=4, embed_dim=16, depth=1, num_heads=2, num_classes=10,
        reg_tokens=2,
    ).eval()  # fmt: skip
    block = "blocks.0"
    x = load_dataset("digits:test", 16, channels=3)[3][0][None]
    seen = _hooked(vit, x, [block])
    tokens = seen[block][1][0]  # (1 + 2 + 16, 16): class token, 2 registers, 4x4 patches
    with _live_client(vit, tmp_path / "vit") as client:
        out = client.get(f"/api/runs/r/live/sample-3/ops/{block}").json()["output"]
    assert [t["token"] for t in out["patchless"]] == [0, 1, 2]
    assert "class or register tokens" in out["note"] and "a class token" not in out["note"]
    for t in out["patchless"]:
        assert np.allclose(t["values"], tokens[t["token"]].numpy(), atol=1e-5)
