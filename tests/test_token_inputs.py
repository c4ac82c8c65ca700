"""A text classifier's run in the explorer: inputs that are token ids, not images.

A small model (an embedding, two batch-first TransformerEncoder layers, a mean-pool and a
linear head) probed from Python on ``(token ids, label)`` pairs. Before, every page asked
for images the server could not make ("to_pil needs a (1|3, H, W) ... image, got (12,)"):
the layer grid was 64 broken images, the unit page grey "no image" tiles under image /
gradient / crop toggles, and the sample page's prediction failed with that same error.
Now the pages show each sample's token ids, the token where the unit peaks marked, every
number checked here against forward hooks on the model; images are refused with the
reason, the live view takes a typed sequence (tests/test_live_typed.py), and Explain
scores each token of a sample.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from explorer_fixtures import get_json, served_run, skip_without_browser, strict_page

VOCAB, LENGTH, N, K = 20, 10, 48, 5
RID = "text"
LAYER = "enc.layers.1.norm2"  # a module the oracle hooks: (N, tokens, 32)


class TextClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 32)
        block = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(block, 2, enable_nested_tensor=False)
        self.head = nn.Linear(32, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(self.emb(x)).mean(1))


def _dataset() -> TensorDataset:
    """Does the sequence hold token 7? (half of them do, at a random place)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, VOCAB, (N, LENGTH), generator=g)
    x[x == 7] = 3
    has = torch.rand(N, generator=g) < 0.5
    where = torch.randint(0, LENGTH, (N,), generator=g)
    x[has, where[has]] = 7
    return TensorDataset(x, has.long())


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    torch.manual_seed(0)
    model, data = TextClassifier().eval(), _dataset()
    root: Path = tmp_path_factory.mktemp("text")
    with served_run(root, RID, model, data, LAYER, K) as served:
        yield served


