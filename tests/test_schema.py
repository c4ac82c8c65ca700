"""The trace JSON document (lurker.graph.schema) against its JSON Schema, and the edges."""

from __future__ import annotations

import copy
import json
import math

import jsonschema
import pytest
import torch
import torchvision
from torch import nn

import lurker
from lurker.graph.edges import edges
from lurker.graph.schema import SCHEMA_VERSION, decode, json_schema, json_value, to_json
from models_zoo import Branchy, Fails, Generates, LSTMNet, RNNLoop, Small, Structured, Twice


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft202012Validator:
    schema = json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


class Readouts(nn.Module):
    """Non-bool readouts: item() (a NaN) and int()."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bad = (x * 0 / 0).sum().item()  # nan
        n = int(x.abs().sum() > 0)
        return x * n + (0 if bad == bad else 1)


def _partial() -> lurker.Trace:
    with pytest.raises(lurker.TraceError) as ei:
        lurker.trace(Fails(), torch.randn(2, 4))
    return ei.value.partial


def _traces() -> dict[str, lurker.Trace]:
    torch.manual_seed(0)
    s = torch.tensor(3.0)
    return {
        "resnet18": lurker.trace(torchvision.models.resnet18(), torch.randn(1, 3, 64, 64)),
        "dict_output": lurker.trace(
            Structured(), (torch.randn(2, 4), torch.randn(2, 4)), {"z": torch.randn(2, 4)}, scale=s
        ),
        "rnn_loop": lurker.trace(RNNLoop(), torch.randn(4, 2, 3)),
        "branch": lurker.trace(Branchy(), torch.ones(2, 4)),
        "branch_else": lurker.trace(Branchy(), -torch.ones(2, 4)),
        "partial": _partial(),
        "generates": lurker.trace(Generates(), torch.randn(2, 4)),
        "lstm": lurker.trace(LSTMNet(), torch.randn(2, 5, 6)),
        "twice": lurker.trace(Twice(), torch.randn(2, 4)),
        "readouts": lurker.trace(Readouts(), torch.randn(2, 4)),
    }


TRACES = _traces()


@pytest.mark.parametrize("name", list(TRACES))
def test_validates(name: str, validator: jsonschema.Draft202012Validator) -> None:
    tr = TRACES[name]
    doc = tr.to_json()
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.path))
    assert not errors, [f"{list(e.path)}: {e.message[:200]}" for e in errors[:5]]
    text = json.dumps(doc, allow_nan=False)  # plain JSON: no tensors, dtypes or NaN leak
    assert json.loads(text) == doc
    assert doc["version"] == SCHEMA_VERSION == lurker.Trace.SCHEMA_VERSION
    assert doc["lurker_version"] == lurker.__version__
    assert len(doc["ops"]) == len(tr.ops)
    assert all(op["index"] == i for i, op in enumerate(doc["ops"]))
    assert doc["model"]["num_ops"] == tr.num_ops and doc["model"]["num_params"] == tr.num_params


@pytest.mark.parametrize("name", list(TRACES))
def test_edges_match_parents(name: str) -> None:
    doc = to_json(TRACES[name])
    ops = doc["ops"]
    data = {(e["src"], e["dst"]) for e in doc["edges"] if e["kind"] == "data"}
    from_parents = {(p, op["index"]) for op in ops for p in op["parents"]}
    from_children = {(op["index"], c) for op in ops for c in op["children"]}
    assert data == from_parents == from_children
    triples = [(e["src"], e["dst"], e["src_output"]) for e in doc["edges"]]
    assert len(triples) == len(set(triples))
    for e in doc["edges"]:
        if e["kind"] == "data":
            assert e["src_output"] < len(ops[e["src"]]["outputs"])
            assert e["label"] is None
        else:
            assert ops[e["src"]]["kind"] == "readout"
            assert e["dst"] > e["src"] and e["label"]
            between = ops[e["src"] + 1 : e["dst"]]
            assert all(o["kind"] in ("buffer", "constant") for o in between)
    readouts = [op["index"] for op in ops if op["kind"] == "readout"]
    assert sorted(e["src"] for e in doc["edges"] if e["kind"] == "branch") == readouts
    # module and rolled indices point at real nodes
    for m in doc["modules"]:
        assert all(0 <= i < len(ops) for i in m["ops"])
        for nodes in m["outputs"].values():
            assert all(0 <= i < len(ops) for i in nodes)
    passes = sorted(i for r in doc["rolled"] for i in r["passes"])
    assert passes == list(range(len(ops)))


def test_small_by_hand() -> None:
    tr = lurker.trace(Small(), torch.randn(2, 4))
    doc = to_json(tr)
    assert [(o["label"], o["kind"], o["name"]) for o in doc["ops"]] == [
        ("input_1", "input", "x"),
        ("linear_1", "op", "linear"),
        ("relu_1", "op", "relu"),
        ("add_1", "op", "add"),
        ("output_1", "output", "output"),
    ]
    assert doc["edges"] == [
        {"src": i, "dst": i + 1, "src_output": 0, "kind": "data", "label": None} for i in range(4)
    ]
    lin = doc["ops"][1]
    assert lin["module"] == "fc" and lin["modules"] == [["fc", 1]]
    assert lin["module_outputs"] == ["fc"]
    assert lin["params"] == [
        {"name": "fc.weight", "shape": [3, 4], "numel": 12},
        {"name": "fc.bias", "shape": [3], "numel": 3},
    ]
    assert lin["outputs"] == [
        {"shape": [2, 3], "dtype": "float32", "device": "cpu", "requires_grad": True, "bytes": 24}
    ]
    # the call, fx-style: the input node's output, then the parameters by name
    assert lin["target"] == "torch.nn.functional.linear"
    assert lin["args"] == [{"op": 0, "output": 0}, {"param": "fc.weight"}, {"param": "fc.bias"}]
    assert lin["kwargs"] == {} and lin["meta"] == {"flops": 48}
    add = doc["ops"][3]
    assert add["target"] == "torch.Tensor.add" and add["args"] == [{"op": 2, "output": 0}, 1]
    assert doc["ops"][4]["args"] == [{"op": 3, "output": 0}] and doc["ops"][4]["target"] is None
    assert [o["seq"] for o in doc["ops"]] == [-1, 0, 1, 2, -1]
    assert lin["flops"] == 2 * 2 * 3 * 4
    assert [o["dist_from_input"] for o in doc["ops"]] == [0, 1, 2, 3, 4]
    assert [o["dist_from_output"] for o in doc["ops"]] == [4, 3, 2, 1, 0]
    assert doc["ops"][2]["module"] is None and doc["ops"][2]["modules"] == []
    assert doc["model"] == {
        "name": "Small",
        "num_ops": 3,
        "num_params": 15,
        "activation_bytes": 72,
        "flops": 48,
        "flops_unknown": 0,
        "is_recurrent": False,
        "has_branching": False,
        "time_s": doc["model"]["time_s"],
        "complete": True,
        "failed_op": None,
    }
    assert [(m["path"], m["type"], m["parent"], m["depth"]) for m in doc["modules"]] == [
        ("", "Small", None, 0),
        ("fc", "Linear", "", 1),
    ]
    assert doc["modules"][1]["ops"] == [1] and doc["modules"][1]["outputs"] == {"1": [1]}
    assert [r["label"] for r in doc["rolled"]] == [o["label"] for o in doc["ops"]]


def test_branch_and_loop_fields() -> None:
    doc = to_json(TRACES["branch"])
    readout = next(o for o in doc["ops"] if o["kind"] == "readout")
    assert readout["value"] is True and readout["decides_branch"]
    assert any(doc["ops"][p]["decides_branch"] for p in readout["parents"])
    branch = [e for e in doc["edges"] if e["kind"] == "branch"]
    assert branch == [
        {"src": readout["index"], "dst": readout["index"] + 1, "src_output": None}
        | {"kind": "branch", "label": "THEN"}
    ]
    else_doc = to_json(TRACES["branch_else"])
    assert [e["label"] for e in else_doc["edges"] if e["kind"] == "branch"] == ["ELSE"]

    loop = to_json(TRACES["rnn_loop"])
    assert loop["model"]["is_recurrent"]
    cell = next(r for r in loop["rolled"] if r["label"] == "rnn_tanh_cell_1")
    assert len(cell["passes"]) == 4
    assert [loop["ops"][i]["pass"] for i in cell["passes"]] == [1, 2, 3, 4]
    assert all(loop["ops"][i]["num_passes"] == 4 for i in cell["passes"])
    mod = next(m for m in loop["modules"] if m["path"] == "cell")
    assert mod["num_passes"] == 4 and sorted(mod["outputs"]) == ["1", "2", "3", "4"]


def test_readout_values_are_json_safe() -> None:
    doc = to_json(TRACES["readouts"])
    values = [o["value"] for o in doc["ops"] if o["kind"] == "readout"]
    assert values == [{"float": "nan"}, 1]  # encoded exactly (version 2): decode gives a NaN
    back = [decode(v) for v in values]
    assert math.isnan(back[0]) and back[1] == 1
    labels = [e["label"] for e in doc["edges"] if e["kind"] == "branch"]
    assert labels == ["= nan", "= 1"]
    assert json_value(math.inf) == "inf" and json_value((1, 2.5)) == [1, 2.5]
    assert json_value(1 + 2j) == "(1+2j)" and json_value(None) is None


def test_partial_trace() -> None:
    doc = to_json(TRACES["partial"])
    assert doc["model"]["complete"] is False
    failed = doc["ops"][-1]
    assert failed["kind"] == "failed" and failed["label"] == doc["model"]["failed_op"]
    assert failed["outputs"] == []


def test_dict_output_names() -> None:
    doc = to_json(TRACES["dict_output"])
    names = [o["name"] for o in doc["ops"] if o["kind"] == "output"]
    assert names[0] == "output['logits']" and len(names) == 3


def test_schema_rejects_drift(validator: jsonschema.Draft202012Validator) -> None:
    good = to_json(TRACES["branch"])
    bad_kind = copy.deepcopy(good)
    bad_kind["ops"][1]["kind"] = "layer"
    extra = copy.deepcopy(good)
    extra["ops"][1]["activation"] = [1.0]
    missing = copy.deepcopy(good)
    del missing["model"]["flops"]
    branch_with_output = copy.deepcopy(good)
    next(e for e in branch_with_output["edges"] if e["kind"] == "branch")["src_output"] = 0
    data_with_label = copy.deepcopy(good)
    data_with_label["edges"][0]["label"] = "THEN"
    bad_version = copy.deepcopy(good)
    bad_version["version"] = 1
    for doc in (bad_kind, extra, missing, branch_with_output, data_with_label, bad_version):
        assert not validator.is_valid(doc)


def test_edges_accepts_trace_or_ops() -> None:
    tr = TRACES["branch"]
    assert edges(tr) == edges(tr.ops)
