"""A model that runs on its input but refuses the baseline a method runs it on (zeros by
default: a model that divides by its input's norm) is told so, with the fix
(``baseline=``), rather than with the model's own error, which names neither; the
explorer's precompute leaves such a method out, saying why, instead of stopping."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import lurker
from lurker.errors import LurkerError
from lurker.probe import probe


class NormNet(nn.Module):
    """Divides by its input's norm: an all-zero input is refused."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.flatten(1).norm(dim=1)
        if bool((n == 0).any()):
            raise ValueError("input has zero norm")
        h = torch.relu(self.conv(x / n.view(-1, 1, 1, 1)))
        return self.fc(h.mean((2, 3)))


def _model() -> NormNet:
    torch.manual_seed(0)
    return NormNet().eval()


def _data() -> TensorDataset:
    return TensorDataset(torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(1)))


@pytest.mark.parametrize(
    ("method", "options"), [("integrated_gradients", {}), ("occlusion", {"window": 8})]
)
def test_a_refused_default_baseline_is_named_with_the_fix(method: str, options: dict) -> None:
    """Was the model's bare ``ValueError: input has zero norm``, raised from its forward."""
    x = _data().tensors[0][:2]
    with pytest.raises(LurkerError) as err:
        lurker.explain(_model(), x, method=method, **options)
    said = str(err.value)
    assert f"fails on the baseline of {method} (its default baseline, zeros)" in said
    assert "ValueError: input has zero norm" in said and "baseline=" in said


def test_a_baseline_the_model_accepts_explains() -> None:
    """The fix the error names works: completeness holds from the dataset's mean image."""
    model, x = _model(), _data().tensors[0]
    base = x.mean(0) + 0.1  # (a nonzero mean)
    e = lurker.explain(model, x[:2], method="integrated_gradients", baseline=base)
    with torch.no_grad():
        rise = model(x[:2]) - model(base[None].expand(2, -1, -1, -1))
    top = e.target if isinstance(e.target, torch.Tensor) else torch.tensor(e.target)
    want = rise.gather(1, top.view(-1, 1)).squeeze(1)
    got = e.attribution.flatten(1).sum(1)
    assert torch.allclose(got, want, atol=1e-3, rtol=1e-3)
    zero = torch.zeros(2, 3, 8, 8)  # the input itself refused: said as the input's problem
    with pytest.raises(LurkerError, match="does not run on the input"):
        lurker.explain(model, zero, method="integrated_gradients", baseline=base)


def test_precompute_leaves_the_method_out_saying_why(tmp_path: Path) -> None:
    """``lurker images --explanations`` stopped the whole run at sample 0 with
    'integrated_gradients failed on this input: ValueError: ...'; now the method is left
    out with the reason, every other method is made, and one named in --methods is
    refused with the same reason."""
    from lurker.server import explained

    model, data = _model(), _data()
    torch.save(model.state_dict(), tmp_path / "w.pt")
    meta = {"model_spec": f"{__name__}:NormNet", "weights": str(tmp_path / "w.pt")}
    probe(model, data, out=tmp_path / "r", k=2, batch_size=3, progress=False, meta=meta).close()
    done = explained.precompute(tmp_path / "r", 2, dataset=data, progress=False)
    why = done.skipped["integrated_gradients"]
    assert "baseline of integrated_gradients (its default baseline, zeros)" in why
    assert "baseline=" in why
    assert explained.explained_samples(tmp_path / "r", _fingerprint(tmp_path / "r")) == [
        "sample-0",
        "sample-1",
    ]
    assert done.made > 0 and "saliency" not in done.skipped
    with pytest.raises(LurkerError, match="baseline of integrated_gradients"):
        explained.precompute(
            tmp_path / "r", 1, ["integrated_gradients"], dataset=data, progress=False
        )


def test_evaluate_names_the_curve_baseline_the_model_refuses() -> None:
    """Deletion ends on zeros by default, which the model refuses: was its bare
    ``ValueError: input has zero norm``; now the curve, its baseline and the fix are named,
    and the fix given works (the curve's ends are the model's own probabilities)."""
    model, x = _model(), _data().tensors[0][:2]
    with pytest.raises(LurkerError) as err:
        lurker.explain.evaluate(model, x, 0, metrics="deletion")
    said = str(err.value)
    assert "baseline of the deletion curve (deletion_baseline='zeros', the default)" in said
    assert "ValueError: input has zero norm" in said
    assert "deletion_baseline='blur' or 'mean'" in said
    with pytest.raises(LurkerError, match=r"insertion curve \(insertion_baseline=0\)"):
        lurker.explain.evaluate(model, x, 0, metrics="insertion", insertion_baseline=0)
    ev = lurker.explain.evaluate(model, x, 0, metrics="deletion", deletion_baseline="mean")
    mean = x.mean((2, 3), keepdim=True).expand_as(x)
    with torch.no_grad():
        want = torch.stack([model(x), model(mean)], 1).softmax(-1)[:, :, 0].double()
    assert ev.deletion is not None
    assert torch.allclose(ev.deletion.scores[:, [0, -1]], want, atol=1e-6)


