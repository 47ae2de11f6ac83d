"""JSON request bodies, checked before FastAPI validates them: the media type (415), the nesting depth (413) and
the JSON itself (400), each with a detail that says what was wrong.

The media-type rule, for every route with a JSON body: `application/json` or `application/<subtype>+json` (RFC
6839's structured syntax suffix, the rule FastAPI applies too), with no charset or charset=utf-8 (RFC 8259 8.1).
Python's json module recurses once per nesting level, so the depth is measured on the bytes before parsing.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any

import numpy as np
from fastapi import Request, Response
from fastapi.routing import APIRoute

from server.http.problems import ProblemError

JSON_MEDIA_TYPES = "application/json or application/*+json"


def media_type_problem(content_type: str | None) -> str | None:
    """Why a Content-Type does not announce a JSON body, or None when it does."""
    if not content_type:
        return f"no Content-Type; send the body as {JSON_MEDIA_TYPES}"
    media, *params = (part.strip() for part in content_type.split(";"))
    media = media.lower()
    main, _, sub = media.partition("/")
    if main != "application" or not (sub == "json" or sub.endswith("+json")):
        return f"Content-Type {media!r} is not JSON; send the body as {JSON_MEDIA_TYPES}"
    for param in params:
        key, _, value = param.partition("=")
        charset = value.strip().strip('"').lower()
        if key.strip().lower() == "charset" and charset not in ("utf-8", "utf8"):
            return f"charset {charset!r}: JSON bodies are UTF-8; send application/json with charset=utf-8 or none"
    return None


def nesting_depth(body: bytes) -> int:
    """The deepest nesting of arrays and objects in a JSON text; brackets inside strings do not count (a quote after
    an odd run of backslashes is escaped). Vectorized over the positions of quotes, backslashes and brackets only;
    exact for valid JSON."""
    raw = np.frombuffer(body, dtype=np.uint8)
    quotes = np.flatnonzero(raw == 0x22)
    slashes = np.flatnonzero(raw == 0x5C)
    if slashes.size and quotes.size:
        run_starts = slashes[np.r_[True, np.diff(slashes) != 1]]
        after_slash = (quotes > 0) & (raw[np.maximum(quotes - 1, 0)] == 0x5C)
        run = quotes - run_starts[np.maximum(np.searchsorted(run_starts, quotes - 1, side="right") - 1, 0)]
        quotes = quotes[~after_slash | (run % 2 == 0)]
    opens = np.flatnonzero((raw == 0x5B) | (raw == 0x7B))
    closes = np.flatnonzero((raw == 0x5D) | (raw == 0x7D))
    if quotes.size:  # a bracket after an even number of quotes is not in a string
        opens = opens[np.searchsorted(quotes, opens) % 2 == 0]
        closes = closes[np.searchsorted(quotes, closes) % 2 == 0]
    if not opens.size:
        return 0
    steps = np.zeros(raw.size, dtype=np.int8)
    steps[opens] = 1
    steps[closes] = -1
    return int(np.cumsum(steps, dtype=np.int32).max())


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not a JSON value")


def parse_json(body: bytes, max_depth: int) -> Any:
    """The parsed body; ProblemError 413 when it nests deeper than `max_depth`, 400 when it is not JSON."""
    if body.count(b"[") + body.count(b"{") > max_depth and (depth := nesting_depth(body)) > max_depth:
        raise ProblemError(413, "json-too-deep", f"JSON nesting depth {depth} exceeds max_json_depth {max_depth} "
                           f"(over by {depth - max_depth})")
    try:
        return json.loads(body, parse_constant=_not_json)
    except json.JSONDecodeError as exc:
        raise ProblemError(400, "malformed-json", f"request body is not valid JSON: {exc.msg}") from None
    except UnicodeDecodeError as exc:
        raise ProblemError(400, "malformed-json", f"request body is not valid UTF-8: {exc.reason} at byte {exc.start}") from None
    except ValueError as exc:  # NaN or Infinity, an integer over Python's digit limit
        raise ProblemError(400, "malformed-json", f"request body is not valid JSON: {exc}") from None


class CheckedJSONRequest(Request):
    """A request whose JSON body was read, checked and parsed once; FastAPI's json() gets that parse."""

    parsed: Any = None

    async def json(self) -> Any:
        return self.parsed


class JSONBodyRoute(APIRoute):
    """A route whose JSON body passes `media_type_problem` and `parse_json` before FastAPI validates it."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        if self.body_field is None:
            return handler

        async def checked(request: Request) -> Response:
            problem = media_type_problem(request.headers.get("content-type"))
            if problem is not None:
                raise ProblemError(415, "unsupported-media-type", f"{request.method} {request.url.path}: {problem}")
            checked_request = CheckedJSONRequest(request.scope, request.receive)
            body = await checked_request.body()
            if body:
                checked_request.parsed = parse_json(body, request.app.state.settings.max_json_depth)
            return await handler(checked_request)

        return checked
