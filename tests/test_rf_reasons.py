"""Layers without a receptive field say why: the op that broke the chain from the input
(a transpose of H and W, a grid_sample, an unknown op that changes the sizes), from
``receptive_fields(gaps=)`` through the run (``LayerInfo.rf_reason``) to the CLI and the
explorer's layer document. Layers before the break keep exact fields (perturbation oracle)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from fastapi.testclient import TestClient
from torch import Tensor, nn

import lurker
from lurker.graph.receptive import receptive_fields
from lurker.probe import probe
from lurker.server import create_app
from lurker.store import Run


class Broken(nn.Module):
    """A conv, then three branches whose positions stop following the input's axes."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.c3 = nn.Conv2d(3, 4, 3, padding=1)
        self.c4 = nn.Conv2d(4, 4, 3, padding=1)
        self.register_buffer("grid", torch.rand(1, 6, 5, 2) * 2 - 1)

    def forward(self, x: Tensor) -> Tensor:
        a = torch.relu(self.c1(x))
        t = self.c2(a.transpose(2, 3))  # H and W swapped
        f = self.c3(torch.fft.rfft2(x).abs())  # no rule, and W becomes W // 2 + 1
        g = self.c4(F.grid_sample(a, self.grid.expand(len(a), -1, -1, -1), align_corners=False))
        return t.mean((2, 3)) + f.mean((2, 3)) + g.mean((2, 3))


def _changed(model: nn.Module, x: Tensor, py: int, px: int) -> set[tuple[int, int]]:
    """Output positions of c1 that change when input pixel (py, px) does: the oracle."""
    with torch.no_grad():
        base = model.c1(x)
        bumped = x.clone()
        bumped[:, :, py, px] += 1.0
        diff = (model.c1(bumped) - base).abs().sum((0, 1))
    return {(int(i), int(j)) for i, j in (diff > 0).nonzero().tolist()}


def test_gaps_name_the_op_that_broke_the_chain_and_fields_before_it_stay_exact() -> None:
    model = Broken().eval()
    x = torch.randn(1, 3, 8, 10)
    t = lurker.trace(model, x)
    gaps: dict[int, str] = {}
    rfs = receptive_fields(t, gaps=gaps)
    fft = t.find("fft_rfft2")[0]
    assert gaps[fft.index].startswith(f"{fft.label}: no receptive-field rule for fft_rfft2")
    for op in t.ops:  # every op computed from it names it, none gets a field
        if op.index > fft.index and op.module == "c3":
            assert op.index not in rfs and gaps[op.index].startswith(fft.label)
    conv = t.find("conv2d")[0]
    assert conv.index in rfs and conv.index not in gaps
    rf = rfs[conv.index]
    for py in range(8):
        for px in range(10):
            seen = {
                (i, j)
                for i in range(8)
                for j in range(10)
                if rf.box(i, j)[0] <= py < rf.box(i, j)[1]
                and rf.box(i, j)[2] <= px < rf.box(i, j)[3]
            }
            assert _changed(model, x, py, px) == seen


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    root = tmp_path_factory.mktemp("rf_reasons")
    ds = torch.utils.data.TensorDataset(torch.randn(6, 3, 8, 10), torch.zeros(6, dtype=torch.long))
    layers = ["c1", "c2", "c3", "c4"]
    return probe(Broken().eval(), ds, out=root / "runs" / "b", layers=layers, k=2, progress=False)


def test_the_run_keeps_why_each_layer_has_no_field(run: Run) -> None:
    by = {info.name: info for info in Run.open(run.path).layers}
    assert by["c1"].rf is not None and by["c1"].rf_reason is None
    assert by["c2"].rf is None and by["c2"].rf_reason.startswith(
        "transpose_1 (transpose) swaps the input's y and x axes"
    )
    assert by["c3"].rf is None and by["c3"].rf_reason.startswith("fft_rfft2_1: no receptive")
    assert by["c4"].rf is None and by["c4"].rf_reason.startswith("grid_sample_1 (grid_sample)")
    assert Run.open(run.path).unit("c2", 0).to_dict()["layer"]["rf_reason"] == by["c2"].rf_reason


def test_the_explorer_layer_document_says_why(run: Run) -> None:
    client = TestClient(create_app(run.path.parent))
    doc = client.get("/api/runs/b/layers/c2").json()
    assert doc["rf"] is None and "transpose_1" in doc["rf_reason"]
    assert client.get("/api/runs/b/layers/c1").json()["rf_reason"] is None
    # the unit document the unit page reads (its crop help says why) carries it too
    unit = client.get("/api/runs/b/layers/c2/units/0").json()
    assert unit["layer"]["rf"] is None and unit["layer"]["rf_reason"] == doc["rf_reason"]


