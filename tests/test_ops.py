"""The op catalogue: signatures checked against torch's own, binding by name, FLOPs
against brute-force counts, and one decision of what counts as an op for the recorder
and the replayer."""

from __future__ import annotations

import inspect
import itertools
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lurker
from lurker.capture._mode import OpMode
from lurker.capture._recorder import Recorder
from lurker.capture._replay import Replayer
from lurker.ops import catalogue
from lurker.ops import torch_funcs as tf
from lurker.ops.catalogue import SPECS, VARIANTS, Param, bind

_NONE: Any = object()  # torch gives no default


# --------------------------------------------------------------------------- signatures
def _norm(v: Any) -> Any:
    """Torch's and the catalogue's spellings of one default: [1, 1] is 1, [] is None."""
    if isinstance(v, (list, tuple)):
        if not v:
            return None
        if all(x == v[0] for x in v):
            return v[0]
        return tuple(v)
    return v


def _aten(source: str) -> tuple[list[list[tuple[str, Any, bool]]], list[set[str]]]:
    """(candidate parameter lists, every overload's names) of an aten::op[.overload]
    (or another namespace's operator, quantized::linear_dynamic)."""
    op, _, overload = source.partition(".")
    schemas = torch._C._jit_get_schemas_for_operator(op)
    assert schemas, f"torch has no operator {op}"
    every = [{a.name for a in s.arguments} for s in schemas]
    chosen = [s for s in schemas if not overload or s.overload_name == overload]
    assert chosen, f"{op} has no overload {overload!r}"
    cands = [
        [
            (a.name, a.default_value if a.has_default_value() else _NONE, a.kwarg_only)
            for a in s.arguments
        ]
        for s in chosen
    ]
    return cands, every


def _python(source: str) -> list[tuple[str, Any, bool]]:
    obj: Any = torch
    for part in source.split(".")[1:]:
        obj = getattr(obj, part)
    return [
        (
            p.name,
            _NONE if p.default is inspect.Parameter.empty else p.default,
            p.kind is inspect.Parameter.KEYWORD_ONLY,
        )
        for p in inspect.signature(obj).parameters.values()
    ]


def _mismatch(params: tuple[Param, ...], theirs: list, omittable: set[str]) -> str | None:
    ours = [(p.name, p.kw_only) for p in params]
    if ours != [(n, k) for n, _, k in theirs]:
        return f"parameters {ours} vs torch's {[(n, k) for n, _, k in theirs]}"
    for p, (name, default, _) in zip(params, theirs):
        if default is _NONE:
            if not p.required and name not in omittable:
                return f"{name} has default {p.default!r} where torch has none"
        elif p.required or _norm(p.default) != _norm(default):
            return f"{name} default {p.default!r} vs torch's {default!r}"
    return None


_ALL = [(n, s) for n, s in SPECS.items() if s.source] + [(q, s) for q, s in VARIANTS.items()]


@pytest.mark.parametrize(("key", "spec"), _ALL, ids=[k for k, _ in _ALL])
def test_signature_matches_torch(key: str, spec: catalogue.OpSpec) -> None:
    """Each entry's parameters, in order, with defaults, are those of torch's definition
    (one of its overloads). A default where the overload has none is allowed only for a
    parameter another overload leaves out (``x.sum()`` against ``x.sum(dim)``)."""
    source = spec.source
    assert source is not None
    if source.startswith(("aten::", "quantized::")):  # an operator with a schema
        cands, every = _aten(source)
        omittable = {n for p in spec.params for n in [p.name] if any(n not in e for e in every)}
    else:
        cands, omittable = [_python(source)], set()
    errors = [_mismatch(spec.params, c, omittable) for c in cands]
    assert None in errors, f"{key} ({source}): {errors}"


def test_only_unpublished_signatures_lack_a_source() -> None:
    assert {n for n, s in SPECS.items() if s.source is None} == {"getitem", "rmatmul"}


