"""``/api/runs/{run}/graph``: the graph view document (``lurker.graph.view.graph_view``)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from ..deps import entry

router = APIRouter(prefix="/api", tags=["graph"])


@router.get(
    "/runs/{run_id}/graph",
    response_model=dict[str, Any],
    summary="The traced graph, compact, for the graph page (see docs/explorer.md)",
)
def graph(request: Request, run_id: str) -> dict[str, Any]:
    return entry(request, run_id).graph_view()
