"""The explorer in a real browser: NaN and inf in the live view are marked (magenta, with
their count), never drawn or read as values, and left out of every range, mean and top
list; the layer page's header says each thing once (a conv's units and map size, a token
layer's units and tokens, a vector's units).

Oracles: the model's tensors recomputed in the test (torch, numpy), the run read back with
lurker.store.Run (each layer's stored shape and layout).
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from explorer_fixtures import skip_without_browser, strict_page
from test_live_nonfinite import MAGENTA, _NaNs, _tensors

skip_without_browser()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from lurker.probe import probe
    from lurker.probe.data import load_dataset
    from lurker.server import create_app
    from lurker.server.serve import background
    from models_zoo import DigitsViT

    torch.manual_seed(0)
    model = _NaNs().eval()
    data = load_dataset("digits:test", 16, channels=3)
    tmp = tmp_path_factory.mktemp("nonfinite")
    out = tmp / "runs" / "n"
    probe(model, data, out=out, layers="fc", k=2, progress=False, meta={"data": "digits:test"})
    vit = DigitsViT().eval()
    gray = load_dataset("digits:test", 16, channels=1)
    probe(vit, gray, out=tmp / "vit" / "v", k=2, batch_size=128, progress=False)
    with (
        background(create_app(out, model_obj=model)) as url,
        background(create_app(tmp / "vit" / "v")) as vit_url,
    ):
        yield {"url": url, "vit_url": vit_url, "vit_run": tmp / "vit" / "v", "run": out, "model": model,
               "data": data, "shots": Path(os.environ.get("LURKER_SHOTS") or tmp)}  # fmt: skip


def test_live_marks_nonfinite_values_in_maps_vectors_and_kernels(
    served: dict[str, Any], browser: Any
):
    from PIL import Image

    want = _tensors(served["model"], served["data"][3][0][None])
    maps = want["log_1"]  # (4, 16, 16): NaN where the conv is negative; map 3 NaN everywhere
    bad = {c: int((~np.isfinite(maps[c])).sum()) for c in range(4)}
    assert bad[3] == maps[3].size and 0 < bad[0] < maps[0].size
    shots = served["shots"]
    with strict_page(browser, 1280, 900) as pg:
        pg.goto(f"{served['url']}#/r/n/live?image=sample-3&op=log_1")
        pg.wait_for_selector(".fmaps[data-side=output] .fmap img")
        marked = pg.eval_on_selector_all(
            ".fmaps[data-side=output] .fmap.nonfinite",
            "cs => Object.fromEntries(cs.map((c) => [+c.dataset.channel, +c.dataset.nonfinite]))",
        )
        assert {int(c): n for c, n in marked.items()} == {c: n for c, n in bad.items() if n}
        tile = pg.locator('.fmaps[data-side=output] .fmap[data-channel="0"]')
        assert tile.locator(".nf-badge").inner_text() == f"{bad[0]} n/f"
        # map 3 has no finite value: said in words, not drawn as its lowest
        assert (
            pg.locator('.fmaps[data-side=output] .fmap[data-channel="3"] .flat-value').inner_text()
            == "not finite"
        )
        legend = pg.locator(".card[data-side=output] .map-legend").inner_text()
        assert "Magenta: a value that is not finite" in legend
        assert f"{sum(1 for n in bad.values() if n)} of 4 maps here" in legend
        # the PNG the page shows: magenta where the map is NaN
        src = pg.get_attribute('.fmaps[data-side=output] .fmap[data-channel="0"] img', "src")
        res = pg.request.get(pg.url.split("#")[0] + src)
        pix = np.asarray(Image.open(io.BytesIO(res.body())).convert("RGB"))
        s = int(res.headers["x-lurker-scale"])
        assert ((pix[::s, ::s] == MAGENTA).all(-1) == ~np.isfinite(maps[0])).all()
        pg.wait_for_function(
            "[...document.querySelectorAll('.fmaps[data-side=output] img')]"
            ".every((i) => i.complete && i.naturalWidth > 0)"
        )
        pg.locator(".live-maps").screenshot(path=str(shots / "live-nan-maps.png"))

        # a vector with NaN: its range, mean and top 10 are over the finite values
        v = want["log_2"]
        fin = np.isfinite(v)
        pg.goto(f"{served['url']}#/r/n/live?image=sample-3&op=log_2")
        rng = pg.locator(".vector-view[data-side=output] .vec-range")
        rng.wait_for()
        text = rng.inner_text()
        nan_at = [int(i) for i in np.flatnonzero(~fin)]
        assert nan_at and fin.any()
        # "N values · min .. at index i · max .. at index j · mean ..": no NaN, no blank
        ranges = " · ".join(text.split(" · ")[:4])
        assert "NaN" not in ranges and "\u2013" not in ranges and "nan" not in ranges
        lo = int(np.flatnonzero(fin)[np.argmin(v[fin])])
        hi = int(np.flatnonzero(fin)[np.argmax(v[fin])])
        assert f"at index {lo} · max" in ranges and ranges.endswith(
            f"at index {hi} · mean {_fmt(float(v[fin].mean()))}"
        ), ranges
        assert f"{len(nan_at)} not finite ({len(nan_at)} NaN), at ind" in text
        assert ", ".join(map(str, nan_at[:5])) in text
        marks = pg.eval_on_selector_all(
            ".vector-view[data-side=output] .nonfinite-marks rect",
            "rs => rs.map((r) => +r.dataset.index)",
        )
        assert marks == nan_at
        # the highest values: the finite ones, highest first
        labels = pg.eval_on_selector_all(
            ".vector-view[data-side=output] .bars-h text.label title",
            "ts => ts.map((t) => t.textContent)",
        )
        shown = [int(t[6:]) for t in labels if re.fullmatch(r"index \d+", t or "")]
        order = sorted(np.flatnonzero(fin).tolist(), key=lambda i: (-v[i], i))
        assert shown == order[:10]
        pg.locator(".live-maps").screenshot(path=str(shots / "live-nan-vector.png"))

        # the kernel with a NaN weight: its cell magenta and named, the range over the rest
        pg.goto(f"{served['url']}#/r/n/live?image=sample-3&op=conv2d_1")
        pg.locator('.fmaps[data-side=input] .fmap[data-channel="0"]').click()
        pg.locator('.fmaps[data-side=output] .fmap[data-channel="3"]').click()
        k = pg.locator(".kernel[data-out='3'][data-in='0']")
        k.wait_for()
        cells = k.locator("td.nonfinite")
        assert cells.count() == 1 and cells.inner_text() == "NaN"
        w = served["model"].conv.weight[3, 0].detach().double().numpy()
        cap = k.locator("figcaption").inner_text()
        assert "1 weight not finite (1 NaN; magenta), left out of min and max" in cap
        finite = w[np.isfinite(w)]
        assert f"min {_fmt(float(finite.min()))} · max {_fmt(float(finite.max()))}" in cap
        assert "NaN" not in cap.split(" · 1 weight")[0]
        pg.locator(".maps-row").screenshot(path=str(shots / "live-nan-kernel.png"))


TIMES = "\u00d7"  # the page's "x" between sizes


def _fmt(v: float, digits: int = 3) -> str:
    """The page's number format (web/src/dom.ts fmt) for a value under 1e4 in size."""
    if v == int(v):
        return str(int(v))
    if v != 0 and abs(v) < 1e-3:
        m, e = f"{v:.2e}".split("e")
        return f"{m}e{'-' if int(e) < 0 else '+'}{abs(int(e))}"
    return repr(float(f"{v:.{digits}g}"))


