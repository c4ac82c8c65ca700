"""Activations over a stimulus set with ``transform=``, checked against forward hooks."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import lurker


class Block(nn.Module):
    """conv -> batch norm -> in-place ReLU, as in a ResNet: the ReLU overwrites the
    batch norm's output, and the block's call holds the norm's running statistics."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.bn = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.bn(self.conv(x)))


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(Block(3, 6), Block(6, 4), nn.Flatten(), nn.Linear(4 * 8 * 8, 5))
    with torch.no_grad():  # batch norms that shift values below zero, so ReLU changes them
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    return model.eval()


def _hooked(model: nn.Module, names: list[str], x: Tensor) -> dict[str, Tensor]:
    """The oracle: each module's output as a plain forward hook sees it, copied."""
    seen: dict[str, Tensor] = {}
    mods = dict(model.named_modules())
    handles = [
        mods[n].register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, o.detach().clone()))
        for n in names
    ]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return seen


@pytest.mark.parametrize(
    "transform",
    [lambda t: t.flatten(1), lambda t: t, lambda t: t[:, :3]],
    ids=["flatten", "identity", "slice"],
)
def test_a_transform_returning_a_view_keeps_the_value_before_an_inplace_op(
    transform: Callable[[Tensor], Tensor],
):
    # a view of the batch norm's output shared its storage with the tensor the in-place
    # ReLU then overwrote: the saved "bn" values were silently the ReLU's
    model = _model()
    x = torch.randn(4, 3, 8, 8)
    oracle = _hooked(model, ["0.bn", "1.bn"], x)
    assert all((v < 0).any() for v in oracle.values())  # the ReLU does change them
    tr = lurker.trace(model, x[:1], save=["0.bn", "1.bn"], transform=transform)
    with torch.no_grad():
        acts = tr.run(x)
    traced = lurker.trace(model, x, save=["0.bn", "1.bn"], transform=transform)
    for name, want in oracle.items():
        assert torch.equal(acts[name], transform(want)), name
        assert torch.equal(traced[name].activation, transform(want)), name


def test_a_spatial_mean_of_saved_modules_over_batches_matches_forward_hooks():
    # transform= t.mean((2, 3)) with save= naming modules that hold batch norms: it used
    # to run on the norms' 1-D running statistics too, and the trace failed
    model = _model()
    stimuli = torch.randn(23, 3, 8, 8)
    layers = ["0", "1"]
    tr = lurker.trace(model, stimuli[:1], save=layers, transform=lambda t: t.mean((2, 3)))
    oracle = _hooked(model, layers, stimuli)
    for batch_size in (1, 5, 23):
        out: dict[str, list[Tensor]] = {n: [] for n in layers}
        with torch.no_grad():
            for batch in stimuli.split(batch_size):
                acts = tr.run(batch)
                kept = {tr[n].label for n in layers} | {"output_1"}
                assert set(acts) == kept  # nothing inside the modules is kept
                for n in layers:
                    out[n].append(acts[n])
        for n in layers:
            got = torch.cat(out[n])
            assert got.shape == (23, model[int(n)].conv.out_channels)
            torch.testing.assert_close(got, oracle[n].mean((2, 3)), rtol=1e-5, atol=1e-6)


def test_a_transform_that_raises_is_named_not_the_model():
    model = _model()
    with pytest.raises(lurker.TraceError, match=r"transform= raised IndexError .*shape \(2, 5\)"):
        lurker.trace(model, torch.randn(2, 3, 8, 8), save=["3"], transform=lambda t: t.mean((2, 3)))
    tr = lurker.trace(model, torch.randn(2, 3, 8, 8), save=["3"])
    tr._transform = lambda t: t.mean((2, 3))  # (as if traced with it on another layer)
    with pytest.raises(lurker.LurkerError, match=r"transform= raised .* linear_1 of shape"):
        tr.run(torch.randn(2, 3, 8, 8))