def test_precompute_suggests_only_methods_it_still_makes(tmp_path: Path) -> None:
    """LRP has no rule for the model's norm, and integrated gradients is left out for its
    zeros baseline: LRP's and concept relevance's reasons said 'integrated_gradients ...
    still explain it' (or the Python call), a method the same precompute left out; now
    they name methods it made."""
    from lurker.server import explained

    model, data = _model(), _data()
    torch.save(model.state_dict(), tmp_path / "w.pt")
    meta = {"model_spec": f"{__name__}:NormNet", "weights": str(tmp_path / "w.pt")}
    probe(model, data, out=tmp_path / "r", k=2, batch_size=3, progress=False, meta=meta).close()
    done = explained.precompute(tmp_path / "r", 1, dataset=data, progress=False)
    assert set(done.skipped) == {"integrated_gradients", "lrp", "concepts"}
    for method in ("lrp", "concepts"):
        why = done.skipped[method]
        assert "no rule" in why and "integrated_gradients" not in why
        assert "input_x_gradient" in why and "input_x_gradient" not in done.skipped


def test_the_explain_page_greys_out_what_the_model_cannot_give(browser: Any, tmp_path: Path):
    """The page's method check traced the model on zeros, which it refuses: it could tell
    nothing, so LRP and concept relevance were offered (and failed, suggesting integrated
    gradients), and integrated gradients failed on its zeros baseline. Now each is disabled
    with why, only what works suggested, and none of them asked for (a strict page fails
    on a 400). Oracle: lurker.explain on a real sample."""
    from explorer_fixtures import served_run, skip_without_browser, strict_page

    skip_without_browser()
    model, data = _model(), _data()
    x = data.tensors[0][:1]
    for method in ("lrp", "integrated_gradients"):
        with pytest.raises(LurkerError):
            lurker.explain(model, x, method=method)
    lurker.explain(model, x, method="input_x_gradient")  # what the page suggests works
    lurker.explain(model, x, method="saliency")
    with served_run(tmp_path, "r", model, data, "conv", 2) as s, strict_page(browser) as pg:
        asked: list[str] = []
        pg.on("request", lambda r: asked.append(r.url))
        pg.goto(f"{s['url']}/#/r/r/explain?image=sample-1")
        said = {}
        for method in ("lrp", "integrated_gradients"):
            card = pg.locator(f"[data-method='{method}'][aria-disabled='true']")
            card.wait_for()
            said[method] = card.locator(".unavailable-reason").inner_text()
        assert "LRP has no rule for" in said["lrp"] and "norm" in said["lrp"]
        assert "Integrated gradients" not in said["lrp"] and "Input \u00d7 gradient" in said["lrp"]
        ig = said["integrated_gradients"]
        assert "all-zero input" in ig and "ValueError: input has zero norm" in ig
        assert "baseline=" in ig
        note = pg.locator(".concept-unavailable").inner_text()
        assert "Concept relevance is LRP" in note and "Integrated gradients" not in note
        pg.wait_for_selector("[data-method='input_x_gradient']:not([aria-disabled])")
        pg.wait_for_load_state("networkidle")
        for path in ("/explain/concepts", "/explain/lrp", "/explain/integrated_gradients"):
            assert not [u for u in asked if path in u]


def _labelled() -> TensorDataset:
    """:func:`_data` with labels, as a dataset spec the CLI loads again."""
    return TensorDataset(_data().tensors[0], torch.tensor([0, 1, 0, 1, 0, 1]))


def _recorded_run(tmp_path: Path) -> Path:
    """A run recording its model, weights and dataset, as `lurker probe` makes one."""
    model = _model()
    torch.save(model.state_dict(), tmp_path / "w.pt")
    meta = {
        "model_spec": f"{__name__}:NormNet",
        "weights": str(tmp_path / "w.pt"),
        "data": f"{__name__}:_labelled",
    }
    run = tmp_path / "r"
    probe(model, _labelled(), out=run, k=2, batch_size=3, progress=False, meta=meta).close()
    return run


