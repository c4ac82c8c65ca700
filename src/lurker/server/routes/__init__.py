"""One router per resource of the explorer's JSON API (see docs/explorer.md)."""

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from fastapi import APIRouter
from fastapi.responses import Response

from ..deps import MODEL_MADE

F = TypeVar("F", bound=Callable[..., Any])

#: How a PNG endpoint's answer reads in the OpenAPI schema.
PNG = {200: {"content": {"image/png": {}}, "description": "a PNG image"}}


def json_get(router: APIRouter, path: str, model: Any, summary: str) -> Callable[[F], F]:
    """Register a JSON document at ``path.json`` (in the OpenAPI schema) and at ``path``
    (hidden: the client names JSON documents without the suffix). The ``.json`` route
    comes first, so a path parameter never takes ``x.json`` for a name."""

    def register(fn: F) -> F:
        router.get(path + ".json", response_model=model, summary=summary)(fn)
        router.get(path, response_model=model, include_in_schema=False)(fn)
        return fn

    return register


def png_get(router: APIRouter, path: str, summary: str) -> Callable[[F], F]:
    """Register a PNG image at ``path``: the schema says ``image/png``, not JSON."""
    return router.get(path, response_class=Response, responses=PNG, summary=summary)


def made_png(data: bytes, headers: Mapping[str, str] | None = None) -> Response:
    """PNG bytes made on request (by the model, or read from the run where a later command
    may write them again): revalidated every time (:data:`~lurker.server.deps.MODEL_MADE`).
    ``headers`` (a map's ``X-Lurker-*`` scale and range) are added and exposed to scripts of
    other origins, which otherwise cannot read them."""
    extra = dict(headers or {})
    if extra:
        extra["Access-Control-Expose-Headers"] = ", ".join(extra)
    return Response(data, media_type="image/png", headers={**MODEL_MADE, **extra})
