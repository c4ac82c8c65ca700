"""A character-level minGPT in lurker reads as a language model, not as an image
classifier: its causal mask's -inf is by design (a softmax makes it 0), a generator over
``(q, k, v)`` is not recurrence, and the explorer's top-5 and Explain target are the next
token's at the last position. Oracles: a plain forward's softmax, ``lurker.explain`` with
the unit target of that position, and the values the model's own ops make."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from fastapi.testclient import TestClient
from torch import nn

import lurker
from explorer_fixtures import skip_without_browser, strict_page
from lurker.cli import main

TEXT = "the cat sat on the mat.\nthe dog sat on the log.\n" * 3
CHARS = sorted(set(TEXT))
CONTEXT = 32


class Block(nn.Module):
    """minGPT's block: hand-written causal attention (``masked_fill(mask, -inf)`` before the
    softmax, q, k and v reshaped by one generator expression), then an MLP."""

    def __init__(self, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.c_attn = nn.Linear(dim, 3 * dim)
        self.c_proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.register_buffer(
            "bias", torch.tril(torch.ones(CONTEXT, CONTEXT)).view(1, 1, CONTEXT, CONTEXT)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.c_attn(self.ln1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :t, :t] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        y = (att @ v).transpose(1, 2).contiguous().view(b, t, c)
        x = x + self.c_proj(y)
        return x + self.mlp(self.ln2(x))


class CharGPT(nn.Module):
    """Token and position embeddings, two blocks, an lm head: logits ``(B, L, V)``."""

    def __init__(self, vocab: int = len(CHARS), dim: int = 16) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, dim), nn.Embedding(CONTEXT, dim)
        self.blocks = nn.ModuleList(Block(dim) for _ in range(2))
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.size(1)))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


class Windows(torch.utils.data.TensorDataset):
    """``(32 token ids, next-char label)`` windows of the text; its classes are the
    characters (a space and a newline among them)."""

    classes = CHARS


def windows() -> Windows:
    ids = torch.tensor([CHARS.index(ch) for ch in TEXT])
    starts = range(0, len(ids) - CONTEXT - 1, 3)
    x = torch.stack([ids[i : i + CONTEXT] for i in starts])
    return Windows(x, torch.stack([ids[i + CONTEXT] for i in starts]))


# -- the trace: the mask's -inf, and no recurrence ------------------------------------------


def test_the_causal_masks_inf_is_by_design_not_a_nonfinite_problem() -> None:
    torch.manual_seed(0)
    ids = torch.randint(0, len(CHARS), (1, 10))
    tr = lurker.trace(CharGPT().eval(), ids)
    masked = [op for op in tr if op.name == "masked_fill"]
    softmax = [op for op in tr if op.name == "softmax"]
    assert len(masked) == len(softmax) == 2
    # the oracle: the masked_fill's own output holds one -inf per key after its query
    for op in masked:
        assert int(op.activation.isneginf().sum()) == 2 * 10 * 9 // 2  # heads x T(T-1)/2
    assert all(bool(op.activation.isfinite().all()) for op in softmax)
    assert tr.first_nonfinite() is None
    said = [str(m) for m in tr.masked_infs()]
    assert said == [
        f"-inf from {m.label}, an attention mask, made finite by {s.label}"
        for m, s in zip(masked, softmax)
    ]
    assert said[0] == "-inf from masked_fill_1, an attention mask, made finite by softmax_1"


class LeakyMask(nn.Module):
    """The masked scores also reach a value the model keeps (their mean): -inf there is
    a real problem, not a mask's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        att = x @ x.transpose(-2, -1)
        t = x.shape[1]
        att = att.masked_fill(torch.ones(t, t).tril() == 0, float("-inf"))
        return att.softmax(-1) @ x + att.mean()


