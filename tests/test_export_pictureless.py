"""The static export of runs with no picture: token ids, feature vectors and 1-D signals.

Each kind's run (the models and data of test_token_inputs, test_tabular_explorer and
test_signal_inputs) is exported and served; every exported document must equal the served
explorer's answer to the same request (the oracle: the live API, key by key), and the
exported site, opened in a browser from a plain static server, must draw each page's
tokens, feature strips or signal lines with no request the site cannot answer. Before, a
signal run's export wrote each top-k sample as a C x T pixel PNG no page shows (into the
run's cache too), and listed its samples without their signals, so the static samples
page said "signal not at hand" on every tile.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from explorer_fixtures import get_json, skip_without_browser, static_server, strict_page

KINDS = ("text", "wine", "eeg")


def _model_and_data(kind: str) -> tuple[nn.Module, Any, str, int]:
    """The model, dataset, a probed layer and k of the kind's run (as its own tests build
    it)."""
    if kind == "text":
        import test_token_inputs as t

        torch.manual_seed(0)
        return t.TextClassifier().eval(), t._dataset(), t.LAYER, t.K
    if kind == "wine":
        import test_tabular_explorer as t

        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(13, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
        return model, t.Wine(), t.LAYER, t.K
    import test_signal_inputs as t

    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(40, t.C, t.T, generator=g), torch.arange(40) % 2)
    return t._model(), data, "3", t.K


@pytest.fixture(scope="module", params=KINDS)
def exported(request: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The kind's run, its export (warnings recorded) and the served explorer of it with
    its dataset and no model, as the export reads it."""
    from lurker.probe import probe
    from lurker.server import create_app
    from lurker.server.export import export_site
    from lurker.server.serve import background

    kind = request.param
    model, data, layer, k = _model_and_data(kind)
    root = tmp_path_factory.mktemp(f"export-{kind}")
    run = probe(model, data, out=root / kind, k=k, batch_size=16, progress=False)
    assert run is not None
    run.close()
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        site = export_site(root / kind, root / "site", dataset=data, progress=False)
    with background(create_app(root / kind, dataset=data)) as url:
        yield {
            "kind": kind,
            "run": root / kind,
            "site": site,
            "url": url.rstrip("/"),
            "layer": layer,
            "warnings": [str(w.message) for w in said],
        }


def _api_path(relative: str) -> str:
    """The API path (query kept, segments URL-encoded) of a file under ``data/``: the
    inverse of ``static_path``."""
    raw = re.sub(
        r"(?:~[0-9A-F]{2})+", lambda m: bytes.fromhex(m[0].replace("~", "")).decode(), relative
    )
    path, _, query = raw.partition("?")
    return "/".join(quote(s, safe="") for s in path.split("/")) + (f"?{query}" if query else "")


def test_every_exported_document_equals_the_served_one(exported: dict) -> None:
    kind, site, url = exported["kind"], exported["site"], exported["url"]
    checked: set[str] = set()
    for f in sorted((site / "data").rglob("*.json")):
        relative = f.relative_to(site / "data").as_posix().removesuffix(".json")
        if f.name == "signal.json":  # the API's own path ends in .json
            relative += ".json"
        got = json.loads(f.read_text(encoding="utf-8"))
        if re.search(r"/units/chunk-\d+$", relative):  # each unit: the API's unit document
            base = relative.rsplit("/", 1)[0]
            for j, unit in enumerate(got["units"]):
                assert unit == get_json(f"{url}/api/{_api_path(base)}/{got['offset'] + j}")
            checked.add("units")
            continue
        if relative.endswith("/units/index"):
            continue  # the site's own index (its thumbs are checked below)
        if relative.endswith("/exported-samples"):
            served = get_json(f"{url}/api/runs/{kind}/samples?offset=0&limit=1000")
            by_id = {s["id"]: s for s in served["samples"]}
            assert got["total"] == served["total"] and got["samples"]
            for one in got["samples"]:  # the tile each shows: tokens, strip or lines
                assert {k: v for k, v in one.items() if k != "image"} == by_id[one["id"]]
                assert one["image"] is False  # no picture: none is promised
            assert got["no_image"] is None
            checked.add("samples list")
            continue
        want = get_json(f"{url}/api/{_api_path(relative)}")
        if relative == f"runs/{kind}":  # the export serves no model: it says so instead
            got["holds"].pop("live_reason")
            want["holds"].pop("live_reason")
        assert got == want, relative
        checked.add(relative.split("/")[2] if relative.count("/") >= 2 else relative)
    assert {"units", "samples list", "samples", "layers", "graph"} <= checked


