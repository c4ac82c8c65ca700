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

import copy
import gc
import re
import warnings
import weakref
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
    with pytest.raises(LurkerError, match=r"torch\.export.*pass the eager model"):
        lurker.probe(exported, _data(), out=tmp_path / "run", k=3, progress=False, device="cpu")


def test_symbolic_traced_model_is_probed_as_its_eager_self(tmp_path: Path) -> None:
    gm = torch.fx.symbolic_trace(CNN().eval())  # calls its modules: nothing to refuse
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tr = lurker.trace(gm, torch.randn(2, 3, 6, 6))
    assert tr["conv1"].module == "conv1"


def _hooked_acts(model: nn.Module, x: torch.Tensor, batch_size: int) -> dict[str, torch.Tensor]:
    """Every module's output over ``x`` by forward hooks, fed in the probe's batches: a
    dynamically quantized layer scales its input by the batch's range, so a sample's
    activations depend on the samples batched with it."""
    acts: dict[str, list[torch.Tensor]] = {}
    hooks = [
        m.register_forward_hook(lambda m, i, o, n=n: acts.setdefault(n, []).append(o.detach()))
        for n, m in model.named_modules()
        if n and not isinstance(m, nn.MultiheadAttention)  # (its output is a tuple)
    ]
    with torch.no_grad():
        for batch in x.split(batch_size):
            model(batch)
    for h in hooks:
        h.remove()
    return {n: torch.cat(v) for n, v in acts.items()}


def _check_top_samples(run: lurker.Run, acts: dict[str, torch.Tensor], k: int) -> None:
    for layer in run.layers:
        a = acts[layer.module]
        peaks = a.flatten(2).amax(2) if a.dim() > 2 else a  # the unit's peak over positions
        for u in range(layer.num_units):
            top = run.unit(layer.name, u).top("max")
            want = peaks[:, u].topk(k)
            assert [e.sample_id for e in top] == want.indices.tolist(), (layer.name, u)
            torch.testing.assert_close(torch.tensor([e.value for e in top]), want.values)


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
    assert [layer.name for layer in run.layers] == ["conv1", "relu1", "conv2", "relu2", "fc"]
    _check_top_samples(run, _hooked_acts(model, data.tensors[0], 8), 3)


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.relu(self.fc1(x)))


@pytest.mark.parametrize("dtype", [torch.qint8, torch.float16])
def test_quantized_linear_layers_are_probed_by_module_path(
    dtype: torch.dtype, tmp_path: Path
) -> None:
    """An all-Linear MLP, quantized: its Linear layers (``quantized_linear_dynamic``, units on the
    last axis as a float Linear's) are probed under their module paths, with the top
    samples that hooks on the quantized model give, and near the float model's."""
    torch.manual_seed(0)
    float_model = MLP().eval()
    model = _quiet(torch.ao.quantization.quantize_dynamic, float_model, {nn.Linear}, dtype=dtype)
    x = torch.randn(40, 8)
    data = TensorDataset(x, torch.zeros(40, dtype=torch.long))
    run = _quiet(
        lurker.probe,
        model,
        data,
        out=tmp_path / "run",
        k=5,
        batch_size=16,
        progress=False,
        device="cpu",
    )
    assert [layer.name for layer in run.layers] == ["fc1", "relu", "fc2"]
    assert [layer.num_units for layer in run.layers] == [16, 16, 4]
    _check_top_samples(run, _hooked_acts(model, x, 16), 5)
    floats = _hooked_acts(float_model, x, 16)
    for layer in run.layers:  # quantization moves values a little, never the unit axis
        best = [run.unit(layer.name, u).top("max")[0].value for u in range(layer.num_units)]
        torch.testing.assert_close(
            torch.tensor(best), floats[layer.module].amax(0), atol=0.05, rtol=0.05
        )


class LSTMHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(4, 5)
        self.fc = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.lstm(x)[0])


@pytest.mark.parametrize("dtype", [torch.qint8, torch.float16])
@pytest.mark.parametrize(
    ("make", "x"),
    [(MLP, (3, 8)), (CNN, (2, 3, 6, 6)), (LSTMHead, (7, 2, 4))],
    ids=["mlp", "cnn", "lstm"],
)
def test_quantized_model_counts_its_packed_weights(
    make: type[nn.Module], x: tuple[int, ...], dtype: torch.dtype
) -> None:
    """Packed weights (TorchScript objects, no nn.Parameter) are parameters too: a quantized
    model has as many as the float model it came from, in the trace and per module."""
    float_model = make().eval()
    model = _quiet(
        torch.ao.quantization.quantize_dynamic, float_model, {nn.Linear, nn.LSTM}, dtype=dtype
    )
    tr = _quiet(lurker.trace, model, torch.randn(x))
    assert tr.num_params == sum(p.numel() for p in float_model.parameters())
    for name, m in float_model.named_children():
        assert tr.modules[name].num_params == sum(p.numel() for p in m.parameters()), name


