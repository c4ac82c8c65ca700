"""lurker.trace on real architectures and on hand-checked small models."""

from __future__ import annotations

import ast
import gc
import itertools
import re
import threading
import warnings
import weakref

import pytest
import torch
import torchvision
from torch import nn

import lurker
from lurker.capture._tree import paths
from models_zoo import (
    Branchy,
    Fails,
    Generates,
    InPlace,
    LSTMNet,
    RNNLoop,
    Small,
    Structured,
    Twice,
)


def _assert_same_output(tr: lurker.Trace, model: nn.Module, *args, **kwargs) -> None:
    with torch.no_grad():
        plain = model(*args, **kwargs)
    got = dict(paths(tr.output, "o", []))
    exp = dict(paths(plain, "o", []))
    assert got.keys() == exp.keys()
    for k in got:
        torch.testing.assert_close(got[k].detach(), exp[k], rtol=1e-4, atol=1e-5)


def _check_links(tr: lurker.Trace) -> None:
    for op in tr:
        for p in op.parents:
            assert op.index in tr.ops[p].children
            assert p < op.index  # execution order
        for c in op.children:
            assert op.index in tr.ops[c].parents


TORCHVISION = [
    ("resnet18", (1, 3, 64, 64)),
    ("vgg11", (1, 3, 64, 64)),
    ("mobilenet_v3_small", (1, 3, 64, 64)),
]


@pytest.mark.parametrize(("name", "shape"), TORCHVISION)
def test_torchvision_models(name, shape):
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    x = torch.randn(shape)
    tr = lurker.trace(model, x)
    report = tr.validate()
    assert report.checked == tr.num_ops
    assert report.output_checked
    _assert_same_output(tr, model, x)
    _check_links(tr)
    # every parametrised module appears as the producer of its output
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert len([op for op in tr if op.name == "conv2d"]) == len(convs)
    for n in convs:
        assert tr[n].name == "conv2d"
        assert tr[n].params[0].name == f"{n}.weight"
    assert tr.num_params == sum(p.numel() for p in model.parameters())
    assert not tr.is_recurrent and not tr.has_branching


def test_resnet_structure_details():
    model = torchvision.models.resnet18().eval()
    tr = lurker.trace(model, torch.randn(1, 3, 32, 32))
    conv1 = tr["conv1"]
    assert conv1.label == "conv2d_1" and tr["conv2d_1"] is conv1
    assert conv1.module == "conv1" and conv1.parents == [tr["input_1"].index]
    # FLOPs of a conv: 2 * out elements * (in_channels * kh * kw)
    assert conv1.flops == 2 * (64 * 16 * 16) * (3 * 7 * 7)
    assert tr["fc"].flops == 2 * 1000 * 512
    # the skip connection: layer1.0's add has two parents, one of them the block input
    add = tr.find("add_*")[0]
    assert len(add.parents) == 2 and add.module == "layer1.0"
    # shared ReLU module called twice per block is not a loop
    assert tr["layer1.0.relu:1"].label != tr["layer1.0.relu:2"].label
    assert tr["layer1.0.relu:2"].num_passes == 1
    assert conv1.source and "resnet.py" in conv1.source
    assert tr["output_1"].dist_from_output == 0 and conv1.dist_from_input == 1
    assert tr.ops[-1].kind == "output"


def test_googlenet_aux_outputs():
    torch.manual_seed(0)
    model = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=True)
    model.train()
    x = torch.randn(2, 3, 64, 64)
    tr = lurker.trace(model, x)
    outs = [op.name for op in tr.outputs]
    assert len(outs) == 3  # logits, aux_logits2, aux_logits1
    report = tr.validate()  # dropout ops re-executed under the RNG state they drew from
    random = [op.label for op in tr.ops if op.random]
    assert random and not report.skipped
    assert report.checked > 100
    _check_links(tr)


def test_small_model_hand_checked():
    model = Small()
    x = torch.randn(2, 4)
    tr = lurker.trace(model, x)
    assert [op.label for op in tr] == ["input_1", "linear_1", "relu_1", "add_1", "output_1"]
    inp, lin, relu, add, out = tr.ops
    assert inp.name == "x" and inp.kind == "input" and out.kind == "output"
    assert lin.parents == [0] and relu.parents == [1] and add.parents == [2] and out.parents == [3]
    assert lin.children == [2] and add.children == [4]
    assert [p.name for p in lin.params] == ["fc.weight", "fc.bias"]
    assert lin.num_params == 4 * 3 + 3 and relu.num_params == 0
    assert lin.module == "fc" and relu.module is None and tr["fc"] is lin
    assert lin.shape == (2, 3) and lin.dtype == "float32" and lin.nbytes == 2 * 3 * 4
    assert lin.flops == 2 * 2 * 3 * 4
    assert tr.num_ops == 3
    assert [op.dist_from_input for op in tr.ops] == [0, 1, 2, 3, 4]
    assert [op.dist_from_output for op in tr.ops] == [4, 3, 2, 1, 0]
    assert lin.source.endswith(".py:" + lin.source.rsplit(":", 1)[1])
    torch.testing.assert_close(relu.activation, torch.relu(model.fc(x)).detach())
    tr.validate()


def test_branch_recorded_and_marked():
    torch.manual_seed(0)
    model = Branchy()
    x = torch.ones(1, 4)
    tr = lurker.trace(model, x)
    assert tr.has_branching
    (rd,) = tr.branches
    assert rd.kind == "readout" and rd.value is True
    gt = tr.ops[rd.parents[0]]
    assert gt.name == "gt" and gt.decides_branch
    assert tr.ops[gt.parents[0]].name == "sum"
    assert "pos" in tr and "neg" not in tr  # only the taken branch ran
    tr.validate()
    _assert_same_output(tr, model, x)
    # the other branch: a new input taking it is detected by run()
    with pytest.raises(lurker.GraphChangedError, match="another path"):
        tr.run(-torch.ones(1, 4))


def test_rnn_loop_is_recurrent():
    torch.manual_seed(0)
    T = 4
    model = RNNLoop()
    x = torch.randn(T, 2, 3)
    tr = lurker.trace(model, x)
    assert tr.is_recurrent
    cell_ops = [op for op in tr if op.module == "cell"]
    assert cell_ops and all(op.num_passes == T for op in cell_ops)
    rnn = [op for op in cell_ops if op.name == "rnn_tanh_cell"]
    assert [op.pass_num for op in rnn] == list(range(1, T + 1))
    assert rnn[1].label == f"{rnn[1].rolled}:2"
    assert tr.modules["cell"].num_passes == T
    assert tr[f"cell:{T}"] is rnn[-1]
    with pytest.raises(KeyError, match="ran 4 times"):
        tr["cell"]
    assert len(tr.passes(rnn[0].rolled)) == T
    # the loop-carried state: pass t+1 of the cell consumes pass t's output
    for a, b in itertools.pairwise(rnn):
        assert a.index in b.parents
    # getitem x[t] in the forward's loop is one rolled op too
    getitems = [op for op in tr if op.name == "getitem"]
    assert len({op.rolled for op in getitems}) == 1 and len(getitems) == T
    zeros = next(op for op in tr if op.name == "zeros")
    assert zeros.kind == "generated"
    tr.validate()
    _assert_same_output(tr, model, x)


