"""Which of lurker's modules run compiled, and the switch back to plain Python.

``setup.py`` compiles the per-op hot path (:data:`MODULES`) with Cython into extension
modules beside their ``.py`` files; each ``.py`` stays the source and, without a build,
runs as is. Python imports an extension in preference to the ``.py`` of the same name, so
an edited ``.py`` would be shadowed by an older build: in a source checkout, a build older
than its source is skipped here (with a warning) and the ``.py`` runs instead.
``LURKER_PURE_PYTHON=1`` runs every module from its ``.py``, to debug or to check that both
agree.

:func:`install` runs first thing in ``lurker/__init__.py``, before any of these modules is
imported; :data:`STATUS` then says, per module, what runs and why.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
import warnings
from pathlib import Path
from typing import Any

# Keep in sync with setup.py's MODULES (tests/test_compiled.py checks).
MODULES = (
    "lurker.capture._funcs",
    "lurker.capture._recorder",
    "lurker.capture._tree",
    "lurker.graph.nodes",
    "lurker.graph.postprocess",
)
_PACKAGE = Path(__file__).resolve().parent
STATUS: dict[str, str] = {}


def _files(name: str) -> tuple[Path, Path | None]:
    """The module's ``.py`` and its compiled build beside it, if there is one."""
    py = _PACKAGE.joinpath(*name.split(".")[1:]).with_suffix(".py")
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        built = py.with_name(py.stem + suffix)
        if built.exists():
            return py, built
    return py, None


def choose(py_mtime: float | None, built_mtime: float | None, pure: bool) -> str:
    """What runs for one module: ``"compiled"``, or why its ``.py`` does."""
    if built_mtime is None:
        return "python: not built"
    if pure:
        return "python: LURKER_PURE_PYTHON is set"
    if py_mtime is not None and py_mtime > built_mtime:
        return "python: the build is older than its source"
    return "compiled"


class _FromSource:
    """A meta path finder that loads the named modules from their ``.py`` files."""

    def __init__(self, files: dict[str, Path]):
        self.files = files

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        py = self.files.get(fullname)
        return None if py is None else importlib.util.spec_from_file_location(fullname, py)


def install() -> None:
    """Decide, for all of :data:`MODULES` together, whether their builds run.

    All or none: the compiled modules reach into each other's C types (the recorder
    writes Op's fields directly), so one module from source means all from source.
    """
    pure = os.environ.get("LURKER_PURE_PYTHON", "") not in ("", "0")
    files = {name: _files(name) for name in MODULES}
    for name, (py, built) in files.items():
        STATUS[name] = choose(
            # Only a source checkout (its .pxd beside the .py; wheels leave .pxd files out)
            # can hold a .py edited after its build. Installed, the times say nothing: pip
            # writes a wheel's files in archive order (a build before its .py) and keeps
            # none of their times.
            py.stat().st_mtime if py.exists() and py.with_suffix(".pxd").exists() else None,
            built.stat().st_mtime if built is not None else None,
            pure,
        )
    if all(s == "compiled" for s in STATUS.values()):
        return
    missing = [name for name, (py, b) in files.items() if b is not None and not py.exists()]
    if missing:  # nothing to fall back to: keep the builds
        for name, (_, built) in files.items():
            if built is not None:
                STATUS[name] = "compiled"
        warnings.warn(
            f"lurker: cannot run {', '.join(missing)} from source (no .py beside the build); "
            "the compiled modules run.",
            stacklevel=3,
        )
        return
    for name, s in STATUS.items():
        if s == "compiled":
            STATUS[name] = "python: another of these modules runs from source"
    built = {name: py for name, (py, b) in files.items() if b is not None}
    if built:
        sys.meta_path.insert(0, _FromSource(built))
    stale = [n for n, s in STATUS.items() if "older" in s]
    if stale:
        warnings.warn(
            f"lurker: the compiled {', '.join(stale)} is older than its source, so the "
            "hot path runs as Python (slower tracing). Rebuild with `make` or "
            "`pip install -e .`.",
            stacklevel=3,
        )