def test_quantized_run_home_counts_packed_weights(tmp_path: Path) -> None:
    """The explorer's Home reads the run's stored graph: 8x16 + 16 + 16x4 + 4 = 212."""
    model = _quiet(torch.ao.quantization.quantize_dynamic, MLP().eval(), {nn.Linear})
    data = TensorDataset(torch.randn(8, 8), torch.zeros(8, dtype=torch.long))
    run = _quiet(lurker.probe, model, data, out=tmp_path / "run", k=2, progress=False, device="cpu")
    assert run.graph.num_params == 212
    with lurker.Run.open(tmp_path / "run") as stored:
        assert stored.graph.num_params == 212


def test_exported_module_at_another_batch_size_names_dynamic_shapes() -> None:
    """An exported module's shape guards refuse a batch it was not exported for: the error
    names dynamic_shapes (and the eager model), not torch's ``Guard failed``; the fix it
    names then runs at that batch size."""
    model = CNN().eval()
    x, x5 = torch.randn(2, 3, 6, 6), torch.randn(5, 3, 6, 6)
    fixed = torch.export.export(model, (x,)).module()
    tr = _quiet(lurker.trace, fixed, x)
    fix = r"exported for fixed input shapes.*dynamic_shapes=.*Dim\.DYNAMIC.*eager model"
    with pytest.raises(LurkerError, match=fix):
        tr.run(x5)
    with pytest.raises(LurkerError, match=fix):
        _quiet(lurker.trace, fixed, x5)
    dims = ({0: torch.export.Dim.DYNAMIC},)
    dynamic = torch.export.export(model, (x,), dynamic_shapes=dims).module()
    out = _quiet(lurker.trace, dynamic, x).run(x5, save="none").output
    torch.testing.assert_close(out, model(x5))


def test_make_fx_graph_warning_does_not_call_it_an_exported_program() -> None:
    """make_fx makes the same aten graph as torch.export: the warning says what it is
    (an fx graph of aten ops, from either), not that it came from torch.export."""
    from torch.fx.experimental.proxy_tensor import make_fx

    model = CNN().eval()
    x = torch.randn(2, 3, 6, 6)
    gm = make_fx(model)(x)
    with pytest.warns(UserWarning, match=r"fx GraphModule of aten ops.*make_fx") as got:
        tr = lurker.trace(gm, x)
    assert not any("exported program" in str(w.message) for w in got)
    torch.testing.assert_close(tr.output, model(x))


def test_exported_module_under_inference_mode_warns_once_at_the_caller() -> None:
    model = CNN().eval()
    x = torch.randn(2, 3, 6, 6)
    exported = torch.export.export(model, (x,)).module()
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        with torch.inference_mode():
            tr = lurker.trace(exported, x)
    ours = [w for w in got if "lurker.trace" in str(w.message)]
    assert len(ours) == 1 and ours[0].filename == __file__
    torch.testing.assert_close(tr.output, model(x))