def test_lstm():
    torch.manual_seed(0)
    model = LSTMNet().eval()
    x = torch.randn(2, 7, 6)
    tr = lurker.trace(model, x)
    lstm = tr.find("lstm_*")
    assert len(lstm) == 1 and len(lstm[0].outputs) == 3  # output, h, c
    assert lstm[0].num_params == sum(p.numel() for p in model.lstm.parameters())
    tr.validate()
    _assert_same_output(tr, model, x)


def test_transformer_encoder_decomposed():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    x = torch.randn(2, 10, 32)
    tr = lurker.trace(model, x)
    names = [op.name for op in tr]
    # attention is recorded in parts, not as one opaque op
    assert "multi_head_attention_forward" not in names
    assert names.count("layer_norm") == 4
    assert any(n in names for n in ("softmax", "scaled_dot_product_attention"))
    assert tr["layers.0.self_attn"].module_outputs[0] == "layers.0.self_attn"
    tr.validate()
    _assert_same_output(tr, model, x)


def test_generated_tensors():
    model = Generates()
    x = torch.randn(2, 5)
    tr = lurker.trace(model, x)
    gen = {op.name for op in tr if op.kind == "generated"}
    assert {"arange", "zeros", "randn"} <= gen
    assert next(op for op in tr if op.name == "randn").random
    assert next(op for op in tr if op.name == "ones_like").kind == "op"
    report = tr.validate()  # randn re-executed under the RNG state it drew from: checked
    assert not report.skipped and report.checked == len(tr.compute_ops)


def test_inplace_ops_keep_pre_mutation_values():
    torch.manual_seed(0)
    model = InPlace()
    x = torch.randn(3, 4)
    tr = lurker.trace(model, x)
    lin = tr["fc"] if tr["fc"].name == "linear" else tr.find("linear_*")[0]
    y = model.fc(x).detach()
    torch.testing.assert_close(lin.activation, y)  # not overwritten by relu_ later
    mul = next(op for op in tr if op.name == "mul")
    torch.testing.assert_close(mul.activation, y * 1.0)
    iadd = next(op for op in tr if op.name == "add_")  # z += 1
    assert iadd.inplace
    torch.testing.assert_close(iadd.activation, y + 1)  # before mul_ and setitem
    mul_ = next(op for op in tr if op.name == "mul_")
    torch.testing.assert_close(mul_.activation, (y + 1) * 2)
    setitem = next(op for op in tr if op.name == "setitem")
    assert setitem.inplace and setitem.parents == [mul_.index]
    expected = (y + 1) * 2
    expected[0, 0] = 5.0
    torch.testing.assert_close(setitem.activation, expected)
    adds = [op for op in tr if op.name == "add"]
    assert len({op.rolled for op in adds}) == 2  # two adds on one line are not a loop
    assert next(op for op in tr if op.name == "relu").inplace
    tr.validate()
    _assert_same_output(tr, model, x)


def test_submodule_called_twice():
    model = Twice()
    x = torch.randn(2, 4)
    tr = lurker.trace(model, x)
    lins = [op for op in tr if op.module == "block.0"]
    assert [op.pass_num for op in lins] == [1, 2] and lins[0].rolled == lins[1].rolled
    assert tr["block:1"].name == "tanh" and tr["block:2"].name == "tanh"
    assert tr["block:2"].index in tr.ops[tr["out"].index].parents
    assert tr.is_recurrent
    tr.validate()
    _assert_same_output(tr, model, x)


def test_a_module_shared_under_two_paths_is_named_by_its_first():
    """A module registered twice (``self.enc.emb = self.emb``, tied embeddings) is named
    by its first path, as ``named_modules()`` does; its other path, the one the forward
    calls it by, is refused everywhere with the path that names it, not a bare "no such
    module"."""

    class Enc(nn.Module):
        def __init__(self, emb: nn.Embedding) -> None:
            super().__init__()
            self.emb = emb
            self.l = nn.Linear(8, 8)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.l(self.emb(ids))

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(20, 8)
            self.enc = Enc(self.emb)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.enc(ids)

    torch.manual_seed(0)
    model = Tied()
    ids = torch.randint(0, 20, (2, 5))
    tr = lurker.trace(model, ids)
    torch.testing.assert_close(tr["emb"].activation, model.emb.weight[ids].detach())
    use = "use 'emb'"
    with pytest.raises(KeyError, match=use):
        tr["enc.emb"]
    with pytest.raises(KeyError, match=use):
        tr.run(ids, hooks={"enc.emb": lambda op, out: None})
    with pytest.raises(lurker.LurkerError, match=use):
        lurker.trace(model, ids, save=["enc.emb"])
    with pytest.raises(lurker.LurkerError, match=use):
        tr.run(ids, save=["enc.emb"])
    with pytest.raises(KeyError) as err:  # a key that is no path at all gets no such note
        tr["enc.nothing"]
    assert "registered first" not in str(err.value)


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.lin(x))


class _SharedBlock(nn.Module):
    """``blk`` registered again as ``enc.blk``, and called by that path."""

    def __init__(self) -> None:
        super().__init__()
        self.blk = _Block()
        self.enc = nn.Module()
        self.enc.blk = self.blk
        self.enc.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.enc.head(self.enc.blk(x))