class FullyMaskedRow(nn.Module):
    """A query whose keys are all masked: its softmax row is 0 / 0 = NaN."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        att = x @ x.transpose(-2, -1)
        mask = torch.ones(4, 4).tril() == 0
        mask[0, 0] = True
        return att.masked_fill(mask, float("-inf")).softmax(-1) @ x


def test_a_mask_whose_inf_reaches_another_value_is_still_the_first_nonfinite() -> None:
    tr = lurker.trace(LeakyMask(), torch.randn(1, 4, 3))
    first = tr.first_nonfinite()
    assert first is not None and first.op.name == "masked_fill" and first.count.neginf == 6
    assert tr.masked_infs() == []
    tr = lurker.trace(FullyMaskedRow(), torch.randn(1, 4, 3))
    first = tr.first_nonfinite()
    assert first is not None and first.op.name == "masked_fill"
    assert tr.masked_infs() == []  # its softmax is NaN: nothing made it finite


def test_an_added_mask_is_by_design_too() -> None:
    class Added(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            t = x.shape[1]
            mask = torch.full((t, t), float("-inf")).triu(1)
            return ((x @ x.transpose(-2, -1)) + mask).softmax(-1) @ x

    tr = lurker.trace(Added(), torch.randn(1, 5, 3))
    assert tr.first_nonfinite() is None
    (m,) = tr.masked_infs()
    assert m.op.name == "full" and m.softmaxes == ("softmax_1",)
    assert [tr[label].name for label in m.through] == ["triu", "add"]


def test_a_float16_overflow_into_a_softmax_is_not_called_a_mask() -> None:
    # scores - 40000 in float16: -30000 - 40000 is past -65504, so -inf from finite inputs
    # reaches only the softmax, which makes it 0; an overflow all the same, not a mask's
    class Shifted(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.softmax(x * 100.0 - 40000.0, -1)

    x = torch.tensor([[1.0, 2.0, -300.0]], dtype=torch.float16)
    assert bool((x.float() * 100 - 40000).isfinite().all())  # float32 holds it
    tr = lurker.trace(Shifted(), x)
    assert tr.masked_infs() == []
    first = tr.first_nonfinite()
    assert first is not None and first.op.name == "sub" and first.count.neginf == 1
    assert "float16's largest finite value is 65504" in str(first)


def test_cli_trace_says_the_mask_is_by_design(tmp_path: Path) -> None:
    f = tmp_path / "gpt.py"
    f.write_text(f"import sys\nsys.path.insert(0, {str(Path(__file__).parent)!r})\n"
                 "from test_gpt_language_model import CharGPT\n")  # fmt: skip
    args = ["trace", f"{f}:CharGPT", "-i", "1,32", "--input-dtype", "long"]
    r = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "g.dot")])
    assert r.exit_code == 0, r.output
    assert "non-finite: none" in r.output and "made 1,984 -inf" not in r.output
    assert "-inf from masked_fill_1, an attention mask, made finite by softmax_1" in r.output
    assert "Recurrent:   no" in r.output


def test_a_generator_over_q_k_v_is_not_recurrence_but_a_loop_on_its_output_is() -> None:
    tr = lurker.trace(CharGPT().eval(), torch.randint(0, len(CHARS), (1, 8)))
    # the generator runs view and transpose three times at one place...
    assert {op.num_passes for op in tr if op.name == "view" and op.num_passes > 1} == {3}
    # ...on three distinct tensors, none fed by another: one step, not a loop
    assert not tr.is_recurrent and "Recurrent:   no" in tr.summary()

    class Refine(nn.Module):  # one module applied to its own output
        def __init__(self) -> None:
            super().__init__()
            self.step = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for _ in range(3):
                x = torch.tanh(self.step(x))
            return x

    class Cells(nn.Module):  # an LSTM stepped by hand
        def __init__(self) -> None:
            super().__init__()
            self.cell = nn.LSTMCell(3, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = c = torch.zeros(1, 4)
            for t in range(x.shape[0]):
                h, c = self.cell(x[t], (h, c))
            return h

    for model, x in [
        (Refine(), torch.randn(1, 4)),
        (Cells(), torch.randn(5, 1, 3)),
        (nn.LSTM(3, 4), torch.randn(5, 1, 3)),  # torch's own recurrent kernel, one call
    ]:
        tr = lurker.trace(model, x)
        assert tr.is_recurrent and "Recurrent:   yes" in tr.summary(), type(model).__name__


# -- the explorer: the next token at the last position -------------------------------------


@pytest.fixture(scope="module")
def gpt(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from lurker.probe import probe
    from lurker.server import create_app
    from lurker.server.serve import background

    torch.manual_seed(0)
    model, data = CharGPT(), windows()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = data.tensors
    for _ in range(60):  # a few steps: its top tokens are not a random head's ties
        loss = F.cross_entropy(model(x)[:, -1], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    root = tmp_path_factory.mktemp("gpt")
    probe(model, data, out=root / "gpt", layers=["blocks.1.mlp.2"], k=4, progress=False).close()
    app = create_app(root / "gpt", model_obj=model, dataset=data, vocab=CHARS)
    with background(app) as url:
        yield {"client": TestClient(app), "url": url.rstrip("/"), "model": model, "data": data}


def _oracle(model: nn.Module, ids: list[int]) -> tuple[list[int], list[float]]:
    with torch.no_grad():
        p = model(torch.tensor([ids]))[0, -1].softmax(-1)
    top = p.topk(5)
    return top.indices.tolist(), top.values.tolist()


def test_live_shows_the_next_token_top5_at_the_last_position(gpt: dict) -> None:
    ids = [CHARS.index(ch) for ch in "the cat sat on the m"]
    r = gpt["client"].post("/api/runs/gpt/live/inputs", json={"ids": ids})
    assert r.status_code == 200, r.text
    doc = r.json()
    want, probs = _oracle(gpt["model"], ids)
    preds = doc["predictions"]
    assert [q["class"] for q in preds] == want and doc["predictions_note"] is None
    assert [q["prob"] for q in preds] == pytest.approx(probs, rel=1e-5)
    assert [q["name"] for q in preds] == [CHARS[i] for i in want]  # the vocabulary's chars
    assert {q["position"] for q in preds} == {len(ids) - 1}
    assert preds[0]["target"] == f"head:{want[0]}:0:{len(ids) - 1}"
    # a dataset sample's page
    want, probs = _oracle(gpt["model"], gpt["data"].tensors[0][3].tolist())
    page = gpt["client"].get("/api/runs/gpt/samples/3").json()
    assert [q["class"] for q in page["prediction"]] == want and page["prediction_error"] is None
    assert [q["prob"] for q in page["prediction"]] == pytest.approx(probs, rel=1e-5)
    assert page["prediction"][0]["position"] == CONTEXT - 1


@pytest.mark.parametrize("method", ["saliency", "input_x_gradient", "integrated_gradients"])
def test_explains_default_target_is_the_next_token_at_the_last_position(
    gpt: dict, method: str
) -> None:
    page = gpt["client"].get("/api/runs/gpt/samples/5").json()
    target = page["prediction"][0]["target"]
    top = page["prediction"][0]["class"]
    assert target == f"head:{top}:0:{CONTEXT - 1}"
    r = gpt["client"].get(
        f"/api/runs/gpt/live/sample-5/explain/{method}.json", params={"target": target}
    )
    assert r.status_code == 200, r.text
    ids = gpt["data"].tensors[0][5][None]
    want = lurker.explain(gpt["model"], ids, ("head", top, 0, CONTEXT - 1), method).attribution[0]
    assert r.json()["scores"] == pytest.approx(want.tolist(), rel=1e-4, abs=1e-6)
    # not the class's score averaged over the positions
    mean = lurker.explain(gpt["model"], ids, ("head", top), method).attribution[0]
    assert not torch.allclose(mean, want, atol=1e-4)


def test_smoothgrad_on_tokens_is_said_unsigned_as_its_scores_are(gpt: dict) -> None:
    info = gpt["client"].get("/api/runs/gpt/explain/methods").json()
    signed = {m["name"]: m["signed"] for m in info["methods"]}
    assert signed == {
        "saliency": False, "input_x_gradient": True,
        "integrated_gradients": True, "smoothgrad": False,
    }  # fmt: skip
    target = gpt["client"].get("/api/runs/gpt/samples/2").json()["prediction"][0]["target"]
    for name, is_signed in signed.items():
        r = gpt["client"].get(
            f"/api/runs/gpt/live/sample-2/explain/{name}.json", params={"target": target}
        )
        doc = r.json()
        assert doc["signed"] == is_signed
        if not is_signed:
            assert min(doc["scores"]) >= 0
        else:
            assert min(doc["scores"]) < 0 < max(doc["scores"])


def _shoot(pg: Any, name: str) -> None:
    """A screenshot where ``LURKER_SHOTS`` names a folder (to look at; nothing asserted)."""
    where = os.environ.get("LURKER_SHOTS")
    if where:
        pg.screenshot(path=os.path.join(where, f"gpt-{name}.png"), full_page=True)


def test_the_pages_read_the_gpt_as_a_language_model(browser: Any, gpt: dict) -> None:
    """Live shows the next-token top-5 (spaces as ␣), the Explain page's default target is
    the top next token's score at the last position, chosen in its target chooser, and
    Home names the classes ␣ and ↵ and says a text run has no images."""
    skip_without_browser()
    typed = "the cat sat on the"  # the next character is a space
    ids = [CHARS.index(ch) for ch in typed]
    want, _ = _oracle(gpt["model"], ids)
    with strict_page(browser) as pg:
        pg.goto(f"{gpt['url']}/#/r/gpt/live")
        pg.fill("#live-text", typed)
        pg.press("#live-text", "Enter")
        pg.wait_for_selector("#live-preds li")
        assert f"at the last position ({len(ids) - 1})" in pg.inner_text("#preds-head")
        names = pg.locator("#live-preds .pname").all_inner_texts()
        assert names == [CHARS[i].replace(" ", "␣").replace("\n", "↵") for i in want]
        _shoot(pg, "live")

        page = gpt["client"].get("/api/runs/gpt/samples/5").json()
        pg.goto(f"{gpt['url']}/#/r/gpt/explain?image=sample-5")
        pg.wait_for_selector(".target.on")
        on = pg.locator(".target.on")
        assert on.get_attribute("data-target") == page["prediction"][0]["target"]
        assert on.get_attribute("data-class") == str(page["prediction"][0]["class"])
        assert pg.locator("#explain-unit").input_value() == ""
        assert f"at the last position ({CONTEXT - 1})" in pg.inner_text("#target-head")
        pg.wait_for_selector("[data-method=smoothgrad] .tok[data-score]")
        assert pg.inner_text("[data-method=smoothgrad] .sign").strip() == "≥ 0"
        _shoot(pg, "explain")

        pg.goto(f"{gpt['url']}/#/r/gpt")
        pg.wait_for_selector(".cached-images")
        text = pg.inner_text("main") if pg.locator("main").count() else pg.inner_text("body")
        shown = ", ".join("␣" if c == " " else "↵" if c == "\n" else c for c in CHARS)
        assert f"{len(CHARS)}: {shown}" in text
        assert "cached so far" not in text and "inputs are token ids" in text
        _shoot(pg, "home")


# -- precomputed explanations, a padded typed input, the graph's non-finite marks ----------


@pytest.fixture(scope="module")
def gpt_run(gpt: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trained GPT probed with its spec and weights recorded (as ``lurker probe``
    records them), so ``lurker images --explanations`` can load it; samples 0 and 1
    precomputed with saliency and input x gradient."""
    from lurker.probe import probe

    root = tmp_path_factory.mktemp("gpt-run")
    torch.save(gpt["model"].state_dict(), root / "w.pt")
    meta = {
        "model_spec": f"{__name__}:CharGPT",
        "weights": str(root / "w.pt"),
        "data": f"{__name__}:windows",
    }
    probe(
        gpt["model"], gpt["data"], out=root / "gpt", layers=["blocks.1.mlp.2"], k=4,
        progress=False, meta=meta,
    ).close()  # fmt: skip
    args = ["images", str(root / "gpt"), "--explanations", "2"]
    res = CliRunner().invoke(main, [*args, "--methods", "saliency,input_x_gradient"])
    assert res.exit_code == 0, res.output
    said = " ".join(res.output.split())
    assert "4 explanations made" in said
    assert "explaining the top next token's score at the last position (head:" in said
    return root / "gpt"