def test_catalogue_is_torch_free() -> None:
    """Graph analyses read the catalogue wherever a graph is read, without torch."""
    path = Path(catalogue.__file__)
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('cat', {str(path)!r})\n"
        "m = importlib.util.module_from_spec(spec); sys.modules['cat'] = m\n"
        "spec.loader.exec_module(m)\n"
        "assert m.bind('conv2d', ('x', 'w'))['stride'] == 1\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_receptive_rules_bind_known_ops() -> None:
    """Every op whose receptive-field rule reads its arguments has a catalogue entry."""
    from lurker.graph import receptive as r

    readers = {
        r._h_interpolate, r._h_pad, r._h_permute, r._h_getitem, r._h_cat, r._h_split,
        r._h_narrow, r._h_flip, r._h_roll, r._h_reduce, r._h_along,
    }  # fmt: skip
    no_args = {"t", "T", "H", "mT", "mH", "adjoint", "fliplr", "flipud"}
    for name, h in r._HANDLERS.items():
        if (h in readers or "_spatial_op" in h.__qualname__) and name not in no_args:
            assert name in SPECS, name


# --------------------------------------------------------------------------- bind
def test_bind_by_name() -> None:
    assert bind("conv2d", ("x", "w"), {"stride": 2}) == {
        "input": "x", "weight": "w", "stride": 2, "bias": None, "padding": 0,
        "dilation": 1, "groups": 1,
    }  # fmt: skip
    # methods spread a list parameter; functions pass it whole
    assert bind("permute", ("x", 2, 0, 1))["dims"] == (2, 0, 1)
    assert bind("permute", ("x", (2, 0, 1)))["dims"] == (2, 0, 1)
    assert bind("permute", ("x",), {"dims": [1, 0]})["dims"] == [1, 0]
    assert bind("flip", ("x", 0))["dims"] == 0
    assert bind("view", ("x", 2, -1))["size"] == (2, -1)
    # torch.sum(input=x): aten calls it 'self'
    assert bind("sum", (), {"input": "x", "dim": 1}) == {
        "self": "x",
        "dim": 1,
        "keepdim": False,
        "dtype": None,
    }
    assert bind("mode", ("x",))["dim"] == -1
    assert bind("dropout_", ("x", 0.2), {"training": False})["train"] is False
    assert bind("alpha_dropout", ("x",))["training"] is False
    assert bind("max", ("a",), {"other": "b"})["other"] == "b"  # kept under its own name
    assert "dim" not in bind("cumsum", ("x",))  # required and omitted: absent
    sdpa = bind("scaled_dot_product_attention", ("q", "k", "v", None, 0.1), {"scale": 2.0})
    assert (sdpa["dropout_p"], sdpa["scale"], sdpa["is_causal"]) == (0.1, 2.0, False)
    # torch.batch_norm orders its arguments unlike F.batch_norm
    assert bind("batch_norm", ("x", "m", "v"))["running_mean"] == "m"
    tb = bind(
        "batch_norm", ("x", "w", "b", "m", "v", True, 0.1, 1e-5, False), target="torch.batch_norm"
    )
    assert (tb["weight"], tb["running_mean"], tb["training"]) == ("w", "m", True)


@pytest.mark.parametrize(
    ("name", "args", "kwargs"),
    [
        ("dropout", ("x",), {}),
        ("dropout", ("x", 0.2, False), {}),
        ("dropout", ("x",), {"train": False, "p": 0.0}),
        ("dropout_", ("x", 0.2), {"training": True}),
        ("batch_norm", ("x", "m", "v", None, None, True), {}),
        ("instance_norm", ("x",), {"running_mean": "m"}),
        ("scaled_dot_product_attention", ("q", "k", "v"), {"dropout_p": 0.1, "scale": 2.0}),
        ("permute", ("x", 2, 0, 1), {}),
        ("sum", (), {"input": "x", "dim": 1}),
    ],
)
def test_one_argument_equals_bind(name: str, args: tuple, kwargs: dict) -> None:
    """``arg``, the recorder's one-argument read, agrees with ``bind`` on every name."""
    spec = SPECS[name]
    bound = spec.bind(args, kwargs)
    for key in (*spec.names, *kwargs, "absent"):
        assert spec.arg(args, kwargs, key, "dflt") == bound.get(key, "dflt"), key


def test_bind_errors() -> None:
    with pytest.raises(KeyError, match="relu"):
        bind("relu", ("x",))
    with pytest.raises(TypeError, match="positional"):
        bind("linear", ("x", "w", "b", "extra"))
    with pytest.raises(TypeError, match="multiple values"):
        bind("linear", ("x", "w"), {"weight": "w"})
    with pytest.raises(TypeError, match="positional"):  # keyword-only
        bind("scaled_dot_product_attention", ("q", "k", "v", None, 0.0, False, 2.0))


