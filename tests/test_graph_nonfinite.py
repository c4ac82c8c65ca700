"""The graph view marks the probed layers that made NaN or +inf, how many samples did,
and the first such node in execution order; the graph page draws them.

Oracle: the model run sample by sample with plain torch forward hooks on the probed
modules (which layers hold a NaN or inf, on which samples, in which order they ran).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch
from fastapi.testclient import TestClient

from lurker.graph.view import json_schema
from lurker.probe import probe
from lurker.probe.data import load_dataset
from lurker.server import create_app

LAYERS = ["fc", "dark", "relu", "head"]


class _Dark(torch.nn.Module):
    """Adds ``sqrt(mean brightness - t)`` to every unit: NaN on the samples darker than t."""

    def __init__(self, t: float) -> None:
        super().__init__()
        self.t = t

    def forward(self, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return v + torch.sqrt(x.flatten(1).mean(1, keepdim=True) - self.t)


class _SomeNaNs(torch.nn.Module):
    """A clean linear layer, then NaN on the dark samples only (all its units), kept by a
    ReLU, then a clean head (the NaN zeroed before it)."""

    def __init__(self, t: float) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(3 * 16 * 16, 4)
        self.dark = _Dark(t)
        self.relu = torch.nn.ReLU()
        self.head = torch.nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.relu(self.dark(self.fc(x.flatten(1)), x))
        return self.head(torch.nan_to_num(a, 0.0, 0.0, 0.0))


def _bad_samples(model: torch.nn.Module, data: Any) -> dict[str, list[int]]:
    """Per probed module, in the order they ran: the samples whose output is not finite."""
    bad: dict[str, list[int]] = {}
    current = [0]

    def hook(name: str):
        def f(_m: Any, _i: Any, out: torch.Tensor) -> None:
            ids = bad.setdefault(name, [])
            if not bool(out.isfinite().all()):
                ids.append(current[0])

        return f

    hs = [getattr(model, n).register_forward_hook(hook(n)) for n in LAYERS]
    with torch.no_grad():
        for i in range(len(data)):
            current[0] = i
            model(data[i][0][None])
    for h in hs:
        h.remove()
    return bad


def _probed(tmp: Path) -> tuple[torch.nn.Module, Any, Path]:
    torch.manual_seed(0)
    data = load_dataset("digits:test", 16, channels=3)
    means = torch.stack([data[i][0].mean() for i in range(len(data))])
    model = _SomeNaNs(float(means.median())).eval()
    out = tmp / "runs" / "g"
    with pytest.warns(UserWarning, match="NaN or infinite"):
        probe(model, data, out=out, layers=LAYERS, k=2, progress=False)
    return model, data, out


def test_graph_view_marks_the_layers_with_nan_and_the_first(tmp_path: Path) -> None:
    model, data, out = _probed(tmp_path)
    bad = _bad_samples(model, data)
    assert list(bad) == LAYERS  # the hooks ran in execution order
    # the oracle: NaN on some samples only (about half: more than k=2 a unit), in dark
    # and relu; fc and head clean
    assert 2 < len(bad["dark"]) < len(data) and bad["relu"] == bad["dark"]
    assert bad["fc"] == [] and bad["head"] == []
    with TestClient(create_app(out)) as client:
        doc = client.get("/api/runs/g/graph").json()
    jsonschema.Draft202012Validator(json_schema()).validate(doc)
    marked = {n["L"]: n.get("nf") for n in doc["nodes"] if "L" in n}
    assert marked == {layer: len(ids) or None for layer, ids in bad.items()}
    first = next(layer for layer, ids in bad.items() if ids)
    assert doc["nodes"][doc["first_nonfinite"]]["L"] == first == "dark"


def test_a_run_without_nan_marks_nothing(tmp_path: Path) -> None:
    torch.manual_seed(0)
    data = load_dataset("digits:test", 16, channels=3)
    out = tmp_path / "runs" / "c"
    probe(_SomeNaNs(-1.0).eval(), data, out=out, layers=LAYERS, k=2, progress=False)
    with TestClient(create_app(out)) as client:
        doc = client.get("/api/runs/c/graph").json()
    assert "first_nonfinite" not in doc
    assert not any("nf" in n for n in doc["nodes"])


def test_graph_page_marks_the_nodes_and_links_the_first(tmp_path: Path, browser: Any) -> None:
    from explorer_fixtures import STATIC, strict_page
    from lurker.server.serve import background

    if not (STATIC / "index.html").exists():
        pytest.skip(f"the front end is not built ({STATIC}): run `make web`")
    model, data, out = _probed(tmp_path)
    bad = _bad_samples(model, data)
    with TestClient(create_app(out)) as client:
        nodes = client.get("/api/runs/g/graph").json()["nodes"]
    pos = {n["L"]: k for k, n in enumerate(nodes) if "L" in n}
    shots = Path(os.environ.get("LURKER_SHOTS") or tmp_path)
    with background(create_app(out)) as url, strict_page(browser, 1280, 900) as pg:
        pg.goto(f"{url}#/r/g/graph")
        pg.wait_for_selector(".graph-page[data-ready='1']")
        marked = pg.eval_on_selector_all(
            "svg.graph g.nd.nonfinite", "gs => gs.map((g) => g.dataset.k)"
        )
        assert sorted(marked) == sorted(f"n{pos[layer]}" for layer, ids in bad.items() if ids)
        assert pg.eval_on_selector_all(
            "svg.graph g.nd.nf-first", "gs => gs.map((g) => g.dataset.k)"
        ) == [f"n{pos['dark']}"]
        assert pg.locator("svg.graph g.nd.nonfinite .nf-badge").count() == len(marked)
        line = pg.locator(".graph-nonfinite")
        assert line.inner_text() == (
            f"Among the probed layers, NaN or +inf first appears at dark (on at least {len(bad['dark'])} samples); "
            "2 probed layers affected (outlined in red)."
        )
        pg.locator("svg.graph").screenshot(path=str(shots / "graph-nan.png"))
        line.locator("a").click()
        pg.wait_for_selector(f"svg.graph g.nd.current[data-k='n{pos['dark']}']")
        assert "focus=" in pg.url
        pg.screenshot(path=str(shots / "graph-nan-focused.png"))
    clean = tmp_path / "runs" / "c"
    probe(_SomeNaNs(-1.0).eval(), data, out=clean, layers=LAYERS, k=2, progress=False)
    with background(create_app(clean)) as url, strict_page(browser, 1280, 900) as pg:
        pg.goto(f"{url}#/r/c/graph")
        pg.wait_for_selector(".graph-page[data-ready='1']")
        assert pg.locator(".graph-nonfinite").count() == 0
        assert pg.locator("svg.graph .nonfinite, svg.graph .nf-badge").count() == 0