PRECOMPUTED = ("saliency", "input_x_gradient")


def test_precomputed_explanations_are_the_next_tokens_at_the_last_position(
    gpt: dict, gpt_run: Path, tmp_path: Path
) -> None:
    """``lurker images --explanations`` used the target ``top``, which a (1, L, V) model
    refuses: nothing was made. Each sample is now explained for its top next token's score
    at the last position, as the served page defaults to; a server without the model and
    a static export answer those scores at that target. Oracle: ``lurker.explain`` with
    the unit target ``("head", c, 0, L - 1)``."""
    from explorer_fixtures import without_weights
    from lurker.server import create_app, export_site, static_segment

    model, ids = gpt["model"], gpt["data"].tensors[0]
    targets = {}
    for sid in (0, 1):
        top = _oracle(model, ids[sid].tolist())[0][0]
        targets[sid] = (top, f"head:{top}:0:{CONTEXT - 1}")
    bare = without_weights(gpt_run, tmp_path / "bare")
    with TestClient(create_app(bare, dataset=gpt["data"])) as c:
        assert c.get("/api/runs/gpt").json()["holds"]["live"] is False
        index = c.get("/api/runs/gpt/explained").json()
        assert [(e["sample"], e["target"], e["methods"]) for e in index["samples"]] == [
            (sid, targets[sid][1], list(PRECOMPUTED)) for sid in (0, 1)
        ]
        assert [e["top"]["target"] for e in index["samples"]] == [targets[0][1], targets[1][1]]
        served = {}
        for sid, (top, target) in targets.items():
            want = {
                m: lurker.explain(model, ids[sid][None], ("head", top, 0, CONTEXT - 1), m)
                for m in PRECOMPUTED
            }
            for m in PRECOMPUTED:
                r = c.get(f"/api/runs/gpt/live/sample-{sid}/explain/{m}.json?target={target}")
                assert r.status_code == 200, r.text
                doc = r.json()
                assert doc["cached"] and doc["target"] == target
                got = doc["scores"]
                assert got == pytest.approx(want[m].attribution[0].tolist(), rel=1e-4, abs=1e-6)
                served[(sid, m)] = doc
    # the static export holds them at the path its Explain page asks for
    site = export_site(gpt_run, tmp_path / "site", dataset=gpt["data"], progress=False)
    data = site / "data" / "runs" / "gpt"
    exported = json.loads((data / "explained.json").read_text())
    assert [e["target"] for e in exported["samples"]] == [targets[0][1], targets[1][1]]
    for sid, (_, target) in targets.items():
        for m in PRECOMPUTED:
            name = static_segment(f"{m}.json?target={target}") + ".json"
            doc = json.loads((data / "live" / f"sample-{sid}" / "explain" / name).read_text())
            assert doc["scores"] == served[(sid, m)]["scores"]


