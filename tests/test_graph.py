"""lurker.graph as a public, torch-free data model: Graph, Op's call, the JSON round trip."""

from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
from typing import Any

import jsonschema
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import lurker
from lurker.errors import GraphDocumentError, LurkerError
from lurker.graph import Graph, Op, Opaque, OpRef, ParamRef
from lurker.graph.nodes import ITEMSIZE
from lurker.graph.schema import decode, encode, json_schema
from models_zoo import (
    Branchy,
    Fails,
    Generates,
    InPlace,
    LSTMNet,
    Pyramid,
    RNNLoop,
    Small,
    Structured,
    Twice,
)

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")


class Constants(nn.Module):
    """Arguments JSON has no type for: slices, Ellipsis, None indices, a dtype, lists and
    dicts of tensors, non-finite floats, a string, keyword arguments."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor, extra: dict) -> torch.Tensor:
        y = self.conv(x)
        a = y[:, 1:3, ..., None]  # slice, Ellipsis, None
        b = torch.cat([a, a * 2], dim=1)  # a list of tensors, a keyword
        c = b.to(torch.float64).float()  # a dtype
        d = torch.clamp(c, min=-math.inf, max=math.inf)  # non-finite floats
        e = F.pad(d, (1, 1), mode="constant", value=0.5)  # a string
        f = torch.stack(list(extra.values())).sum()
        return e.sum() + f + torch.tensor(float("nan")).nan_to_num()


class Deep(nn.Module):
    """A conv net with batch norm in training mode (buffers written in place)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(inplace=True))
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).mean((2, 3)))


def _partial() -> lurker.Trace:
    with pytest.raises(lurker.TraceError) as ei:
        lurker.trace(Fails(), torch.randn(2, 4))
    return ei.value.partial


def _with_grads() -> lurker.Trace:
    """Some ops saved (one module's), some of those with gradients: flags that differ."""
    tr = lurker.trace(Deep().eval(), torch.randn(2, 3, 8, 8), save=["body", "head"], grads=True)
    tr.backward()
    return tr


def _zoo() -> dict[str, lurker.Trace]:
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 2, enable_nested_tensor=False
    ).eval()
    img = torch.randn(2, 3, 8, 8)
    return {
        "small": lurker.trace(Small(), torch.randn(2, 4)),
        "branch": lurker.trace(Branchy(), torch.ones(2, 4)),
        "branch_else": lurker.trace(Branchy(), -torch.ones(2, 4)),
        "rnn_loop": lurker.trace(RNNLoop(), torch.randn(4, 2, 3)),
        "lstm": lurker.trace(LSTMNet(), torch.randn(2, 5, 6)),
        "generates": lurker.trace(Generates(), torch.randn(2, 4)),
        "inplace": lurker.trace(InPlace(), torch.randn(2, 4)),
        "twice": lurker.trace(Twice(), torch.randn(2, 4)),
        "structured": lurker.trace(
            Structured(),
            (torch.randn(2, 4), torch.randn(2, 4)),
            {"z": torch.randn(2, 4)},
            scale=torch.tensor(3.0),
        ),
        "partial": _partial(),
        "constants": lurker.trace(Constants(), img, {"p": torch.ones(2), "q": torch.zeros(2)}),
        "constants_save_none": lurker.trace(
            Constants(), img, {"p": torch.ones(2), "q": torch.zeros(2)}, save="none"
        ),
        "deep_train_save_module": lurker.trace(Deep().train(), img, save=["body"]),
        "deep_grads": _with_grads(),
        "transformer": lurker.trace(enc, torch.randn(1, 6, 16)),
        "resnet18": lurker.trace(torchvision.models.resnet18().eval(), torch.randn(1, 3, 64, 64)),
    }


ZOO = _zoo()


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(json_schema())


