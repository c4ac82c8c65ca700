"""The live view on runs with no picture: a typed sentence (or token ids) on a text run,
typed feature values on a tabular run. Before, Live took only an uploaded image and said
so on such runs. Now the server runs the live model on the typed input and answers its
prediction and every probed layer's units (mean and max over positions, as the probe
ranks them), checked here against forward hooks on the model; bad input is a 422 naming
the problem."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
import torch

from explorer_fixtures import served_run, skip_without_browser, strict_page, watch
from test_tabular_explorer import LAYER as WINE_LAYER
from test_tabular_explorer import Wine
from test_token_inputs import LAYER as TEXT_LAYER
from test_token_inputs import VOCAB, TextClassifier, _dataset

WORDS = [f"w{i}" for i in range(VOCAB)]
WORDS[7] = "Seven"  # the word the classifier looks for


@pytest.fixture(scope="module")
def text(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from lurker.server import create_app
    from lurker.server.serve import background

    torch.manual_seed(0)
    model, data = TextClassifier().eval(), _dataset()
    root: Path = tmp_path_factory.mktemp("text")
    with served_run(root, "text", model, data, TEXT_LAYER, 5) as served:
        app = create_app(served["run"], model_obj=model, dataset=data, vocab=WORDS)
        with background(app) as url:
            yield {**served, "vocab_url": url.rstrip("/")}


@pytest.fixture(scope="module")
def wine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(13, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    with served_run(
        tmp_path_factory.mktemp("tab"), "wine", model.eval(), Wine(), WINE_LAYER, 4
    ) as s:
        yield s


def _post(url: str, run: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{url}/api/runs/{run}/live/inputs", json=body, timeout=60)


def _hooked(model: torch.nn.Module, layer: str, x: torch.Tensor) -> torch.Tensor:
    """Brute force: the module's output on ``x`` by a forward hook (grad on, so torch's
    fused encoder path, which skips the submodules, is not taken)."""
    seen: list[torch.Tensor] = []
    hook = model.get_submodule(layer).register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        with torch.enable_grad():
            logits = model(x)
    finally:
        hook.remove()
    return seen[0].detach()[0], logits.detach()[0]


def _by_layer(doc: dict[str, Any], name: str) -> dict[str, Any]:
    return next(layer for layer in doc["layers"] if layer["layer"] == name)


def test_a_typed_sentence_gives_the_units_forward_hooks_give(text: dict):
    sentence = "w1 seven w3 W4 w5 w1"  # case folded where it names one word
    ids = [1, 7, 3, 4, 5, 1]
    r = _post(text["vocab_url"], "text", {"text": sentence})
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["ids"] == ids and doc["words"] == [WORDS[i] for i in ids]
    acts, logits = _hooked(text["model"], TEXT_LAYER, torch.tensor([ids]))  # (tokens, units)
    layer = _by_layer(doc, TEXT_LAYER)
    assert layer["positions"] == len(ids) and layer["num_units"] == acts.shape[1]
    assert layer["mean"] == pytest.approx(acts.mean(0).tolist(), rel=1e-4, abs=1e-5)
    assert layer["max"] == pytest.approx(acts.amax(0).tolist(), rel=1e-4, abs=1e-5)
    assert layer["top"] == acts.amax(0).argsort(descending=True)[:10].tolist()
    assert doc["predictions"][0]["class"] == int(logits.argmax())
    assert doc["predictions"][0]["prob"] == pytest.approx(float(logits.softmax(0).max()), rel=1e-4)
    # the same sequence typed as ids is the same input
    again = _post(text["url"], "text", {"ids": ids}).json()
    assert again["input"] == doc["input"] and again["words"] == [None] * len(ids)
    assert _by_layer(again, TEXT_LAYER)["max"] == layer["max"]


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({"text": "w1 blorp w2 zzz"}, "'blorp', 'zzz'"),
        ({"ids": [1, 20]}, "id 20, out of range"),
        ({"ids": [1, -1]}, "id -1, out of range"),
        ({"ids": [1, "two"]}, "'two', not a token id"),
        ({"ids": []}, "empty"),
        ({"features": [1.0]}, "send"),
    ],
)
def test_bad_token_input_is_named(text: dict, body: dict, says: str):
    r = _post(text["vocab_url"], "text", body)
    assert r.status_code == 422 and says in r.json()["detail"], r.text


def test_words_without_a_vocabulary_say_to_type_ids(text: dict):
    r = _post(text["url"], "text", {"text": "w1 w2"})
    assert r.status_code == 422 and "no vocabulary" in r.json()["detail"]
    assert "token ids as numbers" in r.json()["detail"]


def test_typed_features_give_the_units_forward_hooks_give(wine: dict):
    row = wine["data"].tensors[0][5].clone()
    row[0] = 2.5
    r = _post(wine["url"], "wine", {"features": row.tolist()})
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["feature_names"] == Wine().feature_names
    acts, logits = _hooked(wine["model"], WINE_LAYER, row[None])
    layer = _by_layer(doc, WINE_LAYER)
    assert layer["positions"] == 1
    assert layer["mean"] == pytest.approx(acts.tolist(), rel=1e-5, abs=1e-6)
    assert layer["max"] == layer["mean"]
    assert doc["predictions"][0]["class"] == int(logits.argmax())


@pytest.mark.parametrize(
    ("features", "says"),
    [
        ([0.0] * 12, "12 values given; the model takes 13"),
        ([0.0] * 12 + ["x"], "feature 12 (proline) is 'x', not a number"),
        ([0.0] * 12 + [None], "feature 12 (proline) is None"),
        ([0.0] * 12 + ["inf"], "finite"),
        ([0.0] * 12 + ["1_0"], "feature 12 (proline) is '1_0', not a number"),  # not 10
        ([0.0] * 12 + [10**400], "feature 12 (proline) is 1000"),  # was a 500
        ([1e308] * 13, "feature 0 (alcohol) is 1e+308, beyond the model's input dtype float32"),
    ],
)
def test_bad_features_are_named(wine: dict, features: list, says: str):
    r = _post(wine["url"], "wine", {"features": features})
    assert r.status_code == 422 and says in r.json()["detail"], r.text


def test_without_a_model_typed_input_says_how_to_attach_one(wine: dict):
    r = _post(wine["bare"], "wine", {"features": [0.0] * 13})
    assert r.status_code == 409 and "--model" in r.json()["detail"], r.text


def _shoot(pg: Any, name: str) -> None:
    """Screenshots at a laptop's and a projector's width where ``LURKER_SHOTS`` names a
    folder (to look at; nothing is asserted on them)."""
    where = os.environ.get("LURKER_SHOTS")
    if not where:
        return
    for w, hh in ((1280, 800), (800, 600)):
        pg.set_viewport_size({"width": w, "height": hh})
        pg.screenshot(path=os.path.join(where, f"live-{name}-{w}.png"), full_page=False)


def test_the_live_page_runs_a_typed_sentence(browser: Any, text: dict):
    skip_without_browser()
    model = text["model"]
    with strict_page(browser) as pg:
        pg.goto(f"{text['vocab_url']}/#/r/text/live")
        pg.fill("#live-text", "w1 w2 w3 w4")
        pg.press("#live-text", "Enter")
        pg.wait_for_selector("#live-preds li")
        first = pg.inner_text("#live-preds li >> nth=0")
        with torch.no_grad():
            logits = model(torch.tensor([[1, 2, 3, 4]]))[0]
        assert first.startswith(str(int(logits.argmax())))
        card = pg.locator(f".live-layer[data-layer='{TEXT_LAYER}']")
        assert card.locator("a[data-unit]").count() == 10
        href = card.locator("a[data-unit] >> nth=0").get_attribute("href")
        assert f"/unit/{TEXT_LAYER}/" in href
        pg.fill("#live-text", "Seven Seven w2 w3")
        pg.click("#live-run")
        pg.wait_for_selector("#live-fed .tok >> text=Seven")
        _shoot(pg, "text")
    ctx, pg, errors = watch(browser, 1280, 900)  # the 422 is expected: not a strict page
    try:
        pg.goto(f"{text['vocab_url']}/#/r/text/live")
        pg.fill("#live-text", "w1 nope")
        pg.click("#live-run")
        pg.wait_for_selector("#live-result .notice.error")
        assert "'nope'" in pg.inner_text("#live-result")
        assert all("422" in e for e in errors), errors
    finally:
        ctx.close()


def test_the_live_page_recomputes_when_a_feature_is_edited(browser: Any, wine: dict):
    skip_without_browser()
    model, data = wine["model"], wine["data"]
    with strict_page(browser) as pg:
        pg.goto(f"{wine['url']}/#/r/wine/live?sample=5")
        pg.wait_for_selector("#live-preds li")
        row = data.tensors[0][5]
        assert float(pg.input_value("#feature-0")) == pytest.approx(float(row[0]), rel=1e-5)
        assert "alcohol" in pg.inner_text("label[for=feature-0]")
        before = pg.inner_text("#live-preds")
        # a value far enough out to change the answer, found by the model itself
        edited = row.clone()
        for value in (-30.0, 30.0):
            edited[12] = value
            with torch.no_grad():
                if model(edited[None]).argmax() != model(row[None]).argmax():
                    break
        pg.fill("#feature-12", str(edited[12].item()))
        pg.press("#feature-12", "Tab")
        want = Wine().classes[int(model(edited[None]).argmax())]
        pg.wait_for_function(
            "w => document.querySelector('#live-preds li .pname')?.textContent.includes(w)",
            arg=want,
        )
        assert pg.inner_text("#live-preds") != before
        # each unit's bar is as long as |value| from zero, a negative one marked: a bar
        # measured from the layer's lowest value gave negative values long bars
        doc = _post(wine["url"], "wine", {"features": edited.tolist()}).json()
        for layer in doc["layers"]:
            card = pg.locator(f".live-layer[data-layer='{layer['layer']}']")
            most = max(abs(v) for v in layer["max"] if v is not None)
            for i, u in enumerate(layer["top"]):
                bar = card.locator("li .pbar").nth(i)
                width = float(bar.evaluate("b => parseFloat(b.style.width)"))
                assert width == pytest.approx(100 * abs(layer["max"][u]) / most, abs=0.1)
                assert ("neg" in bar.get_attribute("class")) == (layer["max"][u] < 0)
        _shoot(pg, "wine")


def _fed_ids(pg: Any) -> list[int]:
    titles = pg.locator("#live-fed .tok").evaluate_all("ts => ts.map(t => t.title)")
    return [int(t.rsplit("id ", 1)[1]) for t in titles]


def test_the_sample_page_opens_live_filled_with_that_sample(browser: Any, text: dict):
    """The sample page's *Try it in live view* fills the box from the sample, as words
    where the vocabulary spells its ids apart; where two of its ids are spelled alike the
    words would feed another sequence, so the box holds the sample's ids instead."""
    skip_without_browser()
    from lurker.server import create_app
    from lurker.server.serve import background

    ids = text["data"].tensors[0][7].tolist()
    with strict_page(browser) as pg:
        pg.goto(f"{text['vocab_url']}/#/r/text/sample/7")
        pg.click("#open-live")
        pg.wait_for_selector("#live-fed .tok")
        assert pg.input_value("#live-mode") == "text"
        assert pg.input_value("#live-text") == " ".join(WORDS[i] for i in ids)
        assert _fed_ids(pg) == ids
    dup = list(WORDS)
    t = max(ids)  # a later id spelled as the one before it: the word looks up the first
    dup[t] = dup[t - 1]
    app = create_app(text["run"], model_obj=text["model"], dataset=text["data"], vocab=dup)
    with background(app) as url, strict_page(browser) as pg:
        pg.goto(f"{url.rstrip('/')}/#/r/text/sample/7")
        pg.click("#open-live")
        pg.wait_for_selector("#live-result .notice >> text=spells several ids alike")
        assert _fed_ids(pg) == ids  # the sample's own sequence, not the words' lookup
        assert pg.input_value("#live-mode") == "ids"
        assert pg.input_value("#live-text") == " ".join(map(str, ids))