class FixedGPT(CharGPT):
    """The GPT with its position embedding added whole: it takes only sequences of
    ``CONTEXT`` tokens, as a model traced or exported at one length does."""

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe.weight
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


class PaddedWindows(Windows):
    pad_id = CHARS.index(".")  # the run's padding id, stored by the probe


def test_a_padded_typed_input_predicts_after_its_last_typed_token(
    gpt: dict, tmp_path: Path
) -> None:
    """Live pads a short input for a model of one length: the top-5 was the next token
    after the last pad. It is now the next token after the last typed one, at its
    position, with that position's Explain target. Oracle: the causal GPT's own forward
    on the unpadded text (its scores there do not see the padding after them)."""
    from lurker.probe import probe
    from lurker.server import create_app

    fixed = FixedGPT().eval()
    fixed.load_state_dict(gpt["model"].state_dict())
    data = PaddedWindows(*gpt["data"].tensors)
    probe(
        fixed, data, out=tmp_path / "fixed", layers=["blocks.1.mlp.2"], k=4, progress=False
    ).close()
    typed = "the cat sat on"
    ids = [CHARS.index(ch) for ch in typed]
    with TestClient(
        create_app(tmp_path / "fixed", model_obj=fixed, dataset=data, vocab=CHARS)
    ) as c:
        r = c.post("/api/runs/fixed/live/inputs", json={"text": typed})
        assert r.status_code == 200, r.text
        doc = r.json()
    assert doc["padded_from"] == len(ids) and len(doc["ids"]) == CONTEXT
    want, probs = _oracle(gpt["model"], ids)  # the same weights, no padding
    preds = doc["predictions"]
    assert [q["class"] for q in preds] == want
    assert [q["prob"] for q in preds] == pytest.approx(probs, rel=1e-4)
    assert {q["position"] for q in preds} == {len(ids) - 1}
    assert preds[0]["target"] == f"head:{want[0]}:0:{len(ids) - 1}"
    with torch.no_grad():  # not the scores after the padding
        padded = fixed(torch.tensor([doc["ids"]]))[0, -1]
    assert padded.softmax(-1).topk(5).values.tolist() != pytest.approx(probs, rel=1e-4)