def test_a_run_written_before_the_reason_says_it_is_not_recorded(run: Run, tmp_path: Path) -> None:
    old = tmp_path / "old"
    old.mkdir()
    (old / "run.db").write_bytes((run.path / "run.db").read_bytes())
    with sqlite3.connect(old / "run.db") as conn:
        conn.execute("ALTER TABLE layers DROP COLUMN rf_reason")
    by = {info.name: info for info in Run.open(old).layers}
    assert by["c1"].rf_reason is None
    assert by["c2"].rf_reason.startswith("not recorded")


def test_the_cli_says_which_layers_have_no_crop_and_why(tmp_path: Path) -> None:
    """``lurker probe`` prints, after the sweep, each reason once with the layers it holds
    for (a user who sees no crop in the explorer learns why from the command already)."""
    from click.testing import CliRunner

    from lurker.cli import main

    src = tmp_path / "broken.py"
    src.write_text(
        "import torch\nfrom torch import nn\n\n\n"
        "class Swapped(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.c1 = nn.Conv2d(3, 4, 3, padding=1)\n"
        "        self.c2 = nn.Conv2d(4, 4, 3, padding=1)\n\n"
        "    def forward(self, x):\n"
        "        return self.c2(torch.relu(self.c1(x)).transpose(2, 3)).mean((2, 3))\n\n\n"
        "class Data(torch.utils.data.Dataset):\n"
        "    def __len__(self):\n"
        "        return 6\n\n"
        "    def __getitem__(self, i):\n"
        "        return torch.randn(3, 8, 10, generator=torch.Generator().manual_seed(i)), i % 2\n"
    )
    args = ["probe", f"{src}:Swapped", "--data", f"{src}:Data", "--out", str(tmp_path / "r")]
    args += ["--layers", "c1,c2", "--k", "2"]  # commas, as --kinds takes them
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    lines = [ln for ln in r.output.splitlines() if ln.startswith("no receptive field")]
    assert len(lines) == 1 and lines[0].startswith("no receptive field (no crop) for c2: ")
    assert "transpose_1 (transpose) swaps the input's y and x axes" in lines[0]
    assert [i.name for i in Run.open(tmp_path / "r").layers] == ["c1", "c2"]
    # a comma inside a glob's brackets is the glob's, not a separator
    args[args.index("c1,c2")] = "c[1,2]"
    args[args.index(str(tmp_path / "r"))] = str(tmp_path / "g")
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert [i.name for i in Run.open(tmp_path / "g").layers] == ["c1", "c2"]


def test_vit_tokens_are_not_said_to_have_no_crop(tmp_path: Path) -> None:
    """A ViT's token layers have no receptive field but do have crops (each token's patch):
    neither the run, the layer document nor ``lurker probe`` may say "no crop" for them."""
    from click.testing import CliRunner

    from lurker.cli import main
    from lurker.probe.layout import PATCH_TOKENS

    src = tmp_path / "vit.py"
    src.write_text(
        "import torch\nfrom torchvision.models import VisionTransformer\n\n\n"
        "def build():\n    torch.manual_seed(0)\n"
        "    return VisionTransformer(16, 4, 1, 2, 16, 32, num_classes=2)\n\n\n"
        "class Data(torch.utils.data.Dataset):\n"
        "    def __len__(self):\n"
        "        return 6\n\n"
        "    def __getitem__(self, i):\n"
        "        return torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(i)), i % 2\n"
    )
    out = tmp_path / "r"
    block = "encoder.layers.encoder_layer_0"
    args = ["probe", f"{src}:build", "--data", f"{src}:Data", "--out", str(out), "--k", "2"]
    r = CliRunner().invoke(main, [*args, "--layers", f"conv_proj,{block}"])
    assert r.exit_code == 0, r.output
    assert "no crop" not in r.output, r.output
    run = Run.open(out)
    info = run.layer(block)
    assert info.rf is None and info.rf_reason == PATCH_TOKENS
    doc = TestClient(create_app(out)).get(f"/api/runs/r/layers/{block}").json()
    assert doc["rf"] is None and "no crop" not in doc["rf_reason"]
    assert doc["layout"]["boxes"][1] == [0, 4, 0, 4]  # token 1: the top-left patch
