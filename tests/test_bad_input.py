"""Bad input gets one clear paragraph and loses nothing (issue 10, point 5)."""

from __future__ import annotations

import inspect
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from click.testing import CliRunner
from PIL import Image
from torch import nn

import dist_ranks
import lurker
from lurker.cli import main
from lurker.errors import LurkerError
from lurker.examples import DigitsNet
from lurker.probe import probe
from lurker.probe.data import digits
from lurker.store import RunExistsError, RunInUseError, run_lock


def _model() -> nn.Module:
    torch.manual_seed(0)
    return DigitsNet().eval()


def _cli(*args: str):
    return CliRunner().invoke(main, list(args))


CLI_PROBE = ["probe", "lurker.examples:DigitsNet", "--data", "digits:test", "--image-size", "16"]
CLI_PROBE += ["--layers", "features.8"]


# --------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"k": 0}, "k"),
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": -4}, "batch_size"),
        ({"num_workers": -1}, "num_workers"),
        ({"hist_bins": 0}, "hist_bins"),
        ({"hist_bins": 1}, "hist_bins"),  # one bin cannot hold both signs on the grid
        ({"checkpoint_every": 0}, "checkpoint_every"),
        ({"k": 2.5}, "k"),
    ],
)
def test_probe_refuses_bad_arguments_before_creating_the_run(tmp_path: Path, kwargs, name):
    out = tmp_path / "run"
    with pytest.raises(LurkerError, match=rf"{name} must be"):
        probe(_model(), digits(16, split="test"), out=out, layers="features.8", **kwargs)
    assert not out.exists()


def test_probe_takes_numpy_integers(tmp_path: Path):
    run = probe(
        _model(), digits(16, split="test"), out=tmp_path / "run", layers="features.8",
        k=np.int64(2), batch_size=np.int32(100), progress=False,
    )  # fmt: skip
    assert run.meta["k"] == 2


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["--k", "0"], "--k"),
        (["-b", "0"], "--batch-size"),
        (["-b", "-4"], "--batch-size"),
        (["--image-size", "0"], "--image-size"),
        (["--workers", "-1"], "--workers"),
    ],
)
def test_cli_bad_arguments_then_the_corrected_command_runs(tmp_path: Path, args, option):
    out = tmp_path / "run"
    r = _cli(*CLI_PROBE, "--out", str(out), *args)
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert f"Invalid value for '{option}'" in r.output
    assert len(r.output.strip().splitlines()) <= 4
    assert not out.exists()
    r = _cli(*CLI_PROBE, "--out", str(out), "--k", "2")
    assert r.exit_code == 0, r.output


def test_run_that_never_swept_a_batch_does_not_block(tmp_path: Path, monkeypatch):
    """A probe that dies before saving any batch leaves nothing to lose: the next probe
    into the folder, with other arguments, replaces it. One that saved a batch is kept."""
    from lurker.probe import stats

    out, ds = tmp_path / "run", digits(16, split="test")
    real = stats.UnitStats.update
    calls = {"n": 0, "fail_at": 1}

    def update(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] >= calls["fail_at"]:
            raise RuntimeError("out of memory (simulated)")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(stats.UnitStats, "update", update)
    with pytest.raises(RuntimeError, match="simulated"):
        probe(_model(), ds, out=out, layers="features.8", k=5, progress=False)
    assert (out / "run.db").exists() and not (out / "checkpoint.pt").exists()
    monkeypatch.setattr(stats.UnitStats, "update", real)
    run = probe(_model(), ds, out=out, layers="features.8", k=2, batch_size=50, progress=False)
    assert run.complete and run.meta["k"] == 2

    # a run with a saved batch (a checkpoint) is not thrown away
    other = tmp_path / "other"
    monkeypatch.setattr(stats.UnitStats, "update", update)
    calls.update(n=0, fail_at=3)
    with pytest.raises(RuntimeError, match="simulated"):
        probe(
            _model(), ds, out=other, layers="features.8", k=5, batch_size=50,
            checkpoint_every=1, progress=False,
        )  # fmt: skip
    assert (other / "checkpoint.pt").exists()
    monkeypatch.setattr(stats.UnitStats, "update", real)
    with pytest.raises(RunExistsError) as info:
        probe(_model(), ds, out=other, layers="features.8", k=2, progress=False)
    assert "k=5" in str(info.value) and (other / "checkpoint.pt").exists()