@pytest.mark.parametrize("methods", ["lrp", "concepts", "lrp,integrated_gradients"])
def test_the_cli_refusing_lrp_suggests_only_methods_that_run(tmp_path: Path, methods: str):
    """``lurker images --explanations --methods lrp`` said 'leave it out of --methods
    (integrated_gradients, input_x_gradient and the other gradient methods still explain
    it)': integrated gradients, which this model refuses too (it starts from zeros). Oracle:
    lurker.explain on a sample."""
    from click.testing import CliRunner

    from lurker.cli import main

    model, x = _model(), _data().tensors[0][:1]
    with pytest.raises(LurkerError, match="fails on the baseline of integrated_gradients"):
        lurker.explain(model, x, method="integrated_gradients")
    lurker.explain(model, x, method="input_x_gradient")
    lurker.explain(model, x, method="saliency")
    run = _recorded_run(tmp_path)
    res = CliRunner().invoke(
        main, ["images", str(run), "--explanations", "1", "--methods", methods]
    )
    assert res.exit_code != 0
    said = " ".join(res.output.split())
    assert "LRP has no rule for the function norm" in said and "leave it out of --methods" in said
    assert "input_x_gradient, saliency" in said and "integrated_gradients" not in said


def test_the_api_refusing_lrp_suggests_only_methods_that_run(tmp_path: Path) -> None:
    """A request for LRP (the page greys it out and asks none) answered 400 ending 'Explain
    this model with a gradient method (method='input_x_gradient', 'integrated_gradients')':
    the explorer runs integrated gradients from zeros only, which this model refuses (its
    own 400 on the same sample says so). Oracle: those requests on the same server."""
    from fastapi.testclient import TestClient

    from lurker.server import create_app

    run = _recorded_run(tmp_path)
    with TestClient(create_app(run, dataset=_labelled())) as c:
        base = "/api/runs/r/live/sample-1/explain"
        r = c.get(f"{base}/lrp?target=top")
        assert r.status_code == 400, r.text
        said = r.json()["detail"]
        assert said.startswith("LRP has no rule for norm_1")
        assert "integrated_gradients" not in said
        assert "method='input_x_gradient', 'saliency'" in said
        assert c.get(f"{base}/integrated_gradients?target=top").status_code == 400
        for method in ("input_x_gradient", "saliency"):
            assert c.get(f"{base}/{method}?target=top").status_code == 200


def test_the_api_refusing_concepts_suggests_only_methods_that_run(tmp_path: Path) -> None:
    """A request for concept relevance (greyed out on the page) answered 400 saying
    'attribute the decision with ... method='integrated_gradients'', which this model
    refuses from the explorer's zeros: now a gradient method that runs. Oracle: those
    requests on the same server."""
    from fastapi.testclient import TestClient

    from lurker.server import create_app

    run = _recorded_run(tmp_path)
    with TestClient(create_app(run, dataset=_labelled())) as c:
        base = "/api/runs/r/live/sample-1/explain"
        r = c.get(f"{base}/concepts?target=top")
        assert r.status_code == 400, r.text
        said = r.json()["detail"]
        assert "concept relevance is LRP" in said and "no rule for norm_1" in said
        assert "integrated_gradients" not in said
        assert "method='input_x_gradient'" in said
        assert c.get(f"{base}/integrated_gradients?target=top").status_code == 400
        assert c.get(f"{base}/input_x_gradient?target=top").status_code == 200


