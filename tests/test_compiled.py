"""The compiled hot path (setup.py, lurker._compiled): it is what runs when built, it is
skipped when older than its source, and it records exactly what the pure-Python one does."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import lurker
from lurker import _compiled

ROOT = Path(__file__).resolve().parents[1]
BUILT = all(_compiled._files(m)[1] is not None for m in _compiled.MODULES)


def test_setup_compiles_the_modules_lurker_checks():
    tree = ast.parse((ROOT / "setup.py").read_text())
    listed = next(
        ast.literal_eval(node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "MODULES"
    )
    assert tuple(listed) == _compiled.MODULES
    for name in _compiled.MODULES:  # each has its C types beside it
        py, _ = _compiled._files(name)
        assert py.exists() and py.with_suffix(".pxd").exists(), name


def test_choose_prefers_a_fresh_build_only():
    assert _compiled.choose(1.0, None, False) == "python: not built"
    assert _compiled.choose(1.0, 2.0, False) == "compiled"
    assert _compiled.choose(3.0, 2.0, False) == "python: the build is older than its source"
    assert _compiled.choose(1.0, 2.0, True) == "python: LURKER_PURE_PYTHON is set"


@pytest.mark.skipif(not BUILT, reason="the hot path is not compiled here (no build)")
def test_the_build_is_what_runs():
    if os.environ.get("LURKER_PURE_PYTHON"):
        pytest.skip("LURKER_PURE_PYTHON is set")
    assert set(_compiled.STATUS.values()) == {"compiled"}, _compiled.STATUS
    for name in _compiled.MODULES:
        assert not sys.modules[name].__file__.endswith(".py"), name
    assert lurker.Op.__module__ == "lurker.graph.nodes"


@pytest.mark.skipif(not BUILT, reason="the hot path is not compiled here (no build)")
def test_a_stale_build_falls_back_to_source_for_all():
    """A compiled module older than its .py (edited since the build) makes every module
    run from source, since they share C types, with a warning that says how to rebuild."""
    code = (
        "import json, sys, warnings\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import lurker, lurker._compiled as c\n"
        "import torch\n"
        "lurker.trace(torch.nn.Linear(2, 2), torch.randn(1, 2)).validate()\n"
        "print(json.dumps([c.STATUS, [str(x.message) for x in w],\n"
        "                  sys.modules['lurker.capture._recorder'].__file__]))\n"
    )
    py, built = _compiled._files("lurker.graph.nodes")
    stat = py.stat()
    try:
        os.utime(py, (stat.st_atime, built.stat().st_mtime + 10))
        env = {**os.environ, "LURKER_PURE_PYTHON": ""}
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
        ).stdout
    finally:
        os.utime(py, (stat.st_atime, stat.st_mtime))
    status, warned, recorder = json.loads(out)
    assert status["lurker.graph.nodes"] == "python: the build is older than its source"
    assert all(s.startswith("python") for s in status.values())
    assert any("older than its source" in m and "make" in m for m in warned)
    assert recorder.endswith("_recorder.py")


@pytest.mark.skipif(not BUILT, reason="the hot path is not compiled here (no build)")
def test_compiled_and_pure_python_traces_agree():
    """The oracle for the compiled build: the same models traced by the .py files (in a
    process with LURKER_PURE_PYTHON=1) give the same graph, labels, passes, sources,
    module outputs, FLOPs, distances and saved-activation flags."""
    sys.path.insert(0, str(Path(__file__).parent))
    try:
        import _trace_dump
    finally:
        sys.path.pop(0)
    here = json.loads(json.dumps(_trace_dump.dump()))
    env = {**os.environ, "LURKER_PURE_PYTHON": "1"}
    pure = subprocess.run(
        [sys.executable, str(Path(__file__).parent / "_trace_dump.py")],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    there = json.loads(pure.stdout)
    assert there.keys() == here.keys()
    for name in here:
        assert there[name] == here[name], name