def _differences(a: Graph, b: Graph) -> list[str]:
    """Field-by-field comparison written out here (not through ``==``), for the oracle and
    for a message that names what differs."""
    out = []
    for f in ("model_name", "complete", "failed_op", "time"):
        if getattr(a, f) != getattr(b, f):
            out.append(f)
    if list(a.modules) != list(b.modules):
        out.append("module order")
    for path, m in a.modules.items():
        n = b.modules.get(path)
        for f in (
            "path",
            "type",
            "parent",
            "children",
            "num_passes",
            "num_params",
            "ops",
            "outputs",
        ):
            if n is None or getattr(m, f) != getattr(n, f):
                out.append(f"module {path!r}.{f}")
    if len(a.ops) != len(b.ops):
        return [*out, "number of ops"]
    for x, y in zip(a.ops, b.ops):
        for f in Op.FIELDS:
            u, v = getattr(x, f), getattr(y, f)
            if f in ("args", "kwargs", "value"):  # NaN, dtypes: compare their JSON
                u, v = json.dumps(encode(u)), json.dumps(encode(v))
            if u != v or type(u) is not type(v):
                out.append(f"{x.label}.{f}: {u!r} != {v!r}")
    return out


@pytest.mark.parametrize("name", list(ZOO))
def test_json_round_trip_is_exact(name: str, validator: jsonschema.Draft202012Validator) -> None:
    tr = ZOO[name]
    doc = tr.to_json()
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.path))
    assert not errors, [f"{list(e.path)}: {e.message[:200]}" for e in errors[:5]]
    text = json.dumps(doc, allow_nan=False)  # through text, as a reader gets it
    g = Graph.from_json(json.loads(text))
    assert type(g) is Graph
    assert _differences(tr, g) == []
    assert g == tr and tr == g
    # which ops the trace saved / held gradients for: read from its tensors, then from
    # the document, which has none; a graph read back writes the same document, twice
    for op, back in zip(tr.ops, g.ops):
        assert back.activation is None and back.grad is None
        assert (back.saved, back.has_grad) == (
            op.activation is not None,
            op.grad is not None,
        ), op.label
    again = g.to_json()
    assert again == doc
    third = Graph.from_json(json.loads(json.dumps(again, allow_nan=False)))
    assert _differences(tr, third) == [] and third.to_json() == doc
    # lookups, facts and views read the same from the loaded graph
    for key in list(tr._index)[:50]:
        assert g[key].index == tr[key].index
    assert [e for e in g.edges()] == tr.edges()
    assert {k: [o.index for o in v] for k, v in g.rolled().items()} == {
        k: [o.index for o in v] for k, v in tr.rolled().items()
    }
    for fact in ("num_ops", "num_params", "flops", "activation_bytes", "is_recurrent"):
        assert getattr(g, fact) == getattr(tr, fact), fact
    assert g.summary() == tr.summary()


def test_equality_sees_each_kind_of_field() -> None:
    tr = ZOO["constants"]
    doc = tr.to_json()
    conv = next(i for i, o in enumerate(tr.ops) if o.name == "conv2d")
    for change in (
        lambda d: d["ops"][conv].__setitem__("label", "other"),
        lambda d: d["ops"][conv]["args"].__setitem__(3, [2, 2]),  # stride
        lambda d: d["ops"][conv]["meta"].__setitem__("flops", 1),
        lambda d: d["ops"][conv]["outputs"][0].__setitem__("dtype", "float16"),
        lambda d: d["modules"][1].__setitem__("num_passes", 7),
        lambda d: d["model"].__setitem__("time_s", 1.5),
    ):
        d = json.loads(json.dumps(doc))
        change(d)
        assert Graph.from_json(d) != tr