def test_the_graph_marks_a_real_nan_and_not_an_attention_masks_inf(tmp_path: Path) -> None:
    """The graph page's marks read the probe's NaN and +inf counts: a probed causal mask
    (-inf a softmax makes 0) is not marked, a fully masked row's softmax (0 / 0 = NaN) is.
    Oracle: the probed ops' own outputs, checked with torch."""
    from lurker.probe import probe
    from lurker.server import create_app

    torch.manual_seed(0)
    gpt, rows = CharGPT().eval(), FullyMaskedRow()
    tokens = windows()
    vectors = torch.utils.data.TensorDataset(torch.randn(12, 4, 3), torch.zeros(12).long())
    tr = lurker.trace(gpt, tokens.tensors[0][:1])
    assert bool(tr["masked_fill_1"].activation.isneginf().any())  # the mask is there
    assert bool(lurker.trace(rows, vectors.tensors[0][:1])["softmax_1"].activation.isnan().any())
    layers = ["masked_fill_1", "softmax_1"]
    probe(
        gpt,
        tokens,
        out=tmp_path / "gpt",
        layers=layers,
        k=3,
        progress=False,
        unit_dim=dict.fromkeys(layers, 1),
    ).close()  # fmt: skip (no warning: the mask is not the probe's concern)
    with pytest.warns(UserWarning, match=r"\(softmax_1\) had NaN"):
        probe(
            rows, vectors, out=tmp_path / "rows", layers=layers, k=3, progress=False,
            unit_dim=dict.fromkeys(layers, 1),
        ).close()  # fmt: skip
    with TestClient(create_app(tmp_path)) as c:
        marks = {}
        for name in ("gpt", "rows"):
            doc = c.get(f"/api/runs/{name}/graph").json()
            marks[name] = {n["L"]: n.get("nf") for n in doc["nodes"] if "L" in n}
            marks[name]["first"] = doc.get("first_nonfinite")
    assert marks["gpt"] == {"masked_fill_1": None, "softmax_1": None, "first": None}
    assert marks["rows"]["masked_fill_1"] is None and marks["rows"]["softmax_1"] == 12
