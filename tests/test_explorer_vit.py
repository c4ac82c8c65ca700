"""The explorer on a vision transformer, in a real browser (Debian's chromium via
Playwright) over the real server: a small torchvision ViT (class-token head) probed on the
digits.

- a unit's peak at the class token, which stands for no patch, is said so on the layer
  grid and the unit page (the tile and the "token's patch" crop are the whole image, with
  no box): before, it looked like any patch crop;
- the Explain page's default Grad-CAM is ``lurker.explain``'s (the last block's first
  norm, not a probed layer), and the page names it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from explorer_fixtures import skip_without_browser, static_server, strict_page

skip_without_browser()

RID = "vit"
BLOCK = "vit.encoder.layers.encoder_layer_1"  # the last block: class-token peaks are common
SAMPLE = 3


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from lurker.map import make_map
    from lurker.probe import probe
    from lurker.probe.data import load_dataset
    from lurker.server import create_app
    from lurker.server.serve import background
    from models_zoo import DigitsViT

    torch.manual_seed(0)
    model = DigitsViT().eval()
    root: Path = tmp_path_factory.mktemp("vit")
    torch.save(model.state_dict(), root / "vit.pt")
    data = load_dataset("digits:test", 16, channels=1)
    meta = {"model_spec": "models_zoo:DigitsViT", "weights": str(root / "vit.pt")}
    run = probe(
        model, data, out=root / RID, k=5, batch_size=128, progress=False,
        meta={**meta, "data": "digits:test"}, relevance=True, embed=True,
    )  # fmt: skip
    assert run is not None
    make_map(run, method="pca")
    run.close()
    with background(create_app(root / RID)) as url:
        yield {"url": url, "model": model, "data": data, "run": root / RID}


def _peak_token(model: torch.nn.Module, x: torch.Tensor, unit: int) -> int:
    """Brute force: the token where ``unit`` of the block's output peaks on ``x``."""
    seen: list[torch.Tensor] = []
    h = model.get_submodule(BLOCK).register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad():
        model(x[None])
    h.remove()
    return int(seen[0][0, :, unit].argmax())  # (1, tokens, units)


def test_class_token_peaks_are_marked_on_the_grid_and_the_unit_page(browser: Any, served: dict):
    import httpx2 as httpx

    url, model, data = served["url"].rstrip("/"), served["model"], served["data"]
    doc = httpx.get(f"{url}/api/runs/{RID}/layers/{BLOCK}").json()
    # every unit's top peak, checked against the model: [0, token]
    cls_units = set()
    for u in doc["units"]:
        token = _peak_token(model, data[u["top_max"]][0], u["unit"])
        assert u["top_max_peak"] == [0, token], u
        if token == 0:
            cls_units.add(u["unit"])
    assert 0 < len(cls_units) < len(doc["units"])  # both kinds, so the test can tell them
    with strict_page(browser) as pg:
        pg.goto(f"{url}/#/r/{RID}/layer/{BLOCK}?thumb=crop&sort=index")
        pg.wait_for_selector(".unit-card")
        tagged = pg.locator(".unit-card:has(.token-tag)").evaluate_all(
            "cs => cs.map(c => +c.dataset.unit)"
        )
        assert set(tagged) == cls_units

        unit = min(cls_units)
        pg.goto(f"{url}/#/r/{RID}/unit/{BLOCK}/{unit}?tab=max&crop=1")
        pg.wait_for_selector("figure.top-entry")
        entries = httpx.get(f"{url}/api/runs/{RID}/layers/{BLOCK}/units/{unit}").json()
        want = [e["sample_id"] for e in entries["top"]["max"] if e["x"] == 0]
        assert want and all(e["box"] is None for e in entries["top"]["max"] if e["x"] == 0)
        figures = pg.locator("figure.top-entry")
        shown = [
            int(figures.nth(i).get_attribute("data-sample"))
            for i in range(figures.count())
            if figures.nth(i).locator(".token-tag").count()
        ]
        assert shown == want
        assert pg.locator(".token-tag").first.inner_text() == "class token"
        assert "the peak is at a token with no patch" in pg.locator("body").inner_text()