def test_calls_bound_for_the_recorder() -> None:
    """Random draws and running-statistic updates are read by name, for every callable
    of a name: torch.batch_norm's statistics sit where F.batch_norm's weights do."""
    x = torch.randn(4, 3)
    m, v, w, b = torch.zeros(3), torch.ones(3), torch.ones(3), torch.zeros(3)
    f_info, t_info = tf.func_info(F.batch_norm), tf.func_info(torch.batch_norm)
    assert tf.mutated_buffers(f_info, (x, m, v, w, b, True), {}) == [m, v]
    assert tf.mutated_buffers(f_info, (x, m, v), {}) == []  # training defaults to False
    got = tf.mutated_buffers(t_info, (x, w, b, m, v, True, 0.1, 1e-5, False), {})
    assert got[0] is m and got[1] is v
    assert not tf.is_random_call(tf.func_info(F.alpha_dropout), (x,), {})  # training=False
    assert tf.is_random_call(tf.func_info(F.alpha_dropout), (x, 0.5, True), {})
    assert tf.is_random_call(tf.func_info(torch.dropout), (x, 0.5, True), {})
    assert not tf.is_random_call(tf.func_info(torch.dropout), (x, 0.5), {"train": False})
    # a call its entry's parameters do not take: assumed random, every tensor guarded
    assert tf.is_random_call(tf.func_info(F.dropout), (x, 0.5, True, False, "extra"), {})
    assert tf.mutated_buffers(f_info, (x, m, v, w, b, True, 0.1, 1e-5, "extra"), {}) == [m, v, w, b]


# --------------------------------------------------------------------------- FLOPs
def _conv_count(x: torch.Tensor, w: torch.Tensor, stride: int, pad: int, groups: int) -> tuple:
    """A direct convolution, one multiply-add at a time: (its output, 2 x the count)."""
    n, _, h, wd = x.shape
    co, cg, kh, kw = w.shape
    xp = F.pad(x, (pad, pad, pad, pad))
    oh, ow = (h + 2 * pad - kh) // stride + 1, (wd + 2 * pad - kw) // stride + 1
    out = torch.zeros(n, co, oh, ow, dtype=torch.float64)
    count = 0
    for b, o, i, j in itertools.product(range(n), range(co), range(oh), range(ow)):
        g = o // (co // groups)
        acc = 0.0
        for ci, a, e in itertools.product(range(cg), range(kh), range(kw)):
            acc += float(xp[b, g * cg + ci, i * stride + a, j * stride + e]) * float(w[o, ci, a, e])
            count += 1
        out[b, o, i, j] = acc
    return out, 2 * count


def _conv_t_count(x: torch.Tensor, w: torch.Tensor, stride: int, groups: int) -> tuple:
    """A direct transposed convolution (each input value scattered by every tap)."""
    n, c, h, wd = x.shape
    _, cog, kh, kw = w.shape
    cg = c // groups
    out = torch.zeros(
        n, cog * groups, (h - 1) * stride + kh, (wd - 1) * stride + kw, dtype=torch.float64
    )
    count = 0
    for b, ci, i, j in itertools.product(range(n), range(c), range(h), range(wd)):
        g = ci // cg
        for o, a, e in itertools.product(range(cog), range(kh), range(kw)):
            out[b, g * cog + o, i * stride + a, j * stride + e] += float(x[b, ci, i, j]) * float(
                w[ci, o, a, e]
            )
            count += 1
    return out, 2 * count


def _matmul_count(a: torch.Tensor, b: torch.Tensor) -> tuple:
    """(a @ b, 2 x its multiply-adds), a batched, b one matrix or batched alike."""
    lead = a.shape[:-2]
    m, k = a.shape[-2:]
    nb = b.shape[-1]
    out = torch.zeros(*lead, m, nb, dtype=torch.float64)
    count = 0
    for idx in itertools.product(*(range(s) for s in lead)):
        bm = b[idx] if b.dim() > 2 else b
        for i, j in itertools.product(range(m), range(nb)):
            acc = 0.0
            for q in range(k):
                acc += float(a[idx][i, q]) * float(bm[q, j])
                count += 1
            out[idx][i, j] = acc
    return out, 2 * count