def test_constants_come_back_with_their_types() -> None:
    g = Graph.from_json(json.loads(json.dumps(ZOO["constants"].to_json())))
    by_name = {op.name: op for op in reversed(g.ops)}
    getitem = by_name["getitem"]
    assert getitem.target == "torch.Tensor.__getitem__"
    index = getitem.args[1]
    assert index == (slice(None), slice(1, 3, None), Ellipsis, None)
    cat = by_name["cat"]
    assert type(cat.args[0]) is list and all(type(r) is OpRef for r in cat.args[0])
    assert cat.kwargs == {"dim": 1}
    to = by_name["to"]
    assert to.args[1] == Opaque("torch.float64")
    clamp = by_name["clamp"]
    assert clamp.kwargs["min"] == -math.inf and clamp.kwargs["max"] == math.inf
    pad = by_name["pad"]
    assert pad.args[1] == (1, 1) and pad.kwargs == {"mode": "constant", "value": 0.5}
    conv = by_name["conv2d"]
    weight, bias = conv.args[1:3]
    assert weight == ParamRef("conv.weight", (4, 3, 3, 3)) and weight is conv.params[0]
    assert bias is conv.params[1]
    stack = by_name["stack"]
    assert [type(r) for r in stack.args[0]] == [OpRef, OpRef]
    assert [g[r.index].name for r in stack.args[0]] == ["extra['p']", "extra['q']"]


def test_encode_decode_by_hand() -> None:
    cases: list[tuple[Any, Any]] = [
        ((1, [2.5, None], "s"), [1, {"list": [2.5, None]}, "s"]),
        ({"a": True}, {"dict": [["a", True]]}),
        (float("-inf"), {"float": "-inf"}),
        (slice(1, None, 2), {"slice": [1, None, 2]}),
        (..., {"ellipsis": None}),
        (OpRef(3, 1), {"op": 3, "output": 1}),
        (ParamRef("fc.weight", (2,)), {"param": "fc.weight"}),
        (torch.float16, {"repr": "torch.float16"}),
    ]
    for value, doc in cases:
        assert encode(value) == doc
    assert decode([1, {"list": [2.5, None]}, "s"]) == (1, [2.5, None], "s")
    assert decode({"repr": "torch.float16"}) == Opaque("torch.float16")
    assert math.isnan(decode(encode(float("nan"))))


@pytest.mark.parametrize("name", ["structured", "transformer", "lstm", "small", "constants"])
def test_args_name_the_tensors_the_call_got(name: str) -> None:
    """Oracle: the raw call arguments the recorder kept. Each tensor in them must be, by
    value, the saved output the OpRef names, or, by identity, the parameter ParamRef names."""
    tr = ZOO[name]
    params = dict(tr.model.named_parameters())  # type: ignore[union-attr]
    checked = 0

    def walk(raw: Any, pub: Any) -> None:
        nonlocal checked
        if isinstance(raw, torch.Tensor):
            if type(pub) is ParamRef:
                assert params[pub.name] is raw
            else:
                assert type(pub) is OpRef
                act = tr.ops[pub.index].activation
                act = act[pub.output] if isinstance(act, tuple) else act
                assert torch.equal(act, raw.detach()) or bool(
                    act.isnan().all() and raw.isnan().all()
                )
            checked += 1
        elif isinstance(raw, (tuple, list)):
            assert len(raw) == len(pub)
            for r, p in zip(raw, pub):
                walk(r, p)
        elif isinstance(raw, dict):
            assert list(raw) == list(pub)
            for k in raw:
                walk(raw[k], pub[k])
        else:
            assert pub == raw or (pub != pub and raw != raw)

    for op in tr.ops:
        if op._skel_args is not None:
            walk(tuple(op._skel_args), op.args)
            walk(dict(op._skel_kwargs or {}), op.kwargs)
    assert checked >= 5


def test_skeleton_is_the_same_whether_or_not_the_arguments_are_kept() -> None:
    """save='none' makes the skeleton while recording, save='all' in the build."""
    a, b = ZOO["constants"], ZOO["constants_save_none"]
    assert [(o.target, encode(o.args), encode(o.kwargs)) for o in a.ops] == [
        (o.target, encode(o.args), encode(o.kwargs)) for o in b.ops
    ]
    assert all(o._skel_args is None for o in b.ops)


def _resolve(target: str) -> Any:
    parts = target.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for p in parts[i:]:
            obj = getattr(obj, p)
        return obj
    raise LookupError(target)