def test_aten_graph_check_walks_each_graph_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Telling an aten graph walks all its nodes: a GraphModule traced again and again
    (thousands of nodes) pays it once, and again only for a new or edited graph."""
    from torch.fx.experimental.proxy_tensor import make_fx

    model = CNN().eval()
    x = torch.randn(2, 3, 6, 6)
    gm = make_fx(model)(x)
    walks = []  # a mark per read of a graph's nodes (not the graph: it holds its module)
    nodes = torch.fx.Graph.nodes
    monkeypatch.setattr(
        torch.fx.Graph, "nodes", property(lambda g: walks.append(1) or nodes.fget(g))
    )

    def traced(gm: nn.Module) -> int:
        before = len(walks)
        with pytest.warns(UserWarning, match=r"aten ops.*none in a module"):
            tr = lurker.trace(gm, x)
        torch.testing.assert_close(tr.output, model(x))
        return len(walks) - before

    assert traced(gm) > 0
    assert traced(gm) == 0 and traced(gm) == 0
    new = torch.fx.Graph()  # the same graph, a new object: walked again
    new.output(new.graph_copy(gm.graph, {}))
    gm.graph = new
    assert traced(gm) > 0
    assert traced(gm) == 0
    ref = weakref.ref(gm)
    del gm, new
    gc.collect()
    assert ref() is None  # the cache holds no model alive


class _WithCompiled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 3, 1)
        self.b = torch.compile(CNN().eval())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.stem(x))


def test_compiled_submodule_is_refused_naming_orig_mod(tmp_path: Path) -> None:
    """TorchDynamo compiles lurker's recording along with the submodule and fails, blaming
    the input's shape: the model is refused, naming the eager module to put back."""
    model = _WithCompiled().eval()
    x = torch.randn(2, 3, 6, 6)
    fix = r"submodule 'b' is a torch\.compile'd.*model\.b = model\.b\._orig_mod"
    with pytest.raises(LurkerError, match=fix):
        lurker.trace(model, x)
    with pytest.raises(LurkerError, match=fix):
        lurker.probe(model, _data(), out=tmp_path / "run", k=3, progress=False, device="cpu")
    assert not (tmp_path / "run" / "run.db").exists()
    model.b = model.b._orig_mod  # the fix the error names
    tr = lurker.trace(model, x)
    torch.testing.assert_close(tr.output, model(x))
    assert "b.conv1" in tr.modules


@pytest.mark.parametrize("dtype", [torch.qint8, torch.float16])
@pytest.mark.parametrize(
    ("make", "x"),
    [(MLP, (3, 8)), (CNN, (2, 3, 6, 6)), (LSTMHead, (7, 2, 4))],
    ids=["mlp", "cnn", "lstm"],
)
def test_quantized_layers_count_the_float_models_flops(
    make: type[nn.Module], x: tuple[int, ...], dtype: torch.dtype
) -> None:
    """A quantized Linear or LSTM keeps its weight in a packed object, no tensor argument:
    its ops count the FLOPs of the float layer it replaced (op by op, and in all), not 0."""
    float_model = make().eval()
    model = _quiet(
        torch.ao.quantization.quantize_dynamic, float_model, {nn.Linear, nn.LSTM}, dtype=dtype
    )
    inp = torch.randn(x)
    want = lurker.trace(float_model, inp)
    got = _quiet(lurker.trace, model, inp)
    counted = [(op.modules[-1][0], op.flops) for op in got.ops if op.flops]
    assert counted == [(op.modules[-1][0], op.flops) for op in want.ops if op.flops]
    assert got.flops == want.flops > 0
    if make is MLP:  # 2 FLOPs per multiply-add: 3 rows of 8x16, then of 16x4
        assert got.flops == 2 * 3 * (8 * 16 + 16 * 4)


class _StaticCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.quant = torch.ao.quantization.QuantStub()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.dequant = torch.ao.quantization.DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequant(self.relu(self.conv(self.quant(x))))


def test_statically_quantized_conv_counts_its_flops() -> None:
    """A statically quantized conv's packed weight is read for its FLOPs (the trace
    failed with torch's NotImplementedError from indexing the packed object)."""
    float_model = _StaticCNN().eval()
    float_model.qconfig = torch.ao.quantization.get_default_qconfig("fbgemm")
    x = torch.randn(2, 3, 6, 6)
    prepared = _quiet(torch.ao.quantization.prepare, copy.deepcopy(float_model))
    prepared(x)
    model = _quiet(torch.ao.quantization.convert, prepared)
    tr = _quiet(lurker.trace, model, x)
    want = lurker.trace(float_model, x)["conv"].flops
    assert tr["conv"].flops == want == 2 * (2 * 4 * 6 * 6) * (3 * 3 * 3)
    torch.testing.assert_close(tr.output, model(x))


