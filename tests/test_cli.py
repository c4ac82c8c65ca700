"""The ``lurker trace`` command, end to end, and its error messages."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from click.testing import CliRunner

from lurker.cli import main

MODEL_FILE = """
import torch
from torch import nn

class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))

def build():
    return Tiny()
"""


def _invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def test_trace_torchvision_writes_graph_json_and_summary(tmp_path: Path):
    out = tmp_path / "g.svg"
    js = tmp_path / "g.json"
    r = _invoke(
        "trace", "torchvision:resnet18", "-i", "1,3,32,32", "--out", str(out), "--json", str(js)
    )
    assert r.exit_code == 0, r.output
    assert "validation:" in r.output and "layer4" in r.output
    assert out.read_text().lstrip().startswith(("<?xml", "<svg"))
    doc = json.loads(js.read_text())
    assert doc["schema"] == "lurker.trace" and doc["model"]["name"] == "ResNet"


def test_trace_file_spec_with_weights(tmp_path: Path):
    f = tmp_path / "tiny.py"
    f.write_text(MODEL_FILE)
    torch.manual_seed(1)
    sys.path.insert(0, str(tmp_path))
    try:
        import tiny  # type: ignore[import-not-found]

        model = tiny.build()
    finally:
        sys.path.remove(str(tmp_path))
    w = tmp_path / "w.pt"
    torch.save(model.state_dict(), w)
    out = tmp_path / "tiny.dot"
    r = _invoke("trace", f"{f}:build", "-i", "1,3,8,8", "--weights", str(w), "--out", str(out))
    assert r.exit_code == 0, r.output
    assert "conv2d_1" in out.read_text()


def _error(*args: str) -> str:
    r = _invoke(*args)
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    return r.output


def test_errors_are_one_paragraph(tmp_path: Path):
    assert "resnet18" in _error("trace", "torchvision:resnet19", "-i", "1,3,8,8")
    msg = _error(
        "trace", "torchvision:resnet18", "-i", "1,1,32,32", "--out", str(tmp_path / "x.svg")
    )
    assert "input-shape" in msg and "conv2d_1" in msg
    assert "nope.pt" in _error("trace", "torchvision:resnet18", "-i", "1,3,8,8", "-w", "nope.pt")
    w = tmp_path / "other.pt"
    torch.save(torch.nn.Linear(3, 3).state_dict(), w)
    msg = _error("trace", "torchvision:resnet18", "-i", "1,3,8,8", "-w", str(w))
    assert "missing" in msg.lower()
    assert "1,3,224,224" in _error("trace", "torchvision:resnet18", "-i", "1,x,3")


def test_console_script_is_installed():
    exe = Path(sys.executable).parent / "lurker"
    r = subprocess.run([str(exe), "--help"], capture_output=True, text=True, check=False)
    assert r.returncode == 0 and "trace" in r.stdout