@pytest.mark.parametrize("name", ["resnet18", "transformer", "constants", "lstm", "inplace"])
def test_targets_name_the_callable(name: str) -> None:
    """Oracle: importing the dotted name gives back the callable the recorder ran."""
    tr = ZOO[name]
    seen = set()
    for op in tr.ops:
        if op._func is None:
            assert op.target is None
            continue
        assert isinstance(op.target, str)
        got = _resolve(op.target)
        if op.target.endswith(".__get__"):  # property getters: a new bound __get__ per access
            assert got.__self__ is op._func.__self__
        else:
            assert got is op._func, op.target
        seen.add(op.target)
    if name == "resnet18":
        assert "torch.nn.functional.conv2d" in seen and "torch.Tensor.flatten" not in seen


def test_sources_are_strings_shared_per_call_site() -> None:
    tr = ZOO["rnn_loop"]
    for op in tr.ops:
        assert op.source is None or isinstance(op.source, str)
    cells = tr.passes("rnn_tanh_cell_1")
    assert len(cells) == 4 and len({o.source for o in cells}) == 1
    assert cells[0].source is cells[3].source  # resolved once for the call site
    assert cells[0].source.endswith(".py:" + cells[0].source.rsplit(":", 1)[1])


def test_meta_holds_flops() -> None:
    lin = ZOO["small"]["linear_1"]
    assert lin.meta == {"flops": 48} and lin.flops == 48
    assert ZOO["small"]["relu_1"].flops is None and ZOO["small"]["relu_1"].meta == {}


def test_tensor_meta_is_strings() -> None:
    dtypes = [torch.float16, torch.bfloat16, torch.int64, torch.bool, torch.complex64, torch.uint8]

    class Casts(nn.Module):
        def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
            return [x.to(d) for d in dtypes]

    x = torch.randn(3, 5)
    tr = lurker.trace(Casts(), x)
    for op, d in zip([o for o in tr.ops if o.name == "to"], dtypes):
        t = x.to(d)
        assert op.dtype == str(d).removeprefix("torch.") and op.device == "cpu"
        assert op.nbytes == t.nbytes  # oracle: torch's own byte count


def test_itemsize_table_matches_torch() -> None:
    for d in [getattr(torch, n) for n in dir(torch)]:
        if isinstance(d, torch.dtype):
            name = str(d).removeprefix("torch.")
            if name in ITEMSIZE:
                assert ITEMSIZE[name] == d.itemsize, name


def test_trace_is_a_graph() -> None:
    tr = ZOO["small"]
    assert isinstance(tr, Graph) and isinstance(tr, lurker.Trace)
    assert lurker.Graph is Graph
    assert [o.label for o in tr.find("*relu*")] == ["relu_1"]
    assert tr["fc"].label == "linear_1" and tr["x"].kind == "input"


def _run_clean(code: str) -> None:
    env = {**os.environ, "PYTHONPATH": SRC}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


def test_graph_imports_no_torch(tmp_path) -> None:
    """A server reads a graph, looks things up and prints its summary without torch."""
    path = tmp_path / "g.json"
    ZOO["rnn_loop"].to_json(path)
    _run_clean(
        "import sys, lurker.graph\n"
        "assert 'torch' not in sys.modules\n"
        f"g = lurker.graph.Graph.from_json({str(path)!r})\n"
        "assert g['cell:2'].name == 'rnn_tanh_cell' and g.is_recurrent\n"
        "g.summary(); g.edges(); g.to_json(); g.rolled()\n"
        "assert 'torch' not in sys.modules, [m for m in sys.modules if 'torch' in m]\n"
    )