def test_a_save_glob_over_a_shared_modules_second_path_warns_with_the_path_to_add():
    """save=["enc.*"] on a model whose ``enc.blk`` is the module registered first as
    ``blk`` silently saved only ``enc.head``: the trace names the block ``blk``, which the
    glob does not match. It warns, naming the block and the paths that save it, in trace
    and in run; with those added, the block's output is saved, equal to a plain call."""
    torch.manual_seed(0)
    model = _SharedBlock()
    x = torch.randn(3, 4)
    with pytest.warns(
        UserWarning,
        match=r"'enc.blk' is the module registered first as 'blk'.*add 'blk', 'blk\.\*'",
    ):
        tr = lurker.trace(model, x, save=["enc.*"])
    assert set(tr.activations()) == {"linear_2", "output_1"}  # enc.head's only
    with pytest.warns(UserWarning, match=r"add 'blk', 'blk\.\*'"):
        tr.run(x, save=["enc.*"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tr = lurker.trace(model, x, save=["enc.*", "blk*"])
        tr.run(x, save=["enc.*", "blk*"])
        lurker.trace(model, x, save=["enc.head"])  # no glob over the second path
    torch.testing.assert_close(tr["blk"].activation, model.blk(x).detach())


def test_find_over_a_shared_modules_second_path_warns_with_the_path_that_finds_it():
    """tr.find("enc.*") returned only enc.head's op, silently, on a model whose enc.blk is
    the module registered first as blk: it warns as save= does, and find("blk*") finds it."""
    model = _SharedBlock()
    tr = lurker.trace(model, torch.randn(3, 4))
    with pytest.warns(
        UserWarning, match=r"'enc.blk' is the module registered first as 'blk'.*find\('blk'\)"
    ) as said:
        found = tr.find("enc.*")
    assert [op.label for op in found] == ["linear_2"]
    # the finds it names get every op enc.* covers by the second path: the block's output
    # and its linear's (blk.lin, also enc.blk.lin), not the block's output alone
    named = re.findall(r"find\(('[^']*')\)", str(said[0].message))[1:]
    got = {op.label for pattern in named for op in tr.find(ast.literal_eval(pattern))}
    assert got == {"linear_1", "relu_1"}, named
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tr.find("enc.head") == found
        assert tr["blk"] in tr.find("blk*")


def test_structured_inputs_and_dict_output():
    torch.manual_seed(0)
    model = Structured()
    x, y, z, s = torch.randn(2, 4), torch.randn(2, 4), torch.randn(2, 4), torch.tensor(3.0)
    tr = lurker.trace(model, (x, y), {"z": z}, scale=s)
    assert [op.name for op in tr.inputs] == ["pair[0]", "pair[1]", "feats['z']", "scale"]
    assert [op.name for op in tr.outputs] == [
        "output['logits']",
        "output['aux'][0]",
        "output['aux'][1]",
    ]
    assert tr["output['logits']"].kind == "output"
    torch.testing.assert_close(tr["output['logits']"].activation, tr.output["logits"].detach())
    tr.validate()
    _assert_same_output(tr, model, (x, y), {"z": z}, scale=s)


def test_failure_leaves_partial_trace_and_clean_torch():
    model = Fails()
    with pytest.raises(lurker.TraceError) as ei:
        lurker.trace(model, torch.randn(2, 4))
    err = ei.value
    msg = str(err)
    assert "linear" in msg and "fc2" in msg and "(2, 6)" in msg
    assert err.failed_op == "linear_2"
    partial = err.partial
    assert not partial.complete and partial.ops[-1].kind == "failed"
    assert [op.label for op in partial.ops[:3]] == ["input_1", "linear_1", "relu_1"]
    # torch is left as it was: no mode on the stack, no global hooks
    assert torch._C._len_torch_function_stack() == 0
    from torch.nn.modules import module as mod

    assert not mod._global_forward_hooks and not mod._global_forward_pre_hooks
    assert gc.isenabled()  # the GC, paused while recording, is back on
    # the model still works normally afterwards
    ok = nn.Linear(4, 2)
    lurker.trace(ok, torch.randn(1, 4)).validate()


def test_trace_is_freed_without_the_cycle_collector():
    """A dropped trace releases its activations at once: it holds no reference cycle (the
    recorder keeps Python frames while recording, which must not outlive it)."""
    model = torchvision.models.resnet18().eval()
    gc.collect()
    gc.disable()
    try:
        tr = lurker.trace(model, torch.randn(1, 3, 32, 32))
        assert gc.isenabled() is False  # trace() leaves a disabled GC disabled
        act = weakref.ref(tr["conv2d_1"].activation)
        ref = weakref.ref(tr)
        del tr
        assert ref() is None and act() is None
        assert gc.collect() == 0
    finally:
        gc.enable()


def test_traced_model_is_not_kept_alive():
    """The per-model index lurker caches must not keep the model (and its weights) alive."""
    model = nn.Sequential(nn.Linear(8, 8))
    ref = weakref.ref(model)
    tr = lurker.trace(model, torch.randn(1, 8))
    del tr, model
    gc.collect()
    assert ref() is None


class _SideValue(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        y = self.lin(x).relu()
        self.stat = y.mean()  # kept on the side, not returned
        return y


class _Gen(nn.Module):
    def forward(self, g):
        return next(g)


def test_module_outputs_are_what_the_rest_of_the_model_uses():
    """Derived from the graph: values kept on the side, a forward hook's own computations
    and dropped attention weights are not a module's output."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.blk = _SideValue()
            self.probe = nn.Linear(4, 1)
            self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            y = self.blk(x)
            y, _ = self.attn(y, y, y)
            return self.head(y)

    model = M().eval()
    seen = []
    model.blk.register_forward_hook(lambda m, i, o: seen.append(model.probe(o)))
    tr = lurker.trace(model, torch.randn(2, 3, 4))
    assert tr["blk"].name == "relu" and tr["blk"].shape == (2, 3, 4)
    assert tr["attn"].shape == (2, 3, 4)
    assert [tr.ops[i].name for i in tr.modules["attn"].outputs[1]] == [tr["attn"].name]
    mean = next(op for op in tr.compute_ops if op.name == "mean")
    assert mean.module == "blk" and mean.module_outputs == []
    probe = next(op for op in tr.compute_ops if op.module == "probe")
    assert probe.modules == (("blk", 1), ("probe", 1)) and probe.module_outputs == []
    tr.validate()


def test_generator_resumed_under_another_module():
    """A generator's frame resumes under whichever module pulls from it."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = _Gen(), _Gen()

        def forward(self, x):
            g = (t * 2 for t in (x, x + 1))
            return self.a(g) + self.b(g)

    tr = lurker.trace(M(), torch.randn(2, 4))
    muls = [op for op in tr.compute_ops if op.name == "mul"]
    assert [op.module for op in muls] == ["a", "b"]
    assert tr.modules["a"].num_passes == tr.modules["b"].num_passes == 1
    assert tr["b"].index == muls[1].index
    tr.validate()


def test_output_metadata_is_read_before_later_in_place_changes():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 4)

        def forward(self, x):
            y = self.lin(x)
            y.unsqueeze_(0)
            z = x * 2
            z.requires_grad_()
            return y.sum() + z.sum()

    with torch.no_grad():
        tr = lurker.trace(M(), torch.randn(2, 3))
    assert tr["lin"].shape == (2, 4) and tr["lin"].activation.shape == (2, 4)
    assert tr["mul_1"].outputs[0].requires_grad is False


def test_renamed_submodule_is_seen_on_the_next_trace():
    model = nn.Sequential()
    model.add_module("body", nn.Linear(4, 4))
    model.add_module("fc", nn.Linear(4, 2))
    x = torch.randn(2, 4)
    lurker.trace(model, x)
    model.head = model.fc
    del model.fc
    tr = lurker.trace(model, x)
    assert "head" in tr and "fc" not in tr.modules
    assert [p.name for op in tr.compute_ops for p in op.params][-2:] == ["head.weight", "head.bias"]
    model.head.weight = nn.Parameter(torch.randn(3, 4))
    model.head.bias = nn.Parameter(torch.randn(3))
    tr = lurker.trace(model, x)
    assert tr["head"].params[0].shape == (3, 4) and tr.num_params == 4 * 4 + 4 + 3 * 4 + 3


def test_a_tied_weight_counts_in_every_module_that_holds_it():
    """A head sharing the embedding's weight (tied, as language models do) has that weight
    among its parameters (the module's count was 0); the model counts it once."""

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 6)
            self.mid = nn.Linear(6, 6)
            self.head = nn.Linear(6, 10, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return self.head(self.mid(self.emb(t)))

    model = Tied()
    tr = lurker.trace(model, torch.tensor([[1, 2, 3]]))
    for path, mod in model.named_modules():
        assert tr.modules[path].num_params == sum(p.numel() for p in mod.parameters()), path
    assert tr.num_params == sum(p.numel() for p in model.parameters()) == 60 + 42
    # a module registered in two places: both parents hold its parameters
    lin = nn.Linear(4, 4)
    twice = nn.Sequential(nn.Sequential(lin, nn.ReLU()), nn.Sequential(lin, nn.Tanh()))
    tr = lurker.trace(twice, torch.randn(2, 4))
    for path, mod in twice.named_modules():
        assert tr.modules[path].num_params == sum(p.numel() for p in mod.parameters()), path
    assert tr.num_params == 20


def test_module_calls_outside_the_model_and_identity():
    """Modules are found on the Python stack: a module that is not part of the model is
    not a module of the trace, and a module that runs no tensor op has no passes."""

    class Outside(nn.Module):
        def __init__(self, helper: nn.Module):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.skip = nn.Identity()
            self._helper = [helper]  # not registered: not part of the model

        def forward(self, x):
            return self._helper[0](self.skip(self.fc(x)))

    model = Outside(nn.ReLU())
    tr = lurker.trace(model, torch.randn(2, 4))
    relu = next(op for op in tr if op.name == "relu")
    assert relu.modules == () and relu.module is None
    assert tr.modules["fc"].num_passes == 1 and tr.modules["skip"].num_passes == 0
    assert tr["fc"].name == "linear" and tr["fc"].module_outputs == ["fc"]
    tr.validate()


def test_wrong_input_shape_error_names_fix():
    model = torchvision.models.resnet18()
    with pytest.raises(lurker.TraceError, match="input-shape") as ei:
        lurker.trace(model, torch.randn(1, 1, 32, 32))
    assert ei.value.failed_op == "conv2d_1"


def test_not_a_module():
    with pytest.raises(lurker.LurkerError, match=r"nn\.Module"):
        lurker.trace(lambda x: x, torch.randn(1))


def test_save_policies_and_transform():
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 32, 32)
    none = lurker.trace(model, x, save="none")
    assert all(op.activation is None for op in none.compute_ops)
    names = lurker.trace(model, x, save=["layer1.*", "conv2d_1"])
    saved = {op.label for op in names.compute_ops if op.activation is not None}
    assert "conv2d_1" in saved and names["layer1.0"].label in saved
    assert names["layer2"].activation is None
    types = lurker.trace(model, x, save=nn.Conv2d)
    assert {op.name for op in types.compute_ops if op.activation is not None} == {"conv2d"}
    pred = lurker.trace(model, x, save=lambda op: op.name == "relu")
    assert {op.name for op in pred.compute_ops if op.activation is not None} == {"relu"}
    mean = lurker.trace(model, x, transform=lambda t: t.mean((2, 3)) if t.dim() == 4 else t)
    full = lurker.trace(model, x)
    torch.testing.assert_close(mean["layer1"].activation, full["layer1"].activation.mean((2, 3)))
    with pytest.raises(lurker.ValidationError, match="transform"):
        mean.validate()
    cpu = lurker.trace(model, x, save_to="cpu")
    assert cpu["conv1"].activation.device.type == "cpu"
    with pytest.raises(lurker.LurkerError, match="not understood"):
        lurker.trace(model, x, save=3.5)


def test_run_new_input_matches_fresh_trace():
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    tr = lurker.trace(model, torch.randn(1, 3, 32, 32))
    x2 = torch.randn(1, 3, 32, 32)
    acts = tr.run(x2)
    fresh = lurker.trace(model, x2)
    for op in fresh.compute_ops:
        torch.testing.assert_close(acts[op.label], op.activation)
    torch.testing.assert_close(acts["layer2.1"], fresh["layer2.1"].activation)
    some = tr.run(x2, save=["fc"])
    assert list(some) == [tr["fc"].label, "output_1"]


def test_run_repr_says_what_it_holds():
    """A notebook cell ending with ``tr.run(x)`` shows the model, how many activations were
    kept and the output's shape, not ``<...Activations at 0x...>``."""
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    tr = lurker.trace(model, torch.randn(2, 4))
    acts = tr.run(torch.randn(5, 4))
    assert (
        repr(acts) == f"<Activations of Sequential: {len(list(acts))} saved, output tensor (5, 3)>"
    )
    assert repr(tr.run(torch.randn(5, 4), save=["2"])) == (
        "<Activations of Sequential: 2 saved, output tensor (5, 3)>"
    )


def test_gradients_match_autograd():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    x = torch.randn(5, 4)
    tr = lurker.trace(model, x, grads=True)
    tr.backward(output=lambda out: out[:, 1].sum())
    # oracle: autograd on a plain forward
    h1 = model[0](x)
    h2 = model[1](h1)
    out = model[2](h2)
    g1, g2, go = torch.autograd.grad(out[:, 1].sum(), [h1, h2, out])
    torch.testing.assert_close(tr["0"].grad, g1)
    torch.testing.assert_close(tr["1"].grad, g2)
    torch.testing.assert_close(tr["2"].grad, go)


def test_backward_on_a_trace_without_grads_is_refused_before_it_runs():
    """tr.backward() on a trace made without grads=True ran, kept no op's gradient and
    said nothing: every op.grad stayed None. Now it is refused with the fix, and the
    autograd graph is left unspent (the output's own backward still runs)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    x = torch.randn(5, 4)
    tr = lurker.trace(model, x)
    with pytest.raises(lurker.LurkerError, match=r"grads=True"):
        tr.backward(output=lambda out: out[:, 1].sum())
    assert all(op.grad is None for op in tr.ops)
    assert model[0].weight.grad is None  # nothing ran
    tr.output[:, 1].sum().backward()
    (g,) = torch.autograd.grad(model(x)[:, 1].sum(), [model[0].weight])
    torch.testing.assert_close(model[0].weight.grad, g)


def test_gradients_are_kept_for_the_saved_ops_only():
    """grads=True with a save= selection keeps the gradients of the saved ops, through
    the same transform (the transform ran on every op's gradient, and failed on a
    Linear's (1, 2))."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    x = torch.randn(1, 3, 8, 8)
    tr = lurker.trace(net, x, save=nn.Conv2d, transform=lambda t: t.mean((2, 3)), grads=True)
    tr.backward()
    assert [op.label for op in tr.ops if op.grad is not None] == ["conv2d_1"]
    h = net[0](x)
    (g,) = torch.autograd.grad(net[1:](h).sum(), [h])
    torch.testing.assert_close(tr["0"].grad, g.mean((2, 3)))


def test_gradients_after_users_own_backward_with_inplace():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(inplace=True), nn.Linear(8, 2))
    x = torch.randn(3, 4)
    tr = lurker.trace(model, x, grads=True)
    tr.output.pow(2).sum().backward()
    h1 = model[0](x)
    h2 = torch.relu(h1)
    out = model[2](h2)
    g1, g2 = torch.autograd.grad(out.pow(2).sum(), [h1, h2])
    torch.testing.assert_close(tr["0"].grad, g1)
    torch.testing.assert_close(tr["1"].grad, g2)


def test_two_threads_do_not_mix():
    torch.manual_seed(0)
    models = [torchvision.models.resnet18().eval(), RNNLoop(), Small()]
    inputs = [torch.randn(1, 3, 32, 32), torch.randn(3, 2, 3), torch.randn(2, 4)]
    expected = [[op.label for op in lurker.trace(m, x)] for m, x in zip(models, inputs)]
    results: dict[int, list[list[str]]] = {0: [], 1: [], 2: []}
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def work(i: int, j: int) -> None:
        try:
            barrier.wait()
            for _ in range(4):
                results[i].append([op.label for op in lurker.trace(models[i], inputs[i])])
        except BaseException as e:
            errors.append(e)

    # two threads on different models, two on the same model
    threads = [
        threading.Thread(target=work, args=(i, j)) for i, j in ((0, 0), (1, 0), (2, 0), (2, 1))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i in range(3):
        assert results[i] and all(r == expected[i] for r in results[i])


def test_lookup_errors_are_helpful():
    tr = lurker.trace(Small(), torch.randn(1, 4))
    with pytest.raises(KeyError, match="linear_1"):
        tr["linear_9"]
    assert "fc" in tr and "nope" not in tr
    assert next(op.label for op in tr) == "input_1"
    assert len(tr) == 5
    assert "3 ops" in repr(tr)


def test_tolist_is_a_readout():
    class M(nn.Module):
        def forward(self, x):
            n = int(x.sum().tolist() > 0)  # tensor data steering Python
            return x * (n + 1)

    tr = lurker.trace(M(), torch.ones(3))
    (rd,) = tr.branches
    assert rd.name == "tolist" and rd.value == 3.0
    assert tr.run(torch.ones(3))["output_1"].sum() == 6


ZOO = {
    "small": (Small, lambda: (torch.randn(2, 4),)),
    "branchy": (Branchy, lambda: (torch.ones(1, 4),)),
    "rnn_loop": (RNNLoop, lambda: (torch.randn(4, 2, 3),)),
    "lstm": (LSTMNet, lambda: (torch.randn(2, 7, 6),)),
    "generates": (Generates, lambda: (torch.randn(2, 5),)),
    "inplace": (InPlace, lambda: (torch.randn(3, 4),)),
    "twice": (Twice, lambda: (torch.randn(2, 4),)),
    "structured": (
        Structured,
        lambda: ((torch.randn(2, 4), torch.randn(2, 4)), {"z": torch.randn(2, 4)}),
    ),
    "transformer": (
        lambda: nn.TransformerEncoder(
            nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 2, enable_nested_tensor=False
        ),
        lambda: (torch.randn(1, 5, 16),),
    ),
    "googlenet": (
        lambda: torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=True),
        lambda: (torch.randn(1, 3, 64, 64),),
    ),
}


@pytest.mark.parametrize("name", sorted(ZOO))
def test_every_model_renders(name, tmp_path):
    make, inputs = ZOO[name]
    torch.manual_seed(0)
    model = make().eval()
    kwargs = {"scale": torch.tensor(2.0)} if name == "structured" else {}
    tr = lurker.trace(model, *inputs(), **kwargs)
    for rolled in (False, True):
        path = tr.render(tmp_path / f"{name}-{rolled}.svg", rolled=rolled)
        text = path.read_text()
        op = tr.ops[1]
        assert "<svg" in text and (op.rolled if rolled else op.label) in text


def test_iterating_a_tensor_is_recorded():
    class Rows(nn.Module):
        def forward(self, x):
            return torch.stack([r * i for i, r in enumerate(x)])

    x = torch.randn(3, 2)
    tr = lurker.trace(Rows(), x)
    names = [op.name for op in tr.compute_ops]
    assert names[0] == "unbind" and names.count("mul") == 3 and names[-1] == "stack"
    assert not [op for op in tr if op.kind == "constant"]  # rows come from the unbind
    tr.validate()
    torch.testing.assert_close(tr.run(x)["output_1"], Rows()(x))


def test_shape_queries_are_not_ops_and_readouts_are():
    class Q(nn.Module):
        def forward(self, x):
            n = x.shape[0] + x.dim() + x.size(1)
            if torch.equal(x, x):
                return x * n
            return x

    tr = lurker.trace(Q(), torch.ones(2, 3))
    assert [op.name for op in tr.compute_ops] == ["mul"]
    assert [op.name for op in tr.branches] == ["equal"]
    tr2 = lurker.trace(Q(), torch.ones(2, 3))  # second trace: queries skipped, same graph
    assert [op.label for op in tr2] == [op.label for op in tr]


def test_run_save_by_module_type():
    model = torchvision.models.resnet18().eval()
    tr = lurker.trace(model, torch.randn(1, 3, 32, 32), save="none")
    acts = tr.run(torch.randn(1, 3, 32, 32), save=nn.Linear)
    assert [k for k in acts if k != "output_1"] == [tr["fc"].label]


def test_list_argument_mutated_after_the_call():
    """DenseNet keeps appending to the list it passes to torch.cat."""

    class Dense(nn.Module):
        def __init__(self):
            super().__init__()
            self.convs = nn.ModuleList(nn.Conv2d(2 + 2 * i, 2, 1) for i in range(3))

        def forward(self, x):
            feats = [x]
            for conv in self.convs:
                feats.append(conv(torch.cat(feats, 1)))
            return torch.cat(feats, 1)

    model = Dense()
    x = torch.randn(1, 2, 4, 4)
    tr = lurker.trace(model, x)
    assert tr.validate().checked == tr.num_ops
    _assert_same_output(tr, model, x)
    assert [len(op.parents) for op in tr if op.name == "cat"] == [1, 2, 3, 4]


MORE = [
    ("efficientnet_b0", {}, [(1, 3, 64, 64)]),
    ("convnext_tiny", {}, [(1, 3, 64, 64)]),
    ("swin_t", {}, [(1, 3, 64, 64)]),
    ("vit_b_16", {}, [(1, 3, 224, 224)]),
    ("shufflenet_v2_x0_5", {}, [(1, 3, 64, 64)]),
    ("densenet121", {}, [(1, 3, 64, 64)]),
    ("inception_v3", {"init_weights": True, "aux_logits": False}, [(1, 3, 96, 96)]),
    ("deeplabv3_mobilenet_v3_large", {"weights_backbone": None}, [(1, 3, 64, 64)]),
    ("raft_small", {}, [(1, 3, 128, 128), (1, 3, 128, 128)]),  # optical flow: a loop
]


@pytest.mark.parametrize(("name", "kw", "shapes"), MORE, ids=[m[0] for m in MORE])
def test_more_torchvision_architectures(name, kw, shapes):
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, **kw).eval()
    args = [torch.randn(s) for s in shapes]
    with torch.no_grad():
        tr = lurker.trace(model, *args)
    assert tr.validate().checked == tr.num_ops
    _check_links(tr)
    if name == "raft_small":
        assert tr.is_recurrent  # the refinement loop reuses its update block


