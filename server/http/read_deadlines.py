"""How long a client may take to send a request: its headers (a uvicorn protocol) and its body (ASGI middleware).

uvicorn has no deadline for either: a connection that never finishes its headers, or a body sent one byte at a
time, holds a socket and a task for as long as the client likes (slowloris). `header_deadline_protocol` gives
the request line and headers `header_timeout_s` from the connection's opening (and from each later request's
first byte) and at most MAX_HEADER_BYTES; `BodyDeadline` gives a body `body_timeout_s`, after which it must
average `min_body_rate_kib_s`. Either answers 408 (431 for oversized headers) and closes the connection.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from server.http.problems import PROBLEM_MEDIA_TYPE, problem_bytes

MAX_HEADER_BYTES = 64 * 1024  # request line plus headers


def _raw_problem(status: int, reason: str, slug: str, detail: str) -> bytes:
    body = problem_bytes(status, slug, detail)
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: {PROBLEM_MEDIA_TYPE}\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n")
    return head.encode() + body


class HeaderDeadlineProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline and a size cap for the request line and headers."""

    header_timeout_s: float = 10.0
    _timer: asyncio.TimerHandle | None = None
    _header_bytes = 0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        waiting = self._timer is not None
        super().data_received(data)
        if waiting and self._timer is not None:  # the headers are still incomplete after this chunk
            self._header_bytes += len(data)
            if self._header_bytes > MAX_HEADER_BYTES:
                self._refuse(431, "Request Header Fields Too Large", "headers-too-large",
                             f"the request line and headers exceed {MAX_HEADER_BYTES} bytes")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._timer is None:
            self._header_bytes = 0
            self._timer = self.loop.call_later(self.header_timeout_s, self._too_slow)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _too_slow(self) -> None:
        self._timer = None
        self._refuse(408, "Request Timeout", "header-timeout",
                     f"the request line and headers did not arrive within header_timeout_s {self.header_timeout_s:g}s")

    def _refuse(self, status: int, reason: str, slug: str, detail: str) -> None:
        """Answer (unless a response on this connection is under way) and close the connection."""
        self._disarm()
        if self.transport.is_closing():
            return
        if self.cycle is None or self.cycle.response_complete:
            self.transport.write(_raw_problem(status, reason, slug, detail))
        self.transport.close()


def _may_have_body(scope: Scope) -> bool:
    for key, value in scope["headers"]:
        if (key == b"content-length" and value.strip() != b"0") or key == b"transfer-encoding":
            return True
    return False


def header_deadline_protocol(timeout_s: float) -> type[HeaderDeadlineProtocol]:
    """The protocol class for uvicorn.Config(http=...) with this header deadline."""
    return type("HeaderDeadlineProtocol", (HeaderDeadlineProtocol,), {"header_timeout_s": timeout_s})


class BodyDeadline:
    """Raw ASGI middleware: a request body gets `grace_s`, then must average `min_rate` bytes/s since it began. A
    slower one is answered 408 (connection: close); the app then sees a disconnect and its answer is dropped. An
    answer sent before the body has arrived closes the connection too, so the rest cannot trickle in unbounded."""

    def __init__(self, app: ASGIApp, grace_s: float, min_rate: float) -> None:
        self.app = app
        self.grace_s = grace_s
        self.min_rate = min_rate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.monotonic()
        received = 0
        done = False  # the whole body has arrived
        started = False  # the app began its answer
        answered = False  # we sent the 408 (or gave up on a body the app answered without)

        async def timed_receive() -> Message:
            nonlocal received, done, answered
            if answered:
                return {"type": "http.disconnect"}
            if done:
                return await receive()
            deadline = start + self.grace_s + received / self.min_rate
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                if not started:
                    await self._answer(send, received, time.monotonic() - start)
                answered = True
                return {"type": "http.disconnect"}
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                done = not message.get("more_body", False)
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if answered:
                return
            if message["type"] == "http.response.start" and not done and _may_have_body(scope):
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            started = True
            await send(message)

        try:
            await self.app(scope, timed_receive, guarded_send)
        except Exception:
            if not answered:
                raise

    async def _answer(self, send: Send, received: int, elapsed: float) -> None:
        detail = (f"the request body arrived too slowly ({received} bytes in {elapsed:.1f}s): after body_timeout_s "
                  f"{self.grace_s:g}s it must average min_body_rate_kib_s {self.min_rate / 1024:g} KiB/s")
        body = problem_bytes(408, "body-timeout", detail)
        headers: list[Any] = [(b"content-type", PROBLEM_MEDIA_TYPE.encode()), (b"content-length", str(len(body)).encode()),
                              (b"connection", b"close")]
        await send({"type": "http.response.start", "status": 408, "headers": headers})
        await send({"type": "http.response.body", "body": body})
