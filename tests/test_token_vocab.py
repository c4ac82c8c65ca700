"""A text model's run shows words, not bare ids, once it knows its vocabulary.

Oracle: ``vocab[id]`` by hand for each stored id; the vocabulary is made up (a ``<b>``
token checks that the pages escape what the vocabulary says)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from explorer_fixtures import get_json, skip_without_browser, strict_page
from lurker.errors import LurkerError

VOCAB, LENGTH, N, K = 12, 8, 24, 3
WORDS = ["<pad>", "<b>", "Ġthe", "▁cat", " sat", "on", "a", "mat", "\t", "dog", "ran", "x&y"]
LAYER = "conv"


class Text(nn.Module):
    def __init__(self, rows: int = VOCAB) -> None:
        super().__init__()
        self.emb = nn.Embedding(rows, 6)
        self.conv = nn.Conv1d(6, 4, 3, padding=1)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(self.emb(x).transpose(1, 2)).amax(2))


def _data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randint(0, VOCAB, (N, LENGTH), generator=g), torch.arange(N) % 2)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from lurker.probe import probe
    from lurker.server import create_app
    from lurker.server.serve import background

    torch.manual_seed(0)
    model, data = Text().eval(), _data()
    root = tmp_path_factory.mktemp("vocab")
    vocab = {w: i for i, w in enumerate(WORDS)}  # as a tokenizer's get_vocab() gives it
    run = probe(model, data, out=root / "t", layers=[LAYER], k=K, progress=False, vocab=vocab)
    assert run is not None
    run.close()
    with background(create_app(root / "t", model_obj=model, dataset=data)) as url:
        yield {"url": url.rstrip("/"), "data": data, "run": root / "t", "model": model}


def test_api_gives_each_stored_id_its_word(served: dict) -> None:
    url, ids = served["url"], served["data"].tensors[0]
    assert get_json(f"{url}/api/runs/t")["dataset"]["vocab_size"] == VOCAB
    doc = get_json(f"{url}/api/runs/t/layers/{LAYER}/units/1")
    for e in doc["top"]["max"] + doc["top"]["mean"]:
        assert e["tokens"] == ids[e["sample_id"]].tolist()  # the ids stay ids
        assert e["token_text"] == [WORDS[i] for i in e["tokens"]]
    for u in get_json(f"{url}/api/runs/t/layers/{LAYER}")["units"]:
        assert u["top_max_token_text"] == [WORDS[i] for i in u["top_max_tokens"]]
    sample = get_json(f"{url}/api/runs/t/samples/4")
    assert sample["token_text"] == [WORDS[i] for i in ids[4].tolist()]


def test_a_vocab_too_short_is_refused_before_the_sweep(tmp_path: Path) -> None:
    from lurker.probe import probe

    with pytest.raises(LurkerError, match=r"holds 5 tokens.*samples use 12 ids"):
        probe(Text(), _data(), out=tmp_path / "r", k=K, progress=False, vocab=WORDS[:5])
    assert not (tmp_path / "r" / "run.db").exists()  # refused before anything is written


def test_a_vocab_for_images_is_refused_with_the_reason(tmp_path: Path) -> None:
    from lurker.probe import probe

    data = TensorDataset(torch.rand(4, 1, 6, 6), torch.arange(4) % 2)
    with pytest.raises(LurkerError, match="not a sequence of token ids"):
        probe(nn.Conv2d(1, 2, 3), data, out=tmp_path / "i", k=2, progress=False, vocab=WORDS)


def test_vocab_files_round_trip_and_serve_override(served: dict, tmp_path: Path) -> None:
    import json

    from lurker.server import create_app
    from lurker.server.serve import background
    from lurker.vocab import read_vocab

    other = [f"w{i}" for i in range(VOCAB)]
    lines, listed, mapped = tmp_path / "v.txt", tmp_path / "v.json", tmp_path / "m.json"
    lines.write_text("\n".join(other) + "\n")
    listed.write_text(json.dumps(other))
    mapped.write_text(json.dumps({w: i for i, w in enumerate(other)}))
    for f in (lines, listed, mapped):
        assert read_vocab(f) == other
    spaced = tmp_path / "s.txt"
    spaced.write_text(" a\r\n\tb\n\n")  # a token's spaces are its own; an empty token is one
    assert read_vocab(spaced) == [" a", "\tb", ""]
    with pytest.warns(UserWarning, match=r"holds 3 tokens.*looks up 12 ids.*this model's"):
        create_app(served["run"], vocab=read_vocab(spaced))
    app = create_app(served["run"], dataset=served["data"], vocab=read_vocab(lines))
    with background(app) as url:
        doc = get_json(f"{url}api/runs/t/samples/2")
    assert doc["token_text"] == [other[i] for i in doc["tokens"]]


def test_cli_serve_reads_the_vocab_file(served: dict, tmp_path: Path, monkeypatch) -> None:
    from click.testing import CliRunner

    import lurker.server.serve as serve_mod
    from lurker.cli import main

    got: dict[str, Any] = {}
    monkeypatch.setattr(serve_mod, "serve_forever", lambda run, **kw: got.update(kw))
    f = tmp_path / "v.txt"
    f.write_text("\n".join(WORDS) + "\n")
    r = CliRunner().invoke(main, ["serve", str(served["run"]), "--no-browser", "--vocab", str(f)])
    assert r.exit_code == 0, r.output
    assert got["vocab"] == WORDS


def test_unit_page_shows_words_escaped_with_the_peak_marked(browser: Any, served: dict) -> None:
    skip_without_browser()
    url, ids = served["url"], served["data"].tensors[0]
    doc = get_json(f"{url}/api/runs/t/layers/{LAYER}/units/1")
    shown = {"Ġthe": "Ġthe", "▁cat": "▁cat", " sat": "␣sat", "\t": "⇥", "<b>": "<b>"}
    with strict_page(browser) as pg:
        pg.goto(f"{url}/#/r/t/unit/{LAYER}/1")
        pg.wait_for_selector(".token-entry")
        rows = pg.locator(".token-entry")
        assert pg.locator(".tokens b").count() == 0  # "<b>" is text, never markup
        for i, e in enumerate(doc["top"]["max"]):
            toks = rows.nth(i).locator(".tok")
            got = toks.evaluate_all("ts => ts.map(t => [+t.dataset.id, t.textContent])")
            want = ids[e["sample_id"]].tolist()
            assert got == [[t, shown.get(WORDS[t], WORDS[t])] for t in want]
            peak = rows.nth(i).locator(".tok-peak")
            assert peak.count() == 1 and int(peak.get_attribute("data-pos")) == e["x"]
            assert f"id {want[e['x']]}" in peak.get_attribute("title")


def test_a_bert_vocab_txt_starting_with_a_bracket_is_read_as_lines(tmp_path: Path) -> None:
    from lurker.vocab import read_vocab

    bert = ["[PAD]", "[unused0]", "{", "the", "##s"]
    for name in ("vocab.txt", "vocab"):
        (tmp_path / name).write_text("\n".join(bert) + "\n")
        assert read_vocab(tmp_path / name) == bert
    (tmp_path / "v.json").write_text("\n".join(bert) + "\n")  # named JSON: it must be JSON
    with pytest.raises(LurkerError, match=r"v\.json is not valid JSON"):
        read_vocab(tmp_path / "v.json")


def test_a_vocab_stored_on_a_finished_run_reaches_the_running_server(tmp_path: Path) -> None:
    import httpx2 as httpx

    from lurker.probe import probe
    from lurker.server import create_app
    from lurker.server.serve import background

    torch.manual_seed(0)
    model, data = Text().eval(), _data()
    kw: dict[str, Any] = dict(out=tmp_path / "p", layers=[LAYER], k=K, progress=False)
    probe(model, data, **kw).close()
    with background(create_app(tmp_path / "p", model_obj=model, dataset=data)) as url:
        url = url.rstrip("/")
        assert get_json(f"{url}/api/runs/p")["dataset"]["vocab_size"] is None
        assert get_json(f"{url}/api/runs/p/samples/3")["token_text"] is None
        before = get_json(f"{url}/api/runs/p/generation")
        with pytest.warns(UserWarning, match="already holds this probe"):
            probe(model, data, **kw, vocab=WORDS).close()  # stored, no sweep
        after = get_json(f"{url}/api/runs/p/generation")
        assert after["additions"]["vocab"] not in (None, before["additions"]["vocab"])
        assert get_json(f"{url}/api/runs/p")["dataset"]["vocab_size"] == VOCAB
        ids = data.tensors[0][3].tolist()
        assert get_json(f"{url}/api/runs/p/samples/3")["token_text"] == [WORDS[i] for i in ids]
        unit = httpx.get(f"{url}/api/runs/p/layers/{LAYER}/units/0").json()
        e = unit["top"]["max"][0]
        assert e["token_text"] == [WORDS[i] for i in e["tokens"]]


def test_a_server_vocab_is_refused_with_several_text_runs(tmp_path: Path) -> None:
    from lurker.probe import probe
    from lurker.server import create_app

    for name, words in (("a", WORDS), ("b", [w.upper() for w in WORDS])):
        probe(Text(), _data(), out=tmp_path / name, k=K, progress=False, vocab=words).close()
    with pytest.raises(LurkerError, match=r"2 served runs take token ids \('a', 'b'\)"):
        create_app(tmp_path, vocab=WORDS)


def test_a_server_vocab_that_stops_fitting_shows_ids_and_says_why(tmp_path: Path) -> None:
    from lurker.probe import probe
    from lurker.server import create_app
    from lurker.server.serve import background

    calls: list[int] = []

    def word(i: int) -> str:
        calls.append(i)
        if i >= VOCAB:
            raise RuntimeError("unknown id")  # a tokenizer failing past its vocabulary
        return WORDS[i]

    data = _data()
    probe(Text(), data, out=tmp_path / "runs" / "t", k=K, progress=False).close()
    with background(create_app(tmp_path / "runs", dataset=data, vocab=word)) as url:
        url = url.rstrip("/")
        assert get_json(f"{url}/api/runs/t/samples/1")["token_text"] is not None
        # probed again with a bigger embedding: the vocabulary no longer fits
        probe(Text(20), data, out=tmp_path / "runs" / "t", k=K, progress=False, overwrite=True)
        summary = get_json(f"{url}/api/runs/t")
        assert summary["dataset"]["vocab_size"] is None
        assert summary["dataset"]["vocab_error"].startswith("run 't': ")
        assert "failed on id 12: RuntimeError: unknown id" in summary["dataset"]["vocab_error"]
        asked = len(calls)
        sample = get_json(f"{url}/api/runs/t/samples/1")
        assert sample["tokens"] == data.tensors[0][1].tolist() and sample["token_text"] is None
        get_json(f"{url}/api/runs/t/layers/{LAYER}")
        get_json(f"{url}/api/runs/t/layers/{LAYER}/units/0")
        assert len(calls) == asked  # the failure is cached, not asked for per request


def test_a_padded_embedding_takes_the_tokenizers_vocab(tmp_path: Path) -> None:
    from lurker.probe import probe
    from lurker.vocab import as_vocab

    # 13 rows for 12 tokens (nanoGPT pads GPT-2's 50257 to 50304): the data uses 0..11
    run = probe(Text(13), _data(), out=tmp_path / "a", k=K, progress=False, vocab=WORDS)
    assert run.meta["vocab"] == [*WORDS, None]
    run.close()
    # a list's __getitem__ raises IndexError past its end: that id has no word
    run = probe(Text(13), _data(), out=tmp_path / "b", k=K, progress=False, vocab=WORDS.__getitem__)
    assert run.meta["vocab"] == [*WORDS, None]
    run.close()
    with pytest.warns(UserWarning, match=r"holds 12 tokens.*looks up 40 ids.*this model's"):
        probe(Text(40), _data(), out=tmp_path / "c", k=K, progress=False, vocab=WORDS).close()

    def broken(i: int) -> str:
        raise ValueError("no such token")

    with pytest.raises(LurkerError, match=r"callable failed on id 0: ValueError: no such"):
        as_vocab(broken, 4)


def test_a_dataset_vocab_that_does_not_fit_is_not_stored(tmp_path: Path) -> None:
    from lurker.probe import probe

    class Named(TensorDataset):
        itos = WORDS[:5]  # names ids 0..4, and the samples use 0..11

    data = Named(*_data().tensors)
    with pytest.warns(UserWarning, match=r"vocab/itos is not stored.*holds 5 tokens"):
        run = probe(Text(), data, out=tmp_path / "r", k=K, progress=False)
    assert "vocab" not in run.meta
    run.close()
    data.itos = WORDS
    run = probe(Text(), data, out=tmp_path / "s", k=K, progress=False)
    assert run.meta["vocab"] == WORDS
    run.close()


def test_an_open_sample_page_offers_the_vocab_stored_since(browser: Any, tmp_path: Path) -> None:
    skip_without_browser()
    from lurker.probe import probe
    from lurker.server import create_app
    from lurker.server.serve import background

    torch.manual_seed(0)
    model, data = Text().eval(), _data()
    kw: dict[str, Any] = dict(out=tmp_path / "p", layers=[LAYER], k=K, progress=False)
    probe(model, data, **kw).close()
    want = [WORDS[i] for i in data.tensors[0][5].tolist()]
    app = create_app(tmp_path / "p", model_obj=model, dataset=data)
    with background(app) as url, strict_page(browser) as pg:
        pg.goto(f"{url.rstrip('/')}/#/r/p/sample/5")
        pg.wait_for_selector(".tok")
        assert pg.locator(".tok").first.text_content() != want[0].replace(" ", "␣")
        with pytest.warns(UserWarning, match="already holds this probe"):
            probe(model, data, **kw, vocab=WORDS).close()
        with pg.expect_response(lambda r: r.url.endswith("/api/runs/p/generation")):
            pg.evaluate("document.dispatchEvent(new Event('visibilitychange'))")
        pg.wait_for_selector(".run-changed[data-state=stale]")
        bar = pg.inner_text(".run-changed")
        assert "a new vocabulary" in bar and "probed again" not in bar
        pg.click("text=Show the new results")
        shown = [{" sat": "␣sat", "\t": "⇥"}.get(w, w) for w in want]
        pg.wait_for_function("w => document.querySelector('.tok')?.textContent === w", arg=shown[0])
        assert pg.locator(".tok").evaluate_all("ts => ts.map(t => t.textContent)") == shown


def test_a_server_vocab_is_not_asked_again_when_the_run_is_written_to(tmp_path: Path) -> None:
    """A vocabulary given to the server depends on the run's graph alone: a write that only
    adds to the run (lurker map, lurker featviz) must not make every request call the
    tokenizer again for every id."""
    import sqlite3

    from lurker.probe import probe
    from lurker.server import create_app
    from lurker.server.serve import background

    calls: list[int] = []

    def word(i: int) -> str:
        calls.append(i)
        return WORDS[i]

    data = _data()
    probe(Text(), data, out=tmp_path / "runs" / "t", k=K, progress=False).close()
    with background(create_app(tmp_path / "runs", dataset=data, vocab=word)) as url:
        url = url.rstrip("/")
        assert get_json(f"{url}/api/runs/t/samples/1")["token_text"] is not None
        asked = len(calls)
        for n in range(3):  # an addition to the run's database before each request
            with sqlite3.connect(tmp_path / "runs" / "t" / "run.db") as db:
                db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (f"x{n}", "1"))
            text = get_json(f"{url}/api/runs/t/samples/1")["token_text"]
            assert text == [WORDS[i] for i in data.tensors[0][1].tolist()]
        assert len(calls) == asked


def test_layer_tiles_keep_words_and_the_peak_inside_the_tile(browser: Any, tmp_path: Path) -> None:
    """A layer tile shows 7 words around the unit's peak. Words as long as a real
    vocabulary's (``[CLS]``, ``sleeps``) used to overflow the 96 px tile, centred, so its
    first line was cut in half at the top (and its last at the bottom). Every tile's
    words now start inside it and its peak token is shown whole."""
    skip_without_browser()
    from lurker.probe import probe
    from lurker.server import create_app
    from lurker.server.serve import background

    words = ["[PAD]", "[CLS]", "yesterday", "elephant", "wandered", "through", "gardens",
             "quietly", "sleeping", "tomorrow", "children", "mountain"]  # fmt: skip
    torch.manual_seed(0)
    model, data = Text().eval(), _data()
    probe(model, data, out=tmp_path / "w", layers=[LAYER], k=K, progress=False, vocab=words)
    app = create_app(tmp_path / "w", model_obj=model, dataset=data)
    with background(app) as url, strict_page(browser) as pg:
        pg.goto(f"{url.rstrip('/')}/#/r/w/layer/{LAYER}")
        pg.wait_for_selector(".unit-card .tok-thumb .tok-peak")
        boxes = pg.locator(".unit-card .tok-thumb").evaluate_all(
            """ts => ts.map(t => {
              const r = t.getBoundingClientRect();
              const first = t.querySelector('.tokens > *').getBoundingClientRect();
              const peak = t.querySelector('.tok-peak').getBoundingClientRect();
              return {top: r.top, bottom: r.bottom, left: r.left, right: r.right,
                      first: first.top, peakTop: peak.top, peakBottom: peak.bottom,
                      peakLeft: peak.left, peakRight: peak.right};
            })"""
        )
    assert len(boxes) == 4
    for b in boxes:
        assert b["first"] >= b["top"], b  # the first line is not cut off above the tile
        assert b["top"] <= b["peakTop"] and b["peakBottom"] <= b["bottom"], b
        assert b["left"] <= b["peakLeft"] and b["peakRight"] <= b["right"], b


def test_run_page_describes_a_token_run_without_image_facts(browser: Any, served: dict) -> None:
    """The run page of a text model said "image size -", "transparency dropped: not
    checked", "9 images per unit", offered "Live view" (which does not apply to token ids)
    and "Explain an image". It now says what a sample is: its tokens and vocabulary."""
    skip_without_browser()
    url = served["url"]
    assert get_json(f"{url}/api/runs/t")["dataset"]["vocab_size"] == len(WORDS)
    with strict_page(browser) as pg:
        pg.goto(f"{url}/#/r/t")
        pg.wait_for_selector("dl.facts")
        facts = dict(
            zip(
                pg.locator("dl.facts dt").all_inner_texts(),
                pg.locator("dl.facts dd").all_inner_texts(),
                strict=True,
            )
        )
        assert facts["tokens per sample"] == str(LENGTH)
        assert facts["vocabulary"] == f"{len(WORDS)} tokens"
        assert facts["top-k"].startswith(f"{K} samples per unit")
        assert "image size" not in facts and "transparency dropped" not in facts
        buttons = pg.locator(".entry-links a").all_inner_texts()
        assert "Explain a sample" in buttons
        assert "Live view" not in buttons and "Explain an image" not in buttons
