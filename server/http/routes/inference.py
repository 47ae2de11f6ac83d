"""POST /v1/infer: run inputs through a composition of adapters (embedding or a head's labels)."""

from __future__ import annotations

from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends

from server.execution.engine import Classified
from server.http.auth import Principal, authenticate, owner_label
from server.http.deps import runtime_of
from server.http.jsonbody import JSONBodyRoute
from server.http.jsonfmt import FastJSONResponse
from server.http.problems import problem_responses
from server.http.schemas import InferRequest, InferResponse
from server.scheduling.resolve import Resolved
from server.scheduling.runner import Task
from server.scheduling.runtime import Runtime, Tokenized

router = APIRouter(tags=["inference"], route_class=JSONBodyRoute)
INFER_ERRORS = problem_responses(400, 401, 404, 408, 413, 415, 422, 429, 503, 504)


def task_of(resolved: Resolved) -> Task:
    return "classification" if resolved.head is not None else "embedding"


def results_json(output: Any, tokens: Tokenized) -> list[dict[str, Any]]:
    """Per-input result objects from the runner's output for one request."""
    out: list[dict[str, Any]] = []
    if isinstance(output, np.ndarray) and output.ndim == 3:  # parallel: [rows, branches, hidden]
        for row, trunc in zip(output, tokens.truncated, strict=True):
            out.append({"parallel": row, "truncated": trunc})
        return out
    if isinstance(output, np.ndarray):
        for row, trunc in zip(output, tokens.truncated, strict=True):
            out.append({"embedding": row, "truncated": trunc})
        return out
    for item, trunc in zip(output, tokens.truncated, strict=True):
        assert isinstance(item, Classified)
        out.append({"label": item.label, "score": item.score, "logits": item.logits, "truncated": trunc})
    return out


@router.post("/v1/infer", response_model=InferResponse, responses=INFER_ERRORS, summary="Run inputs through adapters")
async def infer(body: InferRequest, principal: Annotated[Principal, Depends(authenticate)], rt: Annotated[Runtime, Depends(runtime_of)]) -> FastJSONResponse:
    rt.check_inputs(body.inputs)
    resolved = await rt.resolve(principal.tenant, body.adapters, body.head, body.task)
    tokens = await rt.tokenize(body.inputs, body.truncate)
    task = task_of(resolved)
    output = await rt.infer(tokens, resolved, task)
    return FastJSONResponse({
        "results": results_json(output, tokens),
        "adapters": [
            {"name": m.name, "version": m.version, "owner": owner_label(m.tenant)}
            for m in resolved.metas
        ],
        "usage": {"prompt_tokens": tokens.tokens, "total_tokens": tokens.tokens},
    })
