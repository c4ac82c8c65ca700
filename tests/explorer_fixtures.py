"""A small probed run for the explorer's server tests, made once per test process.

The digits CNN trained for one epoch (seconds) and probed on the 360 test digits, with
its model spec, weights and data recorded in the run's config (as `lurker probe` does),
so the server can load the model and the dataset on its own.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

_BUILT: dict[str, ExplorerRun] = {}


@dataclass(frozen=True)
class ExplorerRun:
    path: Path
    weights: Path
    model: torch.nn.Module


def build_run(root: Path) -> ExplorerRun:
    from lurker.examples import train_digits
    from lurker.probe import probe
    from lurker.probe.data import load_dataset

    model, _ = train_digits(1, log=lambda *_: None)
    weights = root / "digits.pt"
    torch.save(model.state_dict(), weights)
    data = load_dataset("digits:test", 16, channels=1)
    out = root / "runs" / "digits"
    run = probe(
        model,
        data,
        out=out,
        k=5,
        batch_size=128,
        progress=False,
        relevance=True,
        meta={
            "model_spec": "lurker.examples:DigitsNet",
            "weights": str(weights),
            "data": "digits:test",
        },
    )
    assert run is not None
    run.close()
    return ExplorerRun(out, weights, model.eval())


@pytest.fixture(scope="session")
def explorer_run() -> ExplorerRun:
    """The run (shared by every test file of this process; never written by tests except
    its image cache)."""
    if "run" not in _BUILT:
        root = Path(tempfile.mkdtemp(prefix="lurker-explorer-test-"))
        _BUILT["run"] = build_run(root)
    return _BUILT["run"]
