"""Models in production formats: lurker sees inside what it can and says plainly what it
cannot, naming what to pass instead (the eager model), never a KeyError from deep inside
torch or a silently empty trace or run.

- TorchScript (``torch.jit.script`` / ``torch.jit.trace``, or inside the model) and a
  ``torch.compile``'d model run code a TorchFunctionMode does not see: trace and probe
  refuse them, naming the eager model (``model._orig_mod`` for a compiled one).
- An exported program's module (``torch.export.export(...).module()``) calls aten ops on
  its weights: the trace records its ops with a warning that none is in a module, and the
  probe, which has no layers to find, refuses it.
- A dynamically quantized model (``quantize_dynamic``) is probed: its packed Linear
  weights (TorchScript objects in its state dict) do not break the probe, and the top
  samples of its layers are those that brute force over forward hooks finds.
"""

from __future__ import annotations

import gc
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import lurker
from lurker.errors import LurkerError


@pytest.fixture(autouse=True, scope="module")
def _collect_torch_cycles():
    """torch.export and torch.compile leave reference cycles behind: collect them, so
    later tests that count the garbage a trace leaves see none of theirs."""
    yield
    gc.collect()


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu2(self.conv2(self.relu1(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


class Wrapper(nn.Module):
    """An eager head on a scripted backbone."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = _quiet(torch.jit.script, CNN().eval())
        self.head = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def _data(n: int = 16) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 3, 6, 6, generator=g), torch.zeros(n, dtype=torch.long))


def _quiet(fn, *args, **kwargs):  # torch's deprecation warnings for jit and quantization
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _torchscript(kind: str) -> nn.Module:
    model = CNN().eval()
    if kind == "script":
        return _quiet(torch.jit.script, model)
    if kind == "trace":
        return _quiet(torch.jit.trace, model, torch.randn(2, 3, 6, 6))
    return Wrapper().eval()


@pytest.mark.parametrize("kind", ["script", "trace", "submodule"])
def test_trace_refuses_torchscript_naming_the_eager_model(kind: str) -> None:
    model = _torchscript(kind)
    with pytest.raises(LurkerError, match="TorchScript") as err:
        lurker.trace(model, torch.randn(2, 3, 6, 6))
    assert "pass the eager nn.Module" in str(err.value)
    if kind == "submodule":
        assert "'backbone'" in str(err.value)


@pytest.mark.parametrize("kind", ["script", "trace"])
def test_probe_refuses_torchscript_and_writes_no_run(kind: str, tmp_path: Path) -> None:
    out = tmp_path / "run"
    with pytest.raises(LurkerError, match=r"TorchScript.*pass the eager nn\.Module"):
        lurker.probe(_torchscript(kind), _data(), out=out, k=3, progress=False, device="cpu")
    assert not (out / "run.db").exists()


def test_compiled_model_names_orig_mod() -> None:
    compiled = torch.compile(CNN().eval())  # compiles lazily, at the first call: never here
    with pytest.raises(LurkerError, match=r"torch\.compile'd.*model\._orig_mod"):
        lurker.trace(compiled, torch.randn(2, 3, 6, 6))


def test_compiled_model_probe_names_orig_mod(tmp_path: Path) -> None:
    compiled = torch.compile(CNN().eval())
    with pytest.raises(LurkerError, match=r"model\._orig_mod"):
        lurker.probe(compiled, _data(), out=tmp_path / "run", k=3, progress=False, device="cpu")


def test_exported_module_traces_its_ops_and_says_it_has_no_modules(tmp_path: Path) -> None:
    model = CNN().eval()
    x = torch.randn(2, 3, 6, 6)
    exported = torch.export.export(model, (x,)).module()
    with pytest.warns(UserWarning, match=r"torch\.export.*none in a module"):
        tr = lurker.trace(exported, x)
    assert len(tr.ops) > 3 and all(op.module is None for op in tr.ops)
    torch.testing.assert_close(tr.output, model(x))
    with pytest.raises(LurkerError, match=r"exported program.*pass the eager model"):
        lurker.probe(exported, _data(), out=tmp_path / "run", k=3, progress=False, device="cpu")


def test_symbolic_traced_model_is_probed_as_its_eager_self(tmp_path: Path) -> None:
    gm = torch.fx.symbolic_trace(CNN().eval())  # calls its modules: nothing to refuse
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tr = lurker.trace(gm, torch.randn(2, 3, 6, 6))
    assert tr["conv1"].module == "conv1"


def test_dynamically_quantized_model_is_probed_right(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _quiet(torch.ao.quantization.quantize_dynamic, CNN().eval(), {nn.Linear})
    data = _data(24)
    run = _quiet(
        lurker.probe,
        model,
        data,
        out=tmp_path / "run",
        k=3,
        batch_size=8,
        progress=False,
        device="cpu",
    )
    assert [layer.name for layer in run.layers][:2] == ["conv1", "relu1"]
    acts: dict[str, torch.Tensor] = {}
    hooks = [
        m.register_forward_hook(lambda m, i, o, n=n: acts.__setitem__(n, o.detach()))
        for n, m in model.named_modules()
        if n
    ]
    with torch.no_grad():
        model(data.tensors[0])
    for h in hooks:
        h.remove()
    for layer in run.layers:
        peaks = acts[layer.module].flatten(2).amax(2)  # the unit's peak over positions
        for u in range(layer.num_units):
            got = [e.sample_id for e in run.unit(layer.name, u).top("max")]
            assert got == peaks[:, u].topk(3).indices.tolist(), (layer.name, u)