def test_lazy_root() -> None:
    _run_clean(
        "import sys, lurker\n"
        "assert 'torch' not in sys.modules\n"
        "assert lurker.__version__\n"
        "import torch\n"
        "tr = lurker.trace(torch.nn.Linear(2, 2), torch.ones(1, 2))\n"
        "assert isinstance(tr, lurker.Trace) and callable(lurker.probe)\n"
        "assert lurker.Run.__name__ == 'Run' and 'Graph' in dir(lurker)\n"
        "try:\n    lurker.nope\nexcept AttributeError as e:\n    assert 'nope' in str(e)\n"
        "else:\n    raise SystemExit('no AttributeError')\n"
    )


def test_from_json_refuses_other_versions() -> None:
    doc = ZOO["small"].to_json()
    with pytest.raises(ValueError, match="version 1"):
        Graph.from_json({**doc, "version": 1})
    with pytest.raises(ValueError, match="not a lurker graph"):
        Graph.from_json({**doc, "schema": "other"})


def test_from_json_names_the_versions_and_the_fix() -> None:
    """Another version: the one found, who wrote it, the one read, and what to do (a
    newer document needs a newer lurker, not a new trace); a ValueError as documented."""
    doc = ZOO["small"].to_json()
    with pytest.raises(
        GraphDocumentError,
        match=r"version 3 \(written by lurker 9\.0\): this lurker reads version 2 only; "
        "upgrade lurker",
    ):
        Graph.from_json({**doc, "version": 3, "lurker_version": "9.0"})


def test_from_json_refuses_what_is_not_a_document_by_name(tmp_path) -> None:
    """A cut-short file raised a raw JSONDecodeError, the document's text "File name too
    long", a list pathlib's TypeError, a document without "ops" KeyError: 'ops'. Each is a
    GraphDocumentError (a LurkerError and a ValueError) saying what was wrong and the fix."""
    tr = ZOO["small"]
    text = json.dumps(tr.to_json())
    cut = tmp_path / "cut.json"
    cut.write_text(text[:100])
    doc = tr.to_json()
    cases = [
        (cut, r"cut\.json is not a JSON document .*Write it again"),
        (text, r"the text of a JSON document.*pass json\.loads\(text\)"),
        ([doc], r"got an object of type list; it takes a trace document"),
        ({k: v for k, v in doc.items() if k != "ops"}, r"field 'ops' is missing"),
    ]
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps([doc]))
    cases.append((listed, r"not a lurker graph document: a JSON list"))
    for given, said in cases:
        with pytest.raises(GraphDocumentError, match=said) as err:
            Graph.from_json(given)
        assert isinstance(err.value, LurkerError) and isinstance(err.value, ValueError)
    whole = tmp_path / "whole.json"
    tr.to_json(whole)
    assert Graph.from_json(whole) == tr == Graph.from_json(str(whole))  # paths still read


def test_from_json_reads_any_path_it_read_before(tmp_path, monkeypatch) -> None:
    """Any os.PathLike (py.path's local, a PurePath) and a path that starts like JSON text
    ('[run 1]/t.json') were read as paths before the checks for other objects and for a
    document's text: they still are."""
    import pathlib

    tr = ZOO["small"]
    folder = tmp_path / "[run 1]"
    folder.mkdir()
    tr.to_json(folder / "t.json")

    class Local:  # a PathLike that is not a pathlib.Path
        def __fspath__(self) -> str:
            return str(folder / "t.json")

    monkeypatch.chdir(tmp_path)
    for given in (Local(), pathlib.PurePath(folder / "t.json"), "[run 1]/t.json"):
        assert Graph.from_json(given) == tr


def test_blank_op_sets_every_slot_as_init_does():
    """The recorder's fast constructor: a slot it forgot would raise AttributeError on read,
    a different default would change every traced op."""
    modules = (("layer1", 1), ("layer1.0", 2))
    fast = Op.blank(7, "op", "conv2d", modules)
    slow = Op(7, "op", "conv2d", modules=modules)
    slots = [s for s in Op.__slots__ if s != "__weakref__"]
    assert slots
    for s in slots:
        assert getattr(fast, s) == getattr(slow, s), s
        assert type(getattr(fast, s)) is type(getattr(slow, s)), s
    other = Op.blank(8, "op", "relu", ())
    for s in ("module_outputs", "parents", "children", "outputs", "params", "meta", "_kwargs"):
        assert getattr(fast, s) is not getattr(other, s), f"{s} shared between ops"


