"""Tests for lurker.models: model specs, weights loading, input shapes."""

from __future__ import annotations

import re
import sys
import textwrap
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from lurker.errors import InputSpecError, LurkerError, ModelSpecError, WeightsError
from lurker.models import example_inputs, load_model, parse_input_shape

FACTORY_SOURCE = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))

    @classmethod
    def factory(cls):
        return cls()


def build():
    return Net()


def build_wide():
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))


def needs_args(width):
    return nn.Linear(4, width)


def broken():
    raise ValueError("boom: bad config")


def not_a_model():
    return {"fc1.weight": torch.zeros(8, 4)}


instance = nn.Linear(3, 3)
instance.train()
NUMBER = 3
"""


def _write(path: Path, source: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(source))
    return path


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    return _write(tmp_path / "mynet.py", FACTORY_SOURCE)


@pytest.fixture
def model_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """An importable package ``lurker_testpkg_models.nets`` with the factory source."""
    root = tmp_path / "site"
    name = "lurker_testpkg_models"
    _write(root / name / "__init__.py", "")
    _write(root / name / "nets.py", FACTORY_SOURCE)
    _write(root / name / "needs_dep.py", "import lurker_no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(root))
    yield name
    for mod in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        del sys.modules[mod]


def _saved_net(tmp_path: Path, model_file: Path, payload=None) -> tuple[Path, dict]:
    """Save the state dict of a random ``build()`` model (optionally wrapped) and return it."""
    model = load_model(f"{model_file}:build")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    path = tmp_path / "weights.pt"
    torch.save(payload(state) if payload else state, path)
    return path, state


def _assert_params_equal(model: nn.Module, state: dict) -> None:
    loaded = model.state_dict()
    assert set(loaded) == set(state)
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key


# --------------------------------------------------------------------------- spec forms


def test_torchvision_spec_builds_random_init_model_in_eval_mode():
    model = load_model("torchvision:resnet18")
    assert type(model).__name__ == "ResNet"
    assert not model.training
    assert model.fc.out_features == 1000
    assert next(model.parameters()).device.type == "cpu"


def test_torchvision_unknown_name_suggests_close_match():
    with pytest.raises(ModelSpecError) as info:
        load_model("torchvision:resnet19")
    message = str(info.value)
    assert "resnet19" in message
    assert "resnet18" in message
    assert "list_models" in message


def test_file_spec_calls_factory(model_file: Path):
    model = load_model(f"{model_file}:build")
    assert type(model).__name__ == "Net"
    assert not model.training
    assert model(torch.zeros(1, 4)).shape == (1, 2)


def test_file_spec_dotted_attribute_and_class(model_file: Path):
    assert type(load_model(f"{model_file}:Net.factory")).__name__ == "Net"
    assert type(load_model(f"{model_file}:Net")).__name__ == "Net"


def test_file_spec_uses_module_instance_as_is(model_file: Path):
    model = load_model(f"{model_file}:instance")
    assert isinstance(model, nn.Linear)
    assert model.in_features == 3
    assert not model.training


def test_file_spec_local_import_and_sys_path_restored(tmp_path: Path):
    _write(tmp_path / "proj" / "lurker_helper_blocks_xyz.py", "WIDTH = 7\n")
    _write(
        tmp_path / "proj" / "main_net.py",
        """
        from torch import nn
        from lurker_helper_blocks_xyz import WIDTH

        def build():
            return nn.Linear(2, WIDTH)
        """,
    )
    before = list(sys.path)
    try:
        model = load_model(f"{tmp_path / 'proj' / 'main_net.py'}:build")
    finally:
        sys.modules.pop("lurker_helper_blocks_xyz", None)
    assert model.out_features == 7
    assert sys.path == before


def test_file_spec_loaded_twice_gives_independent_modules(model_file: Path):
    a = load_model(f"{model_file}:build")
    b = load_model(f"{model_file}:build")
    assert type(a).__module__ != type(b).__module__


def test_package_module_spec(model_package: str):
    model = load_model(f"{model_package}.nets:build")
    assert type(model).__name__ == "Net"
    assert not model.training
    assert type(load_model(f"{model_package}.nets:Net.factory")).__name__ == "Net"


def test_timm_spec_uses_create_model_without_pretrained(monkeypatch: pytest.MonkeyPatch):
    calls = []

    def create_model(name, pretrained=True):
        calls.append((name, pretrained))
        return nn.Linear(2, 2)

    fake = types.ModuleType("timm")
    fake.create_model = create_model
    monkeypatch.setitem(sys.modules, "timm", fake)
    model = load_model("timm:tiny_thing")
    assert isinstance(model, nn.Linear)
    assert calls == [("tiny_thing", False)]


def test_timm_missing_says_pip_install(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # makes `import timm` raise ImportError
    with pytest.raises(ModelSpecError, match="pip install timm"):
        load_model("timm:resnet18")


# --------------------------------------------------------------------------- spec errors


def test_spec_without_colon_explains_forms():
    with pytest.raises(ModelSpecError) as info:
        load_model("mobilenet_v3_small")
    message = str(info.value)
    assert "torchvision:mobilenet_v3_small" in message  # the "did you mean"
    assert "package.module:callable" in message
    assert "file.py:callable" in message


def test_py_file_without_callable_asks_for_one(model_file: Path):
    with pytest.raises(ModelSpecError, match=r":build_model"):
        load_model(str(model_file))


def test_missing_module(model_package: str):
    with pytest.raises(ModelSpecError) as info:
        load_model(f"{model_package}.nope:build")
    assert f"{model_package}.nope" in str(info.value)
    assert "PYTHONPATH" in str(info.value)
    assert isinstance(info.value.__cause__, ModuleNotFoundError)


def test_module_with_missing_dependency_names_the_dependency(model_package: str):
    with pytest.raises(ModelSpecError) as info:
        load_model(f"{model_package}.needs_dep:build")
    assert "lurker_no_such_dependency_xyz" in str(info.value)
    assert "not installed" in str(info.value)


def test_missing_file_names_path(tmp_path: Path):
    missing = tmp_path / "nowhere" / "net.py"
    with pytest.raises(ModelSpecError) as info:
        load_model(f"{missing}:build")
    assert str(missing) in str(info.value)
    assert "does not exist" in str(info.value)


def test_file_that_raises_on_import(tmp_path: Path):
    path = _write(tmp_path / "bad.py", "raise RuntimeError('cannot import me')\n")
    with pytest.raises(ModelSpecError) as info:
        load_model(f"{path}:build")
    assert "RuntimeError" in str(info.value)
    assert "cannot import me" in str(info.value)
    assert not any(m.startswith("_lurker_user_bad_") for m in sys.modules)


def test_missing_attribute_lists_public_callables(model_file: Path):
    with pytest.raises(ModelSpecError) as info:
        load_model(f"{model_file}:biuld")
    message = str(info.value)
    assert "'biuld'" in message
    assert "Did you mean 'build'" in message
    for name in ("build", "build_wide", "Net", "instance"):
        assert name in message
    assert "_lurker_user" not in message  # the file is named as the user wrote it
    assert isinstance(info.value.__cause__, AttributeError)


def test_missing_nested_attribute(model_file: Path):
    with pytest.raises(ModelSpecError, match=r"Net has no attribute 'nope'.*factory"):
        load_model(f"{model_file}:Net.nope")


def test_callable_that_raises_is_wrapped(model_file: Path):
    with pytest.raises(ModelSpecError) as info:
        load_model(f"{model_file}:broken")
    message = str(info.value)
    assert "broken()" in message
    assert "ValueError" in message
    assert "boom: bad config" in message
    assert isinstance(info.value.__cause__, ValueError)


def test_callable_needing_arguments_suggests_factory(model_file: Path):
    with pytest.raises(ModelSpecError, match=r"needs_args.*TypeError.*no arguments"):
        load_model(f"{model_file}:needs_args")


def test_callable_returning_non_module(model_file: Path):
    with pytest.raises(ModelSpecError, match=r"returned a dict, not a torch.nn.Module"):
        load_model(f"{model_file}:not_a_model")


def test_attribute_that_is_not_callable(model_file: Path):
    with pytest.raises(ModelSpecError, match=r"'NUMBER' is a int"):
        load_model(f"{model_file}:NUMBER")


def test_directory_path_without_py_is_rejected(tmp_path: Path):
    with pytest.raises(ModelSpecError, match=r"does not end in '.py'"):
        load_model(f"{tmp_path}/net:build")


def test_model_spec_errors_are_lurker_errors():
    with pytest.raises(LurkerError):
        load_model("torchvision:definitely_not_a_model")


# --------------------------------------------------------------------------- weights


def test_state_dict_round_trip(tmp_path: Path, model_file: Path):
    path, state = _saved_net(tmp_path, model_file)
    model = load_model(f"{model_file}:build", weights=path)
    _assert_params_equal(model, state)
    assert not model.training


def test_weights_accepts_str_path(tmp_path: Path, model_file: Path):
    path, state = _saved_net(tmp_path, model_file)
    _assert_params_equal(load_model(f"{model_file}:build", weights=str(path)), state)


@pytest.mark.parametrize("key", ["state_dict", "model_state_dict", "model", "net", "weights"])
def test_wrapped_state_dict(tmp_path: Path, model_file: Path, key: str):
    path, state = _saved_net(
        tmp_path, model_file, lambda sd: {key: sd, "epoch": 3, "optimizer": {"lr": 0.1}}
    )
    _assert_params_equal(load_model(f"{model_file}:build", weights=path), state)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "_orig_mod.module."])
def test_wrapper_prefixes_are_stripped(tmp_path: Path, model_file: Path, prefix: str):
    path, state = _saved_net(
        tmp_path, model_file, lambda sd: {"state_dict": {prefix + k: v for k, v in sd.items()}}
    )
    _assert_params_equal(load_model(f"{model_file}:build", weights=path), state)


def test_prefix_kept_when_model_itself_uses_it(tmp_path: Path):
    path = _write(
        tmp_path / "wrapped.py",
        """
        from torch import nn

        class Wrapper(nn.Module):
            def __init__(self):
                super().__init__()
                self.module = nn.Linear(2, 2)

        def build():
            return Wrapper()
        """,
    )
    original = load_model(f"{path}:build")
    weights = tmp_path / "w.pt"
    torch.save(original.state_dict(), weights)
    _assert_params_equal(load_model(f"{path}:build", weights=weights), original.state_dict())


def test_torchvision_round_trip(tmp_path: Path):
    source = load_model("torchvision:mobilenet_v3_small")
    path = tmp_path / "mnv3.pt"
    torch.save({"model": source.state_dict()}, path)
    fresh = load_model("torchvision:mobilenet_v3_small", weights=path)
    _assert_params_equal(fresh, source.state_dict())


def test_missing_weights_file_names_path(tmp_path: Path, model_file: Path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(WeightsError) as info:
        load_model(f"{model_file}:build", weights=missing)
    assert str(missing) in str(info.value)


def test_full_pickled_model_is_rejected(tmp_path: Path):
    path = tmp_path / "full.pt"
    torch.save(nn.Sequential(nn.Linear(4, 8)), path)
    with pytest.raises(WeightsError) as info:
        load_model("torchvision:resnet18", weights=path)
    message = str(info.value)
    assert "weights_only" in message
    assert "torch.save(model.state_dict(), path)" in message
    assert "torch.nn.modules" in message  # names what it refused


def test_garbage_file_is_rejected(tmp_path: Path, model_file: Path):
    path = tmp_path / "junk.pt"
    path.write_bytes(b"this is not a checkpoint")
    with pytest.raises(WeightsError) as info:
        load_model(f"{model_file}:build", weights=path)
    assert str(path) in str(info.value)
    assert "is not a PyTorch checkpoint: it is a text file" in str(info.value)
    assert "state dict" in str(info.value)


@pytest.mark.parametrize(
    ("data", "what"),
    [
        (b"x\n", "a text file (it starts with 'x')"),
        # a multi-byte character cut by the 64 bytes read is still text
        (("a" * 63 + "é and more").encode(), "a text file"),
        (b"", "an empty file"),
        (b"\x89HDF\r\n\x1a\n" + bytes(8), "an HDF5 file"),
        (b"<html><body>404</body></html>", "an HTML or XML document"),
        (b"\x00\x01\x02\xfe\xff" * 4, "binary data of an unknown format"),
    ],
)
def test_file_that_is_not_a_checkpoint_is_named(
    tmp_path: Path, model_file: Path, data: bytes, what: str
):
    """`echo x > w.pt` is a text file, not "a pickled model"."""
    path = tmp_path / "w.pt"
    path.write_bytes(data)
    with pytest.raises(WeightsError) as info:
        load_model(f"{model_file}:build", weights=path)
    assert what in str(info.value)
    assert "pickled" not in str(info.value)


def test_legacy_pickle_checkpoint_still_loads(tmp_path: Path, model_file: Path):
    model = load_model(f"{model_file}:build")
    with torch.no_grad():
        model.fc1.weight.add_(1.0)  # differs from the random init load_model starts from
    path = tmp_path / "legacy.pt"
    torch.save(model.state_dict(), path, _use_new_zipfile_serialization=False)
    loaded = load_model(f"{model_file}:build", weights=path)
    assert torch.equal(loaded.fc1.weight, model.fc1.weight)


def test_dict_without_state_dict_is_rejected(tmp_path: Path, model_file: Path):
    path = tmp_path / "meta.pt"
    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}}, path)
    with pytest.raises(WeightsError, match=r"'epoch'.*'optimizer'"):
        load_model(f"{model_file}:build", weights=path)


def test_tensor_checkpoint_is_rejected(tmp_path: Path, model_file: Path):
    path = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), path)
    with pytest.raises(WeightsError, match=r"holds a Tensor, not a state dict"):
        load_model(f"{model_file}:build", weights=path)


def test_wrong_architecture_lists_missing_and_unexpected_keys(tmp_path: Path, model_file: Path):
    path, _ = _saved_net(tmp_path, model_file)  # keys fc1.*, fc2.*
    with pytest.raises(WeightsError) as info:
        load_model(f"{model_file}:build_wide", weights=path)  # keys 0.*, 2.*
    message = str(info.value)
    assert "4 missing key(s)" in message
    assert "0.weight" in message and "2.bias" in message
    assert "4 unexpected key(s)" in message
    assert "fc1.weight" in message and "fc2.bias" in message
    assert "different architecture" in message


def test_shape_mismatch_lists_shapes(tmp_path: Path):
    path = _write(
        tmp_path / "heads.py",
        """
        from torch import nn

        def ten():
            return nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 10))

        def three():
            return nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 3))
        """,
    )
    weights = tmp_path / "ten.pt"
    torch.save(load_model(f"{path}:ten").state_dict(), weights)
    with pytest.raises(WeightsError) as info:
        load_model(f"{path}:three", weights=weights)
    message = str(info.value)
    assert "2 shape mismatch(es)" in message
    assert "1.weight: checkpoint (10, 4) vs model (3, 4)" in message
    assert "1.bias: checkpoint (10,) vs model (3,)" in message
    assert "missing" not in message
    assert "num_classes" in message


def test_mismatch_listing_is_capped(tmp_path: Path):
    path = _write(
        tmp_path / "deep.py",
        """
        from torch import nn

        def deep():
            return nn.Sequential(*[nn.Linear(2, 2) for _ in range(6)])
        """,
    )
    weights = tmp_path / "other.pt"
    torch.save({"other": torch.zeros(1)}, weights)
    with pytest.raises(WeightsError) as info:
        load_model(f"{path}:deep", weights=weights)
    message = str(info.value)
    assert "12 missing key(s)" in message
    assert "... and 7 more" in message
    assert "1 unexpected key(s) the model does not have: other" in message


# --------------------------------------------------------------------------- input shapes


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1,3,224,224", [(1, 3, 224, 224)]),
        ("1x3x224x224", [(1, 3, 224, 224)]),
        ("1,10;1,5", [(1, 10), (1, 5)]),
        ("1,10 1,5", [(1, 10), (1, 5)]),
        ("  1, 3, 8 ; 2x4;", [(1, 3, 8), (2, 4)]),
        ("(1,3)", [(1, 3)]),
        ("7", [(7,)]),
    ],
)
def test_parse_input_shape_valid(text: str, expected: list[tuple[int, ...]]):
    assert parse_input_shape(text) == expected


@pytest.mark.parametrize(
    ("text", "bad"),
    [
        ("", "Empty"),
        (" ; ", "Empty"),
        ("1,a,3", "'a'"),
        ("1,3.5", "'3.5'"),
        ("1,0,3", "dimension 0"),
        ("1,-2", "'-2'"),
        ("1,,3", "empty dimension"),
        ("1,10;1,x", "'1,x'"),
    ],
)
def test_parse_input_shape_invalid(text: str, bad: str):
    with pytest.raises(InputSpecError) as info:
        parse_input_shape(text)
    assert bad in str(info.value)
    assert "1,3,224,224" in str(info.value)  # shows a valid example


# --------------------------------------------------------------------------- example inputs


def test_example_inputs_shapes_and_determinism():
    a = example_inputs([(2, 3), (4,)], seed=1)
    b = example_inputs([(2, 3), (4,)], seed=1)
    c = example_inputs([(2, 3), (4,)], seed=2)
    assert [t.shape for t in a] == [(2, 3), (4,)]
    assert all(t.dtype == torch.float32 for t in a)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])


def test_example_inputs_does_not_touch_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    example_inputs([(5, 5)])
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.int64, torch.bool])
def test_example_inputs_dtypes(dtype: torch.dtype):
    (t,) = example_inputs([(3, 4)], dtype=dtype)
    assert t.dtype == dtype
    if not dtype.is_floating_point:
        assert set(t.long().flatten().tolist()) <= {0, 1}


def test_example_inputs_feed_a_loaded_model():
    model = load_model("torchvision:mobilenet_v3_small")
    (x,) = example_inputs(parse_input_shape("1x3x64x64"))
    with torch.no_grad():
        assert model(x).shape == (1, 1000)


# --------------------------------------------------------------------------- offline builds


def _block_network(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[str]:
    """Make every way torchvision fetches or reuses weights fail loudly; returns the log."""
    import socket
    import urllib.request

    import torchvision

    attempts: list[str] = []

    def refuse(what: str):
        def fail(*args, **kwargs):
            attempts.append(f"{what} {args[:2]}")
            raise AssertionError(f"{what} called: building a model must not fetch anything")

        return fail

    monkeypatch.setattr(socket.socket, "connect", refuse("socket.connect"))
    monkeypatch.setattr(urllib.request, "urlopen", refuse("urlopen"))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse("load_state_dict_from_url"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse("download_url_to_file"))
    # weights already in TORCH_HOME are read through this, without any network
    monkeypatch.setattr(
        torchvision.models.WeightsEnum, "get_state_dict", refuse("WeightsEnum.get_state_dict")
    )
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    return attempts


def test_every_advertised_torchvision_spec_builds_offline(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    """Detection and segmentation builders fetch an ImageNet backbone unless told not to
    (weights_backbone); with the network blocked every advertised spec must still build.

    Built on the meta device (no memory, no init cost); the regnets' constructors need real
    tensors, so their smallest members are built on the CPU (one builder per family)."""
    from lurker.models import torchvision_specs

    attempts = _block_network(monkeypatch, tmp_path)
    specs = torchvision_specs()
    assert {"classification", "detection", "segmentation", "video", "optical flow"} <= set(specs)
    assert "fasterrcnn_mobilenet_v3_large_fpn" in specs["detection"]
    assert {"deeplabv3_resnet50", "lraspp_mobilenet_v3_large"} <= set(specs["segmentation"])
    names = [n for task in specs.values() for n in task]
    assert len(names) > 100
    meta_failed = []
    for name in names:
        try:
            with torch.device("meta"):
                load_model(f"torchvision:{name}", device="meta")
        except ModelSpecError as e:
            assert "meta tensor" in str(e), f"{name}: {e}"
            meta_failed.append(name)
    assert attempts == []
    assert meta_failed and all(n.startswith("regnet_") for n in meta_failed)
    for name in ("regnet_x_400mf", "regnet_y_400mf"):
        assert name in meta_failed
        load_model(f"torchvision:{name}")
    assert attempts == []


def test_detection_spec_has_random_backbone(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """The backbone is random-init too: two seeds' models would differ, none has weights
    from a cache (a cached ImageNet backbone would be used silently otherwise)."""
    attempts = _block_network(monkeypatch, tmp_path)
    model = load_model("torchvision:lraspp_mobilenet_v3_large")
    assert attempts == []
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert model(x)["out"].shape == (1, 21, 32, 32)


# --------------------------------------------------------------------------- input specs


def test_parse_inputs_dtypes_ranges_and_lists():
    from lurker.models import InputSpec, parse_inputs

    (tokens,) = parse_inputs("1,16", "long:0-50257")
    assert tokens == InputSpec(((1, 16),), dtype=torch.int64, low=0, high=50257)
    a, b = parse_inputs("1,16; 1,16", "long:100;bool")
    assert (a.dtype, a.low, a.high) == (torch.int64, 0, 100)
    assert (b.dtype, b.low, b.high) == (torch.bool, None, None)
    (imgs,) = parse_inputs("[3,128,128; 3,96,64]")
    assert imgs.is_list and imgs.shapes == ((3, 128, 128), (3, 96, 64))
    x, lst = parse_inputs("1,3,8,8 [3,8,8]", "half")
    assert not x.is_list and lst.is_list and x.dtype == lst.dtype == torch.float16
    (f,) = parse_inputs("4", "float:-1-1")
    assert (f.low, f.high) == (-1.0, 1.0)


@pytest.mark.parametrize(
    ("shapes", "dtypes", "bad"),
    [
        ("1,16", "long:0-", "Invalid value range"),
        ("1,16", "long:5-5", "empty value range"),
        ("1,16", "long:0-1.5", "integer bounds"),
        ("1,16", "uint8:0-300", "does not fit"),
        ("1,16", "bool:0-3", "not bool"),
        ("1,16", "token", "Unknown input dtype 'token'"),
        ("1,16;1,16;1,4", "long;long", "2 dtypes for 3 inputs"),
        ("[3,8,8", None, "Unbalanced"),
        ("[]", None, "Empty list"),
        ("[3,0,8]", None, "dimension 0"),
    ],
)
def test_parse_inputs_errors_name_the_problem(shapes: str, dtypes: str | None, bad: str):
    from lurker.models import parse_inputs

    with pytest.raises(InputSpecError, match=re.escape(bad)):
        parse_inputs(shapes, dtypes)


def test_example_inputs_follow_specs():
    from lurker.models import parse_inputs

    ids, mask, images = example_inputs(
        parse_inputs("2,500;2,500;[3,8,8;3,4,4]", "long:7-11;bool;float")
    )
    assert ids.dtype == torch.int64 and int(ids.min()) >= 7 and int(ids.max()) < 11
    assert set(ids.flatten().tolist()) == {7, 8, 9, 10}  # 1000 draws cover the range
    assert mask.dtype == torch.bool
    assert isinstance(images, list) and [t.shape for t in images] == [(3, 8, 8), (3, 4, 4)]
    (u,) = example_inputs(parse_inputs("1000", "double:2-3"))
    assert u.dtype == torch.float64 and float(u.min()) >= 2 and float(u.max()) < 3
    again = example_inputs(parse_inputs("2,500;2,500;[3,8,8;3,4,4]", "long:7-11;bool;float"))
    assert torch.equal(again[0], ids) and torch.equal(again[2][1], images[1])
