"""Progress of a long job (the probe's sweep, unit images) on stderr: a rich bar on a
terminal or in a notebook, else a plain line every few seconds, so that a log (nohup, a
batch job, CI) shows how far the job has come while it runs, not only when it ends."""

from __future__ import annotations

import sys
import time
from typing import Any


class Progress:
    """``label: 120/4300 (3%), 61.2 images/s``: a bar on a terminal, else a line every
    ``every`` seconds and one at the end. ``done`` counts what an earlier, interrupted
    call did (shown, not counted in the rate)."""

    def __init__(self, label: str, total: int, done: int, enabled: bool, every: float):
        self.label = label
        self.total, self.done, self.made = total, done, 0
        self.every = every
        self.t0 = self.last = time.perf_counter()
        self.bar: Any = None
        self.lines = enabled and not _live()
        if enabled and not self.lines:
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
        """Images a second in this call."""
        elapsed = time.perf_counter() - self.t0
        return self.made / elapsed if elapsed > 0 else 0.0

    def _line(self) -> None:
        pct = 100.0 * self.done / self.total if self.total else 100.0
        print(
            f"{self.label}: {self.done}/{self.total} ({pct:.0f}%), {self.rate():.1f} images/s",
            file=sys.stderr,
            flush=True,
        )

    def advance(self, n: int) -> None:
        self.done += n
        self.made += n
        now = time.perf_counter()
        if self.bar is not None:
            self.bar.update(self.task, advance=n, rate=f"{self.rate():.1f} images/s")
        elif self.lines and now - self.last >= self.every:
            self.last = now
            self._line()

    def close(self) -> None:
        """The last line (or the bar's final state); call once, however the job ends."""
        if self.bar is not None:
            self.bar.stop()
        elif self.lines:
            self._line()


def _live() -> bool:
    """Whether a bar can redraw itself: stderr is a terminal, or a notebook shows it."""
    if sys.stderr.isatty():
        return True
    from rich.console import Console

    return Console(stderr=True).is_jupyter