class _Flops(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2)
        self.up = nn.ConvTranspose2d(6, 4, 2, stride=2, groups=2)
        self.fc = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> Any:
        c = self.conv(x)
        u = self.up(c)
        return u, self.fc(y), y @ y.transpose(-1, -2), torch.addmm(y[0, :, :3], y[0], y[0].T[:, :3])


@pytest.mark.parametrize("save", ["all", "none"])
def test_flops_equal_brute_force(save: str) -> None:
    """FLOPs of conv, conv_transpose, linear, matmul and addmm equal a count of a direct
    computation's multiply-adds (whose values match torch's), with the recorded arguments
    bound by name or, where save= kept none, the tensor arguments in order."""
    torch.manual_seed(0)
    model = _Flops().double()
    x, y = torch.randn(1, 4, 5, 5, dtype=torch.float64), torch.randn(2, 4, 5, dtype=torch.float64)
    tr = lurker.trace(model, x, y, save=save)
    by = {op.name: op for op in tr.ops if op.kind == "op"}
    with torch.no_grad():
        c_ref, c_n = _conv_count(x, model.conv.weight, 2, 1, 2)
        c = model.conv(x)
        assert torch.allclose(c_ref + model.conv.bias[:, None, None], c)
        u_ref, u_n = _conv_t_count(c, model.up.weight, 2, 2)
        assert torch.allclose(u_ref + model.up.bias[:, None, None], model.up(c))
        l_ref, l_n = _matmul_count(y, model.fc.weight.T)
        assert torch.allclose(l_ref + model.fc.bias, model.fc(y))
        m_ref, m_n = _matmul_count(y, y.transpose(-1, -2))
        assert torch.allclose(m_ref, y @ y.transpose(-1, -2))
        a_ref, a_n = _matmul_count(y[0], y[0].T[:, :3])
        assert torch.allclose(a_ref + y[0, :, :3], torch.addmm(y[0, :, :3], y[0], y[0].T[:, :3]))
    assert by["conv2d"].flops == c_n
    assert by["conv_transpose2d"].flops == u_n
    assert by["linear"].flops == l_n
    assert by["matmul"].flops == m_n
    assert by["addmm"].flops == a_n


class _Convolution(nn.Module):
    """torch.convolution called directly, transposed, and einsums of one operand."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 3, 2, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.convolution(x, self.w, None, [2, 2], [0, 0], [1, 1], True, [0, 0], 1)
        z = torch.einsum("bchw->bhwc", y)
        return torch.einsum("ii", z[0, 0, :3, :3]) + z.sum()


@pytest.mark.parametrize("save", ["all", "none"])
def test_flops_of_a_direct_transposed_convolution_call(save: str) -> None:
    """``convolution``'s ``transposed`` flag is read from the call whether or not save=
    kept its arguments (binding the tensors alone counted it as a forward conv, 3x here);
    einsums of one operand (a transpose, a trace) count nothing, as in torch's counter."""
    from torch.utils.flop_counter import FlopCounterMode

    model, x = _Convolution(), torch.randn(1, 4, 5, 5)
    tr = lurker.trace(model, x, save=save)
    with FlopCounterMode(display=False) as counter:
        model(x)
    assert tr["convolution_1"].flops == counter.get_total_flops() > 0
    assert tr["einsum_1"].flops is None and tr["einsum_2"].flops is None
    assert tr.flops == counter.get_total_flops()


def test_linalg_matmul_counts_as_matmul() -> None:
    """torch.linalg.matmul is matmul under another name: the same FLOPs, torch's count."""
    from torch.utils.flop_counter import FlopCounterMode

    class Both(nn.Module):
        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return torch.linalg.matmul(a, b) + a @ b

    a, b = torch.randn(2, 4, 3), torch.randn(3, 5)
    with FlopCounterMode(display=False) as counter:
        Both()(a, b)
    tr = lurker.trace(Both(), a, b)
    assert tr["linalg_matmul_1"].flops == tr["matmul_1"].flops == 2 * 2 * 4 * 5 * 3
    assert tr.flops == counter.get_total_flops()


