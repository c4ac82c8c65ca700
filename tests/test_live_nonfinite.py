"""Live view: values that are not finite (a model's NaN, an inf from a division by zero)
are marked, never drawn as a value, and left out of every range, mean and top list, which
name them instead.

Oracles: the model's own tensors recomputed in the test (torch), numpy over the PNGs'
pixels, numpy's isnan/isposinf/isneginf for the counts.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from fastapi.testclient import TestClient
from PIL import Image

from lurker.probe import probe
from lurker.probe.data import load_dataset
from lurker.server import create_app

MAGENTA = (255, 0, 255)


class _Log(torch.nn.Module):
    """``log``: NaN where its input is negative, -inf where it is 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(x)


class _Inv(torch.nn.Module):
    """``1 / x``: +inf where its input is 0 (a ReLU that does not fire)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 1.0 / x


class _NaNs(torch.nn.Module):
    """A conv whose output 3 has a NaN weight (so its map is NaN everywhere), then log
    (NaN where the conv is negative) and 1/relu (+inf where the ReLU does not fire); a
    vector of 6 values through log (NaN where negative); a clean head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.log = _Log()
        self.relu = torch.nn.ReLU()
        self.inv = _Inv()
        self.fc = torch.nn.Linear(4, 6)
        self.vlog = _Log()
        self.head = torch.nn.Linear(6, 10)
        with torch.no_grad():
            self.conv.weight[3, 0, 0, 0] = float("nan")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv(x)
        a = torch.nan_to_num(self.log(c) + self.inv(self.relu(c)), 0.0, 0.0, 0.0)
        v = self.vlog(self.fc(a.mean((2, 3))))
        return self.head(torch.nan_to_num(v, 0.0, 0.0, 0.0))


def _x(data: object) -> torch.Tensor:
    return data[3][0][None]  # type: ignore[index]


def _tensors(model: _NaNs, x: torch.Tensor) -> dict[str, np.ndarray]:
    """What the live ops compute, recomputed from the model's own modules."""
    with torch.no_grad():
        c = model.conv(x)
        a = torch.nan_to_num(torch.log(c) + 1.0 / torch.relu(c), 0.0, 0.0, 0.0)
        fc = model.fc(a.mean((2, 3)))
        return {
            "log_1": torch.log(c)[0].double().numpy(),
            "rdiv_1": (1.0 / torch.relu(c))[0].double().numpy(),
            "log_2": torch.log(fc)[0].double().numpy(),
        }


def _pixels(client: TestClient, url: str) -> tuple[np.ndarray, dict[str, str]]:
    res = client.get(url)
    assert res.status_code == 200, res.text
    im = Image.open(io.BytesIO(res.content))
    return np.asarray(im), dict(res.headers)


