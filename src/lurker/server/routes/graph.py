"""``/api/runs/{run}/graph``: the graph view document (``lurker.graph.view.graph_view``).

The document is served as made (it can hold 10,000 nodes: no pydantic pass over it); its
OpenAPI description is ``lurker/schema/graph_view.schema.json`` itself, so the API's
documentation and the view's schema are one text and cannot drift apart.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from lurker.graph.view import json_schema

from ..deps import entry

router = APIRouter(prefix="/api", tags=["graph"])


def openapi_schema() -> dict[str, Any]:
    """The graph view's JSON Schema as an OpenAPI 3.1 schema object (OpenAPI 3.1 schemas
    are JSON Schema 2020-12; only the document-level ``$schema``/``$id`` are dropped)."""
    return {k: v for k, v in json_schema().items() if k not in ("$schema", "$id")}


@router.get(
    "/runs/{run_id}/graph",
    response_class=JSONResponse,
    responses={
        200: {
            "description": "The graph view document (lurker.graph_view/1)",
            "content": {"application/json": {"schema": openapi_schema()}},
        }
    },
    summary="The traced graph, compact, for the graph page (see docs/explorer.md)",
)
def graph(request: Request, run_id: str) -> JSONResponse:
    return JSONResponse(entry(request, run_id).graph_view())
