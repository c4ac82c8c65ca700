"""A run whose graph holds an op of unknown FLOPs (a tensordot whose contraction the FLOPs
rule cannot read: ``Graph.flops_unknown``): Home's FLOPs fact and the graph page's facts
line showed the plain sum, which passed for the model's total; they say now that it is a
lower bound and how many ops it leaves out, as `lurker trace`'s summary does. Oracle: the
graph's own counts, and a run of known FLOPs only beside it, which keeps the plain total."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn

from explorer_fixtures import skip_without_browser, strict_page

skip_without_browser()


class _Contracted(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.w = nn.Parameter(torch.randn(4, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # dims as a tensor: a tensordot whose FLOPs lurker cannot count
        return torch.tensordot(torch.relu(self.conv(x)).mean((2, 3)), self.w, dims=torch.tensor(1))


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    import lurker
    from lurker.server import create_app
    from lurker.server.serve import background
    from lurker.store import Run

    root = tmp_path_factory.mktemp("flops")
    torch.manual_seed(0)
    x, y = torch.rand(8, 1, 8, 8), torch.arange(8) % 3
    ds = torch.utils.data.TensorDataset(x, y)
    known = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3))
    for name, model in (("unknown", _Contracted()), ("known", known)):
        lurker.probe(model.eval(), ds, out=root / name, k=2, progress=False)
    counts = {}
    for name in ("unknown", "known"):
        with Run.open(root / name) as run:
            counts[name] = (run.graph.flops, run.graph.flops_unknown)
    with background(create_app(root)) as url:
        yield {"url": url.rstrip("/"), "counts": counts}


def _fact(pg: Any, label: str) -> str:
    pg.wait_for_selector("dl.facts dt")
    return pg.evaluate(
        """(label) => [...document.querySelectorAll('dl.facts dt')]
            .find(dt => dt.textContent === label).nextElementSibling.textContent""",
        label,
    )


def test_home_and_the_graph_say_a_flops_total_is_a_lower_bound(browser: Any, served: dict):
    flops, unknown = served["counts"]["unknown"]
    assert unknown == 1 and flops > 0  # the conv's, counted; the tensordot's, not
    known_flops, none = served["counts"]["known"]
    assert none == 0
    with strict_page(browser) as pg:
        pg.goto(f"{served['url']}/#/r/unknown")
        assert _fact(pg, "FLOPs") == f"at least {flops}, 1 op of unknown FLOPs"
        pg.goto(f"{served['url']}/#/r/unknown/graph")
        pg.wait_for_selector(".graph-page[data-ready]", state="attached", timeout=30_000)
        facts = pg.locator(".graph-bar .facts").inner_text()
        assert f"at least {flops:,} FLOPs, 1 op of unknown FLOPs" in facts, facts

        pg.goto(f"{served['url']}/#/r/known")
        assert _fact(pg, "FLOPs") == f"{known_flops}"
        pg.goto(f"{served['url']}/#/r/known/graph")
        pg.wait_for_selector(".graph-page[data-ready]", state="attached", timeout=30_000)
        facts = pg.locator(".graph-bar .facts").inner_text()
        assert f"\u00b7 {known_flops:,} FLOPs" in facts and "at least" not in facts, facts
