"""Per-op statistics for a layer that explodes or dies: ``Trace.stats``, ``Activations.stats``
and ``lurker trace --stats``, checked against numpy over the values forward hooks see on an
untraced forward; and the warning a trace gives for a dropout or BatchNorm left in
training mode inside a model in eval mode."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import lurker
from lurker.capture import _stats
from lurker.cli import main


def _broken() -> nn.Sequential:
    """A conv with a huge init (its outputs explode) and a ReLU after a conv whose bias is
    very negative (every unit dead)."""
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(128, 4),
    ).eval()
    with torch.no_grad():
        m[0].weight.mul_(1e4)
        m[2].bias.fill_(-1e9)
    return m


def _hooked(model: nn.Module, x: torch.Tensor) -> dict[str, np.ndarray]:
    """The oracle: each child module's output on an untraced forward, by path."""
    seen: dict[str, np.ndarray] = {}
    handles = [
        m.register_forward_hook(
            lambda m, i, o, n=n: seen.__setitem__(n, o.detach().double().numpy())
        )
        for n, m in model.named_children()
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return seen


def _numpy_stats(a: np.ndarray) -> tuple[float, float, float, float, float]:
    f = a[np.isfinite(a)]
    return float(f.mean()), float(f.std()), float(f.min()), float(f.max()), float((a == 0).mean())


def test_stats_of_an_exploding_conv_and_a_dead_relu_are_numpys() -> None:
    model, x = _broken(), torch.randn(4, 3, 8, 8)
    want = _hooked(model, x)
    tr = lurker.trace(model, x)
    got = tr.stats()
    assert list(got) == [op.label for op in tr if op.activation is not None]  # execution order
    for path, a in want.items():
        st = got[tr[path].label]
        mean, std, lo, hi, zeros = _numpy_stats(a)
        assert st.numel == a.size and st.nonfinite == 0
        assert st.mean == pytest.approx(mean, rel=1e-6, abs=1e-9)
        assert st.std == pytest.approx(std, rel=1e-6, abs=1e-9)
        assert (st.min, st.max) == (lo, hi)
        assert st.zeros == zeros
    assert got[tr["0"].label].std > 1e3  # the exploding conv, read off one dict
    assert got[tr["3"].label].zeros == 1.0  # the dead ReLU: every unit 0 on every sample
    assert "zeros 100.0%" in str(got[tr["3"].label])


def test_two_checkpoints_compare_by_label_and_a_hooked_run_has_its_own_figures() -> None:
    model, x = _broken(), torch.randn(4, 3, 8, 8)
    before = lurker.trace(model, x).stats()
    with torch.no_grad():
        model[2].bias.zero_()  # the fix
    tr = lurker.trace(model, x)
    after = tr.stats()
    assert list(before) == list(after)
    assert before["relu_2"].zeros == 1.0 and after["relu_2"].zeros < 1.0

    # a run of the same trace with one channel of the first conv switched off
    def off(op: object, out: torch.Tensor) -> torch.Tensor:
        out = out.clone()
        out[:, 5] = 0
        return out

    run = tr.run(x, hooks={"0": off}).stats()
    want = _hooked(model, x)["0"].copy()
    want[:, 5] = 0
    mean, std, _, _, zeros = _numpy_stats(want)
    assert run["conv2d_1"].zeros == zeros >= 1 / 8
    assert run["conv2d_1"].mean == pytest.approx(mean, rel=1e-6)
    assert run["conv2d_1"].std == pytest.approx(std, rel=1e-6)


def test_float16_stats_are_exact_where_the_square_of_the_mean_would_overflow() -> None:
    # float16 values near 300: E[x²] - E[x]² in float16 overflows (300² > 65504), and in
    # float32 loses the small spread to cancellation; the figures must be float64's
    torch.manual_seed(0)
    x = (300 + torch.randn(64, 256) * 0.05).half()
    st = lurker.trace(nn.Identity(), x).stats()["input_1"]
    a = x.double().numpy()
    assert st.mean == pytest.approx(a.mean(), rel=1e-12)
    assert st.std == pytest.approx(a.std(), rel=1e-9)
    naive = float((x.float() ** 2).mean() - x.float().mean() ** 2)  # what a sum of squares gives
    assert abs(naive - a.var()) > 0.5 * a.var()  # the cancellation the two-pass sum avoids


def test_chunks_combine_to_the_whole_tensors_figures(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    t = torch.randn(1000) * 3 + 7
    t[::7] = 0
    t[5] = float("nan")
    t[11] = float("inf")
    whole = _stats.of(t)
    monkeypatch.setattr(_stats, "_CHUNK", 37)  # 28 chunks, the last one short
    chunked = _stats.of(t)
    assert whole is not None and chunked is not None
    a = t.double().numpy()
    mean, std, lo, hi, zeros = _numpy_stats(a)
    for st in (whole, chunked):
        assert st.numel == 1000 and st.nonfinite == 2
        assert st.mean == pytest.approx(mean, rel=1e-12)
        assert st.std == pytest.approx(std, rel=1e-12)
        assert (st.min, st.max, st.zeros) == (lo, hi, zeros)


def test_nonfinite_values_are_left_out_and_counted_and_outputs_of_one_op_pooled() -> None:
    class M(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a, b = x.log().chunk(2, dim=1)  # a NaN for each negative value
            return torch.full_like(a, float("nan")) + b.argmax(1, keepdim=True)

    torch.manual_seed(0)
    x = torch.randn(3, 4)
    tr = lurker.trace(M(), x)
    got = tr.stats()
    logged = x.log().double().numpy()
    st = got["log_1"]
    assert st.nonfinite == int(np.isnan(logged).sum()) > 0
    assert st.mean == pytest.approx(_numpy_stats(logged)[0], rel=1e-6)
    assert "NaN or inf of 12 left out" in str(st)
    assert got["chunk_1"].numel == 12  # both halves, pooled
    assert got["chunk_1"].nonfinite == st.nonfinite
    assert "argmax_1" not in got  # integer indices: no such figures
    assert got["add_1"].mean is None and str(got["add_1"]).startswith("no finite value")


def test_stats_of_nothing_saved_is_refused() -> None:
    tr = lurker.trace(nn.Linear(4, 2), torch.randn(2, 4), save="none")
    with pytest.raises(lurker.LurkerError, match="save='all'"):
        tr.stats()
    assert list(tr.run(torch.randn(2, 4)).stats()) == ["output_1"]  # a run keeps the output


def test_cli_trace_stats_prints_a_row_per_op(tmp_path: Path) -> None:
    f = tmp_path / "dead.py"
    f.write_text(
        "import torch\nfrom torch import nn\n\n"
        "def build():\n"
        "    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))\n"
        "    with torch.no_grad():\n"
        "        m[0].bias.fill_(-1e6)\n"
        "    return m\n"
    )
    out = tmp_path / "g.dot"
    r = CliRunner().invoke(main, ["trace", f"{f}:build", "-i", "2,4", "--stats", "--out", str(out)])
    assert r.exit_code == 0, r.output
    row = next(line for line in r.output.splitlines() if line.startswith("relu_1"))
    assert row.split()[1:3] == ["1", "2x8"] and row.endswith("100.0%")
    r = CliRunner().invoke(main, ["trace", f"{f}:build", "-i", "2,4", "--out", str(out)])
    assert r.exit_code == 0 and "relu_1 " not in r.output  # only when asked


def _block() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5))


def test_a_trace_warns_of_a_batchnorm_left_in_training_mode_in_a_model_in_eval_mode() -> None:
    model = _block().eval()
    model[1].train()  # fine-tuning code switched it back: its outputs depend on the batch
    x = torch.randn(6, 4)
    with pytest.warns(UserWarning, match=r"eval mode, but 1 \(BatchNorm1d\) is in training mode"):
        tr = lurker.trace(model, x)
    assert tr["1"].kwargs["training"] is True  # what the warning points at
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.eval()
        lurker.trace(model, x)  # all in eval mode: nothing to say
        model.train()
        lurker.trace(model, x)  # all in training mode: the caller's choice, traced as it is


def test_stats_leave_out_the_models_buffers_not_its_inputs() -> None:
    """A BatchNorm's running mean (all zeros at init) is the model's state, not a layer's
    output: in the table it would read as a dead layer. The input and every op stay."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    x = torch.randn(2, 3, 8, 8)
    tr = lurker.trace(m, x)
    kinds = {op.label: op.kind for op in tr.ops}
    assert "buffer" in kinds.values()  # the running statistics were recorded
    for got in (tr.stats(), tr.run(x).stats()):
        assert all(kinds[label] not in ("buffer", "constant") for label in got)
        assert {lab for lab, k in kinds.items() if k == "op"} <= set(got)
    inp = next(lab for lab, k in kinds.items() if k == "input")
    assert tr.stats()[inp].mean == pytest.approx(float(x.double().mean()))
