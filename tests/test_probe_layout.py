"""The probe reads units from the right axis on every layout (lurker.probe.layout).

Oracle: a plain forward of the whole dataset with forward hooks on the probed modules,
the outputs permuted by hand to (N, C, *positions) as the architecture is known to lay
them out (channels-last Swin, sequence-first attention, ViT tokens), and top-k, peaks and
class means computed from those by numpy.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import Tensor, nn

import lurker
from lurker.errors import LurkerError
from lurker.probe import UnitImages, probe, select_layers
from lurker.probe.layout import Layout, Skip, infer_layouts, layer_layout

N, K, CLASSES = 20, 3, 3


def _data(seed: int = 0, size: int = 32) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(N, 3, size, size, generator=g)
    return torch.utils.data.TensorDataset(xs, torch.arange(N) % CLASSES)


def _brute(model: nn.Module, ds, modules: dict[str, Callable[[Tensor], Tensor]]):
    """Each module's output for every sample, permuted by ``modules[name]`` to (N, C, ...)."""
    found: dict[str, Tensor] = {}
    mods = dict(model.named_modules())
    hooks = []
    for name, perm in modules.items():

        def hook(m, i, o, name=name, perm=perm):
            o = o[0] if isinstance(o, tuple) else o
            found[name] = perm(o.detach()).contiguous().clone()

        hooks.append(mods[name].register_forward_hook(hook))
    xs = torch.stack([ds[i][0] for i in range(len(ds))])
    with torch.no_grad():
        model(xs)
    for h in hooks:
        h.remove()
    return found


def _topk(vals: np.ndarray, k: int) -> list[int]:
    ids = np.arange(len(vals))
    return np.lexsort((ids, -vals))[:k].tolist()


def _check(run: lurker.Run, name: str, act: Tensor, labels: np.ndarray) -> None:
    """The run's statistics of layer ``name`` equal brute force on ``act`` (N, C, *pos)."""
    info = run.layer(name)
    assert info.num_units == act.shape[1], (name, info.num_units, tuple(act.shape))
    flat = act.flatten(2) if act.dim() > 2 else act.unsqueeze(-1)
    means, maxs = flat.mean(2).numpy(), flat.amax(2).numpy()
    argmax = flat.argmax(2).numpy()
    width = act.shape[-1] if act.dim() >= 3 else 1

    def peaks(u: int, exp: list[int], got: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """Where unit u peaks (its first maximum) on samples ``exp``; where values within
        float rounding of the maximum tie (F.normalize's 1.0 at several tokens: which one
        is first depends on the last bit, which another batching changes), the position
        the run gives (``got``) if it is one of them."""
        out = []
        for i, (y, x) in zip(exp, got):
            row = flat[i, u]
            near = (row >= maxs[i, u] - (1e-5 * abs(maxs[i, u]) + 1e-6)).nonzero().flatten()
            pos = y * width + x if act.dim() >= 4 else x
            first = pos if len(near) > 1 and pos in near.tolist() else int(argmax[i, u])
            out.append(
                (0, 0) if act.dim() == 2 else (0, first) if act.dim() == 3 else divmod(first, width)
            )
        return out

    for u in range(act.shape[1]):
        unit = run.unit(name, u)
        top = unit.top("mean")
        exp = _topk(means[:, u], K)
        assert [e.sample_id for e in top] == exp, (name, u)
        np.testing.assert_allclose([e.value for e in top], means[exp, u], rtol=1e-4, atol=1e-6)
        # the mean list keeps where each of its samples peaked, as the max list does
        got = [(e.y, e.x) for e in top]
        assert got == peaks(u, exp, got), (name, u, "mean")
        top = unit.top("max")
        exp = _topk(maxs[:, u], K)
        assert [e.sample_id for e in top] == exp, (name, u)
        np.testing.assert_allclose([e.value for e in top], maxs[exp, u], rtol=1e-5, atol=1e-6)
        got = [(e.y, e.x) for e in top]
        assert got == peaks(u, exp, got), (name, u)
        cm = unit.class_mean_array()
        for c in range(CLASSES):
            np.testing.assert_allclose(cm[c], means[labels == c, u].mean(), rtol=1e-4, atol=1e-6)


def _probe(model: nn.Module, tmp_path: Path, **kw) -> tuple[lurker.Run, Any]:
    ds = _data()
    torch.manual_seed(0)
    run = probe(
        model, ds, out=tmp_path / "run", k=K, batch_size=7, device="cpu", progress=False, **kw
    )
    return run, ds


def _labels() -> np.ndarray:
    return (np.arange(N) % CLASSES).astype(np.int64)


TOKENS_LAST = lambda o: o.permute(0, 2, 1)  # noqa: E731 - (N, L, C) -> (N, C, L)
NHWC = lambda o: o.permute(0, 3, 1, 2)  # noqa: E731 - (N, H, W, C) -> (N, C, H, W)


def _vit() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32,
        num_classes=5,
    ).eval()  # fmt: skip


def test_torchvision_vit_blocks_and_mlp_equal_brute_force(tmp_path: Path):
    model = _vit()
    run, ds = _probe(model, tmp_path)
    names = [info.name for info in run.layers]
    blocks = [f"encoder.layers.encoder_layer_{i}" for i in range(2)]
    hidden = [f"encoder.layers.encoder_layer_{i}.mlp.1" for i in range(2)]
    assert set(blocks + hidden) <= set(names)
    # no attention internals, reshapes or folded-batch ops among the defaults
    assert not [n for n in names if "self_attention" in n or n.startswith(("view", "reshape"))]
    acts = _brute(model, ds, dict.fromkeys(blocks + hidden, TOKENS_LAST))
    for name in blocks + hidden:
        _check(run, name, acts[name], _labels())
        layout = run.layer(name).layout
        assert layout["batch"] == 0 and layout["unit"] == 2 and layout["positions"] == [1]
    # each token maps back to its 8x8 patch; the class token (0) has no position
    images = UnitImages(run, model=model, dataset=ds)
    for t in range(1, 17):
        i, j = divmod(t - 1, 4)
        assert images.box(blocks[1], 0, t) == (8 * i, 8 * i + 8, 8 * j, 8 * j + 8)
    assert images.box(blocks[1], 0, 0) == (0, 32, 0, 32)
    assert run.layer(blocks[0]).layout["boxes"][0] is None
    # the peak the viewer re-finds on a sample is the stored one
    for u in range(3):
        e = run.unit(hidden[0], u).top("max")[0]
        assert images.peak(hidden[0], u, e.sample_id) == (e.y, e.x)
    # the mean list's too (the same first-maximum rule), and its crops are cut around it
    for u in range(4):
        top = run.unit(blocks[1], u).top("mean")
        stored = [(e.y, e.x) for e in top]
        assert [images.peak(blocks[1], u, e.sample_id) for e in top] == stored
        assert images.peaks(blocks[1], u, "mean") == stored
        for r, (y, x) in enumerate(stored):
            assert images.crop_box(blocks[1], u, "mean", r) == images.box(blocks[1], y, x)
    # unit images of a token layer: the crop is the peak token's patch (or the whole image)
    from lurker.probe.data import input_image
    from lurker.probe.images import crop

    e = run.unit(blocks[1], 0).top("max")[0]
    box = images.box(blocks[1], e.y, e.x)
    expected = crop(input_image(images.dataset, e.sample_id), box)
    with Image.open(images.get("crop", blocks[1], 0, 0, "max")) as made:
        np.testing.assert_array_equal(np.asarray(made), np.asarray(expected))
    assert images.get("grad", blocks[1], 0, 0, "max").exists()


