"""Raw ASGI middleware: request metrics, in-flight count, drain refusal, upload body limit."""

from __future__ import annotations

import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.http.problems import PROBLEM_MEDIA_TYPE, ProblemError, problem_bytes
from server.metrics import Metrics

UPLOAD_SLACK = 256 * 1024  # multipart framing on top of the file bytes


class ServeMiddleware:
    """Counts and times every request by route template; refuses /v1 work while draining; caps upload bodies."""

    def __init__(self, app: ASGIApp, metrics: Metrics, state: Any, max_upload_bytes: int, max_json_bytes: int) -> None:
        self.app = app
        self.metrics = metrics
        self.state = state  # app.state: .runtime (None until loaded), .draining, .inflight
        self.max_body = max_upload_bytes + UPLOAD_SLACK
        self.max_json = max_json_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        status = 500
        start = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.state.inflight += 1
        api = path.startswith("/v1/")
        if api:
            self.metrics.in_flight.inc()
        try:
            if api and self.state.draining:
                status = 503
                await _send_problem(send, 503, "draining", "the server is draining and accepts no new requests", {"retry-after": "5"})
                return
            if scope["method"] == "POST" and api:
                upload = path.startswith("/v1/adapters")
                limit = self.max_body if upload else self.max_json
                shown = limit - UPLOAD_SLACK if upload else limit
                length = _content_length(scope)
                if length is not None and length > limit:
                    status = 413
                    await _send_problem(send, 413, "upload-too-large" if upload else "body-too-large",
                                        f"request body of {length} bytes exceeds the limit of {shown} bytes")
                    return
                receive = _limited(receive, limit, shown)
            await self.app(scope, receive, send_wrapper)
        finally:
            self.state.inflight -= 1
            if api:
                self.metrics.in_flight.dec()
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(route=template, status=str(status)).inc()
            self.metrics.request_seconds.labels(route=template).observe(time.perf_counter() - start)
            tenant = (scope.get("state") or {}).get("tenant")
            if tenant is not None:
                self.metrics.tenant_requests.labels(tenant=self.metrics.tenant_label(tenant)).inc()


def _content_length(scope: Scope) -> int | None:
    for key, value in scope["headers"]:
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _limited(receive: Receive, limit: int, shown: int) -> Receive:
    seen = 0

    async def wrapped() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise ProblemError(413, "body-too-large", f"request body exceeds the limit of {shown} bytes")
        return message

    return wrapped


async def _send_problem(send: Send, status: int, slug: str, detail: str, headers: dict[str, str] | None = None) -> None:
    body = problem_bytes(status, slug, detail)
    raw = [(b"content-type", PROBLEM_MEDIA_TYPE.encode()), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
