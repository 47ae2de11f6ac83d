"""RFC 9457 problem+json errors: the one place domain errors become HTTP answers, the HTTP edge's own
ProblemError, and the OpenAPI response declarations."""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.errors import DomainError

PROBLEM_MEDIA_TYPE = "application/problem+json"
TYPE_BASE = "urn:adapterserve:problem:"  # a URI naming the kind of problem (RFC 9457 section 3.1.1)


class OpenAIError(BaseModel):
    """The same error in the shape OpenAI clients read (`error.message`), so they show our detail."""

    message: str
    type: str
    code: str


class Problem(BaseModel):
    """The body of every error response: RFC 9457 problem details, plus an `error` member for OpenAI clients."""

    type: str
    title: str
    status: int
    detail: str
    error: OpenAIError


class ProblemError(Exception):
    """An error of the HTTP edge itself (authentication, request framing, readiness), answered as problem+json;
    everything below the edge raises a server.errors.DomainError instead."""

    def __init__(self, status: int, slug: str, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.slug = slug
        self.detail = detail
        self.headers = headers or {}


class ProblemResponse(JSONResponse):
    media_type = PROBLEM_MEDIA_TYPE


def problem_body(status: int, slug: str, detail: str) -> dict[str, Any]:
    """The JSON body for a problem."""
    title = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "Error"
    return {"type": TYPE_BASE + slug, "title": title, "status": status, "detail": detail,
            "error": {"message": detail, "type": "invalid_request_error" if status < 500 else "server_error", "code": slug}}


def problem_response(status: int, slug: str, detail: str, headers: dict[str, str] | None = None) -> ProblemResponse:
    return ProblemResponse(problem_body(status, slug, detail), status_code=status, headers=headers)


def problem_bytes(status: int, slug: str, detail: str) -> bytes:
    """The encoded body, for raw ASGI middleware that answers before FastAPI runs."""
    return json.dumps(problem_body(status, slug, detail)).encode()


def _validation_detail(exc: RequestValidationError) -> tuple[int, str, str]:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        err = next(e for e in errors if e.get("type") == "json_invalid")
        ctx = err.get("ctx") or {}
        return 400, "malformed-json", f"request body is not valid JSON: {ctx.get('error', err.get('msg'))}"
    parts = []
    for e in errors[:5]:
        loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
        parts.append(f"{loc}: {e.get('msg')}")
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return 422, "validation-error", "; ".join(parts) + more


def install_problem_handlers(app: FastAPI) -> None:
    """Make every error FastAPI or we raise come back as problem+json."""

    @app.exception_handler(ProblemError)
    async def _problem(_: Request, exc: ProblemError) -> ProblemResponse:
        return problem_response(exc.status, exc.slug, exc.detail, exc.headers)

    @app.exception_handler(DomainError)
    async def _domain(_: Request, exc: DomainError) -> ProblemResponse:
        """Every domain error: its status, slug and detail, and Retry-After when it says when to retry."""
        headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else None
        return problem_response(exc.status, exc.slug, exc.detail, headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> ProblemResponse:
        status, slug, detail = _validation_detail(exc)
        return problem_response(status, slug, detail)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> ProblemResponse:
        slug = {404: "not-found", 405: "method-not-allowed"}.get(exc.status_code, "http-error")
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        return problem_response(exc.status_code, slug, detail, dict(exc.headers or {}))

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> ProblemResponse:
        return problem_response(500, "internal", f"internal error: {type(exc).__name__}")


_DESCRIPTIONS = {
    400: "Malformed request (e.g. the body is not JSON)",
    401: "Missing or unknown API key",
    403: "Not allowed for this key's role, or a quota is exhausted",
    404: "No such adapter for this tenant",
    408: "The request's headers or body did not arrive in time (header_timeout_s, body_timeout_s, min_body_rate_kib_s)",
    409: "Conflict with the stored state",
    413: "Upload or input too large, or the request exceeds a limit (cost, composition, response size, JSON depth)",
    415: "Unsupported media type (JSON routes take application/json or application/*+json) or file type (no pickles)",
    422: "The request is well-formed but invalid (validation, composition, shapes)",
    429: "The inference queue is full; retry after Retry-After seconds",
    503: "The server is not ready or is draining",
    504: "The request waited past its deadline and was dropped before it ran",
}


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` entries declaring problem+json bodies for the given statuses."""
    return {
        s: {"model": Problem, "description": _DESCRIPTIONS.get(s, HTTPStatus(s).phrase)} for s in statuses
    }


def rewrite_openapi_errors(schema: dict[str, Any]) -> dict[str, Any]:
    """Declare every 4xx/5xx response body as application/problem+json with the Problem schema."""
    ref = {"$ref": "#/components/schemas/Problem"}
    for path_item in schema.get("paths", {}).values():
        for op in path_item.values():
            for code, resp in op.get("responses", {}).items():
                if not (code.isdigit() and int(code) >= 400):
                    continue
                schema_refs = json.dumps(resp.get("content", {}))
                if "/Problem" in schema_refs or "HTTPValidationError" in schema_refs:
                    resp["content"] = {PROBLEM_MEDIA_TYPE: {"schema": ref}}
                    if code == "422":
                        resp["description"] = _DESCRIPTIONS[422]
    comps = schema.setdefault("components", {}).setdefault("schemas", {})
    comps.setdefault("Problem", Problem.model_json_schema())
    comps.pop("HTTPValidationError", None)
    comps.pop("ValidationError", None)
    return schema
