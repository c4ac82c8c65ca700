"""A top list all of one value, other than 0, in a real browser and over the API.

A convolution padded wider than its kernel reaches, on every digit, a corner that sees
only the padding: its value there is its bias. Where the bias is the unit's peak, every
one of the 360 digits reaches it, so the max list is five ties the probe filled by sample
id (#0 to #4): the unit page said "they are ties ... the list does not single them out"
while the sample pages of digits 0 to 4 listed the unit as ranking them first.

Both pages must say the same: the list is ties; the sample pages leave it out (and count
it), the unit page says so. A list that is not all one value still ranks.

Oracle: the model run on every digit with torch (which samples reach the unit's peak).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from torch import nn

from explorer_fixtures import CHROMIUM, STATIC, strict_page

K, BIAS, LAYER = 5, 0.5, "conv"


class Corner(nn.Module):
    """Unit 0: the bias minus the ink around each position (its peak, the bias, is at the
    padded corners of every digit); unit 1: the ink (its peak differs per digit)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=2)
        with torch.no_grad():
            self.conv.weight[0].fill_(-1.0)
            self.conv.weight[1].fill_(1.0)
            self.conv.bias.copy_(torch.tensor([BIAS, 0.0]))
        self.fc = nn.Linear(2, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean((2, 3)))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lurker.probe import probe
    from lurker.probe.data import load_dataset

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("ties") / "corner"
    data = load_dataset("digits:test", 16, channels=1)
    run = probe(Corner().eval(), data, out=out, k=K, batch_size=128, progress=False)
    assert run is not None
    run.close()
    return out


@pytest.fixture(scope="module")
def reach(run_dir: Path) -> dict[int, list[int]]:
    """Per unit, the samples whose map reaches the unit's peak over the dataset."""
    from lurker.probe.data import load_dataset

    data = load_dataset("digits:test", 16, channels=1)
    x = torch.stack([data[i][0] for i in range(len(data))])
    with torch.no_grad():
        peaks = Corner().eval().conv(x).amax((2, 3))
    top = peaks.max(0).values
    return {u: torch.nonzero(peaks[:, u] == top[u]).ravel().tolist() for u in range(2)}


@pytest.fixture(scope="module")
def client(run_dir: Path) -> Iterator[TestClient]:
    from lurker.server import create_app

    with TestClient(create_app(run_dir)) as c:
        yield c


def test_a_full_list_of_one_value_is_ties_on_both_pages(
    client: TestClient, reach: dict[int, list[int]]
) -> None:
    assert len(reach[0]) > K  # every digit reaches the bias: the list is filled by id
    assert len(reach[1]) < K  # the ink's peak differs: its list ranks
    doc = client.get(f"/api/runs/corner/layers/{LAYER}/units/0").json()
    assert not doc["constant"]
    assert [e["value"] for e in doc["top"]["max"]] == pytest.approx([BIAS] * K)
    assert doc["tied_tail"]["max"] == K  # the whole list
    assert doc["tied_tail"]["mean"] == 0
    other = client.get(f"/api/runs/corner/layers/{LAYER}/units/1").json()
    assert other["tied_tail"] == {"max": 0, "mean": 0}
    listed = [e["sample_id"] for e in doc["top"]["max"]]
    assert set(listed) <= set(reach[0])
    for sid in listed:
        s = client.get(f"/api/runs/corner/samples/{sid}").json()
        held = {(a["layer"], a["unit"], a["list"]) for a in s["appearances"]}
        assert (LAYER, 0, "max") not in held, sid
        assert any(x["layer"] == LAYER and x["count"] >= 1 for x in s["left_out_layers"])
    # unit 1's max list ranks its samples: each one's page lists it
    for rank, e in enumerate(other["top"]["max"]):
        s = client.get(f"/api/runs/corner/samples/{e['sample_id']}").json()
        assert {"layer": LAYER, "unit": 1, "list": "max", "rank": rank} in [
            {k: a[k] for k in ("layer", "unit", "list", "rank")} for a in s["appearances"]
        ]


def test_a_list_of_one_value_that_is_not_full_or_the_whole_run_ranks() -> None:
    """Every sample is listed then: its ties are all the samples there are."""
    from lurker.server.state import tied_tail_count

    assert tied_tail_count([0.37] * 5, 5, 100) == 5
    assert tied_tail_count([0.37] * 3, 5, 100) == 0  # not full
    assert tied_tail_count([0.37] * 5, 5, 5) == 0  # the run is the list
    assert tied_tail_count([0.5, 0.37, 0.37, 0.37, 0.37], 5, 100) == 0  # they rank
    assert tied_tail_count([0.37], 1, 100) == 0  # one entry ties with nothing listed


@pytest.mark.skipif(
    not CHROMIUM.exists() or not (STATIC / "index.html").exists(),
    reason="needs Debian's chromium and the built front end",
)
def test_unit_and_sample_pages_agree(browser: Any, run_dir: Path) -> None:
    pytest.importorskip("uvicorn")
    from lurker.server import create_app
    from lurker.server.serve import background

    with background(create_app(run_dir)) as url, strict_page(browser) as pg:
        pg.goto(f"{url}#/r/corner/unit/{LAYER}/0?tab=max")
        said = pg.inner_text("#tied-list")
        assert f"All {K} samples of this list have the value 0.5" in said
        first = int(pg.locator(".top-entry").first.get_attribute("data-sample"))
        pg.goto(f"{url}#/r/corner/sample/{first}")
        pg.wait_for_selector("#left-out")
        chips = [
            (
                c.locator("xpath=ancestor::section[1]").get_attribute("data-layer"),
                int(c.get_attribute("data-unit")),
                c.get_attribute("data-list"),
            )
            for c in pg.locator(".chip").all()
        ]
        assert (LAYER, 0, "max") not in chips
        assert "or a full list all of one value" in pg.inner_text("#left-out")