def test_example_models_are_model_code():
    """lurker's own example models are sourced like user code (not skipped as lurker's
    plumbing): sources point into examples.py, and its lines tell call sites apart."""
    import inspect

    from lurker import examples

    lines, start = inspect.getsourcelines(examples.DigitsNet.forward)  # one `return` line
    tr = lurker.trace(examples.DigitsNet().eval(), torch.randn(1, 1, 16, 16))
    assert {op.source for op in tr.compute_ops} == {f"{examples.__file__}:{start + len(lines) - 1}"}


def test_list_valued_keyword_arguments():
    """A list passed by keyword (``x.sum(dim=[1])``, ``torch.cat(tensors=[...])``) is copied
    into the op's saved arguments like a positional one, in the compiled recorder too."""

    class KwLists(nn.Module):
        def forward(self, x):
            feats = [x, x]
            y = torch.cat(tensors=feats, dim=1)
            feats.append(y)  # after the call: the saved arguments keep the list as it was
            return y.sum(dim=[1], keepdim=True) + y.permute(dims=[1, 0]).mean(dim=[0])

    model = KwLists()
    x = torch.randn(2, 3)
    tr = lurker.trace(model, x)
    cat = next(op for op in tr if op.name == "cat")
    assert len(cat._skel_kwargs["tensors"]) == 2
    assert tr.validate().checked == tr.num_ops
    _assert_same_output(tr, model, x)


