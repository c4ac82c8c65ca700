"""Fixtures shared by test modules: one headless chromium per test process, and Ctrl-C
delivered as Python's KeyboardInterrupt.

Playwright's sync API allows one running instance per thread, so every browser test
module takes the browser from here instead of starting its own.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    """Debian's chromium driven by Playwright (never a downloaded browser)."""
    if not CHROMIUM.exists():
        pytest.skip("the browser tests need Debian's chromium at /usr/bin/chromium (make sysdeps)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
        yield b
        b.close()


@pytest.fixture(scope="session", autouse=True)
def ctrl_c_reaches_python() -> Iterator[None]:
    """Tests press Ctrl-C (a SIGINT to the test process or to a command it starts) and
    expect what a terminal's Ctrl-C does. A shell without job control starts a background
    command (``make test &``) with SIGINT ignored, which its children inherit: Python then
    installs no KeyboardInterrupt handler. Put Python's back for the session (a command
    started from here then gets its own, as from a terminal)."""
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        yield
        return
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