def _files(run: Path) -> list[str]:
    root = run / "cache" / "explain"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_the_cli_naming_a_refused_baseline_method_writes_nothing(tmp_path: Path) -> None:
    """``lurker images --explanations 2 --methods saliency,integrated_gradients`` stopped at
    sample 0 after writing its ``live.json``, ``input.png`` and saliency: a half-explained
    run, with a fix (``baseline=``) the command does not take. Now every method of a sample
    is made before any file is, the paragraph names the method, the model's refusal and
    both fixes, and the command it suggests then works. Oracle: lurker.explain on the
    samples."""
    from click.testing import CliRunner

    from lurker.cli import main
    from lurker.server.explained import explained_samples

    run = _recorded_run(tmp_path)
    res = CliRunner().invoke(
        main,
        ["images", str(run), "--explanations", "2", "--methods", "saliency,integrated_gradients"],
    )
    assert res.exit_code != 0
    said = " ".join(res.output.split())
    assert "cannot precompute 'integrated_gradients' (sample 0)" in said
    assert "fails on the baseline of integrated_gradients (its default baseline, zeros)" in said
    assert "ValueError: input has zero norm" in said and "nothing was written" in said
    assert "leave integrated_gradients out of --methods (saliency still explains it)" in said
    assert "--option baseline=VALUE" in said and "baseline=..." in said
    # the baselines the model may accept, read off the refusal itself, not its wording
    assert "from a baseline the model accepts (baseline= a number" in said
    assert "such as the dataset's mean image or a blurred copy of the input)" in said
    assert "Traceback" not in res.output
    assert not (run / "cache" / "explain").exists() or _files(run) == []
    res = CliRunner().invoke(
        main, ["images", str(run), "--explanations", "2", "--methods", "saliency"]
    )
    assert res.exit_code == 0, res.output
    assert explained_samples(run, _fingerprint(run)) == ["sample-0", "sample-1"]
    x = _labelled().tensors[0][:2]
    want = lurker.explain(_model(), x, method="saliency")
    for i in range(2):
        got = np.load(run / "cache" / "explain" / f"sample-{i}" / "saliency-top.npy")
        np.testing.assert_allclose(got, want.heatmap(i).numpy(), rtol=1e-5, atol=1e-7)


class NormText(nn.Module):
    """Token ids -> embedding, divided by the sequence's norm: integrated gradients' default
    baseline on ids, the zero vector at every position, is refused."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(20, 6)
        self.fc = nn.Linear(6, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        e = self.embedding(ids)
        n = e.flatten(1).norm(dim=1)
        if bool((n == 0).any()):
            raise ValueError("embedding has zero norm")
        return self.fc(torch.tanh(e / n.view(-1, 1, 1)).mean(1))


def _norm_text() -> NormText:
    torch.manual_seed(0)
    return NormText().eval()


def _text() -> TensorDataset:
    g = torch.Generator().manual_seed(2)
    return TensorDataset(torch.randint(1, 20, (6, 7), generator=g), torch.tensor([0, 1, 2] * 2))


def test_token_ids_name_a_refused_baseline_with_the_fix() -> None:
    """Integrated gradients on token ids raised the model's bare ``ValueError: embedding has
    zero norm`` from inside its forward, naming neither the baseline nor the fix. Now the
    baseline in embedding space is named with the token fixes; the fix given (an id) gives
    Captum's LayerIntegratedGradients from that id's embedding."""
    from captum.attr import LayerIntegratedGradients

    model, ids = _norm_text(), _text().tensors[0][:2]
    for given in ({}, {"baseline": torch.zeros(6)}):
        with pytest.raises(LurkerError) as err:
            lurker.explain(model, ids, method="integrated_gradients", **given)
        said = str(err.value)
        assert said.startswith("NormText runs on the input but fails on the baseline")
        which = "the given baseline" if given else "its default baseline on token ids, the zero"
        assert which in said and "ValueError: embedding has zero norm" in said
        assert "baseline= a token id" in said and "(B, L, D)" in said
    ours = lurker.explain(model, ids, method="integrated_gradients", baseline=1, n_steps=32)
    theirs = LayerIntegratedGradients(model, model.embedding).attribute(
        ids, baselines=torch.full_like(ids, 1), target=ours.target, n_steps=32
    )
    torch.testing.assert_close(ours.attribution, theirs.sum(-1), atol=1e-5, rtol=1e-4)


def test_precompute_of_token_ids_leaves_a_refused_baseline_out(tmp_path: Path) -> None:
    """On a run of token ids, ``lurker images --explanations`` stopped at sample 0 with
    'integrated_gradients failed on this input: ValueError: ...' after writing the sample's
    other methods; now it is left out saying why (every other method made), and named in
    --methods it is refused before any file is written."""
    from lurker.server import explained

    model, data = _norm_text(), _text()
    torch.save(model.state_dict(), tmp_path / "w.pt")
    meta = {"model_spec": f"{__name__}:NormText", "weights": str(tmp_path / "w.pt")}
    run = tmp_path / "r"
    probe(model, data, out=run, k=2, batch_size=3, progress=False, meta=meta).close()
    with pytest.raises(LurkerError) as err:
        explained.precompute(
            run, 2, ["input_x_gradient", "integrated_gradients"], dataset=data, progress=False
        )
    said = str(err.value)
    assert "cannot precompute 'integrated_gradients' (sample 0)" in said
    assert "nothing was written" in said and "baseline= a token id" in said
    assert "lurker explain MODEL" not in said  # (it reads images only)
    assert not (run / "cache" / "explain").exists() or _files(run) == []
    done = explained.precompute(run, 2, dataset=data, progress=False)
    assert set(done.skipped) == {"integrated_gradients"}
    assert "its default baseline on token ids" in done.skipped["integrated_gradients"]
    want = lurker.explain(model, data.tensors[0][:1], method="input_x_gradient")
    got = np.load(run / "cache" / "explain" / "sample-0" / "input_x_gradient-top.npy")
    np.testing.assert_allclose(got[0], want.attribution[0].numpy(), rtol=1e-5, atol=1e-7)


class NormMLP(nn.Module):
    """A tabular model that divides each row by its norm: an all-zero row is refused."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.norm(dim=1, keepdim=True)
        if bool((n == 0).any()):
            raise ValueError("row has zero norm")
        return self.net(x / n)