def _acts(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Brute force: the layer's output on every sample, ``(N, tokens, units)``, by a
    forward hook (with gradients on, so torch's fused encoder fast path, which skips the
    submodules, is not taken)."""
    seen: list[torch.Tensor] = []
    hook = model.get_submodule(LAYER).register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        with torch.enable_grad():
            model(x)
    finally:
        hook.remove()
    assert len(seen) == 1
    return seen[0].detach()


def test_unit_entries_carry_their_tokens_and_peaks_as_the_model_computes(served: dict):
    model, data, url = served["model"], served["data"], served["url"]
    tokens = data.tensors[0]
    acts = _acts(model, tokens)
    peaks, where = acts.max(dim=1)  # (N, units): each sample's peak and its token
    means = acts.mean(dim=1)
    summary = get_json(f"{url}/api/runs/{RID}")
    assert summary["dataset"]["tokens"] == LENGTH
    for unit in range(acts.shape[2]):
        doc = get_json(f"{url}/api/runs/{RID}/layers/{LAYER}/units/{unit}")
        assert doc["token_length"] == LENGTH and doc["tokens_error"] is None
        for which, per_sample in (("max", peaks[:, unit]), ("mean", means[:, unit])):
            entries = doc["top"][which]
            want = per_sample.argsort(descending=True)[:K].tolist()
            assert [e["sample_id"] for e in entries] == want, (unit, which)
            for e in entries:
                sid = e["sample_id"]
                assert e["tokens"] == tokens[sid].tolist()
                assert e["x"] == int(where[sid, unit])  # the token the page marks
                assert e["value"] == pytest.approx(float(per_sample[sid]), rel=1e-5, abs=1e-6)
        assert doc["max"] == pytest.approx(float(peaks[:, unit].max()), rel=1e-5)


def test_layer_tiles_show_the_top_sequence_around_its_peak(served: dict):
    model, data, url = served["model"], served["data"], served["url"]
    tokens = data.tensors[0]
    acts = _acts(model, tokens)
    doc = get_json(f"{url}/api/runs/{RID}/layers/{LAYER}")
    for u in doc["units"]:
        unit, sid = u["unit"], u["top_max"]
        assert sid == int(acts[:, :, unit].amax(dim=1).argmax())
        peak = int(acts[sid, :, unit].argmax())
        assert u["top_max_peak"] == [0, peak]
        start = max(0, peak - 3)
        assert u["top_max_tokens_start"] == start
        assert u["top_max_tokens"] == tokens[sid, start : peak + 4].tolist()


def test_sample_shows_its_tokens_and_the_models_prediction(served: dict):
    model, data, url = served["model"], served["data"], served["url"]
    sid = 5
    doc = get_json(f"{url}/api/runs/{RID}/samples/{sid}")
    assert doc["tokens"] == data.tensors[0][sid].tolist() and doc["tokens_error"] is None
    assert doc["prediction_error"] is None  # was: "to_pil needs a (1|3, H, W) ... image"
    with torch.no_grad():
        probs = model(data.tensors[0][sid][None]).softmax(-1)[0]
    got = {p["class"]: p["prob"] for p in doc["prediction"]}
    assert got == {c: pytest.approx(float(probs[c]), rel=1e-5) for c in range(2)}


def test_images_of_token_ids_are_refused_with_the_reason(served: dict):
    import httpx2 as httpx

    from lurker.errors import LurkerError
    from lurker.probe.data import input_image, wrap

    url = served["url"]
    for path in (
        "samples/3/image.png",
        f"layers/{LAYER}/units/0/max/0/input.png",
        f"layers/{LAYER}/units/0/max/0/crop.png",
        "live/sample-3",
    ):
        r = httpx.get(f"{url}/api/runs/{RID}/{path}")
        assert r.status_code == 409, (path, r.status_code, r.text)
        assert f"{LENGTH} token ids" in r.json()["detail"], r.text
    with pytest.raises(LurkerError, match=f"sample 3 is a sequence of {LENGTH} token ids"):
        input_image(wrap(served["data"]), 3)
    # unit images from Python (and `lurker images`): the same reason, not a shape error
    from lurker.probe import UnitImages

    images = UnitImages(served["run"], model=served["model"], dataset=served["data"])
    for make in (
        lambda: images.gradients(LAYER, 0),
        lambda: images.get("crop", LAYER, 0, rank=0, which="max"),
        lambda: images.get("input", LAYER, 0, rank=0, which="max"),
    ):
        with pytest.raises(LurkerError, match=f"is a sequence of {LENGTH} token ids"):
            make()


def test_unit_images_of_token_ids_are_refused_before_any_progress(served: dict, capsys):
    """`lurker images` on a run of token ids printed "images: 0/96 (0%)" (its progress
    line) before refusing: a start it would never make. Now the refusal comes first,
    naming the token ids, whichever kinds are asked."""
    from lurker.errors import LurkerError
    from lurker.probe import UnitImages

    images = UnitImages(served["run"], model=served["model"], dataset=served["data"])
    for kinds in (("input", "grad"), ("grad",)):
        capsys.readouterr()
        with pytest.raises(LurkerError, match=f"is a sequence of {LENGTH} token ids"):
            images.write_all(layers=[LAYER], kinds=kinds, progress=True, progress_every=0)
        err = capsys.readouterr().err
        assert "images:" not in err and "0%" not in err, err


def test_without_its_dataset_the_run_says_why_it_shows_no_tokens(served: dict):
    bare = served["bare"]
    assert get_json(f"{bare}/api/runs/{RID}")["dataset"]["tokens"] == LENGTH
    doc = get_json(f"{bare}/api/runs/{RID}/layers/{LAYER}/units/0")
    assert "does not record its dataset" in doc["tokens_error"]
    assert all(e["tokens"] is None for e in doc["top"]["max"] + doc["top"]["mean"])
    sample = get_json(f"{bare}/api/runs/{RID}/samples/0")
    assert sample["tokens"] is None and "does not record its dataset" in sample["tokens_error"]


def test_pages_show_sequences_with_the_peak_marked_and_no_images(browser: Any, served: dict):
    skip_without_browser()
    data, url = served["data"], served["url"]
    tokens = data.tensors[0]
    unit = 3
    doc = get_json(f"{url}/api/runs/{RID}/layers/{LAYER}/units/{unit}")
    with strict_page(browser) as pg:
        for which in ("max", "mean"):
            pg.goto(f"{url}/#/r/{RID}/unit/{LAYER}/{unit}?tab={which}")
            pg.wait_for_selector(".token-entry")
            rows = pg.locator(".token-entry")
            assert rows.count() == K and pg.locator("img").count() == 0
            for i, e in enumerate(doc["top"][which]):
                row = rows.nth(i)
                assert int(row.get_attribute("data-sample")) == e["sample_id"]
                ids = row.locator(".tok").evaluate_all("ts => ts.map(t => +t.textContent)")
                assert ids == tokens[e["sample_id"]].tolist()
                marked = row.locator(".tok-peak")
                assert marked.count() == 1 and int(marked.get_attribute("data-pos")) == e["x"]
            assert pg.locator("#token-inputs").is_visible()

        pg.goto(f"{url}/#/r/{RID}/layer/{LAYER}?sort=index")
        pg.wait_for_selector(".unit-card .tok-thumb")
        assert pg.locator(".unit-card .tok-thumb").count() == doc["num_units"]
        assert pg.locator("img").count() == 0
        assert f"over {LENGTH} tokens" in pg.inner_text("h1")  # not "positions"

        pg.goto(f"{url}/#/r/{RID}/sample/7")
        pg.wait_for_selector("#sample-tokens .tok")
        ids = pg.locator("#sample-tokens .tok").evaluate_all("ts => ts.map(t => +t.textContent)")
        assert ids == tokens[7].tolist()
        # Live takes a typed sequence, filled from this sample
        assert pg.get_attribute("#open-live", "href").endswith("/live?sample=7")

    with strict_page(browser) as pg:  # `lurker serve RUN`: no dataset, said once, no errors
        pg.goto(f"{served['bare']}/#/r/{RID}/unit/{LAYER}/{unit}")
        pg.wait_for_selector(".token-entry")
        assert "does not record its dataset" in pg.locator("#token-inputs").inner_text()
        assert pg.locator("img").count() == 0


def test_a_static_export_of_a_token_run_carries_each_samples_tokens(
    served: dict, tmp_path: Path
) -> None:
    """The exported sample pages carry the sample's token ids (as the served ones do) and
    the export does not call the samples imageless for a changed dataset: they have no
    picture by their nature."""
    import json
    import warnings

    from lurker.server.export import export_site

    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        export_site(served["run"], tmp_path / "site", dataset=served["data"])
    assert not [w for w in said if "no image" in str(w.message)], [str(w.message) for w in said]
    docs = sorted((tmp_path / "site").rglob("samples/*.json"))
    assert docs
    for doc in docs[:5]:
        got = json.loads(doc.read_text())
        sid = got["sample"]["id"]
        assert got["tokens"] == served["data"][sid][0].tolist() and got["tokens_error"] is None


class Strided(nn.Module):
    """Token ids through an embedding, then a strided Conv1d: its positions are groups of
    4 tokens, not tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 8)
        self.conv = nn.Conv1d(8, 6, 4, stride=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.emb(x).transpose(1, 2)).amax(2)


