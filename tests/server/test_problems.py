"""Domain errors raised below the HTTP edge come back as problem+json from the one handler in server.http.problems."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from server import errors
from server.http.problems import PROBLEM_MEDIA_TYPE, TYPE_BASE, install_problem_handlers

CASES = [
    (errors.UnknownAdapter("no adapter named 'x' for this tenant"), 404, "unknown-adapter", None),
    (errors.InvalidComposition("bad block"), 422, "invalid-composition", None),
    (errors.StaleFusion("gone"), 422, "stale-fusion", None),
    (errors.InvalidHead("no head"), 422, "invalid-head", None),
    (errors.NoInputs("none"), 422, "no-inputs", None),
    (errors.TooManyInputs("many"), 413, "too-many-inputs", None),
    (errors.InputTooLong("long"), 422, "input-too-long", None),
    (errors.InvalidInput("input 0 holds a lone surrogate"), 422, "invalid-input", None),
    (errors.OverLimit("composition width 50 exceeds max_composition_width 8"), 413, "over-limit", None),
    (errors.QueueFull("the inference queue is full (2 requests); retry shortly", retry_after=1), 429, "queue-full", "1"),
    (errors.Draining("draining", retry_after=5), 503, "draining", "5"),
    (errors.Draining("the server stopped before this request ran"), 503, "draining", None),
    (errors.DeadlineExceeded("late"), 504, "deadline-exceeded", None),
    (errors.AdapterUnavailable("cannot be loaded"), 503, "adapter-unavailable", None),
    (errors.InferenceFailed("boom"), 500, "inference-failed", None),
    (errors.GenerationUnsupported("an encoder"), 422, "generation-unsupported", None),
    (errors.ContextTooLong("300 > 256"), 422, "context-length-exceeded", None),
    (errors.InvalidGenerationRequest("top_p"), 422, "invalid-generation-request", None),
    (errors.UploadRejected(415, "pickle-rejected", "no pickles"), 415, "pickle-rejected", None),
    (errors.InvalidName("bad name"), 422, "invalid-name", None),
    (errors.QuotaExceeded("full"), 403, "quota-exceeded", None),
]


@pytest.fixture(scope="module")
def client() -> TestClient:
    app = FastAPI()
    install_problem_handlers(app)

    @app.get("/raise/{index}")
    async def _raise(index: int) -> None:
        raise CASES[index][0]

    return TestClient(app)


@pytest.mark.parametrize("index", range(len(CASES)), ids=[type(c[0]).__name__ + f"-{c[1]}" for c in CASES])
def test_domain_error_becomes_its_problem(client: TestClient, index: int) -> None:
    error, status, slug, retry_after = CASES[index]
    r = client.get(f"/raise/{index}")
    assert r.status_code == status
    assert r.headers["content-type"].startswith(PROBLEM_MEDIA_TYPE)
    assert r.json() == {"type": TYPE_BASE + slug, "title": r.json()["title"], "status": status, "detail": error.detail,
                        "error": {"message": error.detail, "code": slug,
                                  "type": "invalid_request_error" if status < 500 else "server_error"}}
    assert r.headers.get("retry-after") == retry_after


def test_every_domain_error_class_is_covered() -> None:
    classes = {c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.DomainError)}
    assert classes - {errors.DomainError} == {type(c[0]) for c in CASES}
