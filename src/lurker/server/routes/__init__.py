"""One router per resource of the explorer's JSON API (see docs/explorer.md)."""

from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import APIRouter

F = TypeVar("F", bound=Callable[..., Any])


def json_get(router: APIRouter, path: str, model: Any, summary: str) -> Callable[[F], F]:
    """Register a JSON document at ``path.json`` (in the OpenAPI schema) and at ``path``
    (hidden: the client names JSON documents without the suffix). The ``.json`` route
    comes first, so a path parameter never takes ``x.json`` for a name."""

    def register(fn: F) -> F:
        router.get(path + ".json", response_model=model, summary=summary)(fn)
        router.get(path, response_model=model, include_in_schema=False)(fn)
        return fn

    return register
