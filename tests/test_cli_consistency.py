"""One meaning per option across the `lurker` commands: short flags, the device default,
renamed options kept as hidden aliases."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from lurker.cli import main
from lurker.errors import LurkerError

#: the commands that run a model, and the arguments each needs to parse
RUNS_A_MODEL = {
    "trace": ["torchvision:resnet18", "-i", "1,3,8,8"],
    "probe": ["lurker.examples:DigitsNet", "--data", "digits", "--out", "RUN"],
    "images": ["RUN"],
    "map": ["RUN"],
    "serve": ["RUN"],
    "explain": ["lurker.examples:DigitsNet", "--image", "x.png"],
    "featviz": ["lurker.examples:DigitsNet", "--layer", "features.8"],
}


def _short_flags() -> dict[str, set[str]]:
    """Each short flag of every command, with the long names it stands for."""
    seen: dict[str, set[str]] = {}
    for command in main.commands.values():
        for param in command.params:
            if not isinstance(param, click.Option) or param.hidden:
                continue
            longs = [o for o in param.opts if o.startswith("--")]
            for short in (o for o in param.opts if not o.startswith("--")):
                seen.setdefault(short, set()).update(longs)
    return seen


def test_each_short_flag_means_one_option_in_every_command():
    """`-m` was --method for `lurker explain` and --model for serve and featviz: a flag
    read one way in one command and another way in the next."""
    flags = _short_flags()
    # -l is --layer where one layer is taken, --layers where several are: one meaning
    assert flags["-l"] == {"--layer", "--layers"}
    mixed = {short: longs for short, longs in flags.items() if len(longs) > 1 and short != "-l"}
    assert not mixed, f"short flags with several meanings: {mixed}"
    for name, command in main.commands.items():
        for param in command.params:
            if isinstance(param, click.Option) and "--model" in param.opts:
                assert "-m" in param.opts, f"lurker {name} --model has no -m"


def _no_model(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, object]]:
    """load_model recorded and stopped: what the command would build, and on which device."""
    import lurker.models

    built: list[tuple[str, object]] = []

    def record(spec, weights=None, *, device="cpu"):
        built.append((spec, device))
        raise LurkerError("stopped before building the model")

    monkeypatch.setattr(lurker.models, "load_model", record)
    return built


def test_explain_dash_m_method_says_what_changed_before_loading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """`lurker explain MODEL -m gradcam`, as typed when -m chose the method, is one line
    naming the change and what to type, not "no such model gradcam"; nothing is built."""
    built = _no_model(monkeypatch)
    args = ["explain", "lurker.examples:DigitsNet", "--image", str(tmp_path / "x.png")]
    r = CliRunner().invoke(main, [*args, "-m", "gradcam", "--target", "3"])
    assert r.exit_code == 2, r.output
    assert "-m is --model" in r.output and "--method gradcam" in r.output
    assert "Traceback" not in r.output and not built
    # a spec as MODEL and another with -m: one model, said so (with the method hint)
    r = CliRunner().invoke(main, [*args, "-m", "gradcm"])
    assert r.exit_code == 2 and "is not a run" in r.output and "--method" in r.output
    assert not built
    # --method is the method, and -m a model for `lurker explain RUN`
    CliRunner().invoke(main, [*args, "--method", "gradcam"])
    assert [spec for spec, _ in built] == ["lurker.examples:DigitsNet"]


def test_explain_dash_m_gives_a_runs_model(tmp_path: Path):
    """A run probed from Python records no model: `lurker explain RUN` asks for one, and
    `-m SPEC` (`--model`, as for featviz) gives it; the heatmap is the model's own,
    compared with lurker.explain on the same input."""
    from torch.utils.data import Subset

    import lurker
    from lurker.examples import DigitsNet
    from lurker.explain.cli import load_image
    from lurker.probe.data import load_dataset

    data = Subset(load_dataset("digits", 16, channels=1), range(8))
    torch.manual_seed(0)  # random init, seed 0: what load_model builds (the run's model)
    net = DigitsNet().eval()
    lurker.probe(net, data, out=tmp_path / "run", k=2, progress=False, device="cpu")
    img = tmp_path / "7.png"
    Image.fromarray((torch.rand(16, 16) * 255).byte().numpy(), "L").save(img)
    heat = tmp_path / "h.png"
    args = ["explain", str(tmp_path / "run"), "--image", str(img), "--device", "cpu"]
    args += ["--method", "saliency", "-t", "2", "-o", str(heat)]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2 and "--model SPEC" in r.output, r.output
    r = CliRunner().invoke(main, [*args, "-m", "lurker.examples:DigitsNet"])
    assert r.exit_code == 0, r.output
    from lurker.models import load_model

    model = load_model("lurker.examples:DigitsNet")
    x, shown = load_image(img, 16, 1)
    want = lurker.explain(model, x, 2, "saliency").overlay(0, image=shown)
    assert Image.open(heat).tobytes() == want.tobytes()


def test_featviz_refuses_model_with_a_model_spec(monkeypatch: pytest.MonkeyPatch):
    """`lurker featviz SPEC -m OTHER` used SPEC and dropped OTHER without a word."""
    built = _no_model(monkeypatch)
    r = CliRunner().invoke(
        main,
        ["featviz", "lurker.examples:DigitsNet", "-l", "features.8", "-m", "torchvision:vgg11"],
    )
    assert r.exit_code == 2 and "--model" in r.output and "already the model spec" in r.output
    assert not built


@pytest.mark.parametrize("gpu", [True, False])
@pytest.mark.parametrize("name", sorted(RUNS_A_MODEL))
def test_device_default_is_cuda_when_available_in_every_command(
    name: str, gpu: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """trace and explain defaulted to cpu while probe, images, map, serve and featviz took
    the GPU when there was one: one rule now, resolved before the command runs."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    monkeypatch.chdir(tmp_path)
    Path("RUN").mkdir()
    command = main.commands[name]
    ctx = command.make_context(name, list(RUNS_A_MODEL[name]))
    if name == "serve":  # resolved when the first page needs the model: see below
        assert ctx.params["device"] is None
        from lurker.server import session

        seen = []
        monkeypatch.setattr(
            "lurker.models.load_model", lambda spec, weights, device: seen.append(device)
        )
        with contextlib.suppress(AttributeError):  # None.eval(): it was only asked where
            session._load("resnet18", None, None)
        assert seen == ["cuda" if gpu else "cpu"]
    else:
        assert ctx.params["device"] == ("cuda" if gpu else "cpu")
    # the explicit choice wins
    ctx = command.make_context(name, [*RUNS_A_MODEL[name], "--device", "cpu"])
    assert ctx.params["device"] == "cpu"


