"""Progress of a long job (the probe's sweep, unit images): a rich bar on a terminal, one
line that updates itself in a notebook, else a plain line on stderr every few seconds, so
that a log (nohup, a batch job, CI) shows how far the job has come while it runs, not only
when it ends."""

from __future__ import annotations

import html
import sys
import time
from typing import Any

#: the least seconds between two redraws of a notebook's line (each is a message to the
#: front end; a sweep advances hundreds of times a second)
NOTEBOOK_EVERY = 0.2


class Progress:
    """``label: 120/4300 (3%), 61.2 images/s``: a bar on a terminal, one output in a
    notebook redrawn in place, else a line every ``every`` seconds and one at the end.
    ``done`` counts what an earlier, interrupted call did (shown, not counted in the
    rate). ``unit`` names what is counted ("sequences" for token ids: not images)."""

    def __init__(
        self,
        label: str,
        total: int,
        done: int,
        enabled: bool,
        every: float,
        unit: str = "images",
    ):
        self.label, self.unit = label, unit
        self.total, self.done, self.made = total, done, 0
        self.every = every
        self.t0 = self.last = time.perf_counter()
        self.bar: Any = None
        self.cell: Any = None
        mode = _mode() if enabled else None
        self.lines = mode == "lines"
        if mode == "notebook":
            # not rich's bar: in Jupyter it needs ipywidgets, and without them it warns on
            # every redraw and leaves an empty output
            self.cell = _display(self._state())
        elif mode == "terminal":
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as Bar

            self.bar = Bar(
                TextColumn(label),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"),
                TimeRemainingColumn(),
                console=Console(stderr=True),
            )
            self.task = self.bar.add_task(label, total=total, completed=done, rate="")
            self.bar.start()
        elif self.lines:
            self._line()

    def rate(self) -> float:
        """Items (``unit``) a second in this call."""
        elapsed = time.perf_counter() - self.t0
        return self.made / elapsed if elapsed > 0 else 0.0

    def text(self) -> str:
        """``label: done/total (pct%), rate images/s`` (or the ``unit``)."""
        pct = 100.0 * self.done / self.total if self.total else 100.0
        rate = f"{self.rate():.1f} {self.unit}/s"
        return f"{self.label}: {self.done}/{self.total} ({pct:.0f}%), {rate}"

    def _line(self) -> None:
        print(self.text(), file=sys.stderr, flush=True)

    def _state(self) -> _Line:
        return _Line(self.text(), self.done, self.total)

    def _redraw(self) -> None:
        self.cell.update(self._state())

    def advance(self, n: int) -> None:
        self.done += n
        self.made += n
        now = time.perf_counter()
        if self.bar is not None:
            self.bar.update(self.task, advance=n, rate=f"{self.rate():.1f} {self.unit}/s")
        elif self.cell is not None and now - self.last >= NOTEBOOK_EVERY:
            self.last = now
            self._redraw()
        elif self.lines and now - self.last >= self.every:
            self.last = now
            self._line()

    def close(self) -> None:
        """The last line (or the bar's final state); call once, however the job ends."""
        if self.bar is not None:
            self.bar.stop()
        elif self.cell is not None:
            self._redraw()
        elif self.lines:
            self._line()


def _mode() -> str:
    """How progress is shown: ``"terminal"`` (stderr is one: a rich bar), ``"notebook"``
    (a Jupyter kernel: an output redrawn in place) or ``"lines"`` (a log)."""
    if sys.stderr.isatty():
        return "terminal"
    from rich.console import Console

    return "notebook" if Console(stderr=True).is_jupyter else "lines"


def _display(obj: Any) -> Any:
    """Show ``obj`` in the notebook; the handle's ``update`` redraws that output."""
    from IPython.display import display

    return display(obj, display_id=True)


class _Line:
    """One state of a notebook's progress: a bar and the line (plain text elsewhere)."""

    def __init__(self, text: str, done: int = 0, total: int = 0):
        self.text, self.done, self.total = text, done, total

    def __repr__(self) -> str:
        return self.text

    def _repr_html_(self) -> str:
        bar = f'<progress value="{self.done}" max="{max(self.total, 1)}"></progress> '
        return f"<div>{bar}<code>{html.escape(self.text)}</code></div>"
