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
        self.state = state  # app.state: .runtime (None until loaded), .draining, .inflight, .upload_extra_bytes
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
                # an upload may carry an LM head beyond the upload limit (server.registry.lm_head)
                limit = self.max_body + getattr(self.state, "upload_extra_bytes", 0) if upload else self.max_json
                shown = limit - UPLOAD_SLACK if upload else limit
                length = _content_length(scope)
                if length is not None and length > limit:
                    status = 413
                    await _send_problem(send, 413, "upload-too-large" if upload else "body-too-large",
                                        f"request body of {length} bytes exceeds the limit of {shown} bytes")
                    return
                slug = "upload-too-large" if upload else "body-too-large"
                await _BodyLimit(receive, limit, shown, slug).run(self.app, scope, send_wrapper)
                return
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


class _BodyLimit:
    """Counts streamed body bytes (chunked bodies have no Content-Length). Past the limit, reading fails and
    whatever the app answers to that (FastAPI: a generic 400 "error parsing the body") is replaced by a 413."""

    def __init__(self, receive: Receive, limit: int, shown: int, slug: str) -> None:
        self._receive = receive
        self.limit = limit
        self.shown = shown
        self.slug = slug
        self.seen = 0
        self.exceeded = False
        self.started = False

    async def receive(self) -> Message:
        message = await self._receive()
        if message["type"] == "http.request":
            self.seen += len(message.get("body", b""))
            if self.seen > self.limit:
                self.exceeded = True
                raise ProblemError(413, self.slug, self._detail())
        return message

    def _detail(self) -> str:
        return f"request body exceeds the limit of {self.shown} bytes"

    async def run(self, app: ASGIApp, scope: Scope, send: Send) -> None:
        async def guarded(message: Message) -> None:
            if self.exceeded and not self.started:
                return
            if message["type"] == "http.response.start":
                self.started = True
            await send(message)

        try:
            await app(scope, self.receive, guarded)
        except Exception:
            if not self.exceeded or self.started:
                raise
        if self.exceeded and not self.started:
            await _send_problem(send, 413, self.slug, self._detail())


async def _send_problem(send: Send, status: int, slug: str, detail: str, headers: dict[str, str] | None = None) -> None:
    body = problem_bytes(status, slug, detail)
    raw = [(b"content-type", PROBLEM_MEDIA_TYPE.encode()), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
