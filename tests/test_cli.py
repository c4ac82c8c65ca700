"""The ``lurker trace`` command, end to end, and its error messages."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from click.testing import CliRunner

from lurker.cli import main

MODEL_FILE = """
import pytest
import torch
import torchvision
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


@pytest.fixture
def traced_inputs(monkeypatch: pytest.MonkeyPatch) -> list:
    """The inputs `lurker trace` hands to lurker.trace, recorded."""
    import lurker

    seen: list = []
    real = lurker.trace

    def spy(model, *args, **kwargs):
        seen.append(args)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(lurker, "trace", spy)
    return seen


def test_input_dtype_feeds_token_ids(tmp_path: Path, traced_inputs: list):
    args = ["trace", "lurker.examples:TinyGPT", "-i", "2,40", "--out", str(tmp_path / "g.dot")]
    r = _invoke(*args, "--input-dtype", "long:50250-50257")
    assert r.exit_code == 0, r.output
    ((ids,),) = traced_inputs
    assert ids.shape == (2, 40) and ids.dtype == torch.int64
    assert set(ids.flatten().tolist()) == set(range(50250, 50257))  # 80 draws of 7 values
    # without it the embedding gets floats: the error names the layer and the option
    msg = _error(*args)
    assert "Embedding 'tok' expects integer indices" in msg
    assert "--input-dtype long:0-50257" in msg
    assert "err.partial" not in msg


def test_input_shape_lists_feed_a_detection_model(tmp_path: Path, traced_inputs: list):
    """A list input goes to the model as a list: a detector gets its two images."""
    r = _invoke(
        "trace",
        "torchvision:ssdlite320_mobilenet_v3_large",
        "-i",
        "[3,64,64; 3,48,64]",
        "--no-validate",
        "--out",
        str(tmp_path / "d.dot"),
    )
    assert r.exit_code == 0, r.output
    ((images,),) = traced_inputs
    assert isinstance(images, list) and [t.shape for t in images] == [(3, 64, 64), (3, 48, 64)]
    assert "SSD" in r.output


def test_documented_commands_run(tmp_path: Path, monkeypatch):
    """docs/tracing.md's `lurker trace` commands (GPT-like, detection, ...) run as written."""
    import shlex

    from lurker.examples import DigitsNet

    doc = (Path(__file__).resolve().parents[1] / "docs" / "tracing.md").read_text()
    lines = [ln for ln in doc.splitlines() if ln.startswith("lurker trace ")]
    assert any("TinyGPT" in ln and "--input-dtype long" in ln for ln in lines)
    assert any("fasterrcnn_mobilenet_v3_large_fpn" in ln and "[3," in ln for ln in lines)
    monkeypatch.chdir(tmp_path)
    Path("demo-out").mkdir()
    torch.save(DigitsNet().state_dict(), "demo-out/digits_net.pt")  # what `make demo` leaves
    for line in lines:
        args = shlex.split(line)[1:]
        r = _invoke(*args)
        assert r.exit_code == 0, f"{line}\n{r.output}"
        assert "validation:" in r.output
        out = args[args.index("--out") + 1] if "--out" in args else "graph.svg"
        assert Path(out).stat().st_size > 1000


def test_input_that_torch_refuses_blames_the_input_not_the_model(tmp_path: Path):
    """resnet18 on an unbatched image: its conv accepts it, its BatchNorm2d (torch's own
    code) refuses the 3-D tensor. The CLI names the layer, what it got and what it expects,
    and points to -i, not to `err.partial`."""
    msg = _error("trace", "torchvision:resnet18", "-i", "3,32,32", "--out", str(tmp_path / "x.svg"))
    assert "The input does not fit layer 'bn1'" in msg
    assert "(64, 16, 16)" in msg and "expects (N, 64, H, W)" in msg
    assert "expected 4D input (got 3D input)" in msg and "-i" in msg
    assert "err.partial" not in msg and "in its own code" not in msg
    msg = _error(
        "trace", "torchvision:resnet18", "-i", "1,1,32,32", "--out", str(tmp_path / "x.svg")
    )
    assert "expects (N, 3, H, W)" in msg and "err.partial" not in msg
    # from Python, the same error still leads to the partial trace
    import lurker

    with pytest.raises(lurker.TraceError) as info:
        lurker.trace(torchvision.models.resnet18(), torch.randn(3, 32, 32))
    assert "err.partial" in str(info.value) and "bn1" in str(info.value)
    assert info.value.partial.ops[-1].label == "conv2d_1"


def test_unsupported_graph_format_is_rejected_before_tracing(monkeypatch):
    import lurker.models

    def no_build(*args, **kwargs):
        raise AssertionError("the model was built before --out was checked")

    monkeypatch.setattr(lurker.models, "load_model", no_build)
    msg = _error("trace", "torchvision:resnet18", "-i", "1,3,8,8", "--out", "x.jpg")
    assert "x.jpg" in msg and ".svg" in msg and ".png" in msg


