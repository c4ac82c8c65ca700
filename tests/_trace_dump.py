"""Traces of a fixed set of models, as plain data: what the compiled and the pure-Python
recorder must agree on (tests/test_compiled.py runs it in both; run as a script, it prints
the JSON)."""

from __future__ import annotations

import json
import sys
from typing import Any

import torch
import torchvision
from torch import nn

import lurker
import models_zoo as zoo


def _models() -> list[tuple[str, Any, Any]]:
    def enc() -> nn.Module:
        layer = nn.TransformerEncoderLayer(
            d_model=16, nhead=2, dim_feedforward=32, batch_first=True
        )
        return nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)

    img = (1, 3, 64, 64)
    return [
        ("resnet18", lambda: torchvision.models.resnet18(), img),
        ("mobilenet_v3_small", lambda: torchvision.models.mobilenet_v3_small(), img),
        ("googlenet", lambda: torchvision.models.googlenet(init_weights=False), (2, 3, 64, 64)),
        ("transformer", enc, (1, 8, 16)),
        ("rnn_loop", zoo.RNNLoop, (4, 2, 3)),
        ("lstm", zoo.LSTMNet, (2, 5, 6)),
        ("inplace", zoo.InPlace, (2, 4)),
        ("twice", zoo.Twice, (2, 4)),
        ("branchy", zoo.Branchy, (2, 4)),
        ("generates", zoo.Generates, (2, 4)),
    ]


def _plain(x: Any) -> Any:
    """JSON-able, with wall times (which differ run to run) left out."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items() if k not in ("time_s",)}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def dump() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, build, shape in _models():
        torch.manual_seed(0)
        model = build().eval()
        x = torch.randn(*shape)
        with torch.no_grad():
            tr = lurker.trace(model, x)
        tr.validate()
        doc = _plain(tr.to_json())
        doc["extra"] = [
            [op.label, op.stale, [getattr(p, "name", None) for p in op.params], op.seq]
            for op in tr.ops
        ]
        out[name] = doc
    return out


if __name__ == "__main__":
    json.dump(dump(), sys.stdout)
