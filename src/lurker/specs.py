"""Spec strings as runs record them (torch-free: the server compares them per request).

A run records the MODEL and ``--data`` specs it was probed with, and ``lurker serve``,
``map`` and ``images`` load them again, maybe from another directory: a
``path/to/file.py:callable`` spec is recorded with its file absolute.
"""

from __future__ import annotations

from pathlib import Path


def absolute_spec(spec: str) -> str:
    """A ``path/to/file.py:callable`` spec with its file made absolute (where it exists),
    as a run records it; any other spec as given."""
    target, sep, attr = spec.strip().rpartition(":")
    path = Path(target.strip()).expanduser()
    if sep and target.strip().endswith(".py") and path.is_file():
        return f"{path.absolute()}:{attr.strip()}"
    return spec


def same_spec(recorded: str | None, given: str | None) -> bool:
    """Whether a spec given now names what a run recorded: the same text, or the same file
    once made absolute (runs record ``file.py`` specs absolute)."""
    return given is not None and recorded in (given, absolute_spec(given))


def same_weights(a: str | None, b: str | None) -> bool:
    """Whether two weights paths (None: no weights) name the same file."""
    if a is None or b is None:
        return a is None and b is None
    if a == b:
        return True
    try:
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    except OSError:
        return False