CHARS = list(" abcdefghijklmnopq\n.")  # a character-level vocabulary: space and newline are tokens


@pytest.fixture(scope="module")
def chars(text: dict) -> Iterator[str]:
    """The text run served with a character-level vocabulary (a char GPT's)."""
    from lurker.server import create_app
    from lurker.server.serve import background

    app = create_app(text["run"], model_obj=text["model"], dataset=text["data"], vocab=CHARS)
    with background(app) as url:
        yield url.rstrip("/")


def test_a_character_vocabulary_reads_typed_text_one_character_a_token(text: dict, chars: str):
    """With a character-level vocabulary, typed text is read one character per token,
    spaces and newlines included (as a char model was trained), not split at spaces into
    words no entry spells; its units are the ones forward hooks give on those ids."""
    typed = "ab c\nd."
    ids = [CHARS.index(c) for c in typed]
    r = _post(chars, "text", {"text": typed})
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["ids"] == ids and doc["words"] == list(typed)
    acts, _ = _hooked(text["model"], TEXT_LAYER, torch.tensor([ids]))
    assert _by_layer(doc, TEXT_LAYER)["max"] == pytest.approx(
        acts.amax(0).tolist(), rel=1e-4, abs=1e-5
    )
    # case is not folded (a char model's 'A' is not its 'a'), and the unknown one is named
    bad = _post(chars, "text", {"text": "aB,"})
    assert bad.status_code == 422 and "'B', ','" in bad.json()["detail"], bad.text
    assert "characters" in bad.json()["detail"]
    summary = httpx.get(f"{chars}/api/runs/text", timeout=60).json()["dataset"]
    assert summary["vocab_chars"] is True
    words = httpx.get(f"{text['vocab_url']}/api/runs/text", timeout=60).json()["dataset"]
    assert words["vocab_chars"] is False