def test_aten_graph_answer_follows_a_swapped_submodule(tmp_path: Path) -> None:
    """Whether a GraphModule is a graph of aten ops depends on the modules it calls:
    swapping one (``gm.sub = other``) changes neither its graph nor its code, yet the
    answer, and so the trace's warning and the probe's refusal, follow the swap."""

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.sub = nn.Identity()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.ops.aten.relu.default(self.sub(x))

    gm = torch.fx.symbolic_trace(M())
    x = torch.randn(5, 4)
    data = TensorDataset(torch.randn(8, 4), torch.zeros(8, dtype=torch.long))
    with pytest.warns(UserWarning, match=r"aten ops.*none in a module"):
        lurker.trace(gm, x)  # calls no module with weights: its layers cannot be found
    with pytest.raises(LurkerError, match="cannot find the layers"):
        lurker.probe(gm, data, out=tmp_path / "a", progress=False, device="cpu")
    gm.sub = nn.Linear(4, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tr = lurker.trace(gm, x)
    assert tr["sub"].module == "sub"
    run = lurker.probe(gm, data, out=tmp_path / "b", k=2, progress=False, device="cpu")
    # (its aten relu is named relu, an activation probed as an eager torch.relu is)
    assert [(layer.name, layer.module) for layer in run.layers] == [
        ("sub", "sub"),
        ("relu_1", None),
    ]
    gm.sub = nn.Identity()  # and back
    with pytest.warns(UserWarning, match=r"aten ops.*none in a module"):
        lurker.trace(gm, x)


class _Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(self.embed(x)).mean(1))


def test_quantized_transformer_probes_the_float_models_layers(tmp_path: Path) -> None:
    """A quantized Linear is a module with a submodule (its packed weights' holder, never
    called): it is no repeated block, and its result cast back to float still feeds the
    MLP's activation. So a dynamically quantized encoder is probed at the float model's
    layers (the MLP activations, the blocks' outputs), units on the last axis, with the top
    samples by mean over positions that hooks on the quantized model give."""
    torch.manual_seed(0)
    float_model = _Encoder().eval()
    model = _quiet(torch.ao.quantization.quantize_dynamic, float_model, {nn.Linear})
    x = torch.randn(24, 5, 6)
    data = TensorDataset(x, torch.zeros(24, dtype=torch.long))
    probe = dict(k=3, batch_size=8, progress=False, device="cpu")
    want = lurker.probe(float_model, data, out=tmp_path / "float", **probe)
    run = _quiet(lurker.probe, model, data, out=tmp_path / "q", **probe)
    names = ["relu_1", "enc.layers.0.norm2", "relu_2", "enc.layers.1.norm2"]
    assert [layer.name for layer in want.layers] == names
    assert [layer.name for layer in run.layers] == names
    assert [layer.num_units for layer in run.layers] == [32, 16, 32, 16]
    acts = _hooked_acts(model, x, 8)
    oracle = {  # the activation is F.relu, no module: applied to linear1's output
        "relu_1": acts["enc.layers.0.linear1"].relu(),
        "relu_2": acts["enc.layers.1.linear1"].relu(),
        **{n: acts[n] for n in names[1::2]},
    }
    for layer in run.layers:
        means = oracle[layer.name].mean(1)  # (samples, units): the mean over positions
        for u in range(layer.num_units):
            top = run.unit(layer.name, u).top("mean")
            best = means[:, u].topk(3)
            assert [e.sample_id for e in top] == best.indices.tolist(), (layer.name, u)
            torch.testing.assert_close(torch.tensor([e.value for e in top]), best.values)


class _LastStep(LSTMHead):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(4, 5, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.lstm(x)[0][:, -1])


@pytest.mark.parametrize("method", ["saliency", "integrated_gradients", "gradcam", "lrp"])
def test_gradient_methods_refuse_a_quantized_model(method: str) -> None:
    """A quantized layer's kernels have no gradient: every gradient-based attribution was
    silently 0. They refuse, naming the layer and the fixes; occlusion, which only runs
    the model, explains it, as it explains the float model (to quantization's error)."""
    torch.manual_seed(0)
    float_model = _LastStep().eval()
    model = _quiet(torch.ao.quantization.quantize_dynamic, float_model, {nn.Linear, nn.LSTM})
    x = torch.randn(3, 6, 4)  # (batch, steps, features)
    options = {"layer": "lstm"} if method == "gradcam" else {}
    refused = r"layer 'lstm' \(DynamicQuantizedLSTM\) is quantized.*occlusion"
    with pytest.raises(LurkerError, match=refused):
        lurker.explain(model, x, 0, method=method, **options)
    got = _quiet(lurker.explain, model, x, 0, method="occlusion", window=(1, 4), strides=(1, 4))
    want = lurker.explain(float_model, x, 0, method="occlusion", window=(1, 4), strides=(1, 4))
    assert got.attribution.abs().sum() > 0
    torch.testing.assert_close(got.attribution, want.attribution, atol=0.05, rtol=0.1)