def test_run_exists_error_speaks_python_or_cli(tmp_path: Path):
    out = tmp_path / "run"
    ds = digits(16, split="test")
    probe(_model(), ds, out=out, layers="features.8", k=2, progress=False)
    torch.manual_seed(1)
    with pytest.raises(RunExistsError) as info:
        probe(DigitsNet(), ds, out=out, layers="features.8", k=2, progress=False)
    assert "overwrite=True" in str(info.value) and "--overwrite" not in str(info.value)
    assert "--overwrite" in info.value.for_cli()
    r = _cli(*CLI_PROBE, "--out", str(out), "--k", "3")
    assert r.exit_code == 2 and "--overwrite" in r.output and "overwrite=True" not in r.output


# --------------------------------------------------------------------------- the lock

HOLD = textwrap.dedent(
    """
    import sys, time
    from lurker.store import run_lock

    with run_lock(sys.argv[1]):
        print("held", flush=True)
        time.sleep(600)
    """
)


def test_second_probe_into_a_run_in_use_fails_at_once(tmp_path: Path):
    """Another process holds the run: the probe says so (with its pid) before any work;
    when that process dies (SIGKILL, no clean-up), the OS releases the lock."""
    out = tmp_path / "run"
    script = tmp_path / "hold.py"
    script.write_text(HOLD)
    holder = subprocess.Popen(
        [sys.executable, str(script), str(out)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        ds = digits(16, split="test")
        with pytest.raises(RunInUseError, match=rf"in use by another process \(pid {holder.pid}\)"):
            probe(_model(), ds, out=out, layers="features.8", k=2, progress=False)
        assert not (out / "run.db").exists()  # nothing was traced or created
        r = _cli(*CLI_PROBE, "--out", str(out), "--k", "2")
        assert r.exit_code == 2 and f"pid {holder.pid}" in r.output and "--out" in r.output
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    run = probe(_model(), ds, out=out, layers="features.8", k=2, progress=False)
    assert run.complete


def test_lock_is_held_for_the_whole_probe_and_released_after(tmp_path: Path, monkeypatch):
    out = tmp_path / "run"
    from lurker.probe import stats

    real = stats.UnitStats.update
    tried: list[str] = []

    def update(self, *args, **kwargs):  # mid-sweep, another writer is refused
        if not tried:
            with pytest.raises(RunInUseError) as info, run_lock(out):
                pass
            tried.append(str(info.value))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(stats.UnitStats, "update", update)
    probe(_model(), digits(16, split="test"), out=out, layers="features.8", k=2, progress=False)
    assert tried and f"pid {os.getpid()}" in tried[0]
    with run_lock(out):  # released once the probe returned
        pass
    failed = tmp_path / "failed"
    with pytest.raises(LurkerError, match="No layer matches"):
        probe(_model(), digits(16, split="test"), out=failed, layers="nope", progress=False)
    assert not failed.exists()  # a probe that created nothing leaves nothing behind


# --------------------------------------------------------------------------- torchrun figures


def _dist_worker(rank: int, out: str) -> None:
    probe(
        _model(), digits(16, split="test"), out=out, layers="features.8", k=2,
        batch_size=40, progress=False,
    )  # fmt: skip


def test_distributed_sweep_figures_count_every_rank(tmp_path: Path):
    out = tmp_path / "dist"
    dist_ranks.spawn(_dist_worker, str(out))
    sweep = lurker.Run.open(out).meta["sweep"]
    n = len(digits(16, split="test"))
    assert sweep["world"] == 2 and sweep["images"] == n
    assert sweep["images_per_s"] == pytest.approx(n / sweep["seconds"])


# --------------------------------------------------------------------------- datasets


def _folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(
                root / cls / f"{i}.png"
            )
    (root / "dog" / "broken.jpg").write_bytes(b"not an image at all")
    return root


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())


@pytest.mark.parametrize("workers", [0, 2])
def test_torchvision_image_folder_with_a_corrupt_file(tmp_path: Path, workers: int):
    from torchvision import transforms

    root = _folder(tmp_path / "imgs")
    tf = transforms.Compose(
        [transforms.Resize(16), transforms.CenterCrop(16), transforms.ToTensor()]
    )
    ds = torchvision.datasets.ImageFolder(str(root), transform=tf)
    run = probe(
        _tiny(), ds, out=tmp_path / "run", k=2, batch_size=3, num_workers=workers, progress=False
    )
    assert [Path(p).name for p, _ in run.skipped] == ["broken.jpg"]
    assert "UnidentifiedImageError" in run.skipped[0][1]
    ids = {e.sample_id for e in run.unit("0", 0).top("max")}
    broken = [i for i, (p, _) in enumerate(ds.samples) if p.endswith("broken.jpg")]
    assert ids and not ids & set(broken)


def test_transform_error_on_a_readable_file_still_raises(tmp_path: Path):
    """Only files that cannot be read are skipped; a bug in the transform is not hidden."""
    root = _folder(tmp_path / "imgs")

    def bad(image):
        raise TypeError("my transform is broken")

    ds = torchvision.datasets.ImageFolder(str(root), transform=bad)
    with pytest.raises(TypeError, match="my transform is broken"):
        probe(_tiny(), ds, out=tmp_path / "run", k=2, progress=False)


# --------------------------------------------------------------------------- save=


@pytest.mark.parametrize("save", ["bogus", ["nothing.*"], ["features.0", "nope"]])
def test_save_pattern_matching_nothing_is_an_error(save):
    with pytest.raises(LurkerError) as info:
        lurker.trace(_model(), torch.randn(1, 1, 16, 16), save=save)
    msg = str(info.value)
    assert "matches no op or module" in msg
    assert "conv2d_1" in msg and "features.0" in msg  # what names can match


def test_save_classes_matching_no_module_are_an_error():
    """save=nn.LSTM on a CNN would save nothing, silently: said before the model runs,
    with the classes it has; a class it has saves."""
    with pytest.raises(LurkerError, match=r"save=\(LSTM\) matches no module of .*Conv2d"):
        lurker.trace(_model(), torch.randn(1, 1, 16, 16), save=nn.LSTM)
    tr = lurker.trace(_model(), torch.randn(1, 1, 16, 16), save=(nn.LSTM, nn.Conv2d))
    assert any(op.activation is not None for op in tr.ops)


def test_save_patterns_that_match_still_save():
    tr = lurker.trace(
        _model(), torch.randn(1, 1, 16, 16), save=["features.0", "relu_*", "classifier.3"]
    )
    saved = set(tr.activations())
    assert "conv2d_1" in saved and "relu_1" in saved and "linear_2" in saved


# --------------------------------------------------------------------------- images


def test_images_of_a_python_run_says_what_to_pass(tmp_path: Path):
    out = tmp_path / "run"
    probe(_model(), digits(16, split="test"), out=out, layers="features.8", k=2, progress=False)
    r = _cli("images", str(out))
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert "made from Python" in r.output
    assert f"lurker probe MODEL --data DATA --out {out}" in r.output.replace("\n", " ")
    from lurker.probe import UnitImages

    with pytest.raises(LurkerError, match=r"UnitImages\(run, model=\.\.\., dataset=\.\.\.\)"):
        UnitImages(out)


# --------------------------------------------------------------------------- trace errors


class _BadBroadcast(nn.Module):
    def forward(self, x):
        torch.broadcast_shapes((2, 3), (4, 5))  # torch's Python code raises, called from here
        return x


def test_error_inside_torch_called_by_model_code_names_the_calling_line():
    with pytest.raises(lurker.TraceError) as info:
        lurker.trace(_BadBroadcast(), torch.randn(1, 2))
    cli = info.value.for_cli()
    assert "raised RuntimeError inside torch" in cli
    assert f"called from {__file__}:" in cli and "in its own code" not in cli
    assert "err.partial" not in cli and "err.partial" in str(info.value)


def test_torch_layer_refusing_a_deep_tensor_is_named():
    """A 3-D tensor reaching a BatchNorm2d deep inside the model: the layer and both shapes."""
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.Flatten(2), nn.BatchNorm2d(3)).eval()
    with pytest.raises(lurker.TraceError) as info:
        lurker.trace(model, torch.randn(2, 1, 6, 6))
    cli = info.value.for_cli()
    assert "does not fit layer '2'" in cli and "(2, 3, 16)" in cli
    assert "BatchNorm2d '2' expects (N, 3, H, W)" in cli