class _UnknownFlops(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # dims as a tensor: a tensordot whose contraction the FLOPs rule cannot read
        return torch.tensordot(self.fc(x), x.t(), dims=torch.tensor(1))


def test_total_flops_says_when_ops_are_unknown() -> None:
    """An op of a counted kind whose FLOPs are unknown counted as 0 in every total, with no
    mark: the total now says it is a lower bound, how many ops it leaves out, in the
    summary, the JSON document and the explorer's graph view."""
    from lurker.graph.view import graph_view

    tr = lurker.trace(_UnknownFlops(), torch.randn(3, 4))
    assert tr["tensordot_1"].flops is None
    assert tr.flops == 2 * 3 * 4 * 4  # the Linear's alone
    assert tr.flops_unknown == 1
    assert f"at least 0.000 GFLOPs ({tr.flops:,}): 1 op of unknown FLOPs" in tr.summary()
    doc = tr.to_json()
    assert doc["model"]["flops_unknown"] == 1
    assert lurker.Graph.from_json(doc).flops_unknown == 1
    assert graph_view(tr)["flops_unknown"] == 1
    known = lurker.trace(nn.Linear(4, 4), torch.randn(3, 4))
    assert known.flops_unknown == 0 and "at least" not in known.summary()


def _relaxed_hops(ops: list[Op], start: str, down: bool) -> list[int | None]:
    """Oracle for the distances: hops from the nearest node of kind ``start`` along
    children (``down``) or parents, by relaxing every edge until nothing changes."""
    dist: list[int | None] = [0 if op.kind == start else None for op in ops]
    changed = True
    while changed:
        changed = False
        for op in ops:
            d = dist[op.index]
            if d is None:
                continue
            for j in op.children if down else op.parents:
                if dist[j] is None or d + 1 < dist[j]:  # type: ignore[operator]
                    dist[j] = d + 1
                    changed = True
    return dist


@pytest.mark.parametrize(
    "model,x",
    [
        (Pyramid(decode=True), torch.randn(2, 4)),
        (RNNLoop(), torch.randn(4, 2, 3)),
        (InPlace(), torch.randn(2, 4)),
        (Structured(), None),
    ],
    ids=["pyramid", "loop", "inplace", "dict-output"],
)
def test_distances_are_the_fewest_hops_to_an_input_and_an_output(model: nn.Module, x: Any):
    if x is None:
        pair, feats = (torch.randn(2, 4), torch.randn(2, 4)), {"z": torch.randn(2, 4)}
        tr = lurker.trace(model.eval(), pair, feats, scale=torch.tensor(2.0))
    else:
        tr = lurker.trace(model.eval(), x)
    assert [op.dist_from_input for op in tr.ops] == _relaxed_hops(tr.ops, "input", True)
    assert [op.dist_from_output for op in tr.ops] == _relaxed_hops(tr.ops, "output", False)
    assert any(op.dist_from_input and op.dist_from_input > 2 for op in tr.ops)


def test_distances_of_nodes_out_of_execution_order_are_searched():
    """A graph whose node 1 reads node 2 (never a trace's order, a hand-made one's): the
    one-pass distances would read a node not yet done; the build searches instead."""
    from lurker.graph import build

    kinds = ["input", "op", "op", "op", "output"]
    ops = [Op(index=i, kind=k, name=k) for i, k in enumerate(kinds)]
    for p, c in [(0, 2), (2, 1), (1, 3), (3, 4), (0, 3)]:
        ops[c].parents.append(p)
        ops[p].children.append(c)
    build.distances(ops)
    assert [op.dist_from_input for op in ops] == _relaxed_hops(ops, "input", True) == [
        0, 2, 1, 1, 2
    ]  # fmt: skip
    assert [op.dist_from_output for op in ops] == _relaxed_hops(ops, "output", False)