class _StaticNet(nn.Module):
    """Convs whose stride, padding, dilation and groups are not the defaults (a quantized
    conv's call holds none of them: its packed weight does), a 1-D one, and a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.quant = torch.ao.quantization.QuantStub()
        self.conv1 = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 6, 3, padding=2, dilation=2, groups=2)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv1d(6, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8, 5)
        self.dequant = torch.ao.quantization.DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu2(self.conv2(self.relu1(self.conv1(self.quant(x)))))
        x = self.conv3(x.flatten(2))  # (B, 6, H*W): a signal
        return self.dequant(self.fc(x.mean(2)))


def _statically_quantized(x: torch.Tensor) -> tuple[nn.Module, nn.Module]:
    """The float model and its eager-mode static quantization (conv1 fused with relu1)."""
    torch.manual_seed(0)
    float_model = _StaticNet().eval()
    fused = torch.ao.quantization.fuse_modules(copy.deepcopy(float_model), [["conv1", "relu1"]])
    engine = "fbgemm" if "fbgemm" in torch.backends.quantized.supported_engines else "qnnpack"
    fused.qconfig = torch.ao.quantization.get_default_qconfig(engine)
    prepared = _quiet(torch.ao.quantization.prepare, fused)
    prepared(x)
    return float_model, _quiet(torch.ao.quantization.convert, prepared)


def test_statically_quantized_ops_bind_their_own_parameters() -> None:
    """``torch.ops.quantized.conv2d`` takes (qx, packed_weight, output_scale,
    output_zero_point): it was recorded as ``conv2d`` and bound with aten's parameters, so
    its stride read the output zero-point. Its own name and schema now: the arguments
    bind as torch defines them, and its geometry is read off the packed weight."""
    from lurker.ops import catalogue

    x = torch.randn(2, 3, 8, 8)
    float_model, model = _statically_quantized(x)
    tr = _quiet(lurker.trace, model, x)
    names = {op.module: op.name for op in tr.ops if op.kind == "op" and op.module}
    assert names["conv1"] == "quantized_conv2d_relu"
    assert names["conv2"] == "quantized_conv2d"
    assert names["conv3"] == "quantized_conv1d"
    assert names["fc"] == "quantized_linear"
    conv2 = tr["conv2"]
    bound = catalogue.bind(conv2.name, conv2.args, conv2.kwargs)
    assert "stride" not in bound
    assert bound["output_zero_point"] == model.conv2.zero_point
    for path in ("conv1", "conv2", "conv3"):
        conv = getattr(float_model, path)
        packed = tr[path].meta["packed"]
        assert packed["weight"] == list(conv.weight.shape)
        for key in ("stride", "padding", "dilation"):
            assert packed[key] == list(getattr(conv, key)), (path, key)
        assert packed["groups"] == conv.groups


def test_statically_quantized_model_has_the_float_models_flops_and_fields() -> None:
    """FLOPs and receptive fields of a statically quantized model are its float model's,
    op by op (the oracle: the same layers unquantized), also on its graph read back from
    JSON (the packed weights are not in the document: what was read off them is)."""
    from lurker.graph.receptive import receptive_fields

    x = torch.randn(2, 3, 8, 8)
    float_model, model = _statically_quantized(x)
    want = lurker.trace(float_model, x)
    tr = _quiet(lurker.trace, model, x)
    for graph in (tr, lurker.Graph.from_json(tr.to_json())):
        assert graph.flops == want.flops > 0
        got_rf, want_rf = receptive_fields(graph), receptive_fields(want)
        for path in ("conv1", "conv2", "conv3", "fc"):
            w_op = next(op for op in want.ops if op.module == path and op.flops)
            assert graph[path].flops == w_op.flops, path
            got, exp = got_rf[graph[path].index], want_rf[w_op.index]
            assert (got.size, got.stride, got.exact) == (exp.size, exp.stride, exp.exact), path
        assert receptive_fields(graph)[graph["conv2"].index].size == (11, 11)


def test_statically_quantized_model_is_probed_right(tmp_path: Path) -> None:
    """A statically quantized CNN's convs are probed as conv layers, units on axis 1
    (the float model's layers, less a ReLU fused into its conv), and their top samples'
    values are those hooks on the quantized model give (its activations are quantized
    tensors: the probe reads their float values)."""
    data = _data(24)
    _, model = _statically_quantized(data.tensors[0])
    run = _quiet(
        lurker.probe, model, data, out=tmp_path / "run", k=3, batch_size=8, progress=False,
        device="cpu",
    )  # fmt: skip
    assert [layer.name for layer in run.layers] == ["conv1", "conv2", "relu2", "conv3", "fc"]
    assert [layer.num_units for layer in run.layers] == [4, 6, 6, 8, 5]
    acts = {n: a.dequantize() for n, a in _hooked_acts(model, data.tensors[0], 8).items()}
    for layer in run.layers:
        a = acts[layer.module]
        peaks = a.flatten(2).amax(2) if a.dim() > 2 else a
        for u in range(layer.num_units):
            got = [e.value for e in run.unit(layer.name, u).top("max")]
            torch.testing.assert_close(torch.tensor(got), peaks[:, u].topk(3).values)


def test_statically_quantized_model_keeps_its_features_for_the_map(tmp_path: Path) -> None:
    """``embed=True`` on a statically quantized model keeps the input of its last Linear,
    a quantized tensor: the probe failed deep in torch ("Creation of quantized tensor
    requires quantized dtype") pooling its ints. Its features are their float values,
    as a forward hook on the quantized model gives them (float16 storage)."""
    data = _data(24)
    x = data.tensors[0]
    _, model = _statically_quantized(x)
    run = _quiet(
        lurker.probe, model, data, out=tmp_path / "run", k=3, batch_size=8, progress=False,
        device="cpu", embed=True,
    )  # fmt: skip
    seen: list[torch.Tensor] = []
    hook = model.fc.register_forward_hook(lambda m, i, o: seen.append(i[0].dequantize()))
    with torch.no_grad():
        for batch in x.split(8):
            model(batch)
    hook.remove()
    want = torch.cat(seen)  # (samples, 8): the mean over the conv's positions
    got = torch.tensor(run.embedding().features.astype("float32"))
    assert got.shape == want.shape == (24, 8)
    torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)


class _ChannelsLast(nn.Module):
    """A conv, then a Linear over its channels at every position (channels last)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, stride=2)
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).permute(0, 2, 3, 1))