def test_explain_pages_default_gradcam_layer_is_pythons(browser: Any, served: dict):
    """The page offered only probed layers and defaulted to the block before the last;
    ``lurker.explain`` defaults to the last block's first norm. Now the page's default is
    the library's, named in the chooser and under the heatmap."""
    import lurker
    from lurker.explain.gradcam import default_layer

    model, data = served["model"], served["data"]
    x = data[SAMPLE][0][None]
    want = default_layer(model, x)
    module = lurker.trace(model, x)[want].module
    assert module == "vit.encoder.layers.encoder_layer_1.ln_1"
    with strict_page(browser) as pg:
        pg.goto(f"{served['url']}#/r/{RID}/explain?image=sample-{SAMPLE}")
        card = pg.locator("figure.explain-card[data-method=gradcam]")
        pg.wait_for_function(
            "() => { const c = document.querySelector('figure.explain-card[data-method="
            "gradcam] figcaption'); return !!c && !c.textContent.includes('computing'); }",
            timeout=60_000,
        )
        assert card.locator("figcaption").inner_text().startswith(f"at {want} ({module}) · ")
        href = card.locator("figcaption a").first.get_attribute("href")
        assert href is not None and href.endswith(f"/graph?focus={want}")
        chooser = pg.locator("#explain-layer option").first.inner_text()
        assert chooser == f"default ({want} ({module}))"


def test_a_token_units_mean_is_said_to_be_over_its_tokens(browser: Any, served: dict):
    """The histograms said "spatial mean" and "the unit's map averaged over its positions"
    on a ViT block, whose per-sample mean is over all 17 tokens, the class token (no place
    in the image) included: checked here against the model, and now said so."""
    import httpx2 as httpx

    url, model, data = served["url"].rstrip("/"), served["model"], served["data"]
    unit = 2
    doc = httpx.get(f"{url}/api/runs/{RID}/layers/{BLOCK}/units/{unit}").json()
    best = doc["top"]["mean"][0]
    seen: list[torch.Tensor] = []
    h = model.get_submodule(BLOCK).register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad():
        model(data[best["sample_id"]][0][None])
    h.remove()
    tokens = seen[0][0, :, unit]  # (17,): the class token, then 16 patches
    assert len(tokens) == 17
    assert best["value"] == pytest.approx(float(tokens.mean()), rel=1e-5)
    assert abs(best["value"] - float(tokens[1:].mean())) > 1e-3  # the class token counts
    with strict_page(browser) as pg:
        pg.goto(f"{url}/#/r/{RID}/unit/{BLOCK}/{unit}?tab=mean")
        note = pg.locator("#unit-hist-note").inner_text()
        assert "averaged over its 17 tokens (the class token included)" in note
        assert "value: the mean of the unit's values over its 17 tokens" in pg.inner_text("body")
        charts = pg.locator(".card svg").evaluate_all("ss => ss.map(s => s.textContent)")
        assert "mean activation over a sample's tokens" in charts[-1]
        assert not any("spatial" in c for c in charts)
        pg.goto(f"{url}/#/r/{RID}/layer/{BLOCK}")
        pg.wait_for_selector(".unit-card")
        charts = pg.locator("svg").evaluate_all("ss => ss.map(s => s.textContent)")
        assert any("mean activation over a sample's tokens" in c for c in charts)
        assert not any("spatial" in c for c in charts)


def test_mean_list_class_token_crops_are_tagged_from_the_run_in_a_static_export(
    browser: Any, served: dict, tmp_path: Path
):
    """The mean list's crops that peak at the class token are tagged "class token" from
    the peaks the run stores: in a static export (no model, no API: before, its mean-list
    crops could be neither cut nor tagged), each crop cut in the browser, and on the
    served page without asking the model (no ``.../mean/peaks`` request). The oracle: the
    block's output by a forward hook, the first maximal token per sample."""
    from lurker.server import export_site

    model, data = served["model"], served["data"]
    site = tmp_path / "site"
    export_site(served["run"], site, progress=False)
    units = {}  # unit -> the mean list's sample ids that peak at the class token
    for unit in range(32):
        top = httpx_get(served, f"/api/runs/{RID}/layers/{BLOCK}/units/{unit}")["top"]["mean"]
        tokens = [_peak_token(model, data[e["sample_id"]][0], unit) for e in top]
        assert [e["x"] for e in top] == tokens, unit
        units[unit] = [e["sample_id"] for e, t in zip(top, tokens) if t == 0]
    unit = next(u for u, cls in units.items() if 0 < len(cls) < 5)  # tagged and untagged
    asked: list[str] = []
    with static_server(site) as url, strict_page(browser) as pg:
        pg.goto(f"{url}#/r/{RID}/unit/{BLOCK}/{unit}?tab=mean&crop=1")
        pg.wait_for_selector("figure.top-entry canvas")
        figures = pg.locator("figure.top-entry")
        assert figures.locator("canvas").count() == 5 and not pg.locator(".no-img").count()
        tagged = [
            int(figures.nth(i).get_attribute("data-sample"))
            for i in range(figures.count())
            if figures.nth(i).locator(".token-tag").count()
        ]
        assert tagged == units[unit]
        assert "the unit peaks at a token with no patch" in pg.locator("body").inner_text()
        pg.screenshot(path=str(tmp_path / "static-mean-crops.png"))
    with strict_page(browser) as pg:
        pg.on("request", lambda r: asked.append(r.url))
        pg.goto(f"{served['url'].rstrip('/')}/#/r/{RID}/unit/{BLOCK}/{unit}?tab=mean&crop=1")
        pg.wait_for_selector("figure.top-entry .token-tag")
        figures = pg.locator("figure.top-entry")
        tagged = [
            int(figures.nth(i).get_attribute("data-sample"))
            for i in range(figures.count())
            if figures.nth(i).locator(".token-tag").count()
        ]
        assert tagged == units[unit]
    assert not [u for u in asked if u.endswith("/mean/peaks")]