def test_flops_rules_on_shapes() -> None:
    """Rules the traced model does not reach, on bound shapes."""
    f = catalogue.flops
    assert f("bmm", {"self": (3, 2, 4), "mat2": (3, 4, 5)}, (3, 2, 5)) == 2 * 3 * 2 * 5 * 4
    # Tensor.__rmatmul__(b, a) computes a @ b: the inner size is a's last
    assert f("rmatmul", {"self": (4, 5), "other": (2, 4)}, (2, 5)) == 2 * 2 * 5 * 4
    # addbmm sums a batch of 3 products into one matrix
    assert f("addbmm", {"batch1": (3, 2, 4), "batch2": (3, 4, 5)}, (2, 5)) == 2 * 3 * 2 * 5 * 4
    q, kv = (2, 8, 6, 16), (2, 8, 7, 16)
    assert f("scaled_dot_product_attention", {"query": q, "key": kv, "value": kv}, q) == (
        2 * 2 * 8 * 6 * 7 * (16 + 16)
    )
    assert f("relu", {"input": (3,)}, (3,)) is None


# --------------------------------------------------------------------------- op decision
def test_one_op_decision() -> None:
    """The recorder and the replayer route calls through the same code."""
    assert Recorder.__torch_function__ is OpMode.__torch_function__
    assert Replayer.__torch_function__ is OpMode.__torch_function__


class _Mixed(nn.Module):
    """Pass-throughs, a decomposed composite, iteration, properties, readouts, setitem."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        *_, d = x.shape  # pass-throughs
        assert x.dim() == 3 and x.size(-1) == d
        a, _ = self.attn(x, x, x)  # multi_head_attention_forward, opened
        rows = [r.sum() for r in a]  # Tensor.__iter__ as unbind
        y = self.fc(a).mT.mH  # properties
        y = y.clone()
        y[0] = 0.0  # setitem: an op without a tensor output
        if float(torch.stack(rows).detach().abs().sum()) >= 0:  # a readout
            y = y + len(a.tolist())
        return y.real


def test_recorder_and_replayer_count_the_same_calls() -> None:
    """A replay on a new input counts exactly the recorded calls (else it raises) and
    hands over each op's output: equal to a fresh trace of that input."""
    torch.manual_seed(0)
    model = _Mixed().eval()
    x1, x2 = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    tr = lurker.trace(model, x1)
    names = [op.name for op in tr.ops if op.kind in ("op", "readout")]
    for name in ("unbind", "softmax", "mT", "mH", "setitem", "float", "tolist", "real"):
        assert name in names, name
    assert "size" not in names and "dim" not in names
    fresh = lurker.trace(model, x2)
    got = tr.run(x2, save="all")
    labels = [op.label for op in tr.ops if op.kind == "op"]
    assert labels == [op.label for op in fresh.ops if op.kind == "op"]
    for label in labels:
        a, b = got[label], fresh[label].activation
        if isinstance(a, tuple):
            assert all(torch.equal(p, q) for p, q in zip(a, b))
        else:
            assert torch.equal(a, b), label