def test_containers_after_deleting_an_item():
    """``del seq[i]`` rebuilds a container's ``_modules`` as an OrderedDict: the model index
    (built, then checked on the next trace) takes any dict type."""
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    del model[1]
    assert type(model._modules) is not dict
    x = torch.randn(2, 4)
    for _ in range(2):  # the first trace builds the index, the second checks its stamp
        tr = lurker.trace(model, x)
        assert [op.module for op in tr.compute_ops] == ["0", "1"]
        _assert_same_output(tr, model, x)
    model.append(nn.Tanh())
    assert lurker.trace(model, x).compute_ops[-1].name == "tanh"


def test_layers_is_a_deprecated_alias_of_compute_ops():
    """A "layer" is a probed layer; the ops proper are ``compute_ops`` (no inputs, outputs,
    buffers or constants), and the old name still answers, with a warning naming the new."""
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    tr = lurker.trace(model, torch.randn(2, 4))
    assert [op.name for op in tr.compute_ops] == ["linear", "relu"]
    with pytest.warns(DeprecationWarning, match="compute_ops"):
        old = tr.layers
    assert old == tr.compute_ops


def test_cached_model_index_follows_every_change_to_the_model():
    """The per-model index (paths, parameters, buffers) is cached between traces; each
    change below must show in the next trace exactly as in a trace of a fresh copy."""
    import copy

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).eval()
    x = torch.randn(3, 4)

    def same_as_fresh(tr: lurker.Trace) -> None:
        ref = lurker.trace(copy.deepcopy(model), x)  # a new object: never cached
        assert [(op.label, [p.name for p in op.params], op.modules) for op in tr.ops] == [
            (op.label, [p.name for p in op.params], op.modules) for op in ref.ops
        ]
        assert tr.param_shapes == ref.param_shapes
        assert {k: m.num_params for k, m in tr.modules.items()} == {
            k: m.num_params for k, m in ref.modules.items()
        }
        torch.testing.assert_close(tr.output, model(x))

    lurker.trace(model, x)  # cached from here on
    model.append(nn.ReLU())  # a module added
    same_as_fresh(tr := lurker.trace(model, x))
    assert tr["3"].name == "relu"
    model[0].weight = nn.Parameter(torch.randn(4, 4))  # a parameter replaced
    same_as_fresh(lurker.trace(model, x))
    model[2].weight.data = torch.randn(5, 4)  # same object, new shape
    model[2].bias.data = torch.randn(5)
    same_as_fresh(tr := lurker.trace(model, x))
    assert tr.param_shapes["2.weight"] == (5, 4)
    model[1].running_mean = torch.ones(4)  # a buffer replaced
    same_as_fresh(tr := lurker.trace(model, x))
    assert any(op.kind == "buffer" and op.name == "1.running_mean" for op in tr.ops)
    model[1].register_buffer("extra", torch.zeros(1))  # a buffer added
    model[0].bias = None  # a parameter removed
    same_as_fresh(lurker.trace(model, x))