def httpx_get(served: dict, path: str) -> Any:
    import httpx2 as httpx

    return httpx.get(served["url"].rstrip("/") + path).json()


def _shape(*sizes: int) -> str:
    """A shape as the page writes it, its sizes joined by a multiplication sign."""
    return "\u00d7".join(map(str, sizes))


def _live_op(served: dict, op: str) -> dict:
    return httpx_get(served, f"/api/runs/{RID}/live/sample-{SAMPLE}/ops/{op}")


def _live_map(served: dict, op: str, side: str, unit: int) -> torch.Tensor:
    """A token side's map of ``unit`` as the live view serves it: the 16 patch tokens in
    row-major order (the class token is apart)."""
    doc = httpx_get(served, f"/api/runs/{RID}/live/sample-{SAMPLE}/ops/{op}/{side}/{unit}.json")
    return torch.tensor(doc["values"]).flatten()


def test_live_names_an_ops_other_inputs(browser: Any, served: dict):
    """The live view draws one input of an op. On the last block's residual ``add``, the
    class token's ``cat`` and the position embedding's ``add`` it drew the first alone,
    titled "input", as if it were all the op took (a 1x1x32 "input" becoming a 1x17x32
    output). Now the others are named under it, linked. The oracle: the model's own values
    by forward hooks, so the named inputs are the ones the op combines (the block's output
    is the shown input plus the named op's output, which is the MLP's; the embedding's add
    is the cat's output plus the model's ``pos_embedding``)."""
    model, data = served["model"], served["data"]
    vit = model.vit
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        model.get_submodule(name).register_forward_hook(
            lambda m, i, o, name=name: seen.__setitem__(name, o[0])
        )
        for name in (BLOCK, f"{BLOCK}.mlp", "vit.encoder.dropout")
    ]
    with torch.no_grad():
        model(data[SAMPLE][0][None])
    for h in hooks:
        h.remove()
    unit = 5
    # the block's residual add: its input and the other one, named, sum to its output
    add = httpx_get(served, f"/api/runs/{RID}/layers/{BLOCK}/units/{unit}")["layer"]["op"]
    doc = _live_op(served, add)
    (other,) = doc["other_inputs"]
    assert other["param"] is None and other["shape"] == [1, 17, 32]
    mlp = seen[f"{BLOCK}.mlp"][1:, unit]  # (17, 32) -> the patch tokens of the unit
    block = seen[BLOCK][1:, unit]
    assert torch.allclose(_live_map(served, other["op"], "output", unit), mlp, atol=1e-5)
    assert torch.allclose(_live_map(served, add, "input", unit), block - mlp, atol=1e-5)
    # the position embedding's add (what the encoder's dropout reads): the cat plus the param
    embed = next(
        o for o in (_live_op(served, f"add_{i}") for i in range(1, 4))
        if o["other_inputs"] and o["other_inputs"][0]["param"]
    )  # fmt: skip
    assert embed["other_inputs"] == [
        {"op": None, "param": "vit.encoder.pos_embedding", "shape": [1, 17, 32]}
    ]
    pos = vit.encoder.pos_embedding.detach()[0, 1:, unit]
    got = _live_map(served, embed["op"], "output", unit) - _live_map(
        served, embed["op"], "input", unit
    )
    assert torch.allclose(got, pos, atol=1e-5)
    assert torch.allclose(_live_map(served, embed["op"], "output", unit), seen["vit.encoder.dropout"][1:, unit], atol=1e-5)  # fmt: skip
    cat = embed["input_op"]
    cat_doc = _live_op(served, cat)
    (patches,) = cat_doc["other_inputs"]
    assert cat_doc["input"]["shape"] == [1, 1, 32] and patches["shape"] == [1, 16, 32]
    token = _live_op(served, cat_doc["input_op"])  # the class token's expand: no op input
    assert token["input"] is None
    assert token["other_inputs"] == [{"op": None, "param": "vit.class_token", "shape": [1, 1, 32]}]
    url = served["url"].rstrip("/")
    with strict_page(browser) as pg:
        pg.goto(f"{url}/#/r/{RID}/live?image=sample-{SAMPLE}&op={add}")
        line = pg.locator(".card[data-side=input] .input-from")
        line.wait_for()
        assert line.inner_text() == (
            f"the output of {doc['input_op']}: one of its 2 inputs, the only one shown here; "
            f"the other: {other['op']} ({_shape(1, 17, 32)})"
        )
        href = line.locator("a.other-input").get_attribute("href")
        assert href is not None and href.endswith(f"&op={other['op']}")
        pg.goto(f"{url}/#/r/{RID}/live?image=sample-{SAMPLE}&op={embed['op']}")
        line = pg.locator(".card[data-side=input] .input-from")
        line.wait_for()
        assert line.inner_text().endswith(
            f"the other: the parameter vit.encoder.pos_embedding ({_shape(1, 17, 32)})"
        )
        pg.goto(f"{url}/#/r/{RID}/live?image=sample-{SAMPLE}&op={cat}")
        line = pg.locator(".card[data-side=input] .input-from")
        line.wait_for()
        assert f"the other: {patches['op']} ({_shape(1, 16, 32)})" in line.inner_text()
        pg.goto(f"{url}/#/r/{RID}/live?image=sample-{SAMPLE}&op={cat_doc['input_op']}")
        card = pg.locator(".card[data-side=input] .notice")
        card.wait_for()
        assert f"the model's parameter vit.class_token ({_shape(1, 1, 32)})" in card.inner_text()