class NormSignalNet(nn.Module):
    """A Conv1d model of (B, 2, T) signals that divides by the signal's norm."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.flatten(1).norm(dim=1)
        if bool((n == 0).any()):
            raise ValueError("signal has zero norm")
        return self.fc(torch.relu(self.conv(x / n.view(-1, 1, 1))).mean(2))


def _vectors() -> TensorDataset:
    g = torch.Generator().manual_seed(2)
    return TensorDataset(torch.randn(8, 6, generator=g) + 1, torch.tensor([0, 1] * 4))


@pytest.mark.parametrize(
    ("model", "shape", "like"),
    [
        (NormMLP, (2, 6), "such as the dataset's mean feature vector."),
        (
            NormSignalNet,
            (2, 2, 20),
            "such as the dataset's mean signal or a smoothed copy of the input.",
        ),
        (NormNet, (2, 3, 8, 8), "such as the dataset's mean image or a blurred copy of the input."),
    ],
)
def test_the_baseline_fix_names_a_baseline_of_the_inputs_kind(model: type, shape: tuple, like: str):
    """The fix said 'the dataset's mean image or a blurred copy of the input' of a feature
    vector and a signal too: a vector has no image and nothing to blur. Now it is worded
    for the input, and the fix it names works (completeness from the dataset's mean)."""
    torch.manual_seed(0)
    m, x = model().eval(), torch.randn(*shape) + 1
    with pytest.raises(LurkerError) as err:
        lurker.explain(m, x, method="integrated_gradients")
    said = str(err.value)
    assert said.endswith(like) and "ValueError" in said
    if model is not NormNet:
        assert "image" not in said and "blur" not in said
    base = x.mean(0)  # the fix named: the data's mean, as a baseline the model accepts
    e = lurker.explain(m, x, method="integrated_gradients", baseline=base, n_steps=200)
    with torch.no_grad():
        rise = m(x) - m(base[None].expand_as(x))
    want = rise.gather(1, torch.as_tensor(e.target).view(-1, 1)).squeeze(1)
    assert torch.allclose(e.attribution.flatten(1).sum(1), want, atol=1e-3, rtol=1e-2)


def test_a_feature_vector_runs_explain_page_greys_out_integrated_gradients(tmp_path: Path):
    """On a feature-vector run whose model refuses an all-zero row, the Explain page
    offered integrated gradients (``explain/methods`` checked image and signal runs only)
    and its card answered 400. Now the method is listed as unavailable with the model's
    complaint and a baseline for vectors; the other methods still explain the sample."""
    from explorer_fixtures import get_json, served_run

    torch.manual_seed(0)
    model, data = NormMLP().eval(), _vectors()
    with pytest.raises(LurkerError, match="row has zero norm"):
        lurker.explain(model, data.tensors[0][:1], method="integrated_gradients")
    with served_run(tmp_path, "v", model, data, "net.1", 2) as s:
        methods = get_json(f"{s['url']}/api/runs/v/explain/methods")["methods"]
        why = {m["name"]: m["unavailable"] for m in methods}
        assert set(why) == {"saliency", "input_x_gradient", "integrated_gradients", "smoothgrad"}
        ig = why.pop("integrated_gradients")
        assert "all-zero input" in ig and "ValueError: row has zero norm" in ig
        assert ig.endswith("such as the dataset's mean feature vector") and "image" not in ig
        assert set(why.values()) == {None}
        for method in why:  # each method still offered answers
            r = get_json(f"{s['url']}/api/runs/v/live/sample-1/explain/{method}.json?target=top")
            assert len(r["scores"]) == 6


def _fingerprint(run_dir: Path) -> str | None:
    """The model fingerprint the run records (its explanation cache is trusted under it)."""
    from lurker.store import Run

    with Run.open(run_dir) as run:
        return run.meta.get("model_fingerprint")