def _as_older_lurker(doc: dict, counted: bool = True) -> dict:
    """A trace document as lurker wrote it before torch's quantized operators were named
    apart from aten's: a quantize_dynamic'd Linear's op ``linear_dynamic`` (labels
    ``linear_dynamic_1``), no ``meta["packed"]``, no ``flops_unknown``; and, where not
    ``counted``, before the FLOPs of such ops were counted."""
    old = copy.deepcopy(doc)

    def back(name: str) -> str:
        return name.replace("quantized_linear_dynamic", "linear_dynamic")

    del old["model"]["flops_unknown"]
    for op in old["ops"]:
        op["name"], op["label"], op["rolled"] = (back(op[k]) for k in ("name", "label", "rolled"))
        if op["name"].startswith("linear_dynamic"):
            del op["meta"]["packed"]
            if not counted:
                del op["meta"]["flops"]
                op["flops"] = None
    for group in old["rolled"]:
        group["label"], group["name"] = back(group["label"]), back(group["name"])
    old["model"]["flops"] = sum(op["flops"] or 0 for op in old["ops"])
    return old


def test_old_graph_of_a_dynamically_quantized_model_reads_its_ops_by_todays_names() -> None:
    """A graph stored before its ``linear_dynamic`` ops were named
    ``quantized_linear_dynamic`` is read under today's names: its labels are the live
    trace's, and receptive fields go through the Linear as through the float model's
    (the oracle: the same conv and Linear unquantized)."""
    from lurker.graph.receptive import receptive_fields

    torch.manual_seed(0)
    float_model = _ChannelsLast().eval()
    model = _quiet(torch.ao.quantization.quantize_dynamic, float_model, {nn.Linear})
    x = torch.randn(1, 3, 9, 9)
    tr = _quiet(lurker.trace, model, x)
    old = _as_older_lurker(tr.to_json())
    assert "linear_dynamic_1" in {op["label"] for op in old["ops"]}
    graph = lurker.Graph.from_json(old)
    assert [(op.label, op.name) for op in graph.ops] == [(op.label, op.name) for op in tr.ops]
    assert graph["quantized_linear_dynamic_1"].module == "fc"
    want = lurker.trace(float_model, x)
    got_rf = receptive_fields(graph)[graph["quantized_linear_dynamic_1"].index]
    exp = receptive_fields(want)[want["linear_1"].index]
    assert (got_rf.size, got_rf.stride, got_rf.exact) == (exp.size, exp.stride, exp.exact)
    assert got_rf.size == (3, 3)