@pytest.mark.parametrize("name", ["trace", "explain", "featviz", "probe"])
def test_the_resolved_device_is_where_the_model_is_built(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Not only parsed: the commands build their model on it (trace and explain built it
    on the CPU whatever the machine had)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.chdir(tmp_path)
    built = _no_model(monkeypatch)
    r = CliRunner().invoke(main, [name, *RUNS_A_MODEL[name]])
    assert "stopped before building the model" in r.output, r.output
    assert [device for _, device in built] == ["cuda"]


def test_serve_starts_without_torch(tmp_path: Path):
    """`lurker serve` reads a run without torch until a page needs the model: resolving the
    default device when the command is parsed would import it (seconds, in every start)."""
    (tmp_path / "RUN").mkdir()
    code = (
        "import sys\n"
        "from lurker.cli import main\n"
        f"ctx = main.commands['serve'].make_context('serve', [{str(tmp_path / 'RUN')!r}])\n"
        "assert ctx.params['device'] is None\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_device_is_checked_before_the_model_is_built(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    built = _no_model(monkeypatch)
    for name in ("trace", "explain"):
        args = [name, *RUNS_A_MODEL[name]]
        r = CliRunner().invoke(main, [*args, "--device", "cuda"])
        assert r.exit_code == 2 and "no CUDA GPU is available here" in r.output, r.output
        assert "--device cpu" in r.output
        r = CliRunner().invoke(main, [*args, "--device", "gpu"])
        assert r.exit_code == 2 and "'gpu' is not a device" in r.output, r.output
    assert not built


def test_featviz_image_size_as_probe_and_explain_size_still_works(tmp_path: Path):
    """featviz called the image side --size where probe and explain say --image-size; the
    old name still works (scripts), is not shown, and both at once are refused."""
    help_text = CliRunner().invoke(main, ["featviz", "--help"]).output
    assert "--image-size" in help_text and "--size" not in help_text
    base = ["featviz", "lurker.examples:DigitsNet", "-l", "features.8", "-u", "0", "-n", "1"]
    for flag, side in (("--image-size", 12), ("--size", 10)):
        out = tmp_path / flag.strip("-")
        r = CliRunner().invoke(main, [*base, flag, str(side), "-o", str(out), "--device", "cpu"])
        assert r.exit_code == 0, r.output
        (png,) = out.glob("*.png")
        assert Image.open(png).size == (side, side)
    r = CliRunner().invoke(main, [*base, "--size", "10", "--image-size", "12"])
    assert r.exit_code == 2 and "old name of --image-size" in r.output


def _commands(group: click.Group, path: str = "lurker"):
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from _commands(command, f"{path} {name}")
        else:
            yield f"{path} {name}", command


def test_every_option_of_every_command_has_help_text():
    """`--help` tells what each option does (hidden aliases of renamed options excepted)."""
    bare = [
        f"{path} {'/'.join(param.opts)}"
        for path, command in _commands(main)
        for param in command.params
        if isinstance(param, click.Option) and not param.hidden and not (param.help or "").strip()
    ]
    assert len(list(_commands(main))) >= len(RUNS_A_MODEL)
    assert bare == []


def test_images_batch_size_range_is_checked_by_click(tmp_path: Path):
    """`lurker images -b 0` is refused as every command's -b is, before the run is read."""
    r = CliRunner().invoke(main, ["images", str(tmp_path), "-b", "0"])
    assert r.exit_code == 2
    assert "Invalid value for '--batch-size' / '-b': 0 is not in the range x>=1" in r.output
