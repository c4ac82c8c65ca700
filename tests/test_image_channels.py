"""The channels an image needs, as the CLI reads them from the model: the first
convolution that reads the image, not the first registered parameter."""

from __future__ import annotations

import torch
from click.testing import CliRunner
from PIL import Image
from torch import nn

from lurker.cli import main
from lurker.models import image_channels

SPEC = '''
import torch
from torch import nn


class HeadFirst(nn.Module):
    """A 3-channel CNN whose 1x1 head (16 -> 5) is registered before its stem."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.head = nn.Conv2d(16, 5, 1)
        self.grouped = nn.Conv2d(8, 16, 3, padding=1, groups=2)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        x = self.head(self.grouped(torch.relu(self.bn(self.stem(x)))))
        return x.mean((2, 3))


def build():
    return HeadFirst()
'''


def _model(tmp_path):
    path = tmp_path / "headfirst.py"
    path.write_text(SPEC)
    ns: dict = {}
    exec(compile(SPEC, str(path), "exec"), ns)
    return path, ns["HeadFirst"]()


def test_the_first_convolution_that_reads_the_image(tmp_path):
    _, net = _model(tmp_path)
    assert next(net.parameters()).shape[1] == 16  # what the old guess read
    assert image_channels(net, 16) == 3
    from lurker.examples import DigitsNet

    assert image_channels(DigitsNet(), 16) == 1
    assert image_channels(nn.Sequential(nn.Flatten(), nn.Linear(12, 2)), 2) is None


def test_nothing_is_updated_by_the_search(tmp_path):
    _, net = _model(tmp_path)
    net.train()  # batch norm would update its running statistics on a forward
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert image_channels(net, 16) == 3
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not net.stem._forward_pre_hooks  # the hooks are gone


def test_cli_probe_and_explain_of_a_model_whose_head_is_registered_first(tmp_path):
    path, _ = _model(tmp_path)
    g = torch.Generator().manual_seed(0)
    for name in ("a", "b"):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(3):
            px = (torch.rand(20, 20, 3, generator=g) * 255).byte().numpy()
            Image.fromarray(px, "RGB").save(tmp_path / "data" / name / f"{i}.png")
    r = CliRunner().invoke(
        main,
        ["probe", f"{path}:build", "-d", str(tmp_path / "data"), "--image-size", "16",
         "-o", str(tmp_path / "run"), "-l", "stem"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "run: " in r.output
    r = CliRunner().invoke(
        main,
        ["explain", f"{path}:build", "--image", str(tmp_path / "data" / "a" / "0.png"),
         "--image-size", "16", "-o", str(tmp_path / "heat.png")],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert (tmp_path / "heat.png").is_file()


class _Viewed(nn.Module):
    """A grayscale net that reshapes its input first: 3 channels become 3 batch rows."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)

    def forward(self, x):
        return self.conv(x.view(-1, 1, 16, 16)).mean((1, 2, 3))


class _Resized(nn.Module):
    """A grayscale net that resizes its input before its first convolution."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)

    def forward(self, x):
        x = torch.nn.functional.interpolate(x, size=(8, 8))
        return self.conv(x).mean((1, 2, 3))


def test_a_view_or_a_resize_before_the_first_convolution():
    assert image_channels(_Viewed(), 16) == 1  # 3 channels reach it folded: 1 is tried next
    assert image_channels(_Resized(), 16) == 1
    # a 1-d convolution over rows says nothing about an image's channels
    conv1d = nn.Sequential(nn.Flatten(2), nn.Conv1d(12, 4, 3))
    assert image_channels(conv1d, 16) is None
