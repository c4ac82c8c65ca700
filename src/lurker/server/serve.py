"""``lurker serve``: run the explorer with uvicorn on a local port and print its URL."""

from __future__ import annotations

import errno
import os
import socket
import sys
import threading
import time
import webbrowser
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from lurker.errors import LurkerError

#: Tried first when no port is given, so bookmarks survive a restart; busy -> a free port.
DEFAULT_PORT = 8765


def bind(host: str, port: int | None) -> socket.socket:
    """A listening-ready socket on ``host``: ``port``, or DEFAULT_PORT (else a free one)
    when ``port`` is None; 0 means any free port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    tries = [DEFAULT_PORT, 0] if port is None else [port]
    last: OSError | None = None
    for p in tries:
        # IPPROTO_TCP, not the default 0: asyncio sets TCP_NODELAY only on accepted sockets
        # whose proto says TCP, and without it every response after the first on a
        # keep-alive connection (headers and body are two writes) waits ~40 ms for the
        # client's delayed ACK (Nagle): a page of hundreds of map tiles took seconds.
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, p))
            return sock
        except OSError as e:
            sock.close()
            last = e
            if e.errno != errno.EADDRINUSE:
                break
    why = last.strerror if last is not None and last.strerror else str(last)
    wanted = "a free port" if port in (None, 0) else f"port {port}"
    raise LurkerError(
        f"cannot listen on {host}, {wanted}: {why}. Pick another with --port (0: any free "
        "port) or another --host",
    )


def url_of(host: str, port: int) -> str:
    """The URL a local browser opens (the loopback address for a wildcard bind)."""
    shown = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "[::1]"}.get(host, host)
    if ":" in shown and not shown.startswith("["):
        shown = f"[{shown}]"
    return f"http://{shown}:{port}/"


def has_display() -> bool:
    """Whether a browser window could open here (a desktop, not a bare server or CI)."""
    if sys.platform in ("darwin", "win32"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def serve_forever(
    source: str,
    *,
    model: str | None = None,
    weights: str | None = None,
    host: str = "127.0.0.1",
    port: int | None = None,
    browser: bool = True,
    device: str | None = None,
    static_dir: str | None = None,
    vocab: Any = None,
) -> None:
    """Serve the explorer on ``source`` until interrupted; print the URL first (flushed).
    ``vocab``: as :func:`~lurker.server.create_app` takes it."""
    import uvicorn

    from .app import create_app

    app = create_app(
        source, model=model, weights=weights, device=device, static_dir=static_dir, vocab=vocab
    )
    if model is not None:
        app.state.source.load()  # a bad spec or weights file fails now, not on first use
    sock = bind(host, port)
    # Listen before printing the URL: a client that reads it and connects at once waits in
    # the backlog until uvicorn accepts, instead of being refused.
    sock.listen(2048)
    url = url_of(host, sock.getsockname()[1])
    runs = app.state.registry.entries
    print(url, flush=True)
    print(
        f"lurker explorer: {len(runs)} run{'s' if len(runs) != 1 else ''} from "
        f"{app.state.registry.root}; Ctrl-C to stop",
        file=sys.stderr,
        flush=True,
    )
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    if browser and has_display():
        threading.Thread(target=_open_when_up, args=(server, url), daemon=True).start()
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()


def _open_when_up(server: Any, url: str) -> None:
    for _ in range(200):
        if server.started:
            webbrowser.open(url)
            return
        time.sleep(0.05)


@contextmanager
def background(app: Any, host: str = "127.0.0.1", timeout: float = 30.0) -> Iterator[str]:
    """Serve ``app`` on a free port of ``host`` in a daemon thread while the block runs;
    yields its URL once it accepts connections (for scripts, tests and benchmarks)."""
    import uvicorn

    sock = bind(host, 0)
    sock.listen(2048)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            sock.close()
            raise LurkerError(f"the explorer server did not start within {timeout:g} s")
        time.sleep(0.05)
    try:
        yield url_of(host, sock.getsockname()[1])
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