class _Recurrent(nn.Module):
    """einsum (list and varargs forms), tensordot and every recurrent op: LSTM with two
    bidirectional layers and projections, RNN, batch-first GRU and a packed LSTM."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(8, 16, num_layers=2, bidirectional=True, proj_size=4)
        self.rnn = nn.RNN(8, 5, nonlinearity="relu")
        self.gru = nn.GRU(8, 6, batch_first=True)
        self.packed = nn.LSTM(8, 3)
        self.w = nn.Parameter(torch.randn(8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pack = nn.utils.rnn.pack_padded_sequence(x, [7, 5, 2])
        out = self.lstm(x)[0].sum() + self.rnn(x)[0].sum() + self.gru(x)[0].sum()
        out = out + self.packed(pack)[0].data.sum()
        out = out + torch.einsum("tbi,tbj->ij", x, x).sum()
        out = out + torch.einsum("tbi,ij->tbj", [x, self.w]).sum()
        return out + torch.tensordot(x, x, dims=([0, 1], [0, 1])).sum()


@pytest.mark.parametrize("save", ["all", "none"])
def test_flops_of_einsum_tensordot_and_recurrent_ops_equal_torchs_counter(save: str) -> None:
    """Each op's FLOPs equal torch's FlopCounterMode on that op alone (they were left out,
    and a GRU model's total was its Linear's), and the model's total equals torch's, from
    the raw arguments or, where save= kept none, the call's skeleton."""
    import warnings

    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model, x = _Recurrent().eval(), torch.randn(7, 3, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # oneDNN's note on LSTM projections
        tr = lurker.trace(model, x, save=save)
        with FlopCounterMode(display=False) as counter:
            model(x)
    got = {
        op.label: op.flops
        for op in tr.ops
        if op.name in ("lstm", "gru", "rnn_relu", "einsum", "tensordot")
    }
    assert len(got) == 7 and all(got.values()), got
    assert tr.flops == counter.get_total_flops()
    with FlopCounterMode(display=False) as one:
        model.gru(x)
    assert got["gru_1"] == one.get_total_flops()


@pytest.mark.parametrize(
    ("eq", "a", "b"),
    [
        ("bij,bjk->bik", (8, 3, 4), (1, 4, 5)),  # a batch index broadcast from 1
        ("ij,jk->k", (30, 4), (4, 5)),  # i summed out of one operand: no multiplication
        ("ij,jk", (3, 4), (4, 5)),  # the output implicit
        ("bhqd,bhkd->bhqk", (2, 4, 5, 8), (2, 4, 6, 8)),
        ("i,j->ij", (3,), (4,)),  # an outer product: no matmul, not counted
        ("...ij,...jk->...ik", (2, 3, 4, 5), (5, 6)),  # an ellipsis, broadcast from the right
        ("...ij,...jk", (2, 3, 4, 5), (3, 5, 6)),  # ... and an implicit output
        ("b...d,b...d->b...", (2, 3, 4), (2, 3, 4)),  # a batched dot product
        ("...i,...i->i", (3, 4), (3, 4)),  # the ellipsis' axes summed out
        # an index of size 1 in one operand, summed out: summed from the other alone first
        ("bij,bjk->ik", (1, 4, 5), (3, 5, 6)),
        ("...ij,...jk->ik", (2, 1, 4, 5), (3, 5, 6)),
        ("ij,jk->ik", (3, 1), (4, 5)),  # ... which leaves an outer product: not counted
        ("...i,...i->i", (3, 4), (4,)),  # an ellipsis on one operand alone: no matmul
    ],
)
def test_einsum_flops_equal_torchs_counter(eq: str, a: tuple, b: tuple) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    x, y = torch.randn(*a), torch.randn(*b)
    tr = lurker.trace(_Einsum(eq), x, y)
    with FlopCounterMode(display=False) as counter:
        torch.einsum(eq, x, y)
    assert (tr["einsum_1"].flops or 0) == counter.get_total_flops()


def test_an_einsum_of_three_operands_is_a_flops_unknown_and_a_sum_is_not() -> None:
    """A contraction of three matrices costs what its order makes it: no count, so the
    graph's FLOPs total says it is a lower bound; an einsum that contracts nothing (a
    transpose, an element-wise product) costs no matmul and leaves the total exact."""
    a, b, c = torch.randn(3, 4), torch.randn(4, 5), torch.randn(5, 6)
    tr = lurker.trace(_Einsum("ij,jk,kl->il"), a, b, c)
    assert tr["einsum_1"].flops is None and tr.flops_unknown == 1
    assert "at least" in tr.summary()
    assert lurker.Graph.from_json(tr.to_json()).flops_unknown == 1
    # an ellipsis that covers no axis contracts nothing: the total stays exact
    v = a[0]
    for eq, xs in (
        ("ij,ij->ij", (a, a)),
        ("ij->ji", (a,)),
        ("i,j->ij", (a[0], b[0])),
        ("...i,...i->i", (v, v)),
        ("...i,...i,...i->i", (v, v, v)),
        ("...i,...i->i", (a, v)),
    ):
        tr = lurker.trace(_Einsum(eq), *xs)
        assert tr["einsum_1"].flops is None and tr.flops_unknown == 0, eq
        assert lurker.Graph.from_json(tr.to_json()).flops_unknown == 0, eq
    batched = [torch.randn(2, *t.shape) for t in (a, b, c)]
    tr = lurker.trace(_Einsum("...ij,...jk,...kl->...il"), *batched)
    assert tr.flops_unknown == 1 == lurker.Graph.from_json(tr.to_json()).flops_unknown


class _Einsum(nn.Module):
    def __init__(self, eq: str) -> None:
        super().__init__()
        self.eq = eq

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return torch.einsum(self.eq, *xs)
