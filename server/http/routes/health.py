"""Liveness, readiness and the Prometheus scrape endpoint."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from server.http.schemas import Health
from server.metrics import METRICS_MEDIA_TYPE

router = APIRouter(tags=["operations"])


class MetricsResponse(Response):
    media_type = METRICS_MEDIA_TYPE


@router.get("/healthz", response_model=Health, summary="Liveness: the process serves HTTP")
async def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz", response_model=Health, summary="Readiness: backbone loaded and not draining",
    responses={503: {"model": Health, "description": "Loading or draining", "content": {"application/json": {}}}},
)
async def readyz(request: Request) -> JSONResponse:
    rt = getattr(request.app.state, "runtime", None)
    if rt is None:
        return JSONResponse({"status": "loading", "detail": "the backbone is loading"}, status_code=503)
    if request.app.state.draining:
        return JSONResponse({"status": "draining", "detail": "shutting down; finishing queued requests"}, status_code=503)
    return JSONResponse({"status": "ready"})


@router.get(
    "/metrics", response_class=MetricsResponse, summary="Prometheus metrics (text exposition format 0.0.4)",
    responses={200: {"description": "Prometheus text format", "content": {METRICS_MEDIA_TYPE: {"schema": {"type": "string"}}}}},
)
async def metrics(request: Request) -> MetricsResponse:
    return MetricsResponse(request.app.state.metrics.render())
