"""Bad arguments to a Trace's methods: a LurkerError naming the argument and the fix, not a
raw TypeError or AttributeError from inside lurker or torch, nor a bad value taken."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn

import lurker
from lurker.errors import LurkerError


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


@pytest.mark.parametrize(
    "tolerance",
    [{"rtol": "a"}, {"atol": "1e-5"}, {"rtol": -1}, {"atol": None}, {"atol": float("nan")}],
)
def test_validate_refuses_a_tolerance_that_is_not_a_number_at_least_zero(
    tolerance: dict[str, Any],
) -> None:
    """tr.validate(rtol="a") passed every op that re-ran bit for bit, and failed inside
    torch.allclose (or, for atol=None, in a comparison) only at the first that did not; a
    negative or NaN one likewise. It is refused before anything runs, by name."""
    tr = lurker.trace(_mlp(), torch.randn(2, 4))
    (name,) = tolerance
    with pytest.raises(LurkerError, match=rf"trace\.validate\({name}=.*finite number >= 0"):
        tr.validate(**tolerance)
    assert tr.validate(rtol=0, atol=1e-6).checked == 3  # numbers at the limits stay taken


@pytest.mark.parametrize(
    ("call", "said"),
    [
        (lambda tr: tr.backward(output="logits"), r"output=\.\.\.\) got a str.*out\[:, 0\]"),
        (lambda tr: tr.backward(output=tr.output), r"got a Tensor.*out\[:, 0\]\.sum\(\)"),
        (lambda tr: tr.run(torch.randn(2, 4), hooks=[("0", lambda op, h: h)]), "hooks= is a list"),
        (lambda tr: tr.hooks([("0", lambda op, h: h)]), r"hooks= is a list.*dict\(pairs\)"),
    ],
)
def test_a_function_or_mapping_argument_of_another_type_is_named(call: Any, said: str) -> None:
    """tr.backward(output="logits") raised "'str' object is not callable" and hooks= as a
    list of pairs "'list' object has no attribute 'items'"; each is a LurkerError naming the
    argument and the form it takes."""
    tr = lurker.trace(_mlp(), torch.randn(2, 4), grads=True)
    with pytest.raises(LurkerError, match=said):
        call(tr)
    tr.backward(output=lambda out: out[:, 1].sum())  # the trace is left usable
    assert tr["0"].grad is not None


class _Steps(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: Tensor, steps: int) -> Tensor:
        for _ in range(steps):
            x = self.lin(x)
        return x


@pytest.mark.parametrize(
    ("args", "kwargs", "said"),
    [
        ((), {}, r"argument 'steps' is missing \(traced as 3\)"),
        ((), {"x": torch.randn(5, 4)}, r"argument 'steps' is missing \(traced as 3\)"),
        ((), {"step": 3}, r"'steps' is missing .*argument 'step' \(3\) is passed"),
    ],
)
def test_run_without_a_plain_argument_of_the_traced_call_names_it(
    args: tuple, kwargs: dict, said: str
) -> None:
    """tr.run(x) on a trace of model(x, steps=3) said "input 'x' is missing ... 'args[0]'
    is passed", blaming the tensor that was passed (or, for tr.run(x=x), raised torch's
    TypeError as it was): it names the argument that is missing, with its traced value."""
    tr = lurker.trace(_Steps(), torch.randn(2, 4), steps=3)
    x = torch.randn(5, 4)
    call_args = (x, *args) if "x" not in kwargs else args
    with pytest.raises(LurkerError, match=said) as err:
        tr.run(*call_args, **kwargs)
    assert "input 'x'" not in str(err.value) and "args[0]" not in str(err.value)
    torch.testing.assert_close(tr.run(x, steps=3).output, tr.model(x, 3))  # the oracle


@pytest.mark.parametrize(
    ("save_to", "said"),
    [
        ("gpu9", r"save_to='gpu9' is not a device\. Pass 'cpu', 'cuda'"),
        (99, r"save_to=99 asks for cuda:99, but this machine has .*Pass save_to='cpu'"),
        ("meta", r"save_to='meta' keeps no values .*Pass save_to='cpu'"),
    ],
)
def test_a_save_to_device_that_is_not_one_or_not_here_is_named(save_to: Any, said: str) -> None:
    """save_to="gpu9" raised torch's "Invalid device string", and save_to=3 without that
    GPU "Found no NVIDIA driver" from inside the recorder: neither named save_to."""
    with pytest.raises(LurkerError, match=said):
        lurker.trace(_mlp(), torch.randn(2, 4), save_to=save_to)
    tr = lurker.trace(_mlp(), torch.randn(2, 4), save_to="cpu")  # a device it has is taken
    assert tr["0"].activation.device.type == "cpu"


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS")
def test_save_to_mps_without_mps_is_refused_before_the_forward() -> None:
    """save_to="mps" passed the check (it looked at CUDA devices only) and the first saved
    op raised torch's "PyTorch is not linked with support for mps devices" from inside the
    recorder, naming neither save_to nor what to pass."""
    model = _mlp()
    called = []
    model.register_forward_pre_hook(lambda m, a: called.append(1))
    with pytest.raises(
        LurkerError,
        match=r"save_to='mps' asks for mps, but this machine has no mps device\. Pass save_to='cpu'",
    ):
        lurker.trace(model, torch.randn(2, 4), save_to="mps")
    assert not called  # refused up front: the forward never ran


@pytest.mark.skipif(hasattr(torch, "hpu"), reason="this torch has an HPU backend")
def test_save_to_a_backend_this_torch_lacks_is_refused_by_name() -> None:
    """save_to="hpu" (Habana Gaudi) on a torch without that backend: the device check made
    a tensor there to see whether it could, and torch's "No module named 'torch.hpu'"
    (a ModuleNotFoundError, not the RuntimeError it caught) came out raw."""
    with pytest.raises(LurkerError, match=r"save_to='hpu' asks for hpu, but this machine has no"):
        lurker.trace(_mlp(), torch.randn(2, 4), save_to="hpu")


def test_a_transform_that_raises_on_an_input_gives_the_partial_trace() -> None:
    """A transform that takes 4-D tensors only, on a 2-D input, raised a bare
    TransformFailed with no ``partial`` (the same failure on an op gives a TraceError with
    one), and named the input "the output of input (op 0)"."""

    def means(t: Tensor) -> Tensor:
        if t.dim() != 4:
            raise ValueError(f"want (N, C, H, W), got {t.dim()}-D")
        return t.mean((2, 3))

    x = torch.randn(2, 4)
    with pytest.raises(
        lurker.TraceError, match=r"raised ValueError on input 'input' \(input_1\)"
    ) as err:
        lurker.trace(_mlp(), x, transform=means)
    assert err.value.failed_op == "input_1" and err.value.partial is not None
    assert not err.value.partial.complete and err.value.partial.failed_op == "input_1"
    assert [op.label for op in err.value.partial.inputs] == ["input_1"]
    with pytest.raises(lurker.TraceError) as on_op:  # the op case: the same, naming the op
        lurker.trace(_mlp(), x, save=["0"], transform=means)
    assert on_op.value.failed_op == on_op.value.partial.failed_op == "linear_1"


def test_a_transform_that_is_not_a_function_is_refused_before_the_forward() -> None:
    """transform="mean" was reported as "transform= raised TypeError on the output of
    input", as if the function had failed on that tensor."""
    with pytest.raises(LurkerError, match=r"transform='mean' is a str, not a function") as err:
        lurker.trace(_mlp(), torch.randn(2, 4), transform="mean")
    assert "raised" not in str(err.value)


