"""The Python examples in README.md and docs/ run as written and print what the docs say.

A ```` ```python ```` block followed directly by an ```` ```output ```` block states what
the block prints; the test compares it with what the block really prints (lines stripped
of trailing spaces). In the stated output ``...`` stands for any text, lines included (as
doctest's ELLIPSIS). A block whose figures vary between machines or runs (random weights,
timings, dates) is fenced ```` ```output figures-vary ````: there each number and each
True/False of the stated output matches any number / any of True and False, so the test
checks the shape of the output and its words. Blocks without an output block only run.
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

_BLOCK = re.compile(r"```python\n(.*?)```(?:\s*```output( figures-vary)?\n(.*?)```)?", re.S)
_FIGURE = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:e[-+]?\d+)?|\b(?:True|False)\b")


def _blocks(path: Path) -> list[tuple[str, str | None, bool]]:
    """(code, stated output or None, whether its figures vary), in page order."""
    return [(m[1], m[3], bool(m[2])) for m in _BLOCK.finditer(path.read_text())]


def _pattern(stated: str, vary: bool) -> re.Pattern[str]:
    """The stated output as a regex: ``...`` any text, figures any figure if they vary."""

    def literal(text: str) -> str:
        if not vary:
            return re.escape(text)
        out, at = [], 0
        for m in _FIGURE.finditer(text):
            out.append(re.escape(text[at : m.start()]))
            word = m.group()
            out.append(
                r"(?:True|False)"
                if word in ("True", "False")
                else r"-?(?:[\d,.]+(?:e[-+]?\d+)?|nan|inf)"
            )
            at = m.end()
        out.append(re.escape(text[at:]))
        return "".join(out)

    return re.compile(".*?".join(literal(part) for part in _strip(stated).split("...")), re.S)


def _strip(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.strip("\n").splitlines())


@pytest.mark.parametrize("doc", [d for d in DOCS if _blocks(d)], ids=lambda d: d.name)
def test_examples_run(doc: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {}
    for n, (code, stated, vary) in enumerate(_blocks(doc)):
        printed = io.StringIO()  # blocks of one page share state, like a reader's session
        with contextlib.redirect_stdout(printed):
            exec(compile(code, f"{doc.name}", "exec"), namespace)
        if stated is None:
            continue
        real = _strip(printed.getvalue())
        assert _pattern(stated, vary).fullmatch(real), (
            f"{doc.name}, example {n + 1}: the docs say it prints\n{_strip(stated)}\n"
            f"but it printed\n{real}"
        )


def test_stated_output_is_checked():
    """The comparison itself: a wrong word or figure fails, ``...`` and varying figures pass."""
    assert _pattern("a 3 b\n...\nend", vary=False).fullmatch("a 3 b\nx\ny\nend")
    assert not _pattern("a 3 b", vary=False).fullmatch("a 4 b")
    assert _pattern("unit 5: 1.25 (2, 3) True", vary=True).fullmatch("unit 12: -0.5 (0, 1) False")
    assert not _pattern("unit 5: 1.25", vary=True).fullmatch("units 5: 1.25")
    assert not _pattern("unit 5", vary=True).fullmatch("unit x")
