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
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 6)
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

    with pytest.raises(LurkerError, match=r"holds 5 tokens.*embedding looks up 12 ids"):
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
    with pytest.raises(LurkerError, match=r"holds 3 tokens.*looks up 12 ids"):
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