class Waveform(nn.Module):
    """Integer samples of a signal (int16 PCM) read as numbers, not looked up: not ids."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 4, 4, stride=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x.float().unsqueeze(1) / 32768).amax(2)


def test_a_layer_whose_positions_are_not_tokens_marks_none(tmp_path: Path) -> None:
    """A strided convolution's peak is a group of tokens: its tiles show the first tokens,
    unmarked, never token ``x``; and 1-D integer inputs nothing looks up (a waveform's
    samples) are not token ids."""
    from lurker.probe import probe
    from lurker.server import create_app
    from lurker.server.serve import background
    from lurker.server.state import token_length
    from lurker.store import Run

    torch.manual_seed(0)
    x = torch.randint(0, VOCAB, (12, 16))
    data = TensorDataset(x, torch.arange(12) % 2)
    run = probe(Strided().eval(), data, out=tmp_path / "s", layers=["conv"], k=3, progress=False)
    assert run is not None
    run.close()
    with background(create_app(tmp_path / "s", model_obj=Strided().eval(), dataset=data)) as url:
        import json
        import urllib.request

        with urllib.request.urlopen(f"{url}api/runs/s/layers/conv") as r:
            doc = json.load(r)
    for u in doc["units"]:  # the first tokens (0..3), not those around the group x
        assert u["top_max_tokens_start"] == 0 and len(u["top_max_tokens"]) == 4, u
    wave = TensorDataset(
        torch.randint(-32768, 32767, (6, 16), dtype=torch.int16), torch.arange(6) % 2
    )
    run = probe(Waveform().eval(), wave, out=tmp_path / "w", layers=["conv"], k=2, progress=False)
    assert run is not None
    run.close()
    with Run.open(tmp_path / "w") as r:
        assert token_length(r) is None
    with Run.open(tmp_path / "s") as r:
        assert token_length(r) == 16


def test_explain_scores_each_token_as_lurker_explain_does(served: dict):
    """The server's per-token scores of a dataset sample equal ``lurker.explain`` on the
    same ids (was: 409, Explain shows images)."""
    import httpx2 as httpx

    import lurker

    model, data, url = served["model"], served["data"], served["url"]
    sid = 6
    ids = data.tensors[0][sid][None]
    listed = get_json(f"{url}/api/runs/{RID}/explain/methods")["methods"]
    assert [m["name"] for m in listed] == [
        "saliency",
        "input_x_gradient",
        "integrated_gradients",
        "smoothgrad",
    ]
    for method, options in (
        ("input_x_gradient", {}),
        ("integrated_gradients", {}),
        ("saliency", {}),
        ("smoothgrad", {"seed": 0}),
    ):
        doc = get_json(f"{url}/api/runs/{RID}/live/sample-{sid}/explain/{method}?target=1")
        ours = lurker.explain(model, ids, 1, method=method, **options)
        assert doc["tokens"] == ids[0].tolist() and doc["shape"] == [1, LENGTH]
        assert doc["scores"] == pytest.approx(ours.attribution[0].tolist(), abs=1e-5)
        assert doc["signed"] == ours.signed and doc["target_class"] == 1
        if method == "integrated_gradients":
            assert doc["delta"] == pytest.approx(float(ours.delta[0]), abs=1e-5)
    r = httpx.get(f"{url}/api/runs/{RID}/live/sample-{sid}/explain/gradcam")
    assert r.status_code == 409 and "does not apply to token ids" in r.json()["detail"]
    r = httpx.get(f"{url}/api/runs/{RID}/live/sample-{sid}/explain/saliency.png")
    assert r.status_code == 409 and "no picture" in r.json()["detail"]
    r = httpx.get(f"{url}/api/runs/{RID}/live/0123456789abcdef/explain/saliency")
    assert r.status_code == 409 and "uploads" in r.json()["detail"]


def test_explain_page_colours_each_token_by_its_score(browser: Any, served: dict):
    """The Explain page of a token run: the sample's tokens, one row per method, each
    token carrying the server's score for the chosen target (the same numbers as the API,
    which the test above checks against lurker.explain), the target chooser the model's
    top classes; the sample page links to it."""
    skip_without_browser()
    data, url = served["data"], served["url"]
    sid = 6
    with strict_page(browser) as pg:
        pg.goto(f"{url}/#/r/{RID}/sample/{sid}")
        pg.wait_for_selector("#explain-this")
        assert pg.get_attribute("#open-live", "href").endswith(f"/live?sample={sid}")
        pg.click("#explain-this")
        pg.wait_for_selector(".token-explain-card[data-method='input_x_gradient'] .tok")
        # class 0, not the top class: its pressed button exists only once the page is
        # drawn again for it (the top class's cards, drawn first, are then gone)
        pg.click(".target-list button[data-class='0']")
        pg.wait_for_selector(".target-list button[data-class='0'][aria-pressed='true']")
        for method in ("saliency", "input_x_gradient", "integrated_gradients", "smoothgrad"):
            card = f".token-explain-card[data-method='{method}']"
            pg.wait_for_selector(f"{card} .tok[data-score]")
            doc = get_json(f"{url}/api/runs/{RID}/live/sample-{sid}/explain/{method}?target=0")
            toks = pg.locator(f"{card} .tok")
            ids = toks.evaluate_all("ts => ts.map(t => +t.dataset.id)")
            assert ids == data.tensors[0][sid].tolist()
            shown = toks.evaluate_all("ts => ts.map(t => +t.dataset.score)")
            assert shown == pytest.approx(doc["scores"], abs=1e-6)
            signed = pg.locator(f"{card} h3 .sign").inner_text().strip()
            assert signed == ("signed" if doc["signed"] else "≥ 0")
            colours = toks.evaluate_all("ts => ts.map(t => t.style.background)")
            assert len(set(colours)) > 1  # coloured by score, not one flat colour
        assert (
            pg.locator(".target-list button[data-class='1']").get_attribute("aria-pressed")
            == "false"
        )
        assert pg.locator("img").count() == 0


def test_the_live_view_takes_a_typed_sequence_not_an_image(browser: Any, served: dict):
    """It offered "Upload an image..." on a run of token ids; then only a pointer to
    Explain. Now a text box of ids (no vocabulary here); tests/test_live_typed.py runs it."""
    skip_without_browser()
    with strict_page(browser) as pg:
        pg.goto(f"{served['url']}/#/r/{RID}/live")
        pg.wait_for_selector("#live-text")
        assert pg.locator("input[type=file]").count() == 0
        assert pg.eval_on_selector("#live-mode", "s => s.value") == "ids"


def test_the_samples_list_carries_each_samples_first_tokens(served: dict):
    """The Samples page of a text run was a grid of grey "no image" tiles: the list now
    carries each sample's first ids (oracle: the dataset tensor), for the page asked."""
    url, tokens = served["url"], served["data"].tensors[0]
    page = get_json(f"{url}/api/runs/{RID}/samples?offset=7&limit=30")
    assert page["tokens_error"] is None and page["features_error"] is None
    assert [s["id"] for s in page["samples"]] == list(range(7, 37))
    for s in page["samples"]:
        assert s["tokens"] == tokens[s["id"]][:16].tolist() and s["features"] is None
    bare = get_json(f"{served['bare']}/api/runs/{RID}/samples?limit=5")
    assert all(s["tokens"] is None for s in bare["samples"])
    assert "does not record its dataset" in bare["tokens_error"]