def test_no_picture_is_made_or_written_and_no_missing_image_is_claimed(exported: dict) -> None:
    site, run = exported["site"], exported["run"]
    assert not list(site.rglob("*.png"))
    assert not list((run / "cache").rglob("*.png"))  # nor made into the run's cache
    assert not [w for w in exported["warnings"] if "no image" in w], exported["warnings"]
    layer = exported["layer"]
    index = json.loads(
        (site / f"data/runs/{exported['kind']}/layers/{layer}/units/index.json").read_text()
    )
    assert index["no_image"] is None and set(index["thumbs"]) == {None}


#: What each kind's unit entries and sample tiles are drawn as, in place of a picture.
ENTRY = {"text": ".token-entry", "wine": ".token-entry", "eeg": ".signal-entry svg.signal-plot"}
TILE = {"text": ".tok-thumb", "wine": ".feat-thumb", "eeg": ".signal-tile svg"}


def test_the_exported_site_draws_each_page_without_a_picture(browser: Any, exported: dict):
    skip_without_browser()
    kind, layer = exported["kind"], exported["layer"]
    sample = json.loads((exported["site"] / f"data/runs/{kind}/exported-samples.json").read_text())
    sid = sample["samples"][0]["id"]
    r = f"#/r/{kind}"
    with static_server(exported["site"]) as base, strict_page(browser) as pg:
        pg.goto(f"{base}{r}")
        pg.wait_for_selector("h1")
        pg.goto(f"{base}{r}/layer/{layer}")
        pg.wait_for_selector(".unit-card")
        units = json.loads((exported["site"] / f"data/runs/{kind}/layers/{layer}.json").read_text())
        assert pg.locator(".unit-card").count() == len(units["units"])
        assert (
            pg.locator("img").count() == 0 and "not exported" not in pg.locator("main").inner_text()
        )
        pg.goto(f"{base}{r}/unit/{layer}/0?tab=max")
        pg.wait_for_selector(ENTRY[kind])
        assert pg.locator("img").count() == 0
        pg.goto(f"{base}{r}/samples")
        pg.wait_for_selector(TILE[kind])
        assert pg.locator(TILE[kind]).count() == len(sample["samples"])
        assert "not at hand" not in pg.locator("body").inner_text()
        pg.goto(f"{base}{r}/sample/{sid}")
        pg.wait_for_selector(f"text=Sample {sid}")
        assert "not at hand" not in pg.locator("body").inner_text()
        pg.goto(f"{base}{r}/live")
        pg.wait_for_selector("text=static export")
        heading = pg.locator("h1").inner_text()
        assert "image" not in heading, heading  # the live view's input is no image here
        pg.goto(f"{base}{r}/explain")
        pg.wait_for_selector("text=static export")
        assert pg.evaluate("[...document.images].every(i => !i.complete || i.naturalWidth > 0)")


# ----------------------------------------------------- precomputed explanations, exported
class WineNet(nn.Sequential):
    """The tabular model, importable by its spec (``lurker images`` loads the run's own)."""

    def __init__(self) -> None:
        super().__init__(nn.Linear(13, 8), nn.ReLU(), nn.Linear(8, 3))


class EegNet(nn.Sequential):
    def __init__(self) -> None:
        import test_signal_inputs as t

        super().__init__(*t._model())


def _text_net() -> nn.Module:
    import test_token_inputs as t

    return t.TextClassifier()


SPECS = {"text": "_text_net", "wine": "WineNet", "eeg": "EegNet"}


def as_spec(kind: str, model: nn.Module) -> nn.Module:
    """``model`` as the kind's spec builds it, with its weights: the run records the spec,
    and its fingerprint the class, so the model probed is the one the spec loads."""
    net = globals()[SPECS[kind]]()
    net.load_state_dict(model.state_dict())
    return net.eval()