@pytest.mark.parametrize("save", [{"0": False}, {"2": True}])
def test_save_as_a_dict_is_refused_not_read_as_its_keys(save: dict) -> None:
    """save={"0": False} iterated as its keys and saved op "0" (what False meant not to)."""
    with pytest.raises(LurkerError, match=r"save= is a dict; it takes names, not a mapping"):
        lurker.trace(_mlp(), torch.randn(2, 4), save=save)


class _KeywordSteps(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: Tensor, *, steps: int) -> Tensor:
        for _ in range(steps):
            x = self.lin(x)
        return x


def test_a_keyword_only_argument_passed_by_position_is_named() -> None:
    """tr.run(x, 3) on forward(x, *, steps) said "input 'x' is missing ... 'args[0]' is
    passed"; it says steps is keyword-only and how to pass it (lurker.trace likewise)."""
    model = _KeywordSteps()
    x = torch.randn(2, 4)
    tr = lurker.trace(model, x, steps=3)
    said = r"'steps' is keyword-only; pass it by name \(steps=3\)"
    with pytest.raises(LurkerError, match=said) as err:
        tr.run(x, 3)
    assert "input 'x'" not in str(err.value) and "args[0]" not in str(err.value)
    with pytest.raises(LurkerError, match=said):
        lurker.trace(model, x, 3)
    torch.testing.assert_close(tr.run(x, steps=3).output, model(x, steps=3))  # the oracle