def test_swin_units_are_channels_not_rows(tmp_path: Path):
    from torchvision.models.swin_transformer import SwinTransformer

    torch.manual_seed(0)
    model = SwinTransformer(
        patch_size=[4, 4], embed_dim=8, depths=[2, 2], num_heads=[1, 2], window_size=[2, 2],
        num_classes=5,
    ).eval()  # fmt: skip
    tr = lurker.trace(model, _data()[0][0].unsqueeze(0))
    default = {layer.name for layer in select_layers(tr)}
    assert {"features.1.0", "features.1.1", "features.1.0.mlp.1", "features.3.1"} <= default
    mlp0 = "features.1.0.mlp.0"  # Linear on (N, 8, 8, 8) -> (N, 8, 8, 32): 32 units, not 8 rows
    layers = ["features.1.0", "features.1.0.mlp.1", "features.3.1", mlp0]
    run, ds = _probe(model, tmp_path, layers=layers)
    assert run.layer(mlp0).num_units == 32 and run.layer(mlp0).shape == (8, 8, 32)
    acts = _brute(model, ds, dict.fromkeys(layers, NHWC))
    for name in layers:
        _check(run, name, acts[name], _labels())
    # window attention folds windows into the batch: such ops are skipped with that reason
    layouts = infer_layouts(tr)
    folded = [
        op
        for op in tr.ops
        if isinstance(layouts.get(op.index), Skip) and "folded" in layouts[op.index].reason
    ]
    assert folded
    with pytest.raises(LurkerError, match="folded") as err:
        select_layers(tr, folded[0].label)
    # naming a unit axis cannot unfold the batch: the error names where it is whole again
    assert "unit_dim" not in str(err.value) and "has an axis of its own again at" in str(err.value)
    # the same for explain's and featviz's layer_layout, whatever its caller's hint
    with pytest.raises(LurkerError, match="folded") as err:
        layer_layout(tr, folded[0].label, hint="name the axis with unit_dim=")
    assert "unit_dim" not in str(err.value) and "instead." in str(err.value), str(err.value)


def test_maxvit_units_are_channels_not_windows(tmp_path: Path):
    torch.manual_seed(0)
    model = torchvision.models.MaxVit(
        input_size=(32, 32), stem_channels=8, partition_size=2, block_channels=[8, 16],
        block_layers=[1, 1], head_dim=4, stochastic_depth_prob=0.0, num_classes=5,
    ).eval()  # fmt: skip
    base = "blocks.0.layers.0.layers"
    lin = f"{base}.window_attention.mlp_layer.1"  # (N, 16 windows, 4, 32): 32 units
    # a block's output is recorded under its innermost module (here the departition op)
    grid_out = f"{base}.grid_attention"
    block_out = "blocks.1.layers.0.layers.grid_attention.departition_op"
    layers = [lin, f"{base}.window_attention.mlp_layer.2", grid_out, "blocks.1"]
    run, ds = _probe(model, tmp_path, layers=layers)
    assert run.layer(lin).num_units == 32
    perms = {
        lin: NHWC,
        f"{base}.window_attention.mlp_layer.2": NHWC,
        grid_out: lambda o: o,  # departitioned back to (N, C, H, W)
        "blocks.1": lambda o: o,
    }
    acts = _brute(model, ds, perms)
    acts[f"{grid_out}.departition_op"] = acts.pop(grid_out)
    acts[block_out] = acts.pop("blocks.1")
    assert sorted(acts) == sorted(info.name for info in run.layers)
    for name, act in acts.items():
        _check(run, name, act, _labels())


class SeqFirst(nn.Module):
    """Patch tokens through a sequence-first nn.MultiheadAttention: (L, N, E) inside."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 8, stride=8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=False)
        self.fc1 = nn.Linear(8, 12)
        self.act = nn.ReLU()
        self.head = nn.Linear(12, 5)

    def forward(self, x: Tensor) -> Tensor:
        t = self.patch(x).flatten(2).permute(2, 0, 1)  # (L, N, E)
        a, _ = self.attn(t, t, t, need_weights=False)
        h = self.act(self.fc1(a + t))
        return self.head(h.mean(0))


def test_seq_first_attention_equal_brute_force(tmp_path: Path):
    torch.manual_seed(0)
    model = SeqFirst().eval()
    layers = ["patch", "attn", "fc1", "act", "head"]
    run, ds = _probe(model, tmp_path, layers=layers)
    seq = lambda o: o.permute(1, 2, 0)  # noqa: E731 - (L, N, C) -> (N, C, L)
    perms = {"patch": lambda o: o, "attn": seq, "fc1": seq, "act": seq, "head": lambda o: o}
    acts = _brute(model, ds, perms)
    for name in layers:
        _check(run, name, acts[name], _labels())
    assert run.layer("attn").layout["batch"] == 1 and run.layer("attn").layout["unit"] == 2
    # tokens of the seq-first layers still map to their patches
    images = UnitImages(run, model=model, dataset=ds)
    assert images.box("act", 0, 5) == (8, 16, 8, 16)
    # default layers on a transformer: the patch conv and the MLP hidden layer
    assert {"patch", "act"} <= {
        layer.name for layer in select_layers(lurker.trace(model, ds[0][0][None]))
    }


def test_timm_vit_equal_brute_force(tmp_path: Path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2, num_classes=5
    ).eval()
    run, ds = _probe(model, tmp_path)
    names = {info.name for info in run.layers}
    layers = ["blocks.0", "blocks.1", "blocks.0.mlp.act", "blocks.1.mlp.act"]
    assert set(layers) <= names
    acts = _brute(model, ds, dict.fromkeys(layers, TOKENS_LAST))
    for name in layers:
        _check(run, name, acts[name], _labels())
    images = UnitImages(run, model=model, dataset=ds)
    assert images.box("blocks.1", 0, 16) == (24, 32, 24, 32)


class Einsum(nn.Module):
    """A layout lurker cannot know: an einsum moves the channels last."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, stride=2)
        self.act = nn.ReLU()
        self.head = nn.Linear(6, 5)

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(torch.einsum("bchw->bhwc", self.conv(x)))
        return self.head(h.mean((1, 2)))