def test_each_listed_unit_names_the_position_where_it_peaks(text: dict):
    """Live said how strongly a unit fires, not where: ``peak`` is each unit's argmax over
    its tokens, as forward hooks give it (units on the last axis of ``(tokens, units)``)."""
    ids = [1, 7, 3, 4, 7, 2, 9]
    doc = _post(text["url"], "text", {"ids": ids}).json()
    acts, _ = _hooked(text["model"], TEXT_LAYER, torch.tensor([ids]))  # (tokens, units)
    layer = _by_layer(doc, TEXT_LAYER)
    assert layer["peak"] == acts.double().argmax(0).tolist()
    assert len(set(layer["peak"])) > 1  # the units do not all peak at one token


class FixedLength(torch.nn.Module):
    """A text model that takes only sequences of ``LENGTH`` tokens (it flattens them into
    its head), its units channels-first: a conv over the tokens, ``(units, tokens)``."""

    def __init__(self, padding_idx: int | None) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, 8, padding_idx=padding_idx)
        self.conv = torch.nn.Conv1d(8, 12, 3, padding=1)
        self.head = torch.nn.Linear(12 * FIXED, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(self.emb(x).transpose(1, 2)))
        return self.head(h.flatten(1))


FIXED = 10


@pytest.fixture(scope="module")
def fixed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from lurker.server import create_app
    from lurker.server.serve import background

    torch.manual_seed(0)
    model, data = FixedLength(padding_idx=0).eval(), _dataset()
    with torch.no_grad():  # unit 0 reads nothing: its bias at every token, a dead unit
        model.conv.weight[0] = 0
    root: Path = tmp_path_factory.mktemp("fixed")
    with served_run(root, "fixed", model, data, "conv", 5) as served:
        no_pad = FixedLength(padding_idx=None).eval()
        no_pad.load_state_dict(model.state_dict())
        with (
            background(create_app(served["run"], model_obj=model, dataset=data)) as url,
            background(create_app(served["run"], model_obj=no_pad, dataset=data)) as bare,
            background(
                create_app(
                    served["run"], model_obj=no_pad, dataset=data, vocab=["<pad>", *WORDS[1:]]
                )
            ) as voc,
        ):
            yield {
                **served,
                "url": url.rstrip("/"),
                "no_pad": bare.rstrip("/"),
                "voc": voc.rstrip("/"),
            }