@pytest.fixture(scope="module", params=KINDS)
def precomputed(request: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The kind's run probed with its model spec and weights recorded, its top-k samples'
    explanations precomputed (``lurker images RUN --explanations top``), and its export."""
    from lurker.probe import probe
    from lurker.server import create_app
    from lurker.server.explained import precompute
    from lurker.server.export import export_site
    from lurker.server.serve import background

    kind = request.param
    model, data, _, k = _model_and_data(kind)
    model = as_spec(kind, model)
    root = tmp_path_factory.mktemp(f"explained-{kind}")
    torch.save(model.state_dict(), root / "w.pt")
    meta = {"model_spec": f"{__name__}:{SPECS[kind]}", "weights": str(root / "w.pt")}
    run = probe(model, data, out=root / kind, k=k, batch_size=16, progress=False, meta=meta)
    assert run is not None
    run.close()
    done = precompute(root / kind, "top", dataset=data, progress=False)
    site = export_site(root / kind, root / "site", dataset=data, progress=False)
    with background(create_app(root / kind, dataset=data)) as url:
        yield {"kind": kind, "model": model, "data": data, "run": root / kind, "site": site,
               "url": url.rstrip("/"), "done": done}  # fmt: skip


def _held(pre: dict) -> list[dict[str, Any]]:
    path = pre["site"] / f"data/runs/{pre['kind']}/explained.json"
    return json.loads(path.read_text())["samples"]


def test_precomputed_scores_equal_lurker_explains(precomputed: dict) -> None:
    """Each exported method's scores (per token, per feature, per channel along time)
    are ``lurker.explain``'s on the sample for its top class."""
    import lurker

    kind, model, data, site = (precomputed[k] for k in ("kind", "model", "data", "site"))
    held = _held(precomputed)
    ranked = {int(s.stem) for s in (site / f"data/runs/{kind}/samples").glob("*.json")}
    assert {h["sample"] for h in held} == ranked  # `top`: the samples the site holds
    for h in held[:3]:
        x = data[h["sample"]][0][None]
        assert h["top"]["class"] == int(model(x).argmax())
        assert h["methods"]
        for method in h["methods"]:
            f = (
                site
                / f"data/runs/{kind}/live/{h['image']}/explain/{method}.json~3Ftarget~3Dtop.json"
            )
            doc = json.loads(f.read_text())
            assert doc["target_class"] == h["top"]["class"] and doc["cached"] is True
            opts = {
                k: v
                for k, v in doc["options"].items()
                if k in ("seed", "stdev", "window", "strides")
            }
            opts = {k: tuple(v) if isinstance(v, list) else v for k, v in opts.items()}
            if doc["layer"]:
                opts["layer"] = doc["layer"]
            ours = lurker.explain(model, x, h["top"]["class"], method=method, **opts)
            if kind == "eeg":
                want = ours.signal(0)
                want = want[None] if want.dim() == 1 else want
                got = torch.tensor(doc["signal_scores"], dtype=torch.float64)
            else:
                want = ours.attribution[0]
                got = torch.tensor(doc["scores"], dtype=torch.float64)
            torch.testing.assert_close(got, want.double(), atol=1e-5, rtol=1e-4)


def test_exported_explanations_equal_the_served_ones(precomputed: dict) -> None:
    """The explanation documents equal what the served explorer answers from the same
    run with no model (from the run's cache), and what it computes with the model."""
    from lurker.server import create_app
    from lurker.server.serve import background

    kind, site, url = precomputed["kind"], precomputed["site"], precomputed["url"]
    docs = sorted((site / f"data/runs/{kind}").rglob("*.json"))
    explain = [
        f for f in docs if "/explain" in f.relative_to(site).as_posix() or f.stem == "explained"
    ]
    assert len(explain) >= 2 + len(_held(precomputed))
    assert not list(site.rglob("*.png"))  # no heatmap image, no input picture
    with background(create_app(precomputed["run"], model_obj=precomputed["model"],
                               dataset=precomputed["data"])) as live:  # fmt: skip
        for f in explain:
            relative = _api_path(f.relative_to(site / "data").as_posix().removesuffix(".json"))
            got = json.loads(f.read_text(encoding="utf-8"))
            assert got == get_json(f"{url}/api/{relative}"), relative
            if "/live/" in relative:  # computed afresh with the model: the same numbers
                fresh = get_json(f"{live.rstrip('/')}/api/{relative}")
                assert fresh["cached"] is False  # (a model object given: not the run's cache)
                for key in ("cached", "seconds"):
                    got.pop(key), fresh.pop(key)
                _assert_close(got, fresh, relative)


def _assert_close(got: Any, want: Any, where: str) -> None:
    """Equal documents, floats to float32 rounding (the cache keeps float32 scores)."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), where
        for k in want:
            _assert_close(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for i, (a, b) in enumerate(zip(got, want, strict=True)):
            _assert_close(a, b, f"{where}[{i}]")
    elif isinstance(want, float):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-7), where
    else:
        assert got == want, where


def test_asking_a_method_the_run_cannot_show_says_which_it_can(precomputed: dict) -> None:
    from lurker.errors import LurkerError
    from lurker.server.explained import precompute

    if precomputed["kind"] == "eeg":
        pytest.skip("a signal run shows every attribution method")
    with pytest.raises(LurkerError, match=r"gradcam.*no picture.*saliency"):
        precompute(precomputed["run"], 1, ["gradcam"], dataset=precomputed["data"], progress=False)


#: What a precomputed method's card draws: tokens coloured, feature bars, signal bands.
CARD = {"text": ".tok", "wine": ".feat-bar, .bar, svg, rect", "eeg": "svg.signal-plot"}


def test_the_static_explain_page_shows_the_precomputed_scores(browser: Any, precomputed: dict):
    skip_without_browser()
    kind, held = precomputed["kind"], _held(precomputed)
    with static_server(precomputed["site"]) as base, strict_page(browser) as pg:
        pg.goto(f"{base}#/r/{kind}/explain")
        pg.wait_for_selector("#explain-picker a")
        assert pg.locator("#explain-picker a").count() == len(held)
        pg.locator("#explain-picker a").first.click()
        pg.wait_for_selector("[data-method]")
        cards = pg.locator("[data-method]")
        assert [c.get_attribute("data-method") for c in cards.all()] == held[0]["methods"]
        for c in cards.all():  # each drawn from its document, none left computing
            c.locator(CARD[kind]).first.wait_for()
            assert "computing" not in c.inner_text()
        assert "top class" in pg.locator("#explained-only").inner_text()
        assert pg.locator(".target.on").get_attribute("data-class") == str(held[0]["top"]["class"])
        pg.screenshot(path=str(precomputed["run"].parent / "explain.png"), full_page=True)


def test_samples_explained_beyond_the_top_lists_are_exported_with_their_values(
    precomputed: dict, tmp_path: Path
) -> None:
    """A sample precomputed beyond the top-k lists (``--explanations N``) is offered by
    the static Explain page, which reads its values from the sample's page document: the
    export writes that document too (it wrote only the top-k samples', and such a sample
    opened to an error)."""
    from lurker.server.explained import precompute
    from lurker.server.export import export_site

    kind, data, url = precomputed["kind"], precomputed["data"], precomputed["url"]
    precompute(precomputed["run"], len(data), ["saliency"], dataset=data, progress=False)
    site = export_site(precomputed["run"], tmp_path / "site", dataset=data, progress=False)
    held = json.loads((site / f"data/runs/{kind}/explained.json").read_text())["samples"]
    ranked = {
        int(s.stem) for s in (precomputed["site"] / f"data/runs/{kind}/samples").glob("*.json")
    }
    if not {h["sample"] for h in held} - ranked:
        pytest.skip(f"every sample of the {kind} run is in a top-k list")
    for h in held:
        f = site / f"data/runs/{kind}/samples/{h['sample']}.json"
        got = json.loads(f.read_text())
        want = get_json(f"{url}/api/runs/{kind}/samples/{h['sample']}")
        for key in ("prediction", "prediction_error"):  # the site runs no model
            got.pop(key), want.pop(key)
        assert got == want