def test_unknown_layout_is_skipped_named_error_or_unit_dim(tmp_path: Path):
    torch.manual_seed(0)
    model = Einsum().eval()
    ds = _data()
    tr = lurker.trace(model, ds[0][0][None])
    with pytest.raises(LurkerError, match="unit_dim") as err:
        select_layers(tr, "act")
    assert "cannot tell which axis" in str(err.value)
    # default layers: the relu is skipped and listed, the others probed
    run = probe(
        model, ds, out=tmp_path / "default", k=K, batch_size=7, device="cpu", progress=False
    )
    assert [s["layer"] for s in run.meta["skipped_layers"]] == ["act"]
    assert "act" not in {info.name for info in run.layers}
    # named by the user: the right units, equal to brute force
    run = probe(
        model, ds, out=tmp_path / "named", layers=["act"], unit_dim={"act": -1}, k=K,
        batch_size=7, device="cpu", progress=False,
    )  # fmt: skip
    assert run.layer("act").layout["source"] == "unit_dim"
    _check(run, "act", _brute(model, ds, {"act": NHWC})["act"], _labels())


def test_layout_units_view_and_json_round_trip():
    lay = Layout(batch=1, unit=3, positions=(0, 2), boxes=None)
    t = torch.randn(5, 2, 4, 7)  # (L0, B, L2, C)
    assert torch.equal(lay.units(t), t.permute(1, 3, 0, 2))
    assert Layout.from_dict(lay.to_dict()) == lay
    many = Layout(0, 1, (2, 3, 4))
    assert many.units(torch.randn(2, 3, 4, 5, 6)).shape == (2, 3, 20, 6)


def test_cli_unit_dim(tmp_path: Path):
    from click.testing import CliRunner

    from lurker.cli import main

    spec = tmp_path / "einsum_net.py"
    spec.write_text(
        "import torch\nfrom torch import nn\n\n"
        "class Net(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.conv = nn.Conv2d(1, 4, 3, stride=2)\n"
        "        self.act = nn.ReLU()\n\n"
        "    def forward(self, x):\n"
        "        return self.act(torch.einsum('bchw->bhwc', self.conv(x))).mean((1, 2))\n"
    )
    base = [f"{spec}:Net", "--data", "digits", "--image-size", "8", "--k", "2", "--device", "cpu"]
    res = CliRunner().invoke(main, ["probe", *base, "--out", str(tmp_path / "a"), "-l", "act"])
    assert res.exit_code == 2 and "--unit-dim" in res.output and "act" in res.output
    res = CliRunner().invoke(
        main, ["probe", *base, "--out", str(tmp_path / "b"), "--unit-dim", "x"]
    )
    assert res.exit_code == 2 and "LAYER=AXIS" in res.output
    out = tmp_path / "c"
    res = CliRunner().invoke(main, ["probe", *base, "--out", str(out), "--unit-dim", "act=-1"])
    assert res.exit_code == 0, res.output
    run = lurker.Run.open(out)
    assert run.layer("act").num_units == 4 and run.layer("act").layout["unit"] == 3
    res = CliRunner().invoke(main, ["probe", *base, "--out", str(tmp_path / "d")])
    assert res.exit_code == 0, res.output
    assert "skipped 1 layers" in res.output and "act" in res.output


class OneAtATime(nn.Module):
    """Flattens the whole batch into one row: it cannot take batches."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * 32 * 32, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x.reshape(1, -1))


def test_model_that_cannot_take_batches_gets_a_clear_error(tmp_path: Path):
    tr = lurker.trace(OneAtATime().eval(), _data()[0][0][None])
    with pytest.raises(LurkerError, match="batches of 2 and 3") as err:
        select_layers(tr)
    assert "must accept them" in str(err.value)


def test_unit_dim_mistakes_are_named():
    model = Einsum().eval()
    tr = lurker.trace(model, _data()[0][0][None])
    with pytest.raises(LurkerError, match="match none of the layers") as err:
        select_layers(tr, ["act"], unit_dim={"act": -1, "nothing.*": 2})
    assert "nothing.*" in str(err.value) and "act" in str(err.value)
    with pytest.raises(LurkerError, match="unit_dim must be"):
        select_layers(tr, ["act"], unit_dim="last")  # type: ignore[arg-type]
    with pytest.raises(LurkerError, match="batch axis"):
        select_layers(tr, ["act"], unit_dim={"act": 0})


def test_unit_gradient_follows_the_layout():
    """Gradient of one token's unit (a GELU model: guided backprop is plain autograd here)."""
    from lurker.probe.images import unit_gradient

    model = _vit()
    x = _data()[0][0]
    tr = lurker.trace(model, x[None])
    layer = next(la for la in select_layers(tr) if la.name.endswith("encoder_layer_0.mlp.1"))
    unit, token = 5, 7
    grad = unit_gradient(
        tr, layer.op.index, x, unit, "max", peak=(0, token), layout=layer.layout.to_dict()
    )
    xin = x[None].clone().requires_grad_(True)
    found = {}
    mod = dict(model.named_modules())["encoder.layers.encoder_layer_0.mlp.1"]
    h = mod.register_forward_hook(lambda m, i, o: found.setdefault("o", o))
    model(xin)
    h.remove()
    (expected,) = torch.autograd.grad(found["o"][0, token, unit], xin)
    torch.testing.assert_close(grad, expected[0], rtol=1e-4, atol=1e-6)


def test_runs_without_the_layout_column_still_open_and_resume(tmp_path: Path):
    import sqlite3

    torch.manual_seed(0)
    model, ds, out = Einsum().eval(), _data(), tmp_path / "run"
    kw = {"out": out, "layers": ["conv"], "k": K, "batch_size": 7, "device": "cpu"}
    probe(model, ds, progress=False, **kw)
    with sqlite3.connect(out / "run.db") as db:  # as a lurker before layouts wrote it
        db.execute("ALTER TABLE layers DROP COLUMN layout")
        db.execute("DELETE FROM meta WHERE key = 'probed_with'")  # (which it did not record)
    run = lurker.Run.open(out)
    assert run.layer("conv").layout is None and run.layer("conv").num_units == 6
    images = UnitImages(run, model=model, dataset=ds)
    e = run.unit("conv", 2).top("max")[0]
    assert images.peak("conv", 2, e.sample_id) == (e.y, e.x)  # read as (N, C, H, W)
    run.close()
    run = probe(model, ds, progress=False, **kw)  # rewriting it adds the column
    assert run.layer("conv").layout["unit"] == 1


def test_swin_v2_position_bias_mlp_is_not_a_default_layer():
    """Its continuous position bias MLP runs on a table, not on samples: not listed."""
    from torchvision.models.swin_transformer import (
        PatchMergingV2,
        SwinTransformer,
        SwinTransformerBlockV2,
    )

    torch.manual_seed(0)
    model = SwinTransformer(
        patch_size=[4, 4], embed_dim=8, depths=[2, 2], num_heads=[1, 2], window_size=[2, 2],
        num_classes=5, block=SwinTransformerBlockV2, downsample_layer=PatchMergingV2,
    ).eval()  # fmt: skip
    tr = lurker.trace(model, _data()[0][0][None])
    skipped: list[tuple[str, str]] = []
    names = [layer.name for layer in select_layers(tr, skipped=skipped)]
    assert skipped == [] and not [n for n in names if "cpb_mlp" in n]
    assert {"features.1.0", "features.1.0.mlp.1"} <= set(names)
    with pytest.raises(LurkerError, match="does not depend on the batch"):
        select_layers(tr, "features.1.0.attn.cpb_mlp.1")