def test_the_samples_page_shows_tokens_not_missing_images(browser: Any, served: dict):
    skip_without_browser()
    url, tokens = served["url"], served["data"].tensors[0]
    with strict_page(browser) as pg:
        pg.goto(f"{url}/#/r/{RID}/samples")
        pg.wait_for_selector(".sample-card .tok-thumb")
        cards = pg.locator(".sample-card")
        assert cards.count() == N == pg.locator(".sample-card .tok-thumb").count()
        assert pg.locator("img").count() == 0 and pg.locator(".no-img").count() == 0
        for i in (0, 5, N - 1):
            card = cards.nth(i)
            sid = int(card.get_attribute("data-sample") or -1)
            ids = card.locator(".tok").evaluate_all("ts => ts.map(t => +t.dataset.id)")
            assert sid == i and ids == tokens[sid].tolist()
        key = pg.inner_text("#samples-key")
        assert "Under each sample" in key and "image" not in key
    with strict_page(browser) as pg:  # no dataset: why said once, grey tiles, no broken images
        pg.goto(f"{served['bare']}/#/r/{RID}/samples")
        pg.wait_for_selector(".sample-card .no-img")
        assert pg.inner_text(".view").count("does not record its dataset") == 1
        assert pg.locator("img").count() == 0


def test_the_probe_counts_sequences_and_vectors_not_images(tmp_path: Path, capsys):
    """`lurker probe` of token ids said "images/s"; images keep saying so."""
    import lurker

    torch.manual_seed(0)
    lurker.probe(TextClassifier().eval(), _dataset(), out=tmp_path / "t", k=2, progress=True)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("probing:")]
    assert lines and all(line.endswith(" sequences/s") for line in lines), err
    vectors = TensorDataset(torch.randn(12, 5), torch.arange(12) % 2)
    mlp = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    lurker.probe(mlp, vectors, out=tmp_path / "v", k=2, progress=True)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("probing:")]
    assert lines and all(line.endswith(" vectors/s") for line in lines), err
    # integer counts read as numbers (no lookup reads them) are vectors, as the explorer
    # tells them, not sequences
    counts = TensorDataset(torch.randint(0, 9, (12, 5), dtype=torch.int16), torch.arange(12) % 2)

    class Counts(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(5, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x.float())

    lurker.probe(Counts().eval(), counts, out=tmp_path / "c", k=2, progress=True)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("probing:")]
    assert lines and all(line.endswith(" vectors/s") for line in lines), err


