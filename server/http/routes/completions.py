"""OpenAI-compatible generation: POST /v1/completions and /v1/chat/completions, plain JSON or server-sent events."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.background import BackgroundTask

from server.errors import DomainError
from server.execution.generator import Sampling
from server.http.auth import Principal, authenticate
from server.http.deps import runtime_of
from server.http.gen_schemas import ChatRequest, ChatResponse, CompletionRequest, CompletionResponse
from server.http.jsonbody import JSONBodyRoute
from server.http.problems import ProblemError, problem_responses
from server.scheduling import gen_requests as gr
from server.scheduling.generation import Delta, Done, Failed
from server.scheduling.runtime import Runtime

router = APIRouter(tags=["openai"], route_class=JSONBodyRoute)
Auth = Annotated[Principal, Depends(authenticate)]
Rt = Annotated[Runtime, Depends(runtime_of)]
ERRORS = problem_responses(400, 401, 404, 413, 422, 429, 503, 504)
DISCONNECT_POLL_S = 0.05
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _params(body: CompletionRequest | ChatRequest) -> gr.GenerationParams:
    sampling = Sampling(body.temperature, body.top_p, body.top_k, body.seed, body.ignore_eos)
    return gr.GenerationParams(body.max_new_tokens, sampling, gr.check_stop(body.stops))


def _usage(done: list[Done]) -> dict[str, int]:
    prompt = sum(d.prompt_tokens for d in done)
    completion = sum(d.completion_tokens for d in done)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


@router.post("/v1/completions", response_model=CompletionResponse, responses=ERRORS,
             summary="OpenAI-compatible text completion; `model` names an adapter or the backbone")
async def completions(body: CompletionRequest, principal: Auth, rt: Rt, request: Request) -> Any:
    gr.scheduler_of(rt)
    params = _params(body)
    prompts = await asyncio.get_running_loop().run_in_executor(rt.tokenizers, gr.text_prompts, rt, body.prompt)
    resolved = await gr.resolve_for_generation(rt, principal.tenant, body.model, body.adapters)
    run = gr.start(rt, principal.tenant, prompts, resolved, params)
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    head = {"id": rid, "object": "text_completion", "created": created, "model": body.model}

    def chunk(index: int, text: str, finish: str | None) -> dict[str, Any]:
        return {**head, "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish}]}

    if body.stream:
        usage = body.stream_options is not None and body.stream_options.include_usage
        return _sse(run, chunk, None, head, usage)
    texts, done = await _collect(request, run)
    choices = [{"index": d.index, "text": texts[d.index], "logprobs": None, "finish_reason": d.finish} for d in done]
    return JSONResponse({**head, "choices": choices, "usage": _usage(done)})


@router.post("/v1/chat/completions", response_model=ChatResponse, responses=ERRORS,
             summary="OpenAI-compatible chat completion (the tokenizer's chat template)")
async def chat_completions(body: ChatRequest, principal: Auth, rt: Rt, request: Request) -> Any:
    gr.scheduler_of(rt)
    params = _params(body)
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    prompt = await asyncio.get_running_loop().run_in_executor(rt.tokenizers, gr.chat_prompt, rt, messages)
    resolved = await gr.resolve_for_generation(rt, principal.tenant, body.model, body.adapters)
    run = gr.start(rt, principal.tenant, [prompt], resolved, params)
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": body.model}

    def chunk(index: int, text: str, finish: str | None) -> dict[str, Any]:
        delta = {"content": text} if text or finish is None else {}
        return {**head, "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}]}

    first = {**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]}
    if body.stream:
        usage = body.stream_options is not None and body.stream_options.include_usage
        return _sse(run, chunk, first, head, usage)
    texts, done = await _collect(request, run)
    choices = [{"index": d.index, "message": {"role": "assistant", "content": texts[d.index]}, "logprobs": None,
                "finish_reason": d.finish} for d in done]
    return JSONResponse({**head, "object": "chat.completion", "choices": choices, "usage": _usage(done)})


async def _collect(request: Request, run: gr.Generation) -> tuple[list[str], list[Done]]:
    """The whole answer; a client that disconnects before it is ready cancels its sequences."""
    task = asyncio.ensure_future(run.collect())
    try:
        while True:
            finished, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if finished:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                raise ProblemError(499, "client-closed-request", "the client disconnected before the completion was ready")
    finally:
        run.close()


def _sse(run: gr.Generation, chunk: Callable[[int, str, str | None], dict[str, Any]], first: dict[str, Any] | None,
         head: dict[str, Any], include_usage: bool) -> StreamingResponse:
    """Server-sent events: a chunk per text delta, one with each finish_reason, usage if asked, then [DONE].
    A failure mid-stream is an `error` event; a client that disconnects cancels its sequences (finally)."""

    async def body() -> AsyncIterator[bytes]:
        done: list[Done] = []
        try:
            if first is not None:
                yield _data(first)
            async for ev in run.events():
                if isinstance(ev, Delta):
                    yield _data(chunk(ev.index, ev.text, None))
                elif isinstance(ev, Done):
                    done.append(ev)
                    yield _data(chunk(ev.index, "", ev.finish))
                elif isinstance(ev, Failed):
                    yield _data({"error": _error(ev.error)})
                    yield b"data: [DONE]\n\n"
                    return
            if include_usage:
                yield _data({**head, "choices": [], "usage": _usage(done)})
            yield b"data: [DONE]\n\n"
        finally:
            run.close()

    return StreamingResponse(body(), media_type="text/event-stream", headers=SSE_HEADERS, background=BackgroundTask(run.close))


def _error(err: DomainError) -> dict[str, Any]:
    return {"message": err.detail, "type": err.slug, "code": err.status}


def _data(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"