class _Tanh(nn.Module):
    """conv -> tanh -> conv: no op of its own writes in place, so any write into a saved
    value is the transform's."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 6, 3), nn.Tanh(), nn.Conv2d(6, 4, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).mean((2, 3))


@pytest.mark.parametrize(
    "transform",
    [lambda t: t.relu_(), lambda t: t.sub_(t.mean()).mean((2, 3))],
    ids=["relu_", "sub_-then-mean"],
)
def test_a_transform_that_writes_into_the_activation_is_refused_not_a_changed_forward(
    transform: Callable[[Tensor], Tensor],
):
    # the transform gets the model's own tensor (detached, not copied): one that wrote
    # into it changed the rest of the forward, and the trace's output and every later
    # saved value were silently not the model's (0.3-0.7 off its plain forward)
    model = _Tanh().eval()
    x = torch.randn(3, 3, 12, 12)
    stimuli = x.clone()
    with torch.no_grad():
        plain = model(x)
    for name in ("net.0", "input_1"):
        with pytest.raises(lurker.TraceError, match=r"transform= changed .* in place") as err:
            lurker.trace(model, x, save=[name, "net.2"], transform=transform)
        assert err.value.failed_op == ("conv2d_1" if name == "net.0" else "input_1")
        # the caller's stimuli are as they were (the transform wrote into a copy of them)
        assert torch.equal(x, stimuli)
    with torch.no_grad():  # the model is as it was: its forward is the plain one
        torch.testing.assert_close(model(x), plain, rtol=0, atol=0)
    # a batch norm's running statistics (buffers, which save="all" keeps) are not written
    bn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    state = {k: v.clone() for k, v in bn.state_dict().items()}
    with pytest.raises(lurker.TraceError, match=r"transform= changed"):
        lurker.trace(bn, x, transform=lambda t: t.abs_())
    assert all(torch.equal(v, state[k]) for k, v in bn.state_dict().items())
    tr = lurker.trace(
        model, x[:1], save=["input_1"], transform=lambda t: t.mul_(2) if len(t) > 1 else t
    )
    with pytest.raises(lurker.LurkerError, match=r"transform= changed"):
        tr.run(x)
    assert torch.equal(x, stimuli)
    # a run of a trace whose transform writes only into larger batches is refused too
    tr = lurker.trace(
        model,
        x[:1],
        save=["net.0"],
        transform=lambda t: t.relu_() if t.shape[0] > 1 else t.mean((2, 3)),
    )
    with pytest.raises(lurker.LurkerError, match=r"transform= changed the output of conv2d_1"):
        tr.run(x)
    good = lurker.trace(model, x[:1], save=["net.0"], transform=lambda t: t.relu().mean((2, 3)))
    with torch.no_grad():
        acts = good.run(x)
    torch.testing.assert_close(acts.output, plain, rtol=0, atol=0)
    oracle = _hooked(model, ["net.0"], x)["net.0"]
    torch.testing.assert_close(acts["net.0"], oracle.relu().mean((2, 3)), rtol=0, atol=0)


class _Views(nn.Module):
    """A forward whose ops hand back views of tensors from outside it: ``flatten`` of the
    caller's input, a slice of a parameter (a ViT's ``pos_embed[:, 1:]``)."""

    def __init__(self) -> None:
        super().__init__()
        self.pos = nn.Parameter(torch.randn(1, 8) - 0.5)
        self.lin = nn.Linear(8, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(x.flatten(1) + self.pos[:, :8])


@pytest.mark.parametrize(("shape", "op"), [((2, 8), "flatten"), ((1, 8), "getitem")])
def test_a_refused_transform_leaves_the_stimuli_and_weights_an_op_views_unchanged(
    shape: tuple[int, ...], op: str
):
    # an op's output that views the caller's input or a parameter was handed to the
    # transform as it is: the write was refused, but it had reached the stimuli or the
    # weight, so a rerun after fixing the transform read other stimuli, another model
    torch.manual_seed(0)
    model = _Views().eval()
    weight = model.pos.detach().clone()

    armed = [True]

    def writes(t: Tensor) -> Tensor:  # in place on the one value of this shape, if armed
        return t.relu_() if armed[0] and tuple(t.shape) == shape else t.float()

    x = torch.randn(2, 2, 4) - 0.5
    stimuli = x.clone()
    with pytest.raises(lurker.TraceError, match=rf"transform= changed the output of {op}"):
        lurker.trace(model, x, transform=writes)
    assert torch.equal(x, stimuli) and torch.equal(model.pos.detach(), weight)
    armed[0] = False
    tr = lurker.trace(model, x, transform=writes)
    armed[0] = True  # the run applies the trace's transform
    with pytest.raises(lurker.LurkerError, match=rf"transform= changed the output of {op}_1"):
        tr.run(x)
    assert torch.equal(x, stimuli) and torch.equal(model.pos.detach(), weight)
    # a transform that writes nothing keeps the values the op made
    good = lurker.trace(model, x, transform=lambda t: t * 2)
    want = {"flatten": x.flatten(1), "getitem": model.pos.detach()[:, :8]}[op]
    torch.testing.assert_close(good[f"{op}_1"].activation, want * 2, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("transform", "kind"),
    [
        (lambda t: (t.mean((2, 3)), t.amax((2, 3))), "tuple"),
        (lambda t: t.mean().item(), "float"),
        (lambda t: t.mean((2, 3)).numpy(), "ndarray"),
        (lambda t: None, "NoneType"),
    ],
    ids=["tuple", "float", "numpy", "none"],
)
def test_a_transform_that_returns_no_tensor_is_named_not_the_model(
    transform: Callable[[Tensor], object], kind: str
):
    # its result reached the memory guard's `.nbytes` and the error blamed the model's own
    # code ("Sequential raised AttributeError ... in its own code"), or was kept as it was
    model = _model()
    x = torch.randn(2, 3, 8, 8)
    said = rf"transform= returned {kind} on the output of conv2d .* not a tensor.*torch\.stack"
    with pytest.raises(lurker.TraceError, match=said) as err:
        lurker.trace(model, x, save=["0.conv"], transform=transform)
    assert err.value.failed_op == "conv2d_1"
    assert "in its own code" not in str(err.value)


def _dropout_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3))


def test_a_run_keeping_activations_of_a_model_in_training_mode_warns():
    # timm and torchvision build models in training mode: a stimulus set's activations
    # were silently random (dropout), with nothing to say so
    model = _dropout_model()  # left in training mode, as built
    x = torch.randn(8, 6)
    tr = lurker.trace(model, x[:1], save=["2"])
    said = r"training mode, where 2 \(Dropout\).*model\.eval\(\)"
    with pytest.warns(UserWarning, match=said), torch.no_grad():
        first, second = tr.run(x)["2"], tr.run(x)["2"]
    assert not torch.equal(first, second)  # what the warning is about: each run differs
    model.eval()  # the same trace, the model's mode as it is now: no warning, the hook's values
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            got = tr.run(x)["2"]
    torch.testing.assert_close(got, _hooked(model, ["2"], x)["2"], rtol=0, atol=0)


def test_a_run_warns_of_one_dropout_left_in_training_mode_in_a_model_in_eval_mode():
    # model.eval() and then one layer switched back (fine-tuning code, MC dropout): only
    # the root's mode was read, and the run's activations were silently random
    model = _dropout_model().eval()
    x = torch.randn(8, 6)
    tr = lurker.trace(model, x[:1], save=["2"])
    model[2].train()
    said = (
        r"eval mode, but 2 \(Dropout\) is in training mode and computes otherwise.*model\.eval\(\)"
    )
    with pytest.warns(UserWarning, match=said), torch.no_grad():
        first, second = tr.run(x)["2"], tr.run(x)["2"]
    assert not torch.equal(first, second)  # what the warning is about: each run differs
    model[2].eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            tr.run(x)


def test_a_run_that_keeps_nothing_does_not_warn_of_training_mode():
    # lurker's own replays (explain, probe) keep nothing and say it themselves, or switch
    # the model to eval mode
    model = _dropout_model()
    tr = lurker.trace(model, torch.randn(1, 6))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tr.run(torch.randn(4, 6), save="none")


def test_saving_an_identity_module_by_name_warns_and_its_lookup_says_why():
    # timm's fc_norm and ls1 are nn.Identity: save= accepted the name, saved nothing, and
    # reading it said only "produced no tensor output"
    model = nn.Sequential(nn.Linear(3, 4), nn.Identity(), nn.ReLU()).eval()
    x = torch.randn(2, 3)
    with pytest.warns(UserWarning, match=r"save= names module '1' \(Identity\), but no op ran"):
        tr = lurker.trace(model, x, save=["1", "2"])
    with pytest.raises(KeyError, match=r"'1' \(Identity\) ran no op.*returns its input"):
        tr.run(x)["1"]
    with warnings.catch_warnings():  # a glob that covers it is no request for it by name
        warnings.simplefilter("error")
        lurker.trace(model, x, save=["*"])


def test_a_pass_of_a_module_named_in_save_points_at_the_module():
    # acts["block.relu"] asks for a pass ('block.relu:2'), which save= refused with
    # no word of how a pass is saved
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18().eval()
    with pytest.raises(lurker.LurkerError, match=r"save=\['layer1.0.relu'\] keeps them all"):
        lurker.trace(model, torch.randn(1, 3, 32, 32), save=["layer1.0.relu:2"])
    tr = lurker.trace(model, torch.randn(1, 3, 32, 32), save=["layer1.0.relu"])
    with pytest.raises(KeyError, match="name a pass"):
        tr.run(torch.randn(2, 3, 32, 32))["layer1.0.relu"]


def test_rdms_of_resnet18_layers_overwritten_in_place_match_forward_hooks():
    # torchvision's BasicBlock adds the shortcut into bn2's output in place (out +=
    # identity) and its ReLU is in place: the oracle is a copy with both out of place
    torchvision = pytest.importorskip("torchvision")
    from torchvision.models.resnet import BasicBlock

    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    ref = copy.deepcopy(model)

    def out_of_place(self: BasicBlock, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return torch.relu(out + shortcut)

    for m in ref.modules():
        if isinstance(m, BasicBlock):
            m.forward = out_of_place.__get__(m)
    layers = ["layer1.0.bn2", "layer2.1.bn2", "layer3", "layer4.1.bn2", "fc"]
    stimuli = torch.randn(20, 3, 32, 32)
    oracle = _hooked(ref, layers, stimuli)
    tr = lurker.trace(model, stimuli[:1], save=layers, transform=lambda t: t.flatten(1))
    with torch.no_grad():
        runs = [tr.run(batch) for batch in stimuli.split(6)]
    for name in layers:
        got = torch.cat([acts[name] for acts in runs]).double().numpy()
        want = oracle[name].flatten(1).double().numpy()
        np.testing.assert_allclose(1 - np.corrcoef(got), 1 - np.corrcoef(want), atol=1e-5)