def test_old_graph_without_flops_unknown_counts_its_uncounted_ops() -> None:
    """A graph stored before ``flops_unknown`` was written, and before a quantized
    Linear's FLOPs were counted: its total leaves the Linear out, so the graph read back
    says one op of unknown FLOPs (not 0) and its summary says the total is a lower bound."""
    torch.manual_seed(0)
    model = _quiet(torch.ao.quantization.quantize_dynamic, _ChannelsLast().eval(), {nn.Linear})
    tr = _quiet(lurker.trace, model, torch.randn(1, 3, 9, 9))
    assert tr.flops_unknown == 0
    old = _as_older_lurker(tr.to_json(), counted=False)
    graph = lurker.Graph.from_json(old)
    assert (
        graph.flops
        == old["model"]["flops"]
        == tr.flops - tr["quantized_linear_dynamic_1"].flops
        > 0
    )
    assert graph.flops_unknown == 1
    assert "at least" in graph.summary()
    # with the Linear's FLOPs counted (a run of the commits between), none is unknown
    assert lurker.Graph.from_json(_as_older_lurker(tr.to_json())).flops_unknown == 0


def test_old_run_layer_of_a_quantized_linear_is_in_the_live_view(tmp_path: Path) -> None:
    """A run stored before ``linear_dynamic`` was named ``quantized_linear_dynamic``, one
    of whose layers is the op ``linear_dynamic_2``: the layer names today's op, which the
    stored graph and the live trace hold, so the explorer's live view shows its units
    (with the values a forward hook on the model gives), not leaving it out."""
    import json
    import sqlite3

    from fastapi.testclient import TestClient

    from lurker.server import create_app

    torch.manual_seed(0)
    model = _quiet(torch.ao.quantization.quantize_dynamic, MLP().eval(), {nn.Linear})
    data = TensorDataset(torch.randn(12, 8), torch.zeros(12, dtype=torch.long))
    probe = dict(k=2, batch_size=6, progress=False, device="cpu")
    layers = ["fc1", "quantized_linear_dynamic_2"]
    _quiet(lurker.probe, model, data, out=tmp_path / "run", layers=layers, **probe)
    with sqlite3.connect(tmp_path / "run" / "run.db") as db:  # as an older lurker wrote it
        (doc,) = db.execute("SELECT doc FROM graph").fetchone()
        old = _as_older_lurker(json.loads(doc))
        db.execute("UPDATE graph SET doc = ?", (json.dumps(old),))
        db.execute(
            "UPDATE layers SET name = 'linear_dynamic_2', op = 'linear_dynamic_2', "
            "kind = 'linear_dynamic' WHERE op = 'quantized_linear_dynamic_2'"
        )
    db.close()
    with lurker.Run.open(tmp_path / "run") as run:
        info = run.layer("linear_dynamic_2")
        assert (info.op, info.kind) == ("quantized_linear_dynamic_2", "quantized_linear_dynamic")
        assert run.layer("quantized_linear_dynamic_2") is info
        assert run.graph.ops[info.op_index].label == info.op
    x = torch.randn(8)
    seen = {}
    model.fc2.register_forward_hook(lambda m, i, o: seen.update(out=o[0]))
    with torch.no_grad():
        model(x[None])
    app = create_app(tmp_path / "run", model_obj=model, dataset=data)
    with TestClient(app) as client:
        r = client.post("/api/runs/run/live/inputs", json={"features": x.tolist()})
    assert r.status_code == 200, r.text
    shown = {layer["layer"]: layer for layer in r.json()["layers"]}
    assert set(shown) == {"fc1", "linear_dynamic_2"}
    assert shown["linear_dynamic_2"]["op"] == "quantized_linear_dynamic_2"
    torch.testing.assert_close(torch.tensor(shown["linear_dynamic_2"]["max"]), seen["out"])


@pytest.mark.parametrize(
    ("dtype", "pattern", "use", "op"),
    [
        (torch.qint8, "linear_dynamic*", "quantized_linear_dynamic*", "quantized_linear_dynamic_2"),
        (torch.float16, "linear_dynamic_fp16_2", *["quantized_linear_dynamic_fp16_2"] * 2),
    ],
)
def test_save_by_an_old_quantized_linear_name_names_the_new_one(
    dtype: torch.dtype, pattern: str, use: str, op: str
) -> None:
    """``save=`` an op's name from before it was ``quantized_linear_dynamic`` matches no op:
    refused (not a trace that saved nothing), naming the pattern to use, which saves it."""
    model = _quiet(torch.ao.quantization.quantize_dynamic, MLP().eval(), {nn.Linear}, dtype=dtype)
    x = torch.randn(2, 8)
    with pytest.raises(LurkerError, match=rf"named 'quantized_.*use '{re.escape(use)}'") as e:
        _quiet(lurker.trace, model, x, save=pattern)
    assert "Traceback" not in str(e.value)
    tr = _quiet(lurker.trace, model, x, save=use)
    assert tr[op].saved


