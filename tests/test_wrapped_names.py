"""A model under a wrapper (``nn.DataParallel``'s ``module.``, a Lightning-style
``model.net.``): a layer asked for by its bare name (``conv1``) is offered the wrapped
path first, not op labels that merely look alike (``conv2d_1``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import lurker
from lurker.errors import LurkerError, OpKeyError, close_names


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3)
        self.conv2 = nn.Conv2d(4, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv2(self.conv1(x).relu()).mean((2, 3)))


class _Inner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = _Net()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class _Lit(nn.Module):  # a LightningModule holding its network as self.model.net
    def __init__(self) -> None:
        super().__init__()
        self.model = _Inner()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def _first_hint(message: str) -> str:
    assert "Did you mean " in message, message
    return message.split("Did you mean ")[1].split(", ")[0].rstrip("?")


@pytest.mark.parametrize(
    ("wrap", "path"),
    [(lambda: nn.DataParallel(_Net()), "module.conv1"), (_Lit, "model.net.conv1")],
)
def test_trace_offers_the_wrapped_module_path_first(wrap, path: str) -> None:
    model = wrap()
    tr = lurker.trace(model, torch.randn(2, 3, 8, 8))
    with pytest.raises(KeyError) as err:
        tr["conv1"]
    assert _first_hint(str(err.value).strip('"')) == repr(path)
    with pytest.raises(OpKeyError) as err:
        tr.hooks({"conv1": lambda op, out: None})
    assert _first_hint(str(err.value)) == repr(path)
    assert tr[path].module == path  # the hint names what trace[...] takes
    with pytest.raises(LurkerError, match=rf"Close names: {path}"):
        lurker.featviz(model, "conv1", 0, steps=1, size=8)


def test_probe_run_of_a_data_parallel_model_offers_its_layer(tmp_path: Path) -> None:
    data = [(torch.randn(3, 8, 8), 0) for _ in range(4)]
    run = lurker.probe(nn.DataParallel(_Net()), data, out=tmp_path / "run", k=2, progress=False)
    assert run is not None
    with pytest.raises(KeyError) as err:
        run.layer("conv1")
    assert _first_hint(str(err.value).strip('"')) == "'module.conv1'"
    assert run.layer("module.conv1").name == "module.conv1"


def test_several_wrapped_paths_are_offered_shallowest_first() -> None:
    names = ["conv2d_1", "module.layer1.0.conv1", "module.conv1", "module.layer1.1.conv1"]
    assert close_names("conv1", names)[:3] == [
        "module.conv1",
        "module.layer1.0.conv1",
        "module.layer1.1.conv1",
    ]
    assert "conv2d_1" in close_names("conv1", names)  # the fuzzy ones still follow
    assert close_names("conv2d_l", ["conv2d_1", "conv2d_1"]) == ["conv2d_1"]
