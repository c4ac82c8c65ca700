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


def test_build_requires_a_setuptools_that_reads_the_license():
    """``license = "MIT"`` (a PEP 639 expression) needs setuptools 77 or later, which the
    build requirement must ask for: older ones reject the pyproject.toml (``project.license``
    must be a table there) and nothing builds."""
    tomllib = pytest.importorskip("tomllib")
    requirements = pytest.importorskip("packaging.requirements")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    if not isinstance(pyproject["project"].get("license"), str):
        return
    (setuptools,) = [
        req
        for req in map(requirements.Requirement, pyproject["build-system"]["requires"])
        if req.name == "setuptools"
    ]
    assert not setuptools.specifier.contains("76.3"), setuptools


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


def _copy_package(site: Path, *, source_checkout: bool) -> None:
    """lurker with its builds into ``site``: as a source checkout (with the .pxd files) or
    as a wheel installs it (without)."""
    import shutil

    skip = ["*.c", "*.html", "__pycache__"] + ([] if source_checkout else ["*.pxd"])
    shutil.copytree(ROOT / "src" / "lurker", site / "lurker", ignore=shutil.ignore_patterns(*skip))


def _built(py: Path) -> Path:
    import importlib.machinery

    return next(
        b
        for b in (py.with_name(py.stem + s) for s in importlib.machinery.EXTENSION_SUFFIXES)
        if b.exists()
    )


def _import_in(site: Path, pure: str = "") -> tuple[str, dict[str, str], list[str], str]:
    """Import lurker from ``site`` in a fresh process and trace a layer: where lurker came
    from, its STATUS, the warnings, and the file the recorder ran from."""
    code = (
        "import json, sys, warnings\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import lurker, lurker._compiled as c\n"
        "import torch\n"
        "lurker.trace(torch.nn.Linear(2, 2), torch.randn(1, 2)).validate()\n"
        "print(json.dumps([lurker.__file__, c.STATUS, [str(x.message) for x in w],\n"
        "                  sys.modules['lurker.capture._recorder'].__file__]))\n"
    )
    env = {**os.environ, "LURKER_PURE_PYTHON": pure, "PYTHONPATH": str(site)}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    ).stdout
    where, status, warned, recorder = json.loads(out)
    assert Path(where).is_relative_to(site)
    return where, status, warned, recorder


@pytest.mark.skipif(not BUILT, reason="the hot path is not compiled here (no build)")
def test_a_stale_build_falls_back_to_source_for_all(tmp_path: Path):
    """In a source checkout, a compiled module older than its .py (edited since the build)
    makes every module run from source, since they share C types, with a warning that says
    how to rebuild. (On a copy: touching the checkout would race other test processes.)"""
    site = tmp_path / "site"
    _copy_package(site, source_checkout=True)
    py = site / "lurker" / "graph" / "nodes.py"
    os.utime(py, (py.stat().st_atime, _built(py).stat().st_mtime + 10))
    _, status, warned, recorder = _import_in(site)
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


@pytest.mark.skipif(not BUILT, reason="the hot path is not compiled here (no build)")
def test_an_installed_build_runs_whatever_the_file_times(tmp_path: Path):
    """Installed from a wheel, the builds sit beside their .py files with whatever times
    the installer gave them (pip writes files in archive order, ``.so`` before ``.py``, and
    keeps no times): only a source checkout, where a .py can be edited after ``make build``,
    is checked for stale builds."""
    site = tmp_path / "site"
    _copy_package(site, source_checkout=False)  # what a wheel holds: no .pxd
    for name in _compiled.MODULES:
        py = site.joinpath(*name.split(".")).with_suffix(".py")
        built = _built(py)
        os.utime(py, (built.stat().st_atime, built.stat().st_mtime + 1))  # "installed" later
    _, status, warned, recorder = _import_in(site)
    assert set(status.values()) == {"compiled"}, status
    assert not any("lurker" in m for m in warned), warned
    assert not recorder.endswith(".py")


@pytest.mark.skipif(not BUILT, reason="the hot path is not compiled here (no build)")
def test_without_a_py_to_fall_back_to_the_builds_run(tmp_path: Path):
    """An install that shipped a build without its .py cannot run from source even when
    asked to: the builds run, with a warning that says why, instead of a failed import."""
    site = tmp_path / "site"
    _copy_package(site, source_checkout=False)
    (site / "lurker" / "capture" / "_tree.py").unlink()
    _, status, warned, recorder = _import_in(site, pure="1")
    assert set(status.values()) == {"compiled"}, status
    assert any("no .py beside the build" in m for m in warned), warned
    assert not recorder.endswith(".py")