@pytest.mark.parametrize(
    ("model_dtype", "input_dtype"),
    [
        (torch.float32, torch.float16),
        (torch.float16, torch.float32),
        (torch.float32, torch.float64),
    ],
)
def test_input_of_another_float_dtype_than_the_layer_names_both_and_the_fix(
    model_dtype: torch.dtype, input_dtype: torch.dtype
):
    """A float16 input to a float32 model on CPU (``--input-dtype half``): torch says only
    'expected scalar type Half but found Float'; the error names the layer's dtype, the
    input's, and both conversions."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3)).to(model_dtype)
    with pytest.raises(lurker.TraceError) as info:
        lurker.trace(model, torch.randn(1, 3, 8, 8, dtype=input_dtype))
    want = str(model_dtype).removeprefix("torch.")
    got = str(input_dtype).removeprefix("torch.")
    cli = info.value.for_cli()
    assert f"Conv2d '0' has {want} parameters, so it takes {want} inputs, not {got}" in cli
    assert f"x.to(torch.{want}); CLI: --input-dtype {want}" in cli
    assert f"model.to(torch.{got})" in cli


class _Checks(nn.Module):
    """Checks its input as timm's patch embedding does: torch._assert on a bool."""

    def forward(self, x):
        torch._assert(x.shape[-1] == 8, f"Input width ({x.shape[-1]}) doesn't match model (8).")
        return x * 2