class _CachesOnFirstCall(nn.Module):
    """Like timm's LeViT: the first eval forward computes a bias and caches it, so every
    later forward runs fewer ops than the first."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.table = nn.Parameter(torch.randn(4))
        self.cache: dict[str, Tensor] = {}

    def forward(self, x: Tensor) -> Tensor:
        if "bias" not in self.cache:
            self.cache["bias"] = (self.table * 2).tanh()[None, :, None, None]
        return torch.relu(self.conv(x) + self.cache["bias"])


def test_probe_of_a_model_that_caches_on_its_first_call(tmp_path: Path) -> None:
    """The probe traces the model again once its state has settled, instead of failing on
    the first batch with 'this input takes another path'."""
    torch.manual_seed(0)
    model = _CachesOnFirstCall().eval()
    ds = _data(size=8)
    run = probe(model, ds, out=tmp_path / "run", layers="conv", k=K, batch_size=8, progress=False)
    act = _brute(model, ds, {"conv": lambda o: o})["conv"]
    _check(run, "conv", act, np.asarray([int(ds[i][1]) for i in range(N)]))
    images = UnitImages(run, model=model, dataset=ds)
    assert images.trace.state_changes == []  # the settled model's trace


class _TwoOutputs(nn.Module):
    """A block returning a tuple, as timm's PiT blocks return ``(x, cls_tokens)``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        y = self.conv(x)
        return torch.relu(y), torch.tanh(y)


class _TupleNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = _TwoOutputs()
        self.head = nn.Linear(8, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.block(x)
        return self.head(torch.cat([a.mean((2, 3)), b.mean((2, 3))], 1))


def test_a_module_with_two_outputs_gives_two_layers_each_named_for_its_op(
    tmp_path: Path,
) -> None:
    """Both outputs of one module call are layers with their own names (the path for the
    one ``trace[path]`` returns, the label for the other), each with its own statistics;
    before, both were named after the module and the probe failed only once the whole
    dataset had been swept."""
    torch.manual_seed(0)
    model = _TupleNet().eval()
    run, ds = _probe(model, tmp_path)
    tr = lurker.trace(model, ds[0][0][None])
    relu, tanh = (op for op in tr.ops if op.name in ("relu", "tanh"))
    assert tr["block"].index == tanh.index  # the module's last output
    names = {layer.name for layer in run.layers}
    assert {"block", relu.label} <= names, names
    outs: dict[str, Tensor] = {}
    h = model.block.register_forward_hook(lambda m, i, o: outs.update(relu=o[0], tanh=o[1]))
    with torch.no_grad():
        model(torch.stack([ds[i][0] for i in range(len(ds))]))
    h.remove()
    _check(run, "block", outs["tanh"], _labels())
    _check(run, relu.label, outs["relu"], _labels())


class _SplitTokens(nn.Module):
    """Patch tokens split and concatenated back: an empty prefix as rotary-embedding code
    makes when a model has no prefix tokens (timm's qwen3_vit), and two halves."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 16, 8, stride=8)
        self.fc = nn.Linear(16, 16)
        self.head = nn.Linear(16, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2)  # (B, 16 tokens, 16)
        t = torch.cat([t[:, :0], torch.tanh(t[:, 0:])], dim=1)
        t = torch.cat([t[:, :8] * 2, t[:, 8:] + 1], dim=1)
        return self.head(self.fc(t).mean(1))


def test_tokens_concatenated_from_parts_keep_their_patches(tmp_path: Path) -> None:
    """Each part of a concatenation gives its own tokens' patch boxes (an empty part gives
    none); before, an empty part crashed the probe and two parts lost the boxes."""
    torch.manual_seed(0)
    model = _SplitTokens().eval()
    run, ds = _probe(model, tmp_path, layers=["fc"])
    _check(run, "fc", _brute(model, ds, {"fc": TOKENS_LAST})["fc"], _labels())
    images = UnitImages(run, model=model, dataset=ds)
    for t in range(16):
        i, j = divmod(t, 4)
        assert images.box("fc", 0, t) == (8 * i, 8 * i + 8, 8 * j, 8 * j + 8), t


class _Attention(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return (q @ k.transpose(1, 2) / q.shape[-1] ** 0.5).softmax(-1) @ v


class _DwConvMlp(nn.Module):
    """PVTv2's MLP: a depthwise 3x3 convolution between the first linear and the GELU."""

    def __init__(self, d: int, side: int) -> None:
        super().__init__()
        self.side = side
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.dwconv = nn.Conv2d(2 * d, 2 * d, 3, padding=1, groups=2 * d)
        self.act = nn.GELU()

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc1(x).transpose(1, 2).reshape(x.shape[0], -1, self.side, self.side)
        return self.fc2(self.act(self.dwconv(h).flatten(2).transpose(1, 2)))


class _GluMlp(nn.Module):
    """EVA-02's SwiGLU: the first linear's output is chunked into a gate and a value."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc1, self.fc2, self.act = nn.Linear(d, 4 * d), nn.Linear(2 * d, d), nn.SiLU()

    def forward(self, x: Tensor) -> Tensor:
        gate, value = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(self.act(gate) * value)


class _NormMlp(nn.Module):
    """LeViT's MLP: a batch norm over the flattened tokens between linear and activation."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc1, self.bn, self.fc2 = (
            nn.Linear(d, 2 * d),
            nn.BatchNorm1d(2 * d),
            nn.Linear(2 * d, d),
        )
        self.act = nn.Hardswish()

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc1(x)
        return self.fc2(self.act(self.bn(h.flatten(0, 1)).reshape_as(h)))


class _Block(nn.Module):
    def __init__(self, d: int, mlp: nn.Module) -> None:
        super().__init__()
        self.attn, self.mlp = _Attention(d), mlp

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(x)
        return x + self.mlp(x)