def _expected_header(layer: Any) -> str:
    """The header by hand from the stored layout: units, then each unit's positions."""
    lay = layer.layout or {}
    full = list(layer.shape)
    full.insert(lay["batch"], 1)
    sizes = [full[a] for a in lay["positions"]]
    n = f"{layer.num_units} unit{'s' if layer.num_units != 1 else ''}"
    if not sizes or all(s == 1 for s in sizes):
        return n
    if len(sizes) == 1:
        return f"{n} · over {sizes[0]} {'token' if lay.get('boxes') else 'position'}s"
    return f"{n} · each a {TIMES.join(map(str, sizes))} map"


def test_layer_header_says_each_thing_once(served: dict[str, Any], browser: Any):
    from lurker.store import Run

    layers: dict[str, Any] = {}
    for run_dir in (served["vit_run"], served["run"]):  # a ViT; a run of one Linear
        with Run.open(run_dir) as run:
            layers.update({x.name: (run_dir.name, x) for x in run.layers})
    kinds: dict[str, str | None] = {"conv": None, "tokens": None, "vector": None}
    for name, (_, x) in layers.items():
        lay = x.layout or {}
        if len(lay.get("positions", [])) == 2 and kinds["conv"] is None:
            kinds["conv"] = name
        elif lay.get("boxes") and kinds["tokens"] is None:
            kinds["tokens"] = name
        elif not lay.get("positions") and kinds["vector"] is None:
            kinds["vector"] = name
    assert all(kinds.values()), kinds
    urls = {"v": served["vit_url"], "n": served["url"]}
    with strict_page(browser, 1280, 900) as pg:
        for what, name in kinds.items():
            rid, x = layers[name]
            pg.goto(f"{urls[rid]}#/r/{rid}/layer/{name}")
            sub = pg.locator("h1 .sub")
            sub.wait_for()
            text = sub.inner_text().strip()
            assert text == f"{x.kind} · {_expected_header(x)}", (what, text)
            # the unit count once, and no shape that repeats it
            assert text.count(str(x.num_units)) == 1, (what, text)
            if what == "vector":
                assert text == f"{x.kind} · {x.num_units} units"
            if what == "tokens":
                assert "tokens" in text
            pg.locator("h1").screenshot(path=str(served["shots"] / f"layer-header-{what}.png"))