def test_a_short_input_is_padded_with_the_embeddings_padding_idx(fixed: dict):
    """A model of a fixed length answered a short input with its own error; now the input
    is padded with the run's pad id (the embedding's ``padding_idx``), and the answer is the
    one the padded ids typed by hand give, and says so."""
    ids = [5, 7, 3]
    padded = ids + [0] * (FIXED - len(ids))
    r = _post(fixed["url"], "fixed", {"ids": ids})
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["ids"] == padded and doc["padded_from"] == len(ids)
    assert "Padded" in doc["fitted"] and "7 x id 0" in doc["fitted"]
    assert "padding_idx" in doc["fitted"]
    by_hand = _post(fixed["url"], "fixed", {"ids": padded}).json()
    assert (
        by_hand["fitted"] is None
        and by_hand["padded_from"] is None
        and by_hand["input"] == doc["input"]
    )
    assert by_hand["predictions"] == doc["predictions"]
    assert _by_layer(by_hand, "conv") == _by_layer(doc, "conv")
    acts, logits = _hooked(fixed["model"], "conv", torch.tensor([padded]))  # (units, tokens)
    layer = _by_layer(doc, "conv")
    assert layer["max"] == pytest.approx(acts.amax(1).tolist(), rel=1e-5, abs=1e-6)
    # unit 0 is equal at every token: it peaks nowhere (token 0 would name a token)
    acts = acts.double()
    live = acts.amax(1) > acts.amin(1)
    assert live.tolist() == [False] + [True] * (acts.shape[0] - 1)
    want = [int(i) if f else None for i, f in zip(acts.argmax(1), live)]
    assert layer["peak"] == want
    assert doc["predictions"][0]["class"] == int(logits.argmax())