class _SqueezeExcite(nn.Module):
    """Channel attention by 1x1 convolutions of the pooled map: no MLP hidden layer."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(d, d // 2, 1), nn.Conv2d(d // 2, d, 1)
        self.act, self.gate = nn.ReLU(), nn.Sigmoid()

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gate(self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True)))))


class _MlpZoo(nn.Module):
    """A transformer whose MLPs put other ops between their first linear and activation."""

    def __init__(self, d: int = 8, side: int = 4) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, d, 4, stride=4), nn.BatchNorm2d(d), nn.ReLU())
        self.se = _SqueezeExcite(d)
        self.blocks = nn.Sequential(
            _Block(d, _DwConvMlp(d, side)), _Block(d, _GluMlp(d)), _Block(d, _NormMlp(d))
        )
        self.head = nn.Linear(d, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.se(self.stem(x)).flatten(2).transpose(1, 2)).mean(1))


def test_mlp_hidden_layers_behind_norms_chunks_and_depthwise_convs(tmp_path: Path) -> None:
    """PVTv2, EVA-02 (SwiGLU) and LeViT MLPs have their activation a few ops after the first
    linear: they are MLP hidden layers all the same, probed by default (they were left out,
    so EVA-02 had no MLP layer at all), with their units on the last axis."""
    torch.manual_seed(0)
    model, ds = _MlpZoo().eval(), _data(size=16)
    run = probe(model, ds, out=tmp_path / "run", k=K, batch_size=7, progress=False)
    acts = ["blocks.0.mlp.act", "blocks.1.mlp.act", "blocks.2.mlp.act"]
    names = [layer.name for layer in run.layers]
    assert set(acts) <= set(names)
    assert not {"stem.2", "se.act", "se.gate"} & set(names)  # after a 4x4 conv; SE's
    found = _brute(model, ds, {a: lambda o: o.transpose(1, 2) for a in acts})  # (N, C, L)
    for a in acts:
        assert run.layer(a).num_units == found[a].shape[1] == 16
        for u in (0, 5, 15):
            means = found[a][:, u].mean(-1).numpy()
            top = run.unit(a, u).top("mean")
            assert [e.sample_id for e in top] == _topk(means, K)
            np.testing.assert_allclose([e.value for e in top], np.sort(means)[::-1][:K], rtol=1e-5)


class _Bottlenecks(nn.Module):
    """A CNN trunk of ResNet bottlenecks (1x1 narrowing, 3x3, 1x1 widening, residual)
    under one attention layer (a DETR-like head): a transformer by lurker's test, whose
    bottleneck ReLUs are no MLP hidden layers."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(16, 4, 1), nn.BatchNorm2d(4), nn.ReLU(),
                nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                nn.Conv2d(4, 16, 1), nn.BatchNorm2d(16),
            )
            for _ in range(2)
        )  # fmt: skip
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.fc = nn.Linear(16, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for b in self.blocks:
            x = torch.relu(x + b(x))
        t = x.flatten(2).transpose(1, 2)
        return self.fc(self.attn(t, t, t)[0].mean(1))


def test_a_cnn_trunks_bottleneck_relus_are_not_mlp_layers(tmp_path: Path) -> None:
    """A bottleneck's first ReLU follows a 1x1 convolution (through BatchNorm) as a
    convolutional MLP's does, but that 1x1 narrows the channels: in a CNN with attention
    (classified as a transformer) it was taken for an MLP hidden layer, one per block."""
    torch.manual_seed(0)
    run = probe(_Bottlenecks().eval(), _data(size=8), out=tmp_path / "run", k=K, batch_size=7,
                progress=False)  # fmt: skip
    names = [layer.name for layer in run.layers]
    assert not {"blocks.0.2", "blocks.1.2", "blocks.0.5", "blocks.1.5"} & set(names), names


class _TransposedMlp(nn.Module):
    """Patch embedding, one attention layer, then a convolutional MLP made of 1x1
    transposed convolutions (8 -> 32 -> 8 channels): a transposed convolution's weight is
    (in, out, 1, 1), so its widening reads the other way round from a convolution's."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 4, stride=4)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.up, self.act, self.down = (
            nn.ConvTranspose2d(8, 32, 1),
            nn.GELU(),
            nn.ConvTranspose2d(32, 8, 1),
        )
        self.fc = nn.Linear(8, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        x = self.embed(x)
        b, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)
        x = (t + self.attn(t, t, t)[0]).transpose(1, 2).reshape(b, c, h, w)
        x = x + self.down(self.act(self.up(x)))
        return self.fc(x.mean((2, 3)))


def test_an_mlp_of_transposed_1x1_convolutions_has_its_hidden_layer(tmp_path: Path) -> None:
    """The MLP's hidden layer (the GELU after the widening 1x1 transposed convolution) is
    probed by default; read as a convolution's (out, in) weight it was taken for narrowing."""
    torch.manual_seed(0)
    run = probe(_TransposedMlp().eval(), _data(size=16), out=tmp_path / "run", k=K,
                batch_size=7, progress=False)  # fmt: skip
    assert "act" in [layer.name for layer in run.layers]


class _Video(nn.Module):
    """A 3-D CNN on (C, D, H, W) clips, as torchvision's r3d_18."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv3d(3, 4, 3, padding=1), nn.Conv3d(4, 6, 3, stride=2)
        self.relu1, self.relu2, self.fc = nn.ReLU(), nn.ReLU(), nn.Linear(6, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.relu2(self.conv2(self.relu1(self.conv1(x)))).mean((2, 3, 4)))


def test_video_model_default_layers_are_its_3d_convolutions(tmp_path: Path) -> None:
    """The default layers of a 3-D CNN are its convolutions and activations (only its
    final linear layer was probed, without a word), their units on axis 1 and their peaks
    at (frame * H + row, column)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    clips = torch.randn(N, 3, 4, 8, 8, generator=g)
    ds = torch.utils.data.TensorDataset(clips, torch.arange(N) % CLASSES)
    model = _Video().eval()
    run = probe(model, ds, out=tmp_path / "run", k=K, batch_size=7, progress=False)
    assert [layer.name for layer in run.layers] == ["conv1", "relu1", "conv2", "relu2", "fc"]
    found = _brute(model, ds, {"conv2": lambda o: o, "relu1": lambda o: o})
    for name, act in found.items():
        h, w = act.shape[3:]
        assert run.layer(name).layout["unit"] == 1 and run.layer(name).num_units == act.shape[1]
        flat = act.flatten(2).numpy()  # (N, C, D*H*W), row-major
        for u in range(act.shape[1]):
            top = run.unit(name, u).top("max")
            assert [e.sample_id for e in top] == _topk(flat[:, u].max(-1), K)
            for e in top:
                at = int(flat[e.sample_id, u].argmax())  # the first maximum
                assert (e.y, e.x) == ((at // (h * w)) * h + (at // w) % h, at % w)
            means = run.unit(name, u).top("mean")
            assert [e.sample_id for e in means] == _topk(flat[:, u].mean(-1), K)


class _HandMatmul(nn.Module):
    """A linear layer written by hand: ``x @ W.t()``."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(c_out, c_in) / c_in**0.5)

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.w.t()


class _EinsumLinear(nn.Module):
    """A linear layer as an einsum with a weight scaled in forward (weight norm's way)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(c_out, c_in))
        self.g = nn.Parameter(torch.rand(c_out) + 0.5)

    def forward(self, x: Tensor) -> Tensor:
        w = self.w * (self.g / self.w.norm(dim=1))[:, None]
        return torch.einsum("blc,dc->bld", x, w)


class _Normalize(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.normalize(x, dim=-1)


class HandLinears(nn.Module):
    """Tokens through linear layers written as ``@``, an einsum, and F.normalize."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, stride=2)
        self.lin1 = _HandMatmul(6, 8)
        self.act = nn.ReLU()
        self.lin2 = _EinsumLinear(8, 5)
        self.norm = _Normalize()
        self.head = nn.Linear(5, 4)

    def forward(self, x: Tensor) -> Tensor:
        t = self.conv(x).flatten(2).transpose(1, 2)  # (B, L, 6)
        return self.head(self.norm(self.lin2(self.act(self.lin1(t)))).mean(1))


def test_hand_written_linear_layers_have_their_units_last(tmp_path: Path):
    """``x @ W.t()`` and an einsum with a weight are linear layers: probed by default, units
    on the weight's output axis (as nn.Linear's); F.normalize keeps its input's units."""
    torch.manual_seed(0)
    model = HandLinears().eval()
    default = {layer.name for layer in select_layers(lurker.trace(model, _data()[0][0][None]))}
    assert {"conv", "lin1", "act", "lin2", "head"} <= default
    layers = ["lin1", "act", "lin2", "norm"]
    run, ds = _probe(model, tmp_path, layers=layers)
    acts = _brute(model, ds, dict.fromkeys(layers, TOKENS_LAST))
    for name in layers:
        _check(run, name, acts[name], _labels())
        assert run.layer(name).layout["unit"] == 2


class _FactorBlock(nn.Module):
    """CoaT's factorized attention: the keys are softmaxed over the tokens, then
    ``q @ (k.T @ v)``: no softmax over a product of two tensors."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(c, 3 * c)
        self.proj = nn.Linear(c, c)
        self.fc1 = nn.Linear(c, 2 * c)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(2 * c, c)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        att = q @ (k.softmax(dim=1).transpose(1, 2) @ v)
        x = x + self.proj(att)
        return x + self.fc2(self.act(self.fc1(x)))


class FactorAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 8, stride=8)
        self.blocks = nn.Sequential(_FactorBlock(8), _FactorBlock(8))
        self.head = nn.Linear(8, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.patch(x).flatten(2).transpose(1, 2)).mean(1))


def test_factorized_attention_is_a_transformer(tmp_path: Path):
    """CoaT-like attention makes the model a transformer: its defaults are the blocks and
    MLP hidden layers (units last), not every linear (the qkv projections among them)."""
    torch.manual_seed(0)
    model = FactorAttention().eval()
    run, ds = _probe(model, tmp_path)
    names = {info.name for info in run.layers}
    layers = ["blocks.0", "blocks.1", "blocks.0.act", "blocks.1.act"]
    assert set(layers) <= names
    assert not names & {"blocks.0.qkv", "blocks.1.qkv", "blocks.0.proj"}
    acts = _brute(model, ds, dict.fromkeys(layers, TOKENS_LAST))
    for name in layers:
        _check(run, name, acts[name], _labels())


class _ConvAttention(nn.Module):
    """BoTNet's self-attention: a 1x1 convolution makes queries, keys and values."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.qkv = nn.Conv2d(c, 3 * c, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(x).flatten(2).split(c, dim=1)  # (B, C, HW) each
        att = (q.transpose(1, 2) @ k).softmax(dim=-1)  # (B, HW, HW)
        return (v @ att.transpose(1, 2)).reshape(b, c, h, w)


class ConvAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, stride=4)
        self.attn = _ConvAttention(6)
        self.out = nn.Conv2d(6, 6, 3)
        self.head = nn.Linear(6, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.out(self.attn(self.stem(x))).mean((2, 3)))


def test_attention_projection_conv_is_not_a_default_layer(tmp_path: Path):
    """A qkv 1x1 convolution outside any block is attention's projection (queries, keys
    and values side by side), not a stem: not a default layer; named, its units are its
    channels."""
    torch.manual_seed(0)
    model = ConvAttention().eval()
    default = {layer.name for layer in select_layers(lurker.trace(model, _data()[0][0][None]))}
    assert {"stem", "out"} <= default and "attn.qkv" not in default
    run, ds = _probe(model, tmp_path, layers=["attn.qkv"])
    _check(run, "attn.qkv", _brute(model, ds, {"attn.qkv": lambda o: o})["attn.qkv"], _labels())
    assert run.layer("attn.qkv").layout["unit"] == 1


def test_a_softmax_gate_in_a_cnn_keeps_its_cnn_default_layers():
    """A mixture of experts after a CNN: a softmax whose output weighs the experts'
    activations (einsum) is a gate, not attention; the model keeps its CNN defaults (the
    convolutions, their ReLUs, the router and the experts), as it had before factorized
    attention (CoaT) was recognised."""

    class MoE(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(
                nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.ReLU(),
                nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            )  # fmt: skip
            self.router = nn.Linear(16, 4)
            self.experts = nn.ModuleList(nn.Linear(16, 10) for _ in range(4))

        def forward(self, x):
            h = self.stem(x)
            g = torch.softmax(self.router(h), -1)
            e = torch.stack([f(h) for f in self.experts], 1)
            return torch.einsum("be,bec->bc", g, e)

    torch.manual_seed(0)
    tr = lurker.trace(MoE().eval(), torch.randn(2, 3, 16, 16))
    names = [layer.name for layer in select_layers(tr)]
    assert {"stem.0", "stem.1", "stem.2", "stem.3", "router"} <= set(names), names
    assert {f"experts.{i}" for i in range(4)} <= set(names), names


class _Logits(nn.Module):
    """A classifier written by hand: ``feat @ W.t()``."""

    def __init__(self, c_in: int, classes: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(classes, c_in) / c_in**0.5)

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.w.t()


class SoftmaxHeadCNN(nn.Module):
    """A CNN that returns probabilities: a softmax over a hand-written linear layer."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 3, stride=2), nn.ReLU(), nn.Conv2d(6, 8, 3), nn.ReLU()
        )
        self.head = _Logits(8, 4)

    def forward(self, x: Tensor) -> Tensor:
        return torch.softmax(self.head(self.features(x).mean((2, 3))), dim=-1)


class _LatentPool(nn.Module):
    """Attention from learned queries (a Perceiver's latents): ``softmax(Q @ k.T) @ v``
    with Q computed from weights only, so ``Q @ k.T`` is, by its layout, a product with
    a weight; its softmax weighs the values: attention, not a classifier."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.latents = nn.Parameter(torch.randn(4, c))
        self.kv = nn.Linear(c, 2 * c)
        self.fc1 = nn.Linear(c, 2 * c)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(2 * c, c)

    def forward(self, x: Tensor) -> Tensor:
        k, v = self.kv(x).chunk(2, dim=-1)
        att = torch.softmax(self.latents @ k.transpose(1, 2), dim=-1) @ v  # (B, 4, C)
        return att + self.fc2(self.act(self.fc1(att)))


class LatentAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 8, stride=8)
        self.blocks = nn.Sequential(_LatentPool(8), _LatentPool(8))
        self.head = nn.Linear(8, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.patch(x).flatten(2).transpose(1, 2)).mean(1))


def test_a_softmax_over_a_hand_written_classifier_keeps_the_cnn_defaults(tmp_path: Path):
    """``softmax(feat @ W.t())`` is a classifier's probabilities, not attention: the CNN
    keeps its default layers (every convolution and ReLU, and the hand-written linear),
    probed on the channel axis; learned queries' attention (a softmax over a product with
    a weight that weighs the values) still makes a model a transformer."""
    torch.manual_seed(0)
    model = SoftmaxHeadCNN().eval()
    default = [layer.name for layer in select_layers(lurker.trace(model, _data()[0][0][None]))]
    assert default == ["features.0", "features.1", "features.2", "features.3", "head"]
    run, ds = _probe(model, tmp_path)
    acts = _brute(model, ds, dict.fromkeys(default[:4], lambda o: o))
    acts["head"] = _brute(model, ds, {"head": lambda o: o})["head"]
    for name in default:
        _check(run, name, acts[name], _labels())
    assert run.layer("features.1").layout["unit"] == 1 and run.layer("head").layout["unit"] == 1

    torch.manual_seed(0)
    latent = LatentAttention().eval()
    names = {layer.name for layer in select_layers(lurker.trace(latent, _data()[0][0][None]))}
    assert {"patch", "blocks.0", "blocks.1", "blocks.0.act", "blocks.1.act"} <= names, names
    assert not names & {"blocks.0.kv", "blocks.0.fc2", "head"}, names


class _ConvBlock(nn.Module):
    """A residual block of two 3x3 convolutions (a CNN stage's)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.act = nn.ReLU()
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(x + self.conv2(self.act(self.conv1(x))))


class _AttnBlock(nn.Module):
    """BoTNet's self-attention block: 1x1 qkv convolution, attention over the grid."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.attn = _ConvAttention(c)
        self.conv = nn.Conv2d(c, c, 1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(x + self.conv(self.attn(x)))


class MixedStages(nn.Module):
    """BoTNet's layout: a stem, a stage of conv blocks, a stage of a conv block then an
    attention block (no sibling of either type), a stage of attention blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, stride=4)
        self.stages = nn.Sequential(
            nn.Sequential(_ConvBlock(6), _ConvBlock(6)),
            nn.Sequential(_ConvBlock(6), _AttnBlock(6)),
            nn.Sequential(_AttnBlock(6), _AttnBlock(6)),
        )
        self.head = nn.Linear(6, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.stages(self.stem(x)).mean((2, 3)))


def test_every_block_of_a_mixed_stage_is_a_default_layer(tmp_path: Path):
    """A hybrid (BoTNet) whose stage runs a conv block then an attention block: every
    block's output of every stage is a default layer (units on the channel axis), the
    mixed stage's included, though neither of its blocks has a sibling of its type."""
    torch.manual_seed(0)
    model = MixedStages().eval()
    blocks = [f"stages.{s}.{b}" for s in range(3) for b in range(2)]
    default = {layer.name for layer in select_layers(lurker.trace(model, _data()[0][0][None]))}
    assert {"stem", *blocks} <= default, default
    assert not default & {"stages.1.1.attn.qkv", "stages.2.0.attn.qkv"}, default
    run, ds = _probe(model, tmp_path, layers=blocks)
    acts = _brute(model, ds, dict.fromkeys(blocks, lambda o: o))
    for name in blocks:
        _check(run, name, acts[name], _labels())
        assert run.layer(name).layout["unit"] == 1
    # inside a repeated block a container of composite modules is the block's own layers:
    # MaxViT's MBConv (convs, then squeeze-and-excitation) adds none of them
    maxvit = torchvision.models.MaxVit(
        input_size=(32, 32), stem_channels=8, partition_size=2, block_channels=[8, 16],
        block_layers=[1, 1], head_dim=4, stochastic_depth_prob=0.0, num_classes=5,
    ).eval()  # fmt: skip
    tr = lurker.trace(maxvit, torch.randn(1, 3, 32, 32))
    assert any("squeeze_excitation" in m for m in tr.modules)
    default = [layer.name for layer in select_layers(tr)]
    assert not [n for n in default if "squeeze_excitation" in n or n.endswith("MBconv")], default


class _ConvRelPos(nn.Module):
    """CoaT's conv relative position encoding: the values as an image of heads x channels
    per head, a depthwise convolution, back to (B, heads, tokens, channels), times q."""

    def __init__(self, heads: int, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(heads * ch, heads * ch, 3, padding=1, groups=heads * ch)

    def forward(self, q: Tensor, v: Tensor, size: tuple[int, int]) -> Tensor:
        b, h, n, c = q.shape
        img = v.transpose(-1, -2).reshape(b, h * c, *size)
        return q * self.conv(img).reshape(b, h, c, n).transpose(-1, -2)


class _CoatBlock(nn.Module):
    def __init__(self, c: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(c, 3 * c)
        self.crpe = _ConvRelPos(heads, c // heads)
        self.proj = nn.Linear(c, c)

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        att = q @ (k.softmax(dim=2).transpose(-1, -2) @ v) + self.crpe(q, v, size)
        return x + self.proj(att.transpose(1, 2).reshape(b, n, c))


class CoatCrpe(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 8, stride=8)
        self.blocks = nn.ModuleList([_CoatBlock(8, 2), _CoatBlock(8, 2)])
        self.head = nn.Linear(8, 4)

    def forward(self, x: Tensor) -> Tensor:
        p = self.patch(x)
        t = p.flatten(2).transpose(1, 2)
        for block in self.blocks:
            t = block(t, p.shape[2:])
        return self.head(t.mean(1))


def test_conv_relative_position_encoding_convs_probe_and_its_output_says_why_not(
    tmp_path: Path,
):
    """CoaT's crpe: its depthwise convolution is a layer with units, probed by name on its
    channel axis; its output spreads its units over two axes (heads x channels per head),
    so it is refused saying so, without the advice to name a unit axis (any one axis would
    read each head, or one channel of every head, as a unit)."""
    torch.manual_seed(0)
    model = CoatCrpe().eval()
    tr = lurker.trace(model, _data()[0][0][None])
    lay = infer_layouts(tr)[tr["blocks.0.crpe"].index]
    assert isinstance(lay, Skip) and lay.kind == "split" and not lay.unit_dim_helps, lay
    assert "split its 8 units over 2 axes (2 x 4" in lay.reason, lay.reason
    with pytest.raises(LurkerError, match="over 2 axes") as e:
        select_layers(tr, ["blocks.0.crpe"])
    assert "unit_dim" not in str(e.value)
    convs = ["blocks.0.crpe.conv", "blocks.1.crpe.conv"]
    run, ds = _probe(model, tmp_path, layers=convs)
    acts = _brute(model, ds, dict.fromkeys(convs, lambda o: o))
    for name in convs:
        _check(run, name, acts[name], _labels())
        assert run.layer(name).layout["unit"] == 1


def test_timm_coat_crpe_convs_equal_brute_force(tmp_path: Path):
    """timm's CoaT runs each crpe (and its convolutions) once per block: the calls probe
    by name (``crpe1.conv_list.0:2``, the second block's) on their channels; the crpe's
    own output is refused with the split named."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("coat_lite_tiny", pretrained=False, num_classes=3, img_size=32)
    model = model.eval()
    calls: list[Tensor] = []
    hook = model.crpe1.conv_list[0].register_forward_hook(lambda m, i, o: calls.append(o))
    ds = _data()
    with torch.no_grad():
        model(torch.stack([ds[i][0] for i in range(len(ds))]))
    hook.remove()
    run, _ = _probe(model, tmp_path, layers=["crpe1.conv_list.0:1", "crpe1.conv_list.0:2"])
    for name, act in zip(["crpe1.conv_list.0:1", "crpe1.conv_list.0:2"], calls, strict=True):
        _check(run, name, act, _labels())
        assert run.layer(name).layout["unit"] == 1
    with pytest.raises(LurkerError, match=r"split its 64 units over 2 axes \(8 x 8") as e:
        select_layers(lurker.trace(model, ds[0][0][None]), ["crpe1:1"])
    assert "unit_dim" not in str(e.value)


class _GatedConcatCNN(nn.Module):
    """A CNN with a gate (mul of two activations), a concatenation of channels
    (DenseNet's) and a linear head after flatten(1): every op keeps the batch on axis 0."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2)
        self.bn = nn.BatchNorm2d(4)
        self.gate = nn.Conv2d(4, 4, 1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        y = torch.relu(self.bn(self.conv(x)))
        g = torch.sigmoid(self.gate(nn.functional.adaptive_avg_pool2d(y, 1)))
        y = torch.cat([y * g, y], dim=1)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))


class _FoldsTheBatch(nn.Module):
    """CNN ops only, but one moves the batch off an axis of its own: a cat on dim 0
    (test-time augmentation folded into the batch), or flatten(0, 1)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.how = how

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x)
        if self.how == "cat":
            y = torch.cat([y, torch.sigmoid(y)], dim=0)
        else:
            y = y.flatten(0, 1)
        return torch.relu(y) + 1


def _forwards_in_infer_layouts(model: nn.Module, x: Tensor) -> tuple[dict[int, Any], int]:
    """infer_layouts of the model's trace at ``x``, and how many forwards it ran."""
    tr = lurker.trace(model, x)
    calls: list[int] = []
    hook = model.register_forward_pre_hook(lambda m, i: calls.append(1))
    try:
        found = infer_layouts(tr)
    finally:
        hook.remove()
    return found, len(calls)


@pytest.mark.parametrize(
    "make", [lambda: torchvision.models.resnet18(num_classes=3), _GatedConcatCNN]
)
def test_cnn_batch_axes_come_from_the_trace_without_running_the_model(make):
    """A CNN whose every op keeps the batch on axis 0 gets its batch axes from the trace
    alone (the probe's extra forwards at 2x and 3x the batch cost resnet18 2% of a 1,024
    image probe): each op's axis 0, as the oracle says, which traces the model at batches
    of 1 and 3 and takes the one axis that grew."""
    torch.manual_seed(0)
    model = make().eval()
    x = torch.randn(3, 3, 32, 32)
    found, forwards = _forwards_in_infer_layouts(model, x[:1])
    assert forwards == 0
    one, three = lurker.trace(model, x[:1]), lurker.trace(model, x)
    probed = 0
    for a, b in zip(one.ops, three.ops, strict=True):
        if a.kind != "op" or not a.outputs:
            continue
        grown = [d for d, (m, n) in enumerate(zip(a.shape, b.shape)) if m != n]
        assert grown == [0] and b.shape[0] == 3, (a.label, a.shape, b.shape)
        lay = found[a.index]
        assert isinstance(lay, Layout) and lay.batch == 0, (a.label, lay)
        probed += 1
    assert probed > 10


@pytest.mark.parametrize("how", ["cat", "flatten"])
def test_ops_that_move_the_batch_still_have_it_found_by_running_the_model(how: str):
    """A cat on dim 0 or flatten(0, 1) folds the batch with other slots: the model is
    replayed at larger batches, which finds that (the ops after it are skipped as folded),
    rather than taking axis 0 for the batch of a CNN."""
    torch.manual_seed(0)
    model = _FoldsTheBatch(how).eval()
    x = _data()[0][0][None]
    found, forwards = _forwards_in_infer_layouts(model, x)
    assert forwards == 2
    ops = [op for op in lurker.trace(model, x).ops if op.kind == "op"]
    assert [op.name for op in ops] == [
        "conv2d",
        *(["sigmoid"] if how == "cat" else []),
        how,
        "relu",
        "add",
    ]
    first = found[ops[0].index]
    assert isinstance(first, Layout) and first.batch == 0
    for op in ops[-3:]:
        lay = found[op.index]
        assert isinstance(lay, Skip) and lay.kind == "folded", (op.label, lay)


def test_a_convolution_of_an_unbatched_input_is_not_taken_for_a_batch():
    """Conv1d also takes one unbatched (C, L) input, whose axis 0 is its channels: a model
    that convolves its (1, L) input so has no batch axis for the trace to read; growing the
    batch tells it (the model cannot take more than one sample)."""
    model = nn.Sequential(nn.Conv1d(1, 1, 3), nn.ReLU()).eval()
    tr = lurker.trace(model, torch.randn(1, 16))
    with pytest.raises(LurkerError, match="batches of 2 and 3"):
        infer_layouts(tr)


def test_an_activation_passed_as_a_weight_by_keyword_is_not_read_as_batch_first():
    """``F.linear(weight=act, input=q)`` and ``F.conv2d(weight=act, input=template)`` (a
    template correlated with per-sample kernels) put the batch on axis 1: the trace alone
    cannot say so, so the model is replayed, and the op is not read with its batch on
    axis 0 (its unit axis would be the samples). Oracle: the outputs at batch 3."""
    import torch.nn.functional as F

    from lurker.probe.layout import Layout, infer_layouts

    class Lin(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l = nn.Linear(8, 8)
            self.q = nn.Parameter(torch.randn(1, 8))

        def forward(self, x: Tensor) -> Tensor:
            return F.linear(weight=self.l(x), input=self.q).relu()

    class Corr(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c = nn.Conv2d(3, 4, 3)
            self.template = nn.Parameter(torch.randn(1, 4, 8, 8))

        def forward(self, x: Tensor) -> Tensor:
            return F.conv2d(weight=self.c(x), input=self.template).relu()

    for model, x in ((Lin().eval(), torch.randn(1, 8)), (Corr().eval(), torch.randn(1, 3, 5, 5))):
        assert model(x.repeat(3, *[1] * (x.dim() - 1))).shape[1] == 3  # the batch: axis 1
        tr = lurker.trace(model, x)
        last = [op for op in tr.ops if op.name in ("relu", "relu_")][-1]
        lay = infer_layouts(tr).get(last.index)
        assert not (isinstance(lay, Layout) and lay.batch == 0), lay