def test_concept_shares_are_said_to_be_of_the_summed_absolute_relevance(browser: Any, served: dict):
    """Each concept card's % is the unit's relevance over the sum of every unit's
    |relevance|, but the only sum the line above named was the layer's signed total: a
    reader dividing a card's relevance by it got another %. Now the line names the sum the
    shares are of. The oracle: every unit's relevance (``top`` = all), summed in Python."""
    import re

    import httpx2 as httpx

    url = served["url"].rstrip("/")
    doc = httpx.get(
        f"{url}/api/runs/{RID}/live/sample-{SAMPLE}/explain/concepts.json",
        params={"target": "top", "top": 32}, timeout=120,
    ).json()  # fmt: skip
    rel = [u["relevance"] for u in doc["units"]]
    assert len(rel) == doc["channels"] == 32
    total, absolute = sum(rel), sum(abs(r) for r in rel)
    assert doc["total"] == pytest.approx(total, rel=1e-4)
    assert abs(total - absolute) > 0.05 * absolute  # the two sums differ here: the test can tell
    with strict_page(browser) as pg:
        pg.goto(f"{url}/#/r/{RID}/explain?image=sample-{SAMPLE}")
        pg.wait_for_selector(".concept")
        text = pg.locator(".concept-section > p").first.inner_text()
        said = re.search(r"summed \|relevance\|, ([-\d.e]+) ", text)
        assert said, text
        assert float(said.group(1)) == pytest.approx(absolute, rel=5e-3)
        heads = pg.locator(".concept h3").all_inner_texts()
        first = heads[0].split()
        assert first[:2] == ["unit", str(doc["units"][0]["unit"])]
        assert float(first[2].rstrip("%")) == pytest.approx(100 * rel[0] / absolute, abs=0.051)