def test_a_short_input_is_padded_with_the_vocabularys_pad_token(fixed: dict):
    doc = _post(fixed["voc"], "fixed", {"text": "w5 Seven"}).json()
    assert doc["ids"] == [5, 7] + [0] * (FIXED - 2)
    assert doc["words"][2:] == ["<pad>"] * (FIXED - 2)
    assert "'<pad>' (id 0)" in doc["fitted"] and "vocabulary" in doc["fitted"]


def test_a_short_input_without_a_pad_id_says_the_length(fixed: dict):
    r = _post(fixed["no_pad"], "fixed", {"ids": [5, 7, 3]})
    assert r.status_code == 400, r.text
    detail = r.json()["detail"]
    assert "the model failed" in detail and "no padding id" in detail
    assert f"try a sequence of {FIXED}" in detail


def test_a_too_long_input_is_truncated_and_says_so(fixed: dict):
    ids = [(3 * i) % VOCAB for i in range(FIXED + 4)]
    doc = _post(fixed["no_pad"], "fixed", {"ids": ids}).json()
    assert doc["ids"] == ids[:FIXED]
    assert "Truncated" in doc["fitted"] and "last 4 of the 14" in doc["fitted"]
    by_hand = _post(fixed["no_pad"], "fixed", {"ids": ids[:FIXED]}).json()
    assert by_hand["predictions"] == doc["predictions"] and by_hand["input"] == doc["input"]


def test_the_live_page_names_the_token_each_unit_peaks_at(browser: Any, text: dict, fixed: dict):
    skip_without_browser()
    ids = [1, 7, 3, 4, 5, 2]
    acts, _ = _hooked(text["model"], TEXT_LAYER, torch.tensor([ids]))  # (tokens, units)
    with strict_page(browser) as pg:
        pg.goto(f"{text['vocab_url']}/#/r/text/live")
        pg.fill("#live-text", " ".join(WORDS[i] for i in ids))
        pg.press("#live-text", "Enter")
        card = pg.locator(f".live-layer[data-layer='{TEXT_LAYER}']")
        card.locator(".peak-at").first.wait_for()
        for row in range(3):
            li = card.locator("li").nth(row)
            unit = int(li.locator("a[data-unit]").get_attribute("data-unit"))
            at = int(acts[:, unit].double().argmax())
            assert li.locator(".peak-at").inner_text() == f"at “{WORDS[ids[at]]}” (token {at})"
        # the bars as drawn are as long as the values, row against row (each row sized
        # its bar's column by its own text: a unit at 0.7 drew shorter than one at 0.6)
        for width in (1280, 800):
            pg.set_viewport_size({"width": width, "height": 900})
            drawn = card.locator(".pbar").evaluate_all(
                "bars => bars.map(b => b.getBoundingClientRect().width)"
            )
            values = [abs(float(v)) for v in card.locator(".value").all_inner_texts()]
            assert len(drawn) == len(values) > 2
            for w, v in zip(drawn, values):
                assert w == pytest.approx(drawn[0] * v / values[0], abs=1.5), (width, drawn)
        _shoot(pg, "peaks")
        # a fixed-length model: the short input is padded, and the page says so
        pg.goto(f"{fixed['url']}/#/r/fixed/live")
        pg.fill("#live-text", "5 7 3")
        pg.press("#live-text", "Enter")
        pg.wait_for_selector("#live-fitted")
        assert "Padded" in pg.inner_text("#live-fitted")
        assert pg.locator("#live-fed .tok").count() == FIXED
        # a peak on the padding the server added says so; one on a typed token does not
        peaks = pg.locator(".live-layer[data-layer='conv'] .peak-at").all()
        where = [int(peak.get_attribute("data-peak")) for peak in peaks]
        assert min(where) < 3 <= max(where)  # both kinds on the page
        for at, peak in zip(where, peaks):
            said = r"at id \d+ \(token \d, padding\)" if at >= 3 else r"at id \d+ \(token \d\)"
            assert re.fullmatch(said, peak.inner_text()), (at, peak.inner_text())
        _shoot(pg, "padded")


class NamedPad(torch.utils.data.TensorDataset):
    """A dataset that names its padding id, as a tokenizer does, and whose vocabulary has
    no ``<pad>`` word."""

    pad_token_id = 7
    vocab = WORDS


