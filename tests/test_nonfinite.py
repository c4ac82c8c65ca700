"""Where a forward first made NaN or inf: ``Trace.first_nonfinite``, ``Trace.nonfinite`` and
the ``lurker trace`` line, checked against a hand-written scan of every op's output."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn
from torch.overrides import TorchFunctionMode

import lurker
from lurker.cli import main


class StdNorm(nn.Module):
    """(a) A CNN that divides by each sample's std: a constant image gives 0/0 = NaN."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - x.mean((1, 2, 3), keepdim=True)) / x.std((1, 2, 3), keepdim=True)
        h = torch.relu(self.conv1(x))
        h = torch.relu(self.conv2(h))
        return self.fc(h.mean((2, 3)))


class HalfOverflow(nn.Module):
    """(b) float16 activations that overflow to +inf in the second linear layer."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        with torch.no_grad():
            self.b.weight.fill_(300.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        return self.b(h * 100 + 30).softmax(-1)


class _Scan(TorchFunctionMode):
    """The oracle: every torch call's result in order, recorded by hand, no lurker."""

    def __init__(self) -> None:
        super().__init__()
        self.outputs: list[tuple[str, torch.Tensor]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and out.is_floating_point():
            self.outputs.append((getattr(func, "__name__", str(func)), out.detach().clone()))
        return out


def _oracle(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor | None, str | None]:
    """The first non-finite op output (torch-function scan) and the first module whose
    output is not finite (forward hooks on every module, innermost first as they return)."""
    first_module: list[str] = []

    def hook(name: str):  # type: ignore[no-untyped-def]
        def fn(mod, inp, out):  # type: ignore[no-untyped-def]
            if not first_module and not bool(out.isfinite().all()):
                first_module.append(name)

        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    scan = _Scan()
    try:
        with torch.no_grad(), scan:
            model(x)
    finally:
        for h in handles:
            h.remove()
    bad = [out for _, out in scan.outputs if not bool(out.isfinite().all())]
    return (bad[0] if bad else None), (first_module[0] if first_module else None)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.shape == b.shape
        and bool(torch.equal(a.isnan(), b.isnan()))
        and bool(torch.equal(torch.nan_to_num(a, nan=0.0), torch.nan_to_num(b, nan=0.0)))
    )


def _stdnorm_case() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(3, 1, 8, 8)
    x[1] = 0.5  # a constant image: std 0
    return StdNorm().eval(), x


def _half_case() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return HalfOverflow().eval().half(), torch.randn(2, 8).half()


@pytest.mark.parametrize("case", [_stdnorm_case, _half_case])
def test_first_nonfinite_is_the_op_a_brute_force_scan_finds(case) -> None:  # type: ignore[no-untyped-def]
    model, x = case()
    want, want_module = _oracle(model, x)
    assert want is not None
    with torch.no_grad():
        tr = lurker.trace(model, x)
    first = tr.first_nonfinite()
    assert first is not None
    assert _same(first.op.activation, want)
    if want_module is not None and first.op.module is not None:
        assert first.op.module == want_module
    # every op before it is finite, the counts are numpy's
    a = first.op.activation.float().numpy()
    assert (first.count.nan, first.count.posinf, first.count.neginf, first.count.numel) == (
        int(np.isnan(a).sum()),
        int(np.isposinf(a).sum()),
        int(np.isneginf(a).sum()),
        a.size,
    )
    assert next(iter(tr.nonfinite())) == first.op.label
    assert first.op.source is not None and "test_nonfinite.py:" in first.op.source


def test_stdnorm_names_the_division_and_its_zero_divisor() -> None:
    model, x = _stdnorm_case()
    first = lurker.trace(model, x).first_nonfinite()
    assert first is not None and first.op.name == "div"
    assert first.count.nan == 64 and first.count.posinf == first.count.neginf == 0  # one image
    lows = {label: lo for label, lo, _ in first.inputs}
    assert lows["std_1"] == 0.0  # the constant image's std: the divisor that made the NaN
    assert "div_1" in str(first) and "min 0" in str(first) and "from finite inputs" in str(first)


def test_half_overflow_is_in_module_b() -> None:
    model, x = _half_case()
    first = lurker.trace(model, x).first_nonfinite()
    assert first is not None and first.op.module == "b" and first.count.posinf > 0
    assert "in module 'b'" in str(first)


def test_a_half_overflow_says_the_dtypes_largest_value_and_a_zero_divisor_does_not() -> None:
    # the inputs' ranges alone (min 30, max 330) do not say that 300 * 330 * 8 is past
    # float16's 65504 to a reader who does not know the number
    model, x = _half_case()
    first = lurker.trace(model, x).first_nonfinite()
    assert first is not None and first.op.dtype == "float16"
    assert "float16's largest finite value is 65504" in str(first)
    model, x = _stdnorm_case()  # float32, and a NaN, not an overflow
    first = lurker.trace(model, x).first_nonfinite()
    assert first is not None and "largest finite value" not in str(first)


def test_finite_model_reports_none() -> None:
    model, _ = _stdnorm_case()
    x = torch.randn(2, 1, 8, 8)
    assert _oracle(model, x)[0] is None
    tr = lurker.trace(model, x)
    assert tr.first_nonfinite() is None and tr.nonfinite() == {}


def test_nonfinite_input_and_parameter_are_named() -> None:
    model, x = _stdnorm_case()
    x = torch.randn(2, 1, 8, 8)
    x[0, 0, 0, 0] = float("-inf")
    first = lurker.trace(model, x).first_nonfinite()
    assert first is not None and first.op.kind == "input" and first.count.neginf == 1
    assert "input is not finite" in str(first)
    with torch.no_grad():
        model.conv2.weight[0, 0, 0, 0] = float("nan")
    first = lurker.trace(model, torch.randn(2, 1, 8, 8)).first_nonfinite()
    assert first is not None and first.op.module == "conv2"
    assert first.params == ("conv2.weight",) and "conv2.weight" in str(first)


def test_partial_save_says_which_earlier_ops_it_could_not_check() -> None:
    model, x = _stdnorm_case()
    first = lurker.trace(model, x, save=["conv1"]).first_nonfinite()
    assert first is not None and first.op.module == "conv1"
    assert "div_1" in first.unchecked and "not saved" in str(first)
    assert "from finite inputs" not in str(first)  # its input was not checked
    with pytest.raises(lurker.LurkerError, match="save='all'"):
        lurker.trace(model, x, save="none").first_nonfinite()
    with pytest.raises(lurker.LurkerError, match="output is not finite"):
        lurker.trace(model, x, save=["mean_1"]).first_nonfinite()


def test_cli_trace_prints_the_first_nonfinite_op(tmp_path: Path) -> None:
    f = tmp_path / "half_model.py"
    f.write_text(
        "import torch\nfrom torch import nn\n\n"
        "def build():\n"
        "    m = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))\n"
        "    with torch.no_grad():\n"
        "        m[0].bias.fill_(30.0)\n"
        "        m[2].weight.fill_(3000.0)\n"
        "    return m.half()\n"
    )
    out = tmp_path / "g.dot"
    r = CliRunner().invoke(
        main, ["trace", f"{f}:build", "-i", "1,4", "--input-dtype", "float16", "--out", str(out)]
    )
    assert r.exit_code == 0, r.output
    assert "non-finite: linear_2" in r.output and "in module '2'" in r.output
    assert "+inf" in r.output
    f.write_text("from torch import nn\n\ndef build():\n    return nn.Linear(4, 2)\n")
    r = CliRunner().invoke(main, ["trace", f"{f}:build", "-i", "1,4", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "non-finite: none" in r.output