def test_a_failed_check_of_the_models_own_reads_as_one_sentence():
    """The model's assert reads no tensor: no "tensor inputs had shapes []", and its own
    message's full stop is not doubled."""
    with pytest.raises(lurker.TraceError) as info:
        lurker.trace(_Checks(), torch.randn(1, 3, 4, 4))
    text = info.value.for_cli()
    assert "AssertionError: Input width (4) doesn't match model (8). " in text, text
    assert ".." not in text and "shapes []" not in text


class _TooSmall(nn.Module):
    """Refuses small inputs in its own code, as torchvision's RAFT does (below 128 px)."""

    def forward(self, x):
        if x.shape[-1] < 128:
            raise ValueError(f"Feature maps are too small: got {x.shape[-1]}; use at least 128.")
        return x * 2


def test_a_models_own_error_keeps_one_full_stop():
    """RAFT's message ends with a full stop: the error reads '... at least 128. The
    model's input shapes ...', not '128.. The'."""
    with pytest.raises(lurker.TraceError) as info:
        lurker.trace(_TooSmall(), torch.randn(1, 3, 64, 64))
    text = info.value.for_cli()
    assert "use at least 128. The model's input shapes were (1, 3, 64, 64)." in text, text
    assert ".." not in text and ".." not in str(info.value)


class _TwoInputs(nn.Module):
    def forward(self, x, mask):
        return x * mask


def test_too_few_inputs_name_what_the_forward_takes():
    """One tensor for a forward of two: what it takes and what it got, not a TypeError
    "inside torch" called from lurker's own code."""
    with pytest.raises(lurker.TraceError) as info:
        lurker.trace(_TwoInputs(), torch.randn(2, 8))
    said, cli = str(info.value), info.value.for_cli()
    assert (
        "_TwoInputs.forward(x, mask) does not take the inputs given (a tensor of shape (2, 8))"
        in said
    )
    assert "'mask'" in said and "inside torch" not in said and "lurker/capture" not in said
    assert "lurker.trace(model, x, mask)" in said and '-i "1,3,224,224;1,7"' in cli
    with pytest.raises(
        lurker.TraceError, match=r"\(a tensor of shape \(2,\), a tensor of shape \(2,\), a tensor"
    ):
        lurker.trace(_TwoInputs(), torch.ones(2), torch.ones(2), torch.ones(2))