class _Dict(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {"logits": self.lin(x)}


def test_backward_output_not_a_function_suggests_a_fix_that_works() -> None:
    """The message suggested out['logits'] for every model; on a model that returns a
    tensor that fix raises IndexError. The suggestion fits the output, and runs."""
    for model, pattern in [(_mlp(), "out[:, 0].sum()"), (_Dict(), "out['logits'].sum()")]:
        tr = lurker.trace(model, torch.randn(2, 4), grads=True)
        with pytest.raises(LurkerError) as err:
            tr.backward(output="logits")
        assert f"lambda out: {pattern}" in str(err.value)
        tr.backward(output=eval(f"lambda out: {pattern}"))  # the suggested fix runs


class _Branch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: Tensor, steps: int = 2) -> Tensor:
        if x.sum() > 0:  # the data decides the path
            x = x * 2
        for _ in range(steps):
            x = self.lin(x)
        return x


def test_an_argument_left_at_its_default_is_not_blamed() -> None:
    """A trace of model(x, steps=2), steps' default, replayed as tr.run(x2) on data that
    takes another branch: the message said "argument 'steps' is missing (traced as 2)",
    though steps is 2 there too, instead of the data's control flow."""
    tr = lurker.trace(_Branch(), torch.ones(2, 4), steps=2)
    with pytest.raises(LurkerError) as err:
        tr.run(-torch.ones(2, 4))
    assert "'steps'" not in str(err.value)
    assert "control flow depends on the data" in str(err.value)


@pytest.mark.parametrize(
    ("given", "said"),
    [
        (
            lambda x: x.numpy(),
            "input 'input' is a numpy.ndarray, not a tensor: pass torch.as_tensor(",
        ),
        (lambda x: x.tolist(), "input 'input' is a list, not a tensor: pass torch.as_tensor("),
        (lambda x: None, "input 'input' is None"),
    ],
)
def test_run_on_an_input_that_is_not_a_tensor_says_what_it_is(given: Any, said: str) -> None:
    """tr.run(stimuli.numpy()), a stimulus set kept as a numpy array, said "input 'input'
    is missing" though it was passed: the message names what was passed and how to make
    it a tensor of the traced dtype."""
    x = torch.randn(5, 4)
    tr = lurker.trace(_mlp(), x[:1], save=["0"])
    with pytest.raises(LurkerError) as err:
        tr.run(given(x))
    msg = str(err.value)
    assert said in msg
    assert "missing" not in msg
    if "as_tensor" in said:  # the fix it names works
        assert torch.equal(
            tr.run(torch.as_tensor(given(x), dtype=torch.float32))["0"], _mlp()[0](x)
        )