def test_a_short_input_is_padded_with_the_id_the_dataset_names(tmp_path: Path):
    """The dataset's ``pad_token_id`` is stored in the run and preferred over the
    embedding's ``padding_idx`` (0 here): the answer is the model's own on the ids padded
    by hand with 7."""
    import lurker

    torch.manual_seed(0)
    model = FixedLength(padding_idx=0).eval()
    data = NamedPad(*_dataset().tensors)
    with served_run(tmp_path, "pad", model, data, "conv", 3) as served:
        assert lurker.Run.open(served["run"]).meta_now("pad_id") == 7
        ids = [5, 2, 3]
        padded = ids + [7] * (FIXED - len(ids))
        r = _post(served["url"], "pad", {"ids": ids})
        assert r.status_code == 200, r.text
        doc = r.json()
        assert doc["ids"] == padded and doc["padded_from"] == len(ids)
        assert f"{FIXED - 3} x 'Seven' (id 7)" in doc["fitted"]
        assert "the dataset's pad id" in doc["fitted"]
        acts, logits = _hooked(model, "conv", torch.tensor([padded]))
        assert _by_layer(doc, "conv")["max"] == pytest.approx(
            acts.amax(1).tolist(), rel=1e-5, abs=1e-6
        )
        probs = torch.softmax(logits, 0)
        top = doc["predictions"][0]
        assert top["class"] == int(logits.argmax())
        assert top["prob"] == pytest.approx(float(probs.max()), rel=1e-5)


@pytest.mark.parametrize("bad", [-1, 2.0, True, VOCAB])
def test_a_pad_id_that_is_not_an_id_is_not_stored(tmp_path: Path, bad: object):
    from lurker.probe import probe

    data = NamedPad(*_dataset().tensors)
    data.pad_token_id = bad  # type: ignore[assignment]
    with pytest.warns(UserWarning, match="pad_token_id is .* not stored as the run's padding id"):
        run = probe(FixedLength(None).eval(), data, out=tmp_path / "r", k=3, progress=False)
    assert run is not None and run.meta_now("pad_id") is None


#: every page of a run, as reached from its top bar (``{layer}`` the probed layer's name),
#: Live last: its layer card is looked at once the sweep is done
TEXT_PAGES = (
    "",
    "/samples",
    "/sample/3",
    "/layer/{layer}",
    "/unit/{layer}/0",
    "/graph",
    "/map",
    "/explain",
    "/live?sample=3",
)


def test_no_page_of_a_text_run_is_wider_than_a_projectors_800px(browser: Any, text: dict):
    """At 800 px the text Live page scrolled sideways by about 21 px: each layer card's
    unit rows put the peak ("at id 1 (token 0)") and the "mean …" note on one line, wider
    than the card. Now the mean goes under the peak where the card is narrow: no page of
    the run is wider than the window, and every note is still shown, inside its card."""
    skip_without_browser()
    wide = "() => [document.documentElement.scrollWidth, innerWidth]"
    ctx, pg, errors = watch(browser, 800, 900)  # the map's 404 is expected: the run has none
    try:
        for page in TEXT_PAGES:
            pg.goto(f"{text['vocab_url']}/#/r/text{page.format(layer=TEXT_LAYER)}")
            pg.wait_for_selector("main h1, main h2")
            if page.startswith("/live"):
                pg.locator(".live-layer .peak-at").first.wait_for()
            else:
                pg.wait_for_load_state("networkidle")
            scroll, inner = pg.evaluate(wide)
            assert inner == 800 and scroll <= inner, (page, scroll)
        card = pg.locator(f".live-layer[data-layer='{TEXT_LAYER}']")
        right = card.evaluate("c => c.getBoundingClientRect().right")
        means = card.locator("li span", has_text=re.compile(r"^mean "))
        assert means.count() == card.locator("li").count() == 10
        for mean in means.all():
            assert re.fullmatch(r"mean -?\d[\d.e+-]*", mean.inner_text()), mean.inner_text()
            assert mean.evaluate("m => m.getBoundingClientRect().right") <= right
        _shoot(pg, "narrow")
    finally:
        ctx.close()
    maps = [e for e in errors if e.endswith("/api/runs/text/map")]
    loads = [e for e in errors if e.startswith("Failed to load resource") and "404" in e]
    assert len(maps) == len(loads) and len(maps) + len(loads) == len(errors), errors