def test_inputs_are_named_by_the_forward_parameters_they_bind_to():
    class Two(nn.Module):
        def forward(self, x, mask=None):
            return x if mask is None else x[0] * mask

    class Star(nn.Module):
        def forward(self, x, *rest, scale=1.0):
            return x * scale + sum(rest)

    a, b, c = torch.randn(3), torch.randn(3), torch.randn(3)

    def names(model, *args, **kwargs):
        return [op.name for op in lurker.trace(model, *args, **kwargs).inputs]

    for _ in range(2):  # the second time from the cached signature
        assert names(Two(), a, b) == ["x", "mask"]
        assert names(Two(), a) == ["x"]
        assert names(Two(), a, mask=b) == ["x", "mask"]
        assert names(Two(), [a, b], c) == ["x[0]", "x[1]", "mask"]
        assert names(Star(), a, b, c, scale=2.0) == ["x", "rest[0]", "rest[1]"]


class _Halve(nn.Module):
    """A while loop: Python 3.11+ compiles its condition twice (before the loop and at its
    end), at two bytecode offsets of one source expression."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.lin(x)
        while x.norm() > 1:
            x = x / 2
        return x


class _TwoNorms(nn.Module):
    """Two calls of one method on two lines, in a loop: two call sites, two rolled ops."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.lin(x)
        for _ in range(3):
            a = x.norm()
            b = x.norm()
            x = x / (a + b)
        return x