class _Unreadable:
    """A callable whose signature inspect cannot read (``inspect.signature`` raises
    TypeError, as for an extension's forward that sets a bad ``__signature__``)."""

    __signature__ = "not a Signature"

    def __call__(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return x * mask


def test_a_forward_with_no_readable_signature_still_says_why_the_call_failed():
    """The call check read the forward's signature with TypeError meaning "the inputs do
    not bind": an unreadable signature raised UnboundLocalError out of lurker.trace. Now
    the error is the forward's own, in one TraceError, and nothing claims a signature."""
    m = _TwoInputs()
    m.forward = _Unreadable()  # type: ignore[method-assign]
    with pytest.raises(TypeError):
        inspect.signature(m.forward)  # the premise: no signature to read
    with pytest.raises(lurker.TraceError) as info:
        lurker.trace(m, torch.randn(2, 8))
    said = str(info.value)
    assert "missing 1 required positional argument: 'mask'" in said, said
    assert "does not take the inputs given" not in said
    assert "The model's input shapes were (2, 8)." in said


def test_a_type_error_inside_the_forward_is_not_blamed_on_its_inputs():
    """A forward pre-hook supplies the second input; a TypeError raised inside the
    forward is the model's, not a call that "does not take the inputs given"."""

    class Hooked(nn.Module):
        def forward(self, x, mask):
            return torch.add(x * mask, "oops")

    m = Hooked()
    m.register_forward_pre_hook(lambda mod, args: (args[0], torch.ones_like(args[0])))
    with pytest.raises(lurker.TraceError) as info:
        lurker.trace(m, torch.randn(2, 4))
    assert "does not take the inputs given" not in str(info.value)
    assert "must be Tensor, not str" in str(info.value)


def test_token_ids_past_the_embedding_name_the_range():
    """Ids beyond the table: the range it takes and the range it got (the message only
    said the input might not have the right shape or dtype)."""
    model = nn.Sequential(nn.Embedding(100, 8), nn.Linear(8, 2))
    ids = torch.tensor([[1, 5, 200]])
    with pytest.raises(lurker.TraceError) as info:
        lurker.trace(model, ids)
    said = info.value.for_cli()
    assert "expects integer indices (long) in 0..99" in said, said
    assert "It got a tensor of shape (1, 3) (int64, values 1..200)" in said


def test_out_that_cannot_be_created_is_one_paragraph(tmp_path: Path):
    (tmp_path / "file").write_text("mine")
    r = _cli(*CLI_PROBE, "--out", str(tmp_path / "file" / "run"))
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert "cannot create the run directory" in r.output and "--out" in r.output
    with pytest.raises(LurkerError, match="is a file, not a run directory"):
        probe(_model(), digits(16, split="test"), out=tmp_path / "file", progress=False)
    assert (tmp_path / "file").read_text() == "mine"


# --------------------------------------------------------------------------- the CLI, as a user types it


def test_tilde_outputs_and_inputs_are_the_home_folder(tmp_path: Path, monkeypatch):
    """--out=~/runs/x (a shell leaves ~ after = alone) is the home folder for probe and
    featviz, and --image=~/x.png for explain, as for trace: no folder named ~ appears."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    r = _cli(*CLI_PROBE, "--k", "2", "--out=~/runs/x")
    assert r.exit_code == 0, r.output
    assert (home / "runs" / "x" / "run.db").is_file()
    spec = ["lurker.examples:DigitsNet", "--layer", "features.8", "--units", "0"]
    r = _cli("featviz", *spec, "--image-size", "16", "--steps", "2", "--out=~/fv")
    assert r.exit_code == 0, r.output
    assert (home / "fv" / "features.8-0000.png").is_file()
    Image.fromarray(np.zeros((16, 16), np.uint8), "L").save(home / "7.png")
    r = _cli("explain", "lurker.examples:DigitsNet", "--image=~/7.png", "--image-size", "16",
             "--out=~/h.png")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert (home / "h.png").is_file()
    assert not (tmp_path / "~").exists()


def _explain(tmp_path: Path, *args: str):
    img = tmp_path / "7.png"
    Image.fromarray(np.zeros((16, 16), np.uint8), "L").save(img)
    return _cli("explain", "lurker.examples:DigitsNet", "--image", str(img), "--image-size",
                "16", "--out", str(tmp_path / "h.png"), *args)  # fmt: skip


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--method", "integrated_gradients", "--option", "n_steps=abc"], "n_steps is an int"),
        (["--method", "integrated_gradients", "--option", "n_steps=2.5"], "n_steps is an int"),
        (["--method", "smoothgrad", "--option", "stdev=hi"], "stdev is a float"),
        (["--method", "saliency", "--option", "abs=maybe"], "abs is true or false"),
        (["--method", "lrp", "--option", "epsilon=True"], "epsilon is a float"),
    ],
)
def test_explain_option_of_the_wrong_type_is_one_paragraph(tmp_path: Path, args, said):
    """An --option value the method cannot take names the option and its type, rather
    than a TypeError from inside the method."""
    r = _explain(tmp_path, *args)
    assert r.exit_code == 2 and "Traceback" not in r.output, r.exception
    assert said in r.output and "--option" in r.output, r.output


def test_explain_options_read_as_typed(monkeypatch, tmp_path: Path):
    """abs=false is False (not the truthy string 'false'), layer=2 is the module path '2'
    of a Sequential (not the int 2), numbers and tuples are numbers and tuples."""
    import lurker.explain as xp

    seen: list[dict] = []
    real = xp.explain

    def spy(model, x, target=None, method="saliency", channel_dim=None, **options):
        seen.append(options)
        return real(model, x, target=target, method=method, channel_dim=channel_dim, **options)

    monkeypatch.setattr(xp, "explain", spy)
    r = _explain(tmp_path, "--method", "saliency", "--option", "abs=false")
    assert r.exit_code == 0, r.output
    r = _explain(tmp_path, "--method", "smoothgrad", "--option", "abs=TRUE", "--option", "stdev=1",
                 "--option", "n_samples=2")  # fmt: skip
    assert r.exit_code == 0, r.output
    r = _explain(tmp_path, "--method", "occlusion", "--option", "strides=(2, 2)")
    assert r.exit_code == 0, r.output
    assert seen == [{"abs": False}, {"abs": True, "stdev": 1, "n_samples": 2}, {"strides": (2, 2)}]
    from lurker.explain.cli import parse_options

    assert parse_options(["layer=2", "relu=0"], "gradcam") == {"layer": "2", "relu": False}
    assert parse_options(["internal_batch_size=None"], "integrated_gradients") == {
        "internal_batch_size": None
    }
    # a quoted string, as Python literals are written, is its text without the quotes
    assert parse_options(["composite='epsilon'", 'layer="features.2"'], "lrp") == {
        "composite": "epsilon",
        "layer": "features.2",
    }


def test_featviz_of_a_folder_that_is_not_a_run_says_so(tmp_path: Path):
    """A mistyped run path, or a folder without a run, is named as such, not read as a
    model spec with no ':'; an empty --units range is a --units error."""
    (tmp_path / "empty").mkdir()
    for path, why in (
        (tmp_path / "empty", "no run.db in it"),
        (tmp_path / "nope", "no such folder"),
    ):
        r = _cli("featviz", str(path), "--layer", "features.8")
        assert r.exit_code == 2 and "Traceback" not in r.output
        assert f"{path} is not a run directory ({why})" in r.output, r.output
        assert "has no ':'" not in r.output
    r = _cli("featviz", "lurker.examples:DigitsNet", "--layer", "features.8", "--units", "5-3")
    assert r.exit_code == 2 and "--units" in r.output and "Traceback" not in r.output


def test_images_explanations_refuse_the_unit_image_options(tmp_path: Path):
    """--layers, --kinds, --which and -b choose unit images: with --explanations, which
    makes none, they are refused before anything runs, not silently ignored."""
    for extra, named in (
        (["--layers", "features.8"], "--layers"),
        (["--kinds", "crop"], "--kinds"),
        (["--which", "max"], "--which"),
        (["-b", "4"], "--batch-size"),
    ):
        r = _cli("images", str(tmp_path), "--explanations", "top", *extra)
        assert r.exit_code == 2 and "Traceback" not in r.output
        assert named in r.output and "--explanations" in r.output, r.output


def test_serve_weights_without_a_model_names_the_option(tmp_path: Path, monkeypatch):
    import lurker.server.serve as served

    monkeypatch.setattr(served, "serve_forever", lambda *a, **k: pytest.fail("served"))
    w = tmp_path / "w.pt"
    torch.save(_model().state_dict(), w)
    r = _cli("serve", str(tmp_path), "--weights", str(w))
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert "--model" in r.output and "model='SPEC'" not in r.output, r.output


@pytest.fixture(scope="module")
def python_run(tmp_path_factory) -> Path:
    """A small run probed from Python (it records no model spec)."""
    out = tmp_path_factory.mktemp("py") / "run"
    probe(_model(), digits(16, split="test"), out=out, layers="features.8", k=2, progress=False)
    return out


def test_images_layer_typo_gets_close_names(python_run: Path):
    from lurker.probe import UnitImages

    images = UnitImages(python_run, model=_model(), dataset=digits(16, split="test"))
    with pytest.raises(LurkerError, match=r"Close names: features\.8"):
        images.select(["featurs.8"])


def test_explanations_of_a_python_run_say_what_to_do(python_run: Path):
    """`lurker images --explanations` cannot be helped by serving: the message says why
    (no recorded model) and what makes them, not only `lurker serve --model`."""
    r = _cli("images", str(python_run), "--explanations", "2")
    assert r.exit_code == 2 and "Traceback" not in r.output
    said = r.output.replace("\n", " ")
    assert "cannot precompute the explanations" in said and "probed from Python" in said
    assert "probe it from the command line" in said, said


def test_printed_commands_quote_paths_with_spaces(python_run: Path, tmp_path: Path):
    """The command `lurker export` prints to view the site works when pasted, spaces and
    all."""
    import shlex

    site = tmp_path / "my site"
    r = _cli("export", str(python_run), str(site), "--no-images")
    assert r.exit_code == 0, r.output
    printed = r.output.strip().splitlines()[-1]
    command = printed.split("open it with: ", 1)[1].rstrip(")")
    assert shlex.split(command)[-1] == str(site), printed


def test_images_which_takes_what_its_help_lists():
    """Every value `lurker images --help` offers for --which is one it accepts."""
    import re

    from lurker.probe.views import LISTS, _checked_choice

    (opt,) = [p for p in main.commands["images"].params if p.name == "which"]
    listed = re.search(r":\s*(.*?)\.?$", opt.help).group(1)
    for value in re.split(r",\s+|\s+or\s+", listed):
        _checked_choice("which", value.split(","), LISTS)


def test_positions_past_the_context_do_not_blame_the_input_dtype():
    """A sequence longer than the model's context overflows its position embedding, whose
    indices the model makes itself (arange): --input-dtype cannot fix that, so the message
    names the range without suggesting it (token ids straight from the input still do)."""
    from lurker.examples import TinyGPT

    model = TinyGPT(vocab_size=100, context=8, dim=16, depth=1, heads=2).eval()
    with pytest.raises(lurker.TraceError) as info:
        lurker.trace(model, torch.randint(0, 100, (1, 12)))
    said = info.value.for_cli()
    assert "Embedding 'pos' expects integer indices (long) in 0..7." in said, said
    assert "--input-dtype" not in said, said
    with pytest.raises(lurker.TraceError) as info:
        lurker.trace(model, torch.randn(1, 4))
    assert "e.g. --input-dtype long:0-100" in info.value.for_cli()


def test_moved_weights_of_a_run_are_named_as_the_runs(tmp_path: Path):
    """`lurker images` takes no --weights: when the file the run records is gone, the
    message says it is the run's recorded file and what to do, not "the path passed as
    weights"; `lurker featviz RUN` says to pass --weights."""
    w = tmp_path / "w.pt"
    torch.save(_model().state_dict(), w)
    run = tmp_path / "run"
    r = _cli(*CLI_PROBE, "--k", "2", "-w", str(w), "--out", str(run))
    assert r.exit_code == 0, r.output
    w.unlink()
    r = _cli("images", str(run))
    assert r.exit_code == 2 and "Traceback" not in r.output
    said = r.output.replace("\n", " ")
    assert f"records its weights as {w}" in said and "passed as weights" not in said, said
    r = _cli("featviz", str(run), "--layer", "features.8")
    assert r.exit_code == 2 and "recorded weights" in r.output and "--weights" in r.output


def test_moved_dataset_of_a_run_is_named_and_export_says_images_are_missing(tmp_path: Path):
    """The image folder a run records is gone: `lurker images` names it as the run's
    recorded folder (it takes no --data), and `lurker export` says the site's samples have
    no images and why, rather than writing them without a word."""
    folder = tmp_path / "data"
    for c in ("a", "b"):
        (folder / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((16, 16), 40 * i, np.uint8), "L").save(folder / c / f"{i}.png")
    run = tmp_path / "run"
    args = ["probe", "lurker.examples:DigitsNet", "--data", str(folder), "--image-size", "16"]
    r = _cli(*args, "--layers", "features.8", "--k", "2", "--out", str(run))
    assert r.exit_code == 0, r.output
    folder.rename(tmp_path / "moved")
    r = _cli("images", str(run))
    assert r.exit_code == 2 and "Traceback" not in r.output
    said = r.output.replace("\n", " ")
    assert f"records its dataset as the folder {folder}" in said, said
    with pytest.warns(
        UserWarning, match=f"top-k samples have no image.*{re.escape(str(folder))} does not exist"
    ):
        r = _cli("export", str(run), str(tmp_path / "site"))
    assert r.exit_code == 0, r.output


class _ListOfImages(nn.Module):
    """A detector's forward: a list of (C, H, W) images, iterated one by one (as
    torchvision's GeneralizedRCNN, FCOS, RetinaNet and SSD do)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self.conv(img.unsqueeze(0)).mean((2, 3)) for img in images]


class _Unannotated(_ListOfImages):
    def forward(self, images):  # type: ignore[override]  (as RetinaNet: no annotation)
        return [self.conv(img.unsqueeze(0)).mean((2, 3)) for img in images]


@pytest.mark.parametrize("cls", [_ListOfImages, _Unannotated])
@pytest.mark.parametrize("given", ["dict", "tensor"])
def test_a_list_of_images_model_given_a_dict_or_one_tensor_is_told_to_pass_a_list(
    cls: type[nn.Module], given: str
) -> None:
    """A detector traced with {"images": [x]} said only "'str' object has no attribute
    'shape'" (it iterated the dict's keys), and with a bare (3, H, W) tensor the model's
    own complaint about a 2-D image: neither said to pass [x]. Oracle: [x] traces, and
    gives the model's own output."""
    torch.manual_seed(0)
    model = cls().eval()
    x = torch.rand(3, 12, 12)
    with pytest.raises(LurkerError) as err:
        lurker.trace(model, {"images": [x]} if given == "dict" else x)
    said = str(err.value)
    assert "forward takes 'images' as a list of image tensors" in said
    assert "pass lurker.trace(model, [x])" in said
    assert ("a dict" if given == "dict" else "a tensor of shape (3, 12, 12)") in said
    tr = lurker.trace(model, [x])
    torch.testing.assert_close(tr.output[0], model([x])[0], rtol=0, atol=0)


@pytest.mark.parametrize(
    ("cls", "shape", "want"),
    [
        ("_ListOfImages", "3,12,12", '-i "[3,12,12]"'),
        ("_Unannotated", "3,12,12", '-i "[3,12,12]"'),
    ],
)
def test_lurker_trace_tells_a_list_of_images_as_an_input_shape(
    tmp_path: Path, cls: str, shape: str, want: str
) -> None:
    """`lurker trace` of a detector given one tensor printed the Python fix
    (``lurker.trace(model, [x])``), which no command line takes; now the -i that gives the
    same images as a list. Oracle: that -i traces the model."""
    spec = f"{__name__}:{cls}"
    r = _cli("trace", spec, "-i", shape, "--out", str(tmp_path / "g.dot"), "--no-validate")
    assert r.exit_code == 2 and "Traceback" not in r.output
    said = r.output.replace("\n", " ")
    assert (
        "lurker.trace(" not in said
        and f"one C,H,W shape per image separated by ';': {want}" in said
    )
    fixed = want.removeprefix('-i "').removesuffix('"')
    r = _cli("trace", spec, "-i", fixed, "--out", str(tmp_path / "g.dot"), "--no-validate")
    assert r.exit_code == 0, r.output


def test_a_list_of_images_model_given_a_list_gets_no_such_hint() -> None:
    """The hint is for the wrong container only: a list whose image is wrong is the
    model's own error, said without it."""
    with pytest.raises(LurkerError) as err:
        lurker.trace(_ListOfImages().eval(), [torch.rand(5, 12, 12)])
    assert "as a list of image tensors" not in str(err.value)


def test_a_model_whose_batch_is_named_images_gets_no_list_hint() -> None:
    """A plain model whose forward names its (B, C, H, W) batch ``images`` (no annotation)
    is not a detector: its own error (a wrong Linear width) was told to pass
    lurker.trace(model, list(x)), which fails too."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c = nn.Conv2d(3, 4, 3)
            self.fc = nn.Linear(10, 2)

        def forward(self, images):  # type: ignore[no-untyped-def]
            return self.fc(self.c(images).flatten(1))

    with pytest.raises(LurkerError) as err:
        lurker.trace(Net().eval(), torch.randn(2, 3, 8, 8))
    assert "in_features=10" in str(err.value)
    assert "list of image tensors" not in str(err.value)
