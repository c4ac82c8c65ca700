"""HTTP errors of the explorer: each carries a message that says what exists or what to do."""

from __future__ import annotations

from collections.abc import Sequence

#: How many existing names a 404 body lists.
LISTED = 40


class ApiError(Exception):
    """Turned into ``{"detail": message}`` with ``status`` by the app's handler."""

    def __init__(
        self,
        status: int,
        detail: str,
        headers: dict[str, str] | None = None,
        *,
        model_failed: bool = False,
    ):
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers
        #: the model's own code raised (out of memory, a bug in it), not a request the
        #: model cannot answer (a method with no rule for it): precompute tells them apart
        self.model_failed = model_failed


def listing(names: Sequence[object], limit: int = LISTED) -> str:
    """``a, b, c, ... (12 more)``: the first ``limit`` names, for a 404 body."""
    shown = ", ".join(str(n) for n in names[:limit])
    more = len(names) - limit
    return (shown or "(none)") + (f", ... ({more} more)" if more > 0 else "")


def not_found(what: str, value: object, existing: Sequence[object], where: str = "") -> ApiError:
    """404 ``no layer 'x' in run r; layers: a, b, ...``."""
    place = f" {where}" if where else ""
    return ApiError(404, f"no {what} {value!r}{place}; {what}s: {listing(existing)}")


def no_model(run_id: str, reason: str | None = None) -> ApiError:
    """409: the live endpoints need a model."""
    why = f" ({reason})" if reason else ""
    return ApiError(
        409,
        f"run {run_id!r} has no model attached{why}: the live views need one. Serve it with "
        f"`lurker serve RUN --model SPEC --weights WEIGHTS` (or create_app(..., model_obj=...)).",
    )


def wrong_model(run_id: str, reason: str) -> ApiError:
    """409: the model attached is not the one the run was probed with (its fingerprint
    differs), so the live endpoints compute nothing with it."""
    return ApiError(
        409,
        f"run {run_id!r}: {reason}. The pages of what the run stores (top images, "
        "histograms, graph, map) work without it.",
    )


def model_failed(what: str, e: BaseException) -> ApiError:
    """400 ``{what} failed on this input: RuntimeError: ...``: the model's own error (out of
    memory, a bug in it) said in one line, flagged ``model_failed`` so that precompute
    stops on it rather than skipping the sample as one the method cannot answer."""
    return ApiError(400, f"{what} failed on this input: {type(e).__name__}: {e}", model_failed=True)