def test_a_sample_the_dataset_cannot_read_leaves_the_list_listing(served: dict, tmp_path):
    """The samples list reads each tile's tokens from the dataset: one row that raises
    (the dataset's own error) gave the whole page a 500; the list now lists and says why."""
    from lurker.server import create_app
    from lurker.server.serve import background

    data = served["data"]

    class Flaky(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(data)

        def __getitem__(self, i: int):
            if i == 5:
                raise RuntimeError("row 5 is corrupt")
            return data[i]

    with background(create_app(served["run"], dataset=Flaky())) as url:
        page = get_json(f"{url.rstrip('/')}/api/runs/{RID}/samples?limit=10")
        assert [s["id"] for s in page["samples"]] == list(range(10))
        assert all(s["tokens"] is None for s in page["samples"])
        assert "RuntimeError" in page["tokens_error"] and "row 5 is corrupt" in page["tokens_error"]


def test_ids_no_embedding_reads_offer_no_explanation(tmp_path: Path):
    """An EmbeddingBag reads the ids: a run of token ids to the explorer, but
    lurker.explain attributes at an nn.Embedding only. Explain offered four methods that
    each failed with "pass x.float()"; it now offers none and says why."""
    import httpx2 as httpx

    class Bag(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bag = nn.EmbeddingBag(VOCAB, 8)
            self.fc = nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.bag(x))

    torch.manual_seed(0)
    with served_run(tmp_path, "bag", Bag().eval(), _dataset(), "fc", 3) as served:
        url = served["url"]
        assert get_json(f"{url}/api/runs/bag")["dataset"]["tokens"] == LENGTH
        assert get_json(f"{url}/api/runs/bag/explain/methods")["methods"] == []
        r = httpx.get(f"{url}/api/runs/bag/live/sample-2/explain/saliency.json")
        assert r.status_code == 409 and "nn.Embedding" in r.json()["detail"]


def test_a_top_sample_the_dataset_cannot_read_leaves_the_layer_page_working(served: dict):
    """A row the dataset's own code fails on gave the layer document a 500 (only the
    server's own errors were caught); its tiles are now without tokens, the units there."""
    from lurker.server import create_app
    from lurker.server.serve import background

    data = served["data"]
    layer = get_json(f"{served['url']}/api/runs/{RID}/layers/{LAYER}")
    bad = layer["units"][0]["top_max"]

    class Flaky(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(data)

        def __getitem__(self, i: int):
            if i == bad:
                raise RuntimeError(f"row {i} is corrupt")
            return data[i]

    with background(create_app(served["run"], dataset=Flaky())) as url:
        doc = get_json(f"{url.rstrip('/')}/api/runs/{RID}/layers/{LAYER}")
        assert len(doc["units"]) == len(layer["units"])
        assert all(u["top_max_tokens"] is None for u in doc["units"])