def test_token_layers_help_says_tokens_not_positions_of_a_map(browser: Any, served: dict):
    """On a ViT block (17 tokens: the class token and 16 patches) the layer page's tile
    help said "at any position of its map ... each sample's map averaged over its
    positions", and the unit page "the peak of the unit's map" and, on its relevance tab,
    "summed over its positions": a class token is no position of a map. Now the words
    follow the layer: tokens on the block, a map on the patch conv (the control)."""
    import httpx2 as httpx

    url = served["url"].rstrip("/")
    layer = httpx.get(f"{url}/api/runs/{RID}/layers/{BLOCK}").json()
    assert layer["layer"]["shape"] == [17, 32] and layer["layout"]["boxes"][0] is None
    with strict_page(browser) as pg:
        pg.goto(f"{url}/#/r/{RID}/layer/{BLOCK}")
        pg.wait_for_selector(".unit-card")
        note = pg.locator("#grid-note").inner_text()
        assert "highest activation on any sample at any token;" in note
        assert "(each sample's values averaged over its tokens)" in note
        assert "position" not in note and " map" not in note
        pg.goto(f"{url}/#/r/{RID}/unit/{BLOCK}/2?tab=max")
        pg.wait_for_selector("figure.top-entry")
        bar = pg.locator(".toolbar").inner_text()
        assert "value: the peak of the unit's values over its tokens;" in bar
        pg.goto(f"{url}/#/r/{RID}/unit/{BLOCK}/2?tab=relevance")
        pg.wait_for_selector("figure.top-entry")
        bar = pg.locator(".toolbar").inner_text()
        assert "LRP relevance for the model's prediction, summed over its tokens:" in bar
        assert "position" not in bar
        # a conv's map keeps its words
        pg.goto(f"{url}/#/r/{RID}/layer/vit.conv_proj")
        pg.wait_for_selector(".unit-card")
        note = pg.locator("#grid-note").inner_text()
        assert "at any position of its map" in note
        assert "each sample's map averaged over its positions" in note
        pg.goto(f"{url}/#/r/{RID}/unit/vit.conv_proj/2?tab=relevance")
        pg.wait_for_selector("figure.top-entry")
        assert "summed over its positions" in pg.locator(".toolbar").inner_text()


def test_the_map_title_says_its_layer_is_the_class_token(browser: Any, served: dict):
    """``embed=True`` on a ViT keeps ``getitem_7``, an op label, and the Map page's title
    named only that. Now it says what it is. Oracle: the stored features are the class
    token (token 0) of ``vit.encoder.ln``'s output, by a forward hook (float16 storage)."""
    import numpy as np

    from lurker.store import Run

    model, data = served["model"], served["data"]
    with Run.open(served["run"]) as run:
        e = run.embedding()
        label = e.meta["layer"]
        op = next(o for o in run.graph.ops if o.label == label)
        norm = next(o for o in run.graph.ops if o.index == op.parents[0])
    assert norm.module == "vit.encoder.ln"
    seen: list[torch.Tensor] = []
    h = model.get_submodule("vit.encoder.ln").register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad():
        model(torch.stack([data[i][0] for i in range(8)]))
    h.remove()
    got = torch.tensor(np.asarray(e.features[:8], dtype=np.float32))
    assert torch.allclose(got, seen[0][:, 0], atol=2e-3, rtol=2e-3)
    assert not torch.allclose(got, seen[0][:, 1], atol=2e-3, rtol=2e-3)
    want = f"the class token (token 0) of the output of vit.encoder.ln (op {norm.label})"
    assert httpx_get(served, f"/api/runs/{RID}/map")["layer_said"] == want
    with strict_page(browser) as pg:
        pg.goto(f"{served['url'].rstrip('/')}/#/r/{RID}/map")
        pg.wait_for_selector("h1 .sub")
        assert f"by their features at {label}, {want} \u00b7 pca" in pg.inner_text("h1")


def test_a_units_histogram_says_its_axis_spans_its_bins_of_the_layers(browser: Any, served: dict):
    """A patch-conv unit's values fill a few of the layer's 64 shared bins, so its chart
    showed a handful of bars with nothing saying why. The axis already spans only the bins
    that hold its values; the page now says so, with the layer's bin width, and the bars
    are the stored counts, unchanged. Oracle: the run's histogram, by numpy."""
    import numpy as np

    from lurker.store import Run

    with Run.open(served["run"]) as run:
        counts, _ = run.unit("vit.conv_proj", 3).histogram()
        samples = run.num_samples
    held = np.flatnonzero(counts)
    first, last = int(held[0]), int(held[-1])
    assert last - first + 1 < len(counts) and counts.sum() == samples
    with strict_page(browser) as pg:
        pg.goto(f"{served['url'].rstrip('/')}/#/r/{RID}/unit/vit.conv_proj/3?tab=max")
        pg.wait_for_selector("svg.histogram rect")
        note = pg.locator("#unit-hist-bins").inner_text()
        assert f"the {last - first + 1} of the layer's {len(counts)} bins" in note
        shown = pg.locator("svg.histogram rect").evaluate_all("rs => rs.map(r => +r.dataset.count)")
        assert shown == counts[first : last + 1].tolist()
