"""Relevance-max lists (``probe(..., relevance=True)``): each unit's samples ranked by
its LRP relevance for the model's prediction, stored in the run beside the activation lists.

Oracles: at the logits layer, LRP's starting relevance is the predicted class's logit and
nothing else, so a plain forward gives the lists exactly; at inner layers, the relevance of
every sample computed one sample at a time with ``lurker.explain.concepts`` (its
conservation is checked against Zennit in test_explain_lrp.py), ranked by brute force.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch.utils.data import Subset

from lurker.errors import LurkerError
from lurker.probe import probe
from lurker.store import MissingFromRunError, Run

K = 4


@pytest.fixture(scope="module")
def digits() -> tuple[torch.nn.Module, object]:
    from lurker.examples import train_digits
    from lurker.probe.data import load_dataset

    torch.manual_seed(0)
    model, _ = train_digits(1, log=lambda *_: None)
    data = Subset(load_dataset("digits:test", 16, channels=1), range(48))
    return model.eval(), data


@pytest.fixture(scope="module")
def run(digits, tmp_path_factory: pytest.TempPathFactory) -> Run:
    model, data = digits
    out = tmp_path_factory.mktemp("relevance") / "run"
    r = probe(model, data, out=out, k=K, batch_size=32, progress=False, relevance=True)
    assert r is not None
    return r


def _images(data) -> torch.Tensor:
    return torch.stack([data[i][0] for i in range(len(data))])


def _ranked(values: np.ndarray, k: int) -> list[list[int]]:
    """Per unit (row), the ids of the k largest values; ties to the smaller id."""
    return [sorted(range(len(row)), key=lambda i: (-row[i], i))[:k] for row in values]


def test_logits_layer_equals_the_predictions(run: Run, digits) -> None:
    model, data = digits
    x = _images(data)
    with torch.no_grad():
        logits = model(x)
    pred = logits.argmax(1)
    # relevance of class unit c: the logit where c is predicted, else 0
    rel = torch.zeros_like(logits)
    rel[torch.arange(len(x)), pred] = logits[torch.arange(len(x)), pred]
    last = run.layers[-1]
    assert last.num_units == logits.shape[1]
    want = _ranked(rel.T.numpy(), K)
    for c in range(last.num_units):
        top = run.unit(last.name, c).top("relevance")
        assert [e.sample_id for e in top] == want[c]
        got = np.array([e.value for e in top])
        np.testing.assert_allclose(got, rel[want[c], c].numpy(), rtol=1e-5, atol=1e-6)
    assert run.meta["relevance"] == {
        "target": "prediction",
        "composite": "epsilon_plus_flat",
        "k": K,
    }


def test_inner_layers_equal_per_sample_relevance(run: Run, digits) -> None:
    from lurker.explain import concepts

    model, data = digits
    x = _images(data)
    inner = [run.layer("features.4"), run.layer("classifier.1")]  # a conv and a linear layer
    for info in inner:
        # one sample at a time: the oracle shares no batch with the probe's sweep
        per = torch.cat(
            [concepts(model, x[i : i + 1], layer=info.name, top=1).relevance for i in range(len(x))]
        )
        want = _ranked(per.T.numpy(), K)
        for u in range(0, info.num_units, max(1, info.num_units // 5)):
            top = run.unit(info.name, u).top("relevance")
            assert [e.sample_id for e in top] == want[u], (info.name, u)
            np.testing.assert_allclose(
                [e.value for e in top], per[want[u], u].numpy(), rtol=1e-4, atol=1e-6
            )


def test_lists_do_not_depend_on_order_or_batch_size(run: Run, digits, tmp_path: Path) -> None:
    model, data = digits
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(1)).tolist()
    shuffled = Subset(data, order)
    other = probe(
        model,
        shuffled,
        out=tmp_path / "r",
        k=K,
        batch_size=7,
        progress=False,
        relevance=True,
        layers=["features.4", "classifier.3"],
    )
    assert other is not None
    for info in other.layers:
        for u in (0, info.num_units - 1):
            a = [(e.sample_id, e.value) for e in run.unit(info.name, u).top("relevance")]
            b = other.unit(info.name, u).top("relevance")
            # the shuffled run's sample ids are positions in `order`; entries tied with
            # another sample (relevance 0 at the logits of other classes) go to the smaller
            # id, which names another sample in the shuffled run: compare the untied ones
            tied = {v for v, n in Counter(v for _, v in a).items() if n > 1}
            assert [order[e.sample_id] for e in b if e.value not in tied] == [
                s for s, v in a if v not in tied
            ]
            np.testing.assert_allclose([e.value for e in b], [v for _, v in a], rtol=1e-4)


def test_in_the_unit_document_and_not_without_it(run: Run, digits, tmp_path: Path) -> None:
    model, data = digits
    doc = run.unit(run.layers[0].name, 0).to_dict()
    assert set(doc["top"]) == {"max", "mean", "relevance"} and len(doc["top"]["relevance"]) == K
    plain = probe(model, Subset(data, range(20)), out=tmp_path / "p", k=2, progress=False)
    assert plain is not None and not plain.has_relevance
    assert set(plain.unit(plain.layers[0].name, 0).to_dict()["top"]) == {"max", "mean"}
    with pytest.raises(MissingFromRunError, match="relevance=True"):
        plain.unit(plain.layers[0].name, 0).top("relevance")


def test_bad_composite_is_refused_before_anything_is_written(digits, tmp_path: Path) -> None:
    model, data = digits
    with pytest.raises(LurkerError, match="epsilon_plus_flat"):
        probe(model, data, out=tmp_path / "x", relevance="zplus-please", progress=False)
    assert not (tmp_path / "x" / "run.db").exists()


def test_cli_flag(digits, tmp_path: Path) -> None:
    from lurker.cli import main

    model, _ = digits
    weights = tmp_path / "w.pt"
    torch.save(model.state_dict(), weights)
    out = tmp_path / "cli"
    r = CliRunner().invoke(
        main,
        [
            "probe", "lurker.examples:DigitsNet", "--weights", str(weights), "--data",
            "digits:test", "--image-size", "16", "--out", str(out), "--k", "2",
            "--layers", "classifier.3", "--relevance-composite", "epsilon",
        ],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    with Run.open(out) as cli_run:
        assert cli_run.meta["relevance"]["composite"] == "epsilon"
        assert len(cli_run.unit("classifier.3", 0).top("relevance")) == 2


def test_a_reprobe_without_them_drops_the_derived_tables(digits, tmp_path: Path) -> None:
    """Probing a finished run again replaces its results: relevance lists, features and
    feature visualizations made from the old ones go too (never read back empty, nor
    attached to the new layers, whose row ids the old ones reuse)."""
    import lurker

    model, data = digits
    small = Subset(data, range(24))
    out = tmp_path / "r"
    first = probe(model, small, out=out, k=2, progress=False, relevance=True, embed=True)
    assert first is not None and first.has_relevance and first.has_embedding
    lurker.featviz(model, "features.0", units=[0], steps=2, run=out).save(out)
    assert Run.open(out).featviz_layers() == ["features.0"]
    second = probe(model, small, out=out, k=2, progress=False, layers=["features.8"])
    assert second is not None
    assert not second.has_relevance and not second.has_embedding
    assert second.top_lists == ("max", "mean") and "relevance" not in second.meta
    assert second.featviz_layers() == []