def test_warnings_read_as_one_line_without_a_source_place(tmp_path: Path):
    """A warning raised deep in lurker reaches a command-line user as `warning: ...`, not
    as a file and line of lurker's or click's code."""
    from PIL import Image

    img = tmp_path / "x.png"
    Image.fromarray((torch.rand(16, 16) * 255).byte().numpy(), "L").save(img)
    exe = Path(sys.executable).parent / "lurker"
    r = subprocess.run(
        [str(exe), "explain", "lurker.examples:DigitsNet", "--image", str(img),
         "--image-size", "16", "--method", "lrp", "--option", "stabilizer=10",
         "-o", str(tmp_path / "h.png")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "warning: LRP relevance is not conserved at" in r.stderr, r.stderr
    assert "UserWarning" not in r.stderr and ".py:" not in r.stderr


def test_trace_refuses_outputs_it_cannot_write_before_tracing(tmp_path: Path):
    """--out or --json in a folder that cannot be made (a file stands there) is one
    message before the model is traced, not a traceback after; a folder that does not
    exist yet is made; --depth must be >= 0."""
    (tmp_path / "file").write_text("x")
    args = ["trace", "torchvision:resnet18", "-i", "1,3,32,32"]
    for extra, hint in (
        (["--out", str(tmp_path / "file" / "g.svg")], "--out"),
        (["--out", str(tmp_path / "g.svg"), "--json", str(tmp_path / "file" / "g.json")], "--json"),
        (["--out", str(tmp_path)], "--out"),
    ):
        r = CliRunner().invoke(main, [*args, *extra])
        assert r.exit_code == 2 and hint in r.output and "Traceback" not in r.output, r.output
        assert "ResNet" not in r.output  # (no summary: nothing was traced)
    r = CliRunner().invoke(main, [*args, "--depth", "-1", "--out", str(tmp_path / "g.svg")])
    assert r.exit_code == 2 and "--depth" in r.output
    new = tmp_path / "new" / "dir"
    r = CliRunner().invoke(
        main, [*args, "--out", str(new / "g.dot"), "--json", str(new / "g.json")]
    )
    assert r.exit_code == 0 and (new / "g.dot").is_file() and (new / "g.json").is_file(), r.output


def test_trace_out_with_a_tilde_is_the_home_folder(tmp_path: Path, monkeypatch):
    """--out=~/g.dot (a shell leaves ~ after = alone) writes into the home folder, not a
    folder named ~."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(
        main, ["trace", "torchvision:resnet18", "-i", "1,3,32,32", "--out=~/g.dot"]
    )
    assert r.exit_code == 0, r.output
    assert (tmp_path / "home" / "g.dot").is_file() and not (tmp_path / "~").exists()


def test_ctrl_c_stops_lurker_serve_with_exit_status_130_and_no_aborted(tmp_path: Path):
    """Ctrl-C is how `lurker serve` is stopped (its help: "serves until Ctrl-C"), yet uvicorn
    re-raises the SIGINT after its clean shutdown and click turned it into "Aborted!" and
    exit status 1, as for a failure. Now one line and 130, as `lurker probe` and `lurker
    featviz` exit on Ctrl-C."""
    import os
    import signal

    from torch.utils.data import Subset

    import lurker
    from lurker.examples import DigitsNet
    from lurker.probe.data import load_dataset

    data = Subset(load_dataset("digits", 8, channels=1), range(8))
    lurker.probe(DigitsNet(), data, out=tmp_path / "run", k=2, progress=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(
        [sys.executable, "-c", "from lurker.cli import main; main()", "serve",
         str(tmp_path / "run"), "--port", "0", "--no-browser"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        url = proc.stdout.readline()  # printed once the server listens
        assert url.startswith("http://127.0.0.1:"), proc.stderr.read()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "Aborted" not in out + err and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == "lurker serve: stopped"


def test_ctrl_c_of_any_command_exits_130_without_aborted(tmp_path: Path, monkeypatch):
    """Commands without a Ctrl-C message of their own (trace, images, export, map,
    explain) exit 130 with one line naming the command, not click's "Aborted!" (exit 1)."""
    import lurker

    def pressed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(lurker, "trace", pressed)
    r = CliRunner().invoke(main, ["trace", "torchvision:resnet18", "-i", "1,3,32,32"])
    assert r.exit_code == 130, r.output
    assert "Aborted" not in r.output and "lurker trace: interrupted" in r.output


def test_trace_out_in_a_folder_where_no_file_can_be_made(tmp_path: Path, monkeypatch):
    """`--out /proc/g.svg`: /proc passes os.access's writable check, yet no file can be
    created there; the graph was drawn after the whole trace and the temporary file beside
    it failed with a FileNotFoundError traceback. Refused first, naming the folder and what
    to pass (here the folder refuses files as /proc does, by a patched mkstemp)."""
    import tempfile

    real = tempfile.mkstemp
    blocked = tmp_path / "proc"
    blocked.mkdir()

    def mkstemp(*args, **kwargs):
        if Path(kwargs.get("dir") or "") == blocked:
            raise FileNotFoundError(2, "No such file or directory")
        return real(*args, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    f = tmp_path / "net.py"
    f.write_text("from torch import nn\n\ndef build():\n    return nn.Linear(4, 2)\n")
    good = ["--out", str(tmp_path / "g.dot")]
    for option, paths in [("--out", ["--out", str(blocked / "g.dot")]),
                          ("--json", [*good, "--json", str(blocked / "g.json")])]:  # fmt: skip
        r = CliRunner().invoke(main, ["trace", f"{f}:build", "-i", "1,4", *paths])
        assert r.exit_code == 2, r.output
        assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
        assert f"Invalid value for '{option}'" in r.output
        assert f"no file can be created in its folder '{blocked}'" in r.output
        assert "give a path in a folder you can write to" in r.output
    # a file already there is written over through a new file beside it: refused too
    (blocked / "old.dot").write_text("digraph {}")
    r = CliRunner().invoke(
        main, ["trace", f"{f}:build", "-i", "1,4", "--out", str(blocked / "old.dot")]
    )
    assert r.exit_code == 2, r.output
    assert f"no file can be created in its folder '{blocked}'" in r.output