class _Chained(nn.Module):
    """``lo < s < hi`` on tensors: two ``lt`` and two readouts that share one source span."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.lin(x).sum()
        lo, hi = s - 1, s + 1
        for _ in range(2):
            if lo < s < hi:
                s = s + 0.25
        return s


def test_while_condition_is_one_rolled_op_with_every_check():
    """Every evaluation of a while loop's condition is a pass of one rolled op (the compiler
    writes the condition twice), while two calls on two lines stay two ops."""
    torch.manual_seed(0)
    model = _Halve()
    x = torch.randn(2, 4) * 10
    # the oracle: run the loop by hand and count how often the condition was evaluated
    y = model.lin(x).detach()
    checks, halvings = 1, 0
    while y.norm() > 1:
        y = y / 2
        checks += 1
        halvings += 1
    assert halvings >= 2  # else the test would not see a second copy of the condition
    for _ in range(2):  # the second trace finds the copies in the recorder's cache
        tr = lurker.trace(model, x)
        rolled = tr.rolled()
        for name in ("norm", "gt", "bool"):
            labels = [label for label, ops in rolled.items() if ops[0].name == name]
            assert len(labels) == 1, (name, labels)
            assert len(rolled[labels[0]]) == checks
            assert all(op.num_passes == checks for op in rolled[labels[0]])
    (div,) = [ops for ops in rolled.values() if ops[0].name == "div"]
    assert len(div) == halvings
    # the readout's values over the passes: True each time it looped, then False
    reads = [op.value for op in rolled[next(k for k in rolled if k.startswith("bool"))]]
    assert reads == [True] * halvings + [False]
    # what the rolled drawings show: one node per rolled op, fed by the loop's back edge
    from lurker.graph.view import graph_view

    view = graph_view(tr)
    norms = [n for n in view["nodes"] if n["t"] == "norm"]
    assert len(norms) == 1 and norms[0]["p"] == checks
    tr.validate()
    torch.testing.assert_close(tr.output, y)


def test_two_call_sites_of_one_method_stay_two_ops():
    torch.manual_seed(0)
    tr = lurker.trace(_TwoNorms(), torch.randn(2, 4))
    norms = [ops for ops in tr.rolled().values() if ops[0].name == "norm"]
    assert [len(ops) for ops in norms] == [3, 3]
    assert norms[0][0].source != norms[1][0].source
    # a chained comparison's two comparisons share a source span, not a call site
    tr = lurker.trace(_Chained(), torch.randn(2, 4))
    for name in ("lt", "bool"):
        rolled = [ops for ops in tr.rolled().values() if ops[0].name == name]
        assert [len(ops) for ops in rolled] == [2, 2], name


def test_a_long_forward_reads_its_code_positions_once(monkeypatch):
    """Looking for the compiler's copies of a call site (a while loop's condition) scans
    the positions of the forward's code once, not once per op in it: a generated forward
    of thousands of lines (an fx GraphModule) traced in seconds, not minutes."""
    from lurker.capture import _recorder

    lines = 300
    src = "def forward(self, x):\n" + "    x = torch.sin(x)\n" * lines + "    return x\n"
    ns: dict = {"torch": torch}
    exec(compile(src, "<generated forward>", "exec"), ns)  # a code object no test traced
    code = ns["forward"].__code__
    model = type("Generated", (nn.Module,), {"forward": ns["forward"]})()

    scanned: list[int] = []
    real = _recorder._repeated_spans

    def counting(c):
        if c is code:
            scanned.append(1)
        return real(c)

    monkeypatch.setattr(_recorder, "_repeated_spans", counting)
    tr = lurker.trace(model, torch.randn(3), save="none")
    sins = [ops for ops in tr.rolled().values() if ops[0].name == "sin"]
    assert len(sins) == lines  # each line its own rolled op: nothing merged
    assert len(scanned) == 1


# ---------------------------------------------------------------- lazy modules, state changes
def _lazy_mlp() -> nn.Module:
    return nn.Sequential(nn.LazyLinear(5), nn.ReLU(), nn.LazyLinear(2))


def _lazy_cnn() -> nn.Module:
    return nn.Sequential(
        nn.LazyConv2d(4, 3), nn.LazyBatchNorm2d(), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3)
    ).eval()


@pytest.mark.parametrize(
    ("make", "shape"), [(_lazy_mlp, (4, 3)), (_lazy_cnn, (2, 3, 8, 8))], ids=["mlp", "cnn"]
)
def test_a_lazy_model_traced_on_its_first_forward(make, shape) -> None:
    """A lazy model traced on its first forward gives the graph of the same model already
    materialized (the oracle: same seed, one untraced forward first): the same ops, the
    parameters' real shapes, the plain module classes; it validates and replays, and the
    materialization is named in state_changes."""
    x = torch.randn(*shape)
    torch.manual_seed(0)
    oracle = make()
    want = oracle(x)  # materializes it, with the same initial weights
    ref = lurker.trace(oracle, x)
    torch.manual_seed(0)
    model = make()
    tr = lurker.trace(model, x)
    torch.testing.assert_close(tr.output, want, rtol=0, atol=0)
    assert [(op.label, op.kind) for op in tr] == [(op.label, op.kind) for op in ref]
    assert [op.params for op in tr] == [op.params for op in ref]
    assert tr.param_shapes == {n: tuple(p.shape) for n, p in oracle.named_parameters()}
    assert {p: (m.type, m.num_params) for p, m in tr.modules.items()} == {
        p: (m.type, m.num_params) for p, m in ref.modules.items()
    }
    assert tr.num_params == sum(p.numel() for p in oracle.parameters())
    assert tr.state_changes == [
        f"parameter {n} materialized by its lazy module {tuple(p.shape)}"
        for n, p in oracle.named_parameters()
    ]
    report = tr.validate()
    assert report.output_checked and report.checked == len(tr.compute_ops)
    assert report.state_changes == tr.state_changes
    x2 = torch.randn(*shape)
    torch.testing.assert_close(tr.run(x2).output, oracle(x2), rtol=0, atol=0)
    torch.testing.assert_close(tr.run(x)[tr.compute_ops[0].label], ref.compute_ops[0].activation)


def test_a_lazy_model_after_a_random_op_says_it_cannot_compare_the_output() -> None:
    """Dropout before a lazy layer draws random numbers before the layer's initial weights
    do; an untraced forward of the materialized model cannot draw the same ones, and
    validation says so rather than report a false mismatch."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Dropout(0.5), nn.LazyLinear(3)).train()
    tr = lurker.trace(model, torch.randn(4, 6))
    report = tr.validate()
    assert report.checked == len(tr.compute_ops)
    assert not report.output_checked
    assert "random op ran before a lazy module" in report.output_skipped
    assert "output not compared" in str(report)


def _changed_values(model: nn.Module, before: dict[str, torch.Tensor]) -> set[str]:
    now = dict(itertools.chain(model.named_parameters(), model.named_buffers()))
    return {n for n, t in now.items() if not torch.equal(t, before[n])}


def _values(model: nn.Module) -> dict[str, torch.Tensor]:
    named = itertools.chain(model.named_parameters(), model.named_buffers())
    return {n: t.detach().clone() for n, t in named}


def test_state_changes_lists_running_statistics_updated_in_place() -> None:
    """Batch norm in training mode updates its running statistics in place: the trace
    lists each one (the oracle: the buffers whose values differ after the forward), as
    the validation report does; in eval mode it lists nothing."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4))
    x = torch.randn(2, 3, 8, 8)
    before = _values(model.train())
    tr = lurker.trace(model, x)
    changed = _changed_values(model, before)
    assert len(changed) == 6
    assert sorted(tr.state_changes) == sorted(f"buffer {n} updated in place" for n in changed)
    assert sorted(tr.validate().state_changes) == sorted(tr.state_changes)
    before = _values(model.eval())
    tr = lurker.trace(model, x)
    assert _changed_values(model, before) == set() and tr.state_changes == []


def test_settled_trace_does_not_trace_again_for_values_written_in_place() -> None:
    """Running statistics updated in place do not change the graph: settled_trace runs
    the forward once (it traces again only for reassigned attributes and caches)."""
    from lurker.capture import settled_trace

    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).train()
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    tr = settled_trace(model, torch.randn(5, 3))
    assert tr.state_changes and len(calls) == 1


def test_saving_a_module_keeps_its_output_not_the_ops_inside_it():
    """save=["body"] keeps body's output; the ops inside body are freed as soon as nothing
    uses them (while the forward runs, and after it), not kept until the trace ends.
    Oracle: weak references to the storages the model's own code made."""
    from torch.multiprocessing.reductions import StorageWeakRef

    made: dict[str, StorageWeakRef] = {}
    freed_while_running: list[bool] = []

    def note(name: str, t: torch.Tensor) -> None:
        with torch._C.DisableTorchFunction():  # not an op of the model
            made[name] = StorageWeakRef(t.untyped_storage())

    class Block(nn.Module):
        def __init__(self, tag: str):
            super().__init__()
            self.tag = tag
            self.a, self.b = nn.Linear(64, 64), nn.Linear(64, 64)

        def forward(self, x):
            h = self.a(x)
            if self.tag == "second":  # the first block has returned: its insides are garbage
                freed_while_running.append(made["first.h"].expired())
            note(f"{self.tag}.h", h)
            g = torch.tanh(h)
            note(f"{self.tag}.g", g)
            return self.b(g)

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 64), nn.Sequential(Block("first"), Block("second")), nn.Linear(64, 2)
    )
    x = torch.randn(256, 8)
    with torch.no_grad():
        tr = lurker.trace(model, x, save=["1"])
        assert freed_while_running == [True]
        out1 = model[1](model[0](x))  # oracle: the module's output, by a plain forward
    gc.collect()
    assert [k for k, ref in made.items() if not ref.expired()] == []
    assert [op.label for op in tr.compute_ops if op.activation is not None] == [tr["1"].label]
    torch.testing.assert_close(tr["1"].activation, out1)
    assert tr.validate().output_checked
    from lurker.graph import OpRef  # the calls of the ops dropped are still described

    assert tr["1.0.a"].args[0] == OpRef(tr["0"].index, 0)


