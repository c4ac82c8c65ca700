"""The probe's advice is advice that can work, said once, in the interface's own words.

- A layer whose batch is folded with other slots (attention heads, windows, patches)
  cannot be fixed by naming its unit axis: the message names a layer where the batch has
  its own axis again, and never suggests ``unit_dim`` / ``--unit-dim``.
- A layer whose unit axis lurker cannot tell gets the ``unit_dim`` advice once: in Python
  words from Python, in command-line words from the CLI.
- A model that cannot take what the probe feeds it (one image batch, ``(N, C, H, W)``)
  hears that, what it wanted, and what to do; not ``lurker trace``'s ``--input-shape``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from torch import Tensor, nn

import lurker
from lurker.cli import main
from lurker.errors import LurkerError, TraceError
from lurker.probe import probe
from lurker.probe.layout import Skip, infer_layouts
from lurker.probe.sweep import select_layers

MODELS = '''
import torch
from torch import nn


class Folded(nn.Module):
    """Folds 2 slots per sample into the batch around `act` (as heads or windows do);
    `act2` reads an einsum's (N, H, W, C) output, whose unit axis lurker cannot tell."""

    def __init__(self, channels=1):
        super().__init__()
        self.conv = nn.Conv2d(channels, 8, 3, padding=1)
        self.act = nn.ReLU()
        self.proj = nn.Conv2d(8, 6, 1)
        self.act2 = nn.ReLU()
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = self.conv(x)
        n, c, hh, ww = h.shape
        h = self.act(h.reshape(n * 2, c // 2, hh, ww)).reshape(n, c, hh, ww)
        h = self.act2(torch.einsum("bchw->bhwc", self.proj(h)))
        return self.head(h.mean((1, 2)))


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4 + 2, 3)

    def forward(self, img, vec):
        return self.fc(torch.cat([self.conv(img).mean((2, 3)), vec], 1))


class Clip(nn.Module):
    """A video model: (N, C, D, H, W) clips."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3, 4)))
'''


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    path = tmp_path_factory.mktemp("models") / "nets.py"
    path.write_text(MODELS)
    space: dict = {}
    exec(compile(MODELS, str(path), "exec"), space)
    return path, space


def _images(root: Path, n: int = 4, size: int = 12) -> Path:
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n // 2):
            px = (rng.random((size, size, 3)) * 255).astype("uint8")
            Image.fromarray(px).save(root / c / f"{i}.png")
    return root


def _cli(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(main, ["probe", *args], catch_exceptions=False)
    return res.exit_code, res.output


# --------------------------------------------------------------------------- folded batch
def test_a_folded_batch_names_where_it_is_unfolded_not_unit_dim(models) -> None:
    _, space = models
    model = space["Folded"]().eval()
    tr = lurker.trace(model, torch.randn(1, 1, 8, 8))
    lay = infer_layouts(tr)[tr["act"].index]
    assert isinstance(lay, Skip) and lay.kind == "folded" and not lay.unit_dim_helps
    for unit_dim in (None, {"act": 1}):  # naming an axis cannot unfold the batch
        with pytest.raises(LurkerError, match="folded") as err:
            select_layers(tr, ["act"], unit_dim=unit_dim)
        for text in (str(err.value), err.value.for_cli()):
            assert "unit_dim" not in text and "--unit-dim" not in text, text
            assert "block's output" not in text  # it may be the block: its output is folded
            assert "'proj'" in text, text  # the first layer after it with its own batch axis
    assert select_layers(tr, ["proj"])[0].layout.batch == 0


def test_cli_summary_offers_unit_dim_only_where_it_can_help(models, tmp_path: Path) -> None:
    path, _ = models
    base = [f"{path}:Folded", "--data", "digits", "--image-size", "8", "--k", "2"]
    code, out = _cli(*base, "--device", "cpu", "--out", str(tmp_path / "run"))
    assert code == 0, out
    lines = [line for line in out.splitlines() if "--unit-dim" in line]
    assert lines, out
    for line in lines:  # act2's axis can be named; act's folded batch cannot be fixed so
        assert "act2" in line and "act," not in line and not line.endswith(" act"), line
        assert "folded" not in line
    assert "skipped 1 layers that cannot be probed as they are" in out
    # the opening line covers both kinds of skip, not "whose units it cannot locate"
    assert "skipping 2 layer(s) that cannot be probed as they are:" in out, out
    assert "'proj'" in out  # the printed reason says where to probe instead
    run = lurker.Run.open(tmp_path / "run")
    reasons = {s["layer"]: s["reason"] for s in run.meta["skipped_layers"]}
    assert set(reasons) == {"act", "act2"} and "unit_dim" not in reasons["act"]


# --------------------------------------------------------------------------- unit axis
def test_unknown_unit_axis_advice_is_said_once_in_the_interfaces_words(models) -> None:
    _, space = models
    tr = lurker.trace(space["Folded"]().eval(), torch.randn(1, 1, 8, 8))
    with pytest.raises(LurkerError, match="cannot tell which axis") as err:
        select_layers(tr, ["act2"])
    py, cli = str(err.value), err.value.for_cli()
    assert py.count("unit_dim") == 1 and "unit_dim={'act2': AXIS}" in py and "--" not in py, py
    assert cli.count("unit-dim") == 1 and "--unit-dim act2=AXIS" in cli, cli
    assert "unit_dim" not in cli, cli


def test_cli_unit_dim_advice_for_a_named_layer_is_said_once(models, tmp_path: Path) -> None:
    path, _ = models
    base = [f"{path}:Folded", "--data", "digits", "--image-size", "8", "--device", "cpu"]
    code, out = _cli(*base, "--out", str(tmp_path / "run"), "--layers", "act2")
    assert code == 2
    assert out.count("unit-dim") == 1 and "--unit-dim act2=AXIS" in out, out
    assert "unit_dim" not in out, out


def test_no_layer_to_probe_says_what_to_do_in_the_interfaces_words(models) -> None:
    class OnlyFolded(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            n = x.shape[0]
            return torch.relu(x.reshape(n * 2, -1, *x.shape[2:])).reshape(x.shape).mean((2, 3))

    tr = lurker.trace(OnlyFolded(), torch.randn(1, 2, 4, 4))
    with pytest.raises(LurkerError, match="No layer") as err:
        select_layers(tr, None, skipped=[])
    assert "unit_dim" not in str(err.value) and "--layers" in err.value.for_cli()
    assert "layers=" in str(err.value)


# --------------------------------------------------------------------------- inputs
def _probe_folder(spec: str, tmp_path: Path, size: int = 12) -> tuple[int, str]:
    """`lurker probe SPEC` over a small image folder: (exit code, output)."""
    data = _images(tmp_path / "imgs", size=size)
    return _cli(
        spec, "--data", str(data), "--image-size", str(size), "--device", "cpu",
        "--out", str(tmp_path / "run"),
    )  # fmt: skip


def test_cli_video_model_fed_images_hears_what_probe_feeds_and_what_to_do(
    models, tmp_path: Path
) -> None:
    path, _ = models
    code, out = _probe_folder(f"{path}:Clip", tmp_path)
    assert code == 2
    assert "--input-shape" not in out and "--input-dtype" not in out and "-i " not in out, out
    assert "(N, C, H, W)" in out and "5-D" in out and "(N, C, D, H, W)" in out, out
    assert "wrap" in out and "MODEL" in out, out


def test_torchvision_video_model_fed_images(tmp_path: Path) -> None:
    """The user's report: `lurker probe torchvision:r3d_18 --data IMGFOLDER`."""
    code, out = _probe_folder("torchvision:r3d_18", tmp_path, size=16)
    assert code == 2
    assert "--input-shape" not in out and "--input-dtype" not in out, out
    assert "5-D input (N, C, D, H, W)" in out and "one batch of images" in out, out


def test_python_video_model_fed_images_hears_about_datasets(models) -> None:
    _, space = models
    ds = torch.utils.data.TensorDataset(torch.randn(4, 3, 8, 8), torch.arange(4) % 2)
    with pytest.raises(TraceError) as err:
        probe(space["Clip"]().eval(), ds, out="unused-dir", progress=False, device="cpu")
    text = str(err.value)
    assert "--input-shape" not in text and "CLI:" not in text, text
    assert "5-D" in text and "(C, D, H, W)" in text and "dataset" in text, text
    assert err.value.partial is not None  # still the trace's error, with its partial trace
    assert not Path("unused-dir").exists()


def test_python_dataset_of_clips_is_probed(models, tmp_path: Path) -> None:
    """What the message advises from Python works: items shaped as the model's input."""
    _, space = models
    torch.manual_seed(0)
    ds = torch.utils.data.TensorDataset(torch.randn(6, 3, 2, 6, 6), torch.arange(6) % 2)
    run = probe(
        space["Clip"]().eval(), ds, out=tmp_path / "run", layers=["conv"], k=2, batch_size=3,
        device="cpu", progress=False,
    )  # fmt: skip
    assert run.layer("conv").num_units == 4


def test_two_input_model_names_the_missing_input(models, tmp_path: Path) -> None:
    path, space = models
    code, out = _probe_folder(f"{path}:TwoInputs", tmp_path)
    assert code == 2
    assert "missing 1 required positional argument" not in out, out
    assert "(img, vec)" in out and "(N, C, H, W)" in out and "wrap" in out.lower(), out
    assert "--input-shape" not in out, out
    ds = torch.utils.data.TensorDataset(torch.randn(4, 3, 8, 8), torch.arange(4) % 2)
    with pytest.raises(LurkerError, match="vec") as err:
        probe(space["TwoInputs"]().eval(), ds, out=tmp_path / "py", progress=False)
    assert "--" not in str(err.value) and "Wrap the model" in str(err.value)
    assert not (tmp_path / "py").exists()  # refused before anything is created


class _Squeezed(nn.Module):
    """``pool(x).squeeze()``: at the traced batch of one it drops the batch axis too, so the
    linear layers after it have 1-D outputs there; ``act`` is called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = self.act(self.conv2(self.act(self.conv(x))))
        return self.fc(x.mean((2, 3), keepdim=True).squeeze())


def test_a_reused_module_by_path_and_a_squeezed_batch_are_named_not_lost(tmp_path: Path):
    """A module path names a module's every call (``act`` twice: two layers, each equal
    to a forward hook on that call, the oracle), as a hook key does; layers the model
    leaves with no batch axis at the traced batch of one (``x.squeeze()``) are listed as
    skipped with that reason, and naming one says why instead of "no layer matches"."""
    torch.manual_seed(0)
    model = _Squeezed().eval()
    ds = torch.utils.data.TensorDataset(torch.randn(9, 3, 8, 8), torch.arange(9) % 3)
    run = probe(model, ds, out=tmp_path / "r", layers=["act"], k=3, progress=False)
    names = [info.name for info in run.layers]
    assert names == ["act:1", "act:2"]
    calls: list[Tensor] = []
    hook = model.act.register_forward_hook(lambda m, i, o: calls.append(o.detach().clone()))
    with torch.no_grad():
        model(ds.tensors[0])
    hook.remove()
    for name, act in zip(names, calls):
        maxs = act.flatten(2).amax(2).numpy()
        for u in range(4):
            order = np.lexsort((np.arange(9), -maxs[:, u]))[:3].tolist()
            assert [e.sample_id for e in run.unit(name, u).top("max")] == order, (name, u)
    run = probe(model, ds, out=tmp_path / "d", k=3, progress=False)
    assert "fc" not in [info.name for info in run.layers]
    assert [s["layer"] for s in run.meta["skipped_layers"]] == ["fc"]
    assert (
        "no batch axis when the model runs on one sample" in run.meta["skipped_layers"][0]["reason"]
    )
    with pytest.raises(
        LurkerError, match=r"'fc' .*cannot be probed: it has no batch axis.*squeeze"
    ):
        probe(model, ds, out=tmp_path / "n", layers=["fc"], progress=False)


class _FixedGrid(nn.Module):
    """Like timm's EfficientFormer or a ViT with a fixed position table: an attention bias
    of its own 8x8 grid, so other image sizes fail deep inside, where nothing names size."""

    pretrained_cfg = {"input_size": (3, 8, 8)}  # as timm sets it

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bias = nn.Parameter(torch.zeros(4, 64, 64))

    def forward(self, x: Tensor) -> Tensor:
        t = self.conv(x).flatten(2)  # (N, 4, H*W)
        return ((t.transpose(1, 2) @ t)[:, None] + self.bias[None]).mean((1, 2, 3))


def test_model_of_a_fixed_input_size_is_told_its_size(tmp_path: Path) -> None:
    """Fed another size, the model fails on a shape mismatch; the error says the size its
    config gives, and how to feed it (in Python's and the CLI's words)."""
    data = torch.utils.data.TensorDataset(torch.randn(4, 3, 16, 16), torch.zeros(4).long())
    with pytest.raises(TraceError) as err:
        probe(_FixedGrid(), data, out=tmp_path / "r", k=1, progress=False)
    py, cli = str(err.value), err.value.for_cli()
    assert "input size as 8x8, and the images here are 16x16" in py
    assert "load_dataset(DATA, 8)" in py and "--image-size 8" in cli
    assert "--image-size" not in py and "load_dataset" not in cli
    right = torch.utils.data.TensorDataset(torch.randn(4, 3, 8, 8), torch.zeros(4).long())
    run = probe(_FixedGrid(), right, out=tmp_path / "ok", k=1, progress=False)
    assert [layer.name for layer in run.layers] == ["conv"]


def test_fixed_size_model_on_a_dataset_made_by_code_is_told_to_resize_there(
    tmp_path: Path,
) -> None:
    """`lurker probe MODEL -d file.py:fn` at the wrong size said "probe with --image-size
    8", an option the same command then refuses for a dataset made by code: the hint now
    says to make the dataset function return that size."""
    code = tmp_path / "defs.py"
    code.write_text(
        "import torch\nfrom torch import nn\n\n"
        "class FixedGrid(nn.Module):\n"
        "    pretrained_cfg = {'input_size': (3, 8, 8)}\n\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.conv = nn.Conv2d(3, 4, 1)\n"
        "        self.bias = nn.Parameter(torch.zeros(4, 64, 64))\n\n"
        "    def forward(self, x):\n"
        "        t = self.conv(x).flatten(2)\n"
        "        return ((t.transpose(1, 2) @ t)[:, None] + self.bias[None]).mean((1, 2, 3))\n\n"
        "def data(size=16):\n"
        "    return torch.utils.data.TensorDataset(torch.rand(4, 3, size, size), torch.zeros(4).long())\n"
    )
    args = ["probe", f"{code}:FixedGrid", "-d", f"{code}:data", "-k", "1", "--device", "cpu"]
    r = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "r")])
    assert r.exit_code == 2, r.output
    assert "input size as 8x8, and the images here are 16x16" in r.output
    assert "make the dataset function return 8x8 images" in r.output
    assert "probe with --image-size" not in r.output
    # and the option the old hint named is indeed refused for such a dataset
    r = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "s"), "--image-size", "8"])
    assert r.exit_code == 2 and "dataset made by code" in r.output