def test_the_magenta_legend_appears_only_where_a_map_holds_such_values(
    served: dict[str, Any], browser: Any
):
    """On every op of every model the legend said "Magenta ... (none here)": noise where
    nothing is magenta. conv2d_1 reads the finite image and writes one NaN map."""
    with strict_page(browser, 1280, 900) as pg:
        pg.goto(f"{served['url']}#/r/n/live?image=sample-3&op=conv2d_1")
        pg.wait_for_selector(".fmaps[data-side=output] .fmap img")
        pg.wait_for_selector(".card[data-side=input] .map-legend")
        finite = pg.locator(".card[data-side=input] .map-legend").inner_text()
        assert "scaled to its own range" in finite and "Magenta" not in finite
        legend = pg.locator(".card[data-side=output] .map-legend").inner_text()
        assert "Magenta: a value that is not finite" in legend and "1 of 4 maps here" in legend


def test_explain_card_says_a_heatmap_has_no_finite_value(served: dict[str, Any], browser: Any):
    """The model's NaN weight makes every gradient NaN (autograd): the explain route says
    no min or max (null, header ``none``) and the page says so in words instead of a range
    of dashes; a card the same page draws from finite values keeps its numbers."""
    model, x = served["model"], served["data"][3][0][None].clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(x)[0, 1], x)
    assert grad.isnan().all()
    from explorer_fixtures import watch

    ctx, pg, errors = watch(browser, 1280, 900)
    try:
        pg.goto(f"{served['url']}#/r/n/explain?image=sample-3&target=1")
        card = pg.locator('.explain-card[data-method="saliency"] figcaption')
        card.locator(".explain-note").wait_for()
        assert "no finite value: every attribution is NaN or ±inf" in card.inner_text()
        assert "min" not in card.inner_text()
        pg.screenshot(path=str(served["shots"] / "explain-nan.png"))
    finally:
        ctx.close()
    # LRP and concept relevance refuse this model's own modules (400, said on their cards)
    assert [e for e in errors if "400" not in e and "Bad Request" not in e] == []
