"""FastAPI dependencies the routes share: the app's runtime (the caller's principal is in auth)."""

from __future__ import annotations

from fastapi import Request

from server.http.problems import ProblemError
from server.scheduling.runtime import Runtime


async def runtime_of(request: Request) -> Runtime:
    """The app's runtime (503 until the backbone is loaded)."""
    rt: Runtime | None = getattr(request.app.state, "runtime", None)
    if rt is None:
        raise ProblemError(503, "not-ready", "the server is still loading its backbone")
    return rt
