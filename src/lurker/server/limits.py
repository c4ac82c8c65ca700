"""The upload size limit, enforced while the body arrives.

A request with a ``Content-Length`` over the limit is refused before its body is read. A
chunked one (no length) is counted as it is read: the moment the count crosses the limit
the client gets 413 and the connection is closed, so the server never holds more than the
limit plus one chunk of a too-large body, whatever its size.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

#: What a multipart form adds around the file itself (boundaries, part headers).
FORM_SLACK = 64 << 10


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{max(1, round(n / 2**10))} KB"


def too_big(limit: int, size: int | None = None, *, arrived: int | None = None) -> str:
    """Why an upload is refused: its size (or how much of a chunked one arrived) and the
    limit, and what to do."""
    if size is not None:
        said = f"the upload is {_size(size)}; the limit is {_size(limit)}"
    else:
        said = (
            f"the upload is over the limit of {_size(limit)} (refused after {_size(arrived or 0)})"
        )
    return f"{said}. Send a smaller image (the model sees it resized anyway)"


class UploadLimit:
    """ASGI middleware: POST bodies over ``app.state.upload_limit`` (plus the form's
    framing) get 413 as soon as that is known."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        limit: int = scope["app"].state.upload_limit
        allowed = limit + FORM_SLACK
        headers = dict(scope["headers"])
        length = headers.get(b"content-length", b"").decode("latin-1")
        if length.isdigit() and int(length) > allowed:
            await _refuse(send, too_big(limit, int(length)))
            return

        received = 0
        refused = False
        started = False

        async def counted() -> Message:
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > allowed and not started:
                    # answer now and close; the app sees the client gone and stops reading
                    refused = True
                    await _refuse(send, too_big(limit, arrived=received))
                    return {"type": "http.disconnect"}
            return message

        async def guarded(message: Message) -> None:
            nonlocal started
            if refused:
                return  # the app's own answer to the body it never got whole
            started = True
            await send(message)

        try:
            await self.app(scope, counted, guarded)
        except Exception:
            if not refused:
                raise  # a real error; a refused request's "client disconnected" is not


async def _refuse(send: Send, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers: list[Any] = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        # the rest of the body is never read: the connection cannot carry another request
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": 413, "headers": headers})
    await send({"type": "http.response.body", "body": body})