def test_nonfinite_values_are_magenta_and_left_out_of_the_range(tmp_path: Path):
    torch.manual_seed(0)
    model = _NaNs().eval()
    data = load_dataset("digits:test", 16, channels=3)
    out = tmp_path / "runs" / "r"
    probe(model, data, out=out, layers="fc", k=2, progress=False, meta={"data": "digits:test"})
    want = _tensors(model, _x(data))
    with TestClient(create_app(out, model_obj=model)) as client:
        base = "/api/runs/r/live/sample-3/ops"
        for op in ("log_1", "rdiv_1"):
            info = client.get(f"{base}/{op}").json()
            maps = want[op]  # (4, 16, 16)
            bad = {c: int((~np.isfinite(maps[c])).sum()) for c in range(4)}
            assert {int(c): n for c, n in info["output"]["nonfinite"].items()} == {
                c: n for c, n in bad.items() if n
            }
            for c in range(4):
                m = maps[c]
                fin = np.isfinite(m)
                pix, head = _pixels(client, f"{base}/{op}/output/{c}.png")
                doc = client.get(f"{base}/{op}/output/{c}.json").json()
                counts = {
                    "nan": int(np.isnan(m).sum()),
                    "+inf": int(np.isposinf(m).sum()),
                    "-inf": int(np.isneginf(m).sum()),
                }
                assert doc["nonfinite"] == {k: n for k, n in counts.items() if n}
                assert int(head["x-lurker-nonfinite"]) == bad[c]
                if fin.all():
                    assert pix.ndim == 2  # grayscale, as before
                    continue
                # RGB: non-finite positions magenta, finite ones grey by the finite range
                scale = int(head["x-lurker-scale"])
                pix = pix[::scale, ::scale]
                assert pix.shape == (*m.shape, 3)
                assert (pix[~fin] == MAGENTA).all()
                if not fin.any():  # nothing to scale: no min, no max
                    assert doc["min"] is None and doc["max"] is None
                    assert head["x-lurker-min"] == "none"
                    continue
                lo, hi = m[fin].min(), m[fin].max()
                assert doc["min"] == lo and doc["max"] == hi
                assert float(head["x-lurker-min"]) == lo and float(head["x-lurker-max"]) == hi
                grey = pix[fin]
                assert (grey[:, 0] == grey[:, 1]).all() and (grey[:, 1] == grey[:, 2]).all()
                expect = np.rint(255 * (m[fin] - lo) / (hi - lo)) if hi > lo else 128
                assert np.array_equal(grey[:, 0], np.broadcast_to(expect, grey[:, 0].shape))
                # no finite value is drawn in the marker colour
                assert not (grey == MAGENTA).all(1).any()
        # the conv's map 3 (a NaN weight) is NaN everywhere; log's map holds NaN and
        # finite values; 1/relu's +inf where the ReLU does not fire
        assert np.isnan(want["log_1"][3]).all()
        assert np.isnan(want["log_1"][0]).any() and np.isfinite(want["log_1"][0]).any()
        assert np.isposinf(want["rdiv_1"]).any()
        # a vector with NaN: its range is the finite values', the NaNs counted by kind
        v = want["log_2"]
        doc = client.get(f"{base}/log_2/output/0.json").json()
        assert np.isnan(v).any() and np.isfinite(v).any()
        assert doc["nonfinite"] == {"nan": int(np.isnan(v).sum())}
        assert doc["min"] == v[np.isfinite(v)].min() and doc["max"] == v[np.isfinite(v)].max()
        # the kernel with the NaN weight: min and max over the finite weights, named
        k = client.get(f"{base}/conv2d_1/kernels/3/0.json").json()
        w = model.conv.weight[3, 0].detach().double().numpy()
        assert k["nonfinite"] == {"nan": 1}
        assert k["values"][0][0] is None
        assert k["min"] == w[np.isfinite(w)].min() and k["max"] == w[np.isfinite(w)].max()
        assert client.get(f"{base}/conv2d_1/kernels/2/0.json").json()["nonfinite"] == {}


def test_a_map_whose_range_is_near_float64s_limit_is_scaled_not_garbled():
    """Finite values whose range overflows float64 (max - min = inf) made the scaled
    pixels NaN, cast to undefined bytes; and a side with no maps made the count fail."""
    from lurker.server.session import map_png, nonfinite_maps

    a = np.array([[-1e308, 0.0], [1e308, 5e307]])
    png, scale, lo, hi = map_png(a)
    pix = np.asarray(Image.open(io.BytesIO(png)))[::scale, ::scale]
    want = np.rint(255 * ((a / 2 - lo / 2) / (hi / 2 - lo / 2)))
    assert (lo, hi) == (-1e308, 1e308)
    assert pix.tolist() == want.astype(np.uint8).tolist() == [[0, 128], [255, 191]]
    assert nonfinite_maps(np.zeros((0, 4, 4))) == {}


def test_no_finite_value_reads_the_same_in_the_live_and_explain_headers(tmp_path: Path):
    """A map with no finite value has no min or max: both PNG routes say ``none`` in
    ``X-Lurker-Min``/``Max`` (the explain route used to write ``nan``, the live route
    ``none``) and their JSON says null; where there are finite values both give them as
    numbers. Oracle: the gradient by autograd (NaN everywhere through a NaN weight)."""
    torch.manual_seed(0)
    model = _NaNs().eval()
    data = load_dataset("digits:test", 16, channels=3)
    out = tmp_path / "runs" / "r"
    probe(model, data, out=out, layers="fc", k=2, progress=False, meta={"data": "digits:test"})
    xi = _x(data).clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(xi)[0, 1], xi)
    assert grad.isnan().all()  # the oracle: no finite attribution at all
    with TestClient(create_app(out, model_obj=model)) as client:
        base = "/api/runs/r/live/sample-3"
        png = client.get(f"{base}/explain/saliency.png?target=1&overlay=0")
        doc = client.get(f"{base}/explain/saliency.json?target=1").json()
        assert png.status_code == 200, png.text
        assert png.headers["x-lurker-min"] == png.headers["x-lurker-max"] == "none"
        assert doc["min"] is None and doc["max"] is None
        live = client.get(f"{base}/ops/log_1/output/3.png")  # NaN everywhere (the weight)
        assert live.headers["x-lurker-min"] == live.headers["x-lurker-max"] == "none"
        # a map with finite values: its numbers, as the JSON gives them
        live = client.get(f"{base}/ops/log_1/output/0.png")
        doc = client.get(f"{base}/ops/log_1/output/0.json").json()
        assert float(live.headers["x-lurker-min"]) == doc["min"] is not None