@pytest.mark.parametrize("kind", ["static", "dynamic"])
def test_relevance_of_a_quantized_model_names_its_quantized_layer(
    kind: str, tmp_path: Path
) -> None:
    """LRP cannot pass a quantized layer (quantized kernels on packed weights: no gradient,
    no rule). ``relevance=True`` was refused mid-sweep as "no rule for quantize_per_tensor"
    (the QuantStub, the first op LRP met), suggesting gradient methods, which are as
    blind, and left a run behind: now refused before any run is written, naming the
    quantized layer and the fixes (the float model; occlusion); concept relevance says so."""
    if kind == "static":
        data = _data(8)
        _, model = _statically_quantized(data.tensors[0])
        layer, cls = "conv1", "QuantizedConvReLU2d"
    else:
        data = TensorDataset(torch.randn(8, 8), torch.zeros(8, dtype=torch.long))
        model = _quiet(torch.ao.quantization.quantize_dynamic, MLP().eval(), {nn.Linear})
        layer, cls = "fc1", "DynamicQuantizedLinear"
    said = rf"quantized layer '{layer}' \({cls}\).*no gradient.*float model.*occlusion"
    with pytest.raises(LurkerError, match=said) as e:
        _quiet(
            lurker.probe, model, data, out=tmp_path / "run", k=2, progress=False,
            device="cpu", relevance=True,
        )  # fmt: skip
    assert "quantize_per_tensor" not in str(e.value) and "integrated_gradients" not in str(e.value)
    assert "--relevance" in e.value.for_cli()
    assert not (tmp_path / "run").exists()
    with pytest.raises(LurkerError, match=said) as e:
        _quiet(lurker.explain.concepts, model, data.tensors[0][:1], layer=layer)
    assert "gradient method" not in str(e.value)


class _ConvAdd(nn.Module):
    """A residual-like block: a conv's output plus another branch's (a wider kernel, so
    the added input's field is the larger), and a ReLU after the sum where ``relu``."""

    def __init__(self, relu: bool) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.side = nn.Conv2d(4, 4, 5, padding=2)
        self.relu = nn.ReLU() if relu else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        return self.relu(self.conv(h) + self.side(h))


@pytest.mark.skipif(
    "onednn" not in torch.backends.quantized.supported_engines,
    reason="conv + add fuse into quantized::conv2d_add on the onednn engine only",
)
@pytest.mark.parametrize("relu", [False, True], ids=["conv2d_add", "conv2d_add_relu"])
def test_quantized_conv_add_merges_the_added_inputs_field(relu: bool) -> None:
    """fx quantization for onednn fuses a conv and the add after it into one op,
    ``quantized::conv2d_add(qx, qaccum)``: its receptive field is the conv's window of
    ``qx`` merged with ``qaccum``'s, equal to the float model's (conv, then add) position
    by position. Left out, ``qaccum`` read as mixed: the whole image."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.backend_config import get_onednn_backend_config
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    from lurker.graph.receptive import receptive_fields

    torch.manual_seed(0)
    float_model = _ConvAdd(relu).eval()
    x = torch.randn(2, 3, 16, 16)
    engine = torch.backends.quantized.engine
    torch.backends.quantized.engine = "onednn"
    try:
        config = get_onednn_backend_config()
        mapping = get_default_qconfig_mapping("onednn")
        prepared = _quiet(
            prepare_fx, copy.deepcopy(float_model), mapping, (x,), backend_config=config
        )
        prepared(x)
        model = _quiet(convert_fx, prepared, backend_config=config)
        tr = _quiet(lurker.trace, model, x)
    finally:
        torch.backends.quantized.engine = engine
    name = "quantized_conv2d_add_relu" if relu else "quantized_conv2d_add"
    fused = next(op for op in tr.ops if op.name == name)
    want = lurker.trace(float_model, x)
    last = next(op for op in reversed(want.ops) if op.name in ("add", "relu"))
    exp = receptive_fields(want)[last.index]
    for graph in (tr, lurker.Graph.from_json(tr.to_json())):
        got = receptive_fields(graph)[graph[fused.label].index]
        assert got.to_dict() == exp.to_dict()
    assert not exp.full and exp.size == (11, 11)  # the side conv's 5x5 over the stem's
