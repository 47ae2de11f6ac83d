"""OpenAI-compatible routes: POST /v1/embeddings and GET /v1/models (adapters are the models)."""

from __future__ import annotations

import base64
from datetime import datetime
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends
from starlette.concurrency import run_in_threadpool

from server.errors import GenerationUnsupported, InvalidComposition, InvalidInput
from server.http.auth import Principal, authenticate
from server.http.deps import runtime_of
from server.http.jsonbody import JSONBodyRoute
from server.http.jsonfmt import FastJSONResponse
from server.http.problems import problem_responses
from server.http.schemas import EmbeddingsRequest, EmbeddingsResponse, ModelCard, ModelList
from server.registry.store import SHARED_TENANT
from server.scheduling.runtime import Runtime

router = APIRouter(tags=["openai"], route_class=JSONBodyRoute)
Auth = Annotated[Principal, Depends(authenticate)]
Rt = Annotated[Runtime, Depends(runtime_of)]


@router.post(
    "/v1/embeddings", response_model=EmbeddingsResponse, responses=problem_responses(400, 401, 404, 408, 413, 415, 422, 429, 503, 504),
    summary="OpenAI-compatible embeddings; `model` names an adapter",
)
async def embeddings(body: EmbeddingsRequest, principal: Auth, rt: Rt) -> FastJSONResponse:
    if rt.engine.causal_lm:
        raise GenerationUnsupported(
            f"the backbone {rt.engine.name!r} is a causal language model: its hidden states are not sentence embeddings "
            "(use an embedding backbone such as minilm, or /v1/completions and /v1/chat/completions here)",
        )
    if body.dimensions is not None and body.dimensions != rt.engine.hidden_size:
        raise InvalidInput(f"dimensions={body.dimensions} is not supported: this model's embeddings have "
                           f"{rt.engine.hidden_size} dimensions (omit the field or send {rt.engine.hidden_size})")
    inputs = [body.input] if isinstance(body.input, str) or _is_ids(body.input) else body.input
    rt.check_inputs(inputs)
    resolved = await rt.resolve(principal.tenant, body.model, None, "embedding")
    if resolved.solo:
        raise InvalidComposition("embeddings need a single adapter or a non-parallel composition")
    tokens = rt.token_ids(inputs) if inputs and not isinstance(inputs[0], str) else await rt.tokenize(inputs, truncate=False)
    output = await rt.infer(tokens, resolved, "embedding")
    encode = _base64 if body.encoding_format == "base64" else (lambda row: row)
    data = [{"object": "embedding", "index": i, "embedding": encode(row)} for i, row in enumerate(output)]
    usage = {"prompt_tokens": tokens.tokens, "total_tokens": tokens.tokens}
    return FastJSONResponse({"object": "list", "data": data, "model": body.model, "usage": usage})


def _is_ids(value: object) -> bool:
    """One list of token ids (as opposed to a list of texts or of id lists)."""
    return isinstance(value, list) and bool(value) and all(isinstance(v, int) for v in value)


def _base64(row: np.ndarray) -> str:
    """An embedding as OpenAI's base64 form: the little-endian float32 bytes, base64-encoded."""
    return base64.b64encode(np.asarray(row, dtype="<f4").tobytes()).decode("ascii")


def _epoch(iso: str) -> int:
    return int(datetime.fromisoformat(iso).timestamp())


@router.get("/v1/models", response_model=ModelList, responses=problem_responses(401, 503), summary="Adapters usable as OpenAI models")
async def models(principal: Auth, rt: Rt) -> ModelList:
    own = await run_in_threadpool(rt.store.list, principal.tenant)
    shared = await run_in_threadpool(rt.store.list, SHARED_TENANT)
    own, shared = ([m for m in metas if m.method != "fusion"] for metas in (own, shared))  # a fusion is no model alone
    cards = [ModelCard(id=rt.engine.name, created=int(rt.started), owned_by="system")]  # the backbone itself
    cards += [ModelCard(id=m.name, created=_epoch(m.created), owned_by=principal.tenant) for m in own]
    names = {m.name for m in own}
    cards += [ModelCard(id=m.name, created=_epoch(m.created), owned_by="shared") for m in shared if m.name not in names]
    return ModelList(data=cards)