def test_run_refuses_save_names_that_match_nothing():
    """tr.run(x, save=["layer5"]) saved nothing, silently; it says so, with close names."""
    model = torchvision.models.resnet18().eval()
    tr = lurker.trace(model, torch.randn(1, 3, 32, 32), save="none")
    with pytest.raises(lurker.LurkerError, match=r"save=\['layer5'\].*Did you mean 'layer4'"):
        tr.run(torch.randn(2, 3, 32, 32), save=["layer5"])
    with pytest.raises(lurker.LurkerError, match=r"save=\(LSTM\) matches no module"):
        tr.run(torch.randn(2, 3, 32, 32), save=nn.LSTM)
    acts = tr.run(torch.randn(2, 3, 32, 32), save=["layer3"])
    with pytest.raises(KeyError, match=r"'layer2' \(relu_\d+\) was not saved.*save=\['layer2'\]"):
        acts["layer2"]


def test_run_saves_a_looped_op_by_its_rolled_label():
    """A loop's op is linear_1:1, linear_1:2 once traced; lurker.trace(save=["linear_1"])
    saves both passes, and so must tr.run(save=["linear_1"]) (it saved nothing, without
    an error: the label it matched was the pass's)."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for _ in range(2):
                x = self.fc(x).relu()
            return x

    net, x = Net().eval(), torch.randn(2, 4)
    tr = lurker.trace(net, x, save=["linear_1"])
    assert [op.label for op in tr.ops if op.activation is not None] == ["linear_1:1", "linear_1:2"]
    acts = tr.run(x, save=["linear_1"])
    first = net.fc(x)  # the oracle: the loop by hand
    torch.testing.assert_close(acts["linear_1:1"], first)
    torch.testing.assert_close(acts["linear_1:2"], net.fc(first.relu()))


def test_a_dropped_provisional_save_is_not_blamed_for_a_write_into_its_old_storage():
    """With save=[module], an op inside the module whose value dies when the call returns
    is dropped at once and its storage freed; the allocator may hand it to a new tensor,
    which an operator that does not declare its write then writes into. That write is
    into nothing the trace kept: validate must not refuse naming the dropped op."""
    pointers: set[int] = set()

    @torch.library.custom_op("lurker_test::bump_undeclared", mutates_args=())
    def bump(x: torch.Tensor) -> torch.Tensor:
        x.add_(1)  # writes, but its schema does not say so
        return x.clone()

    class Inner(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            t = x * 3  # t and u die when Inner returns: dropped then
            u = t.relu()
            pointers.update(v.untyped_storage().data_ptr() for v in (t, u))
            return u + 1

    reused: list[bool] = []

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = Inner()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x.clone()
            x.add_(0)  # an in-place op first: lurker tracks storages from here
            y = self.m(x)
            z = torch.zeros(256)
            reused.append(z.untyped_storage().data_ptr() in pointers)
            return y + bump(z)

    for _ in range(10):  # the allocator's choice: a few tries until it reuses
        reused.clear()
        tr = lurker.trace(Net(), torch.randn(256), save=["m"])
        if reused[0]:
            break
    else:
        pytest.skip("the allocator never handed a freed storage to the new tensor")
    assert not [op.label for op in tr.ops if op.stale]
    assert tr.validate().output_checked


def test_save_of_a_module_whose_result_is_discarded_warns_and_names_its_ops():
    """``self.aux(x)`` on its own line, or a module that returns its input: no value of the
    call is used outside it, so which op is its result cannot be told (a side value such as
    a logged mean must never be taken for it); save= naming it says so instead of saving
    nothing silently, and names an op label that does save it."""

    class Logger(nn.Module):
        def forward(self, x):
            self.stat = x.abs().mean()  # kept on the side; the module returns x
            return x

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.aux = nn.Sequential(nn.Linear(4, 3), nn.ReLU())
            self.log = Logger()
            self.main = nn.Linear(4, 2)

        def forward(self, x):
            self.aux(x)  # discarded
            return self.main(self.log(x))

    torch.manual_seed(0)
    model, x = M().eval(), torch.randn(2, 4)
    got: list[torch.Tensor] = []  # the oracle: what aux returned (no op in the hook)
    model.aux.register_forward_hook(lambda m, i, o: got.append(o))
    full = lurker.trace(model, x)
    assert full.modules["aux"].outputs == {} and full.modules["log"].outputs == {}
    with pytest.raises(KeyError, match=r"used outside it.*name an op inside it: abs_1, mean_1"):
        full["log"]  # not the logged mean
    with pytest.warns(UserWarning, match=r"module 'aux'.*save=\['relu_1'\]"):
        lurker.trace(model, x, save=["aux"])
    with pytest.warns(UserWarning, match=r"module 'log'.*save=\['mean_1'\]"):
        lurker.trace(model, x, save=["log"])
    tr = lurker.trace(model, x, save=["relu_1"])  # what the warning says to do
    torch.testing.assert_close(tr["relu_1"].activation, got[-1], rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lurker.trace(model, x, save=["main"])  # a module whose result is used: silent


def test_a_second_backward_leaves_the_first_ones_gradients_and_says_why():
    """A second trace.backward() (the autograd graph freed by the first) ran the output's
    gradient hook before torch refused the freed graph: the output op's gradient became
    the sum of both, silently, and the error was torch's. Now every gradient stays the
    first backward's (the oracle: autograd on a plain forward), and the error says why;
    a gradient unlike the output is refused by name instead of torch's shape error."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    x = torch.randn(5, 4)
    h1 = model[0](x)
    out = model[2](model[1](h1))
    g1, go = torch.autograd.grad(out[:, 1].sum(), [h1, out])
    for again in (
        lambda tr: tr.backward(output=lambda out: out[:, 1].sum()),
        lambda tr: tr.output[:, 1].sum().backward(),  # the user's own, first
    ):
        tr = lurker.trace(model, x, grads=True)
        again(tr)
        with pytest.raises(lurker.LurkerError, match="freed by an earlier backward") as err:
            tr.backward(output=lambda out: out[:, 1].sum())
        assert "trace again" in str(err.value)
        torch.testing.assert_close(tr["0"].grad, g1)
        torch.testing.assert_close(tr["2"].grad, go)
    tr = lurker.trace(model, x, grads=True)
    for bad, said in ((torch.ones(3), r"got \(3,\) on cpu"), (2.0, "got float")):
        with pytest.raises(
            lurker.LurkerError, match=rf"output it differentiates, \(5, 3\) on cpu; {said}"
        ):
            tr.backward(bad)
    assert tr["2"].grad is None
    tr.backward(torch.ones(5, 3))  # still possible: nothing ran
    torch.testing.assert_close(tr["2"].grad, torch.ones(5, 3))
