"""create_app(settings) -> FastAPI: the lifespan loads the backbone and starts the batcher."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from server.execution.engine import Engine
from server.execution.worker import AnyEngine, WorkerEngine
from server.http.auth import KeyRing
from server.http.middleware import ServeMiddleware
from server.http.problems import install_problem_handlers, rewrite_openapi_errors
from server.http.read_deadlines import BodyDeadline
from server.http.routes import adapters, completions, health, inference, openai
from server.metrics import Metrics
from server.scheduling.runtime import Runtime, build_runtime
from server.settings import Settings, env_settings

log = logging.getLogger("adapterserve")
EngineFactory = Callable[[Settings], AnyEngine]


def default_engine(settings: Settings) -> AnyEngine:
    """The model in a child process (the default) or on a thread of this one (INFERENCE_WORKER=false)."""
    args = (settings.model_path, settings.device, settings.dtype, settings.torch_threads, settings.length_buckets,
            settings.stack_cache_bytes, settings.forward_lanes)
    if settings.inference_worker:
        return WorkerEngine(*args, switch_interval_ms=settings.switch_interval_ms)
    return Engine(*args)


def create_app(settings: Settings | None = None, engine_factory: EngineFactory = default_engine) -> FastAPI:
    """A fresh app with its own metrics registry, store handle and (at startup) backbone."""
    settings = settings or env_settings()
    keyring = KeyRing(settings.api_keys_file)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if keyring.open_mode:
            log.warning("no API keys file: running OPEN (every caller is tenant 'default' with the admin role), bound to %s", settings.host)
        engine = await asyncio.to_thread(engine_factory, settings)
        runtime = build_runtime(settings, app.state.metrics, engine)
        lm_head = getattr(engine, "lm_head", None)  # a causal LM's LM head may come with an upload, beyond its limit
        app.state.upload_extra_bytes = 0 if lm_head is None else lm_head.allowance
        runtime.batcher.start()
        app.state.runtime = runtime
        log.info("ready: store %s, %d tenants configured", runtime.store.root, len(keyring.tenants()))
        try:
            yield
        finally:
            app.state.runtime = None
            if runtime.generation is not None:
                await runtime.generation.stop()
            await runtime.batcher.stop()
            runtime.close()
            await asyncio.to_thread(engine.close)

    app = FastAPI(
        title="AdapterServe", version="0.1.0", lifespan=lifespan,
        description="One transformer backbone serving many hot-swappable adapters. Errors are application/problem+json.",
    )
    app.state.settings = settings
    app.state.keyring = keyring
    app.state.metrics = Metrics(known_tenants=keyring.tenants())
    app.state.runtime = None
    app.state.draining = False
    app.state.inflight = 0
    app.state.upload_extra_bytes = 0
    install_problem_handlers(app)
    for module in (adapters, inference, openai, completions, health):
        app.include_router(module.router)
    # JSON bodies: room for MAX_INPUTS texts of MAX_INPUT_TOKENS tokens at a generous 32 bytes per token
    max_json = settings.max_inputs * settings.max_input_tokens * 32 + 64 * 1024
    app.add_middleware(BodyDeadline, grace_s=settings.body_timeout_s, min_rate=settings.min_body_rate_kib_s * 1024)
    app.add_middleware(  # outside BodyDeadline: its 408 is counted
        ServeMiddleware, metrics=app.state.metrics, state=app.state, max_upload_bytes=settings.max_upload_bytes,
        max_json_bytes=max_json,
    )

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            app.openapi_schema = rewrite_openapi_errors(schema)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


async def drain(app: FastAPI) -> bool:
    """Refuse new /v1 requests (middleware), let in-flight, queued and running ones finish (bounded by
    DRAIN_TIMEOUT_S).

    Returns True if everything finished in time."""
    settings: Settings = app.state.settings
    app.state.draining = True
    app.state.metrics.draining.set(1)
    runtime: Runtime | None = app.state.runtime
    loop = asyncio.get_running_loop()
    end = loop.time() + settings.drain_timeout_s
    while loop.time() < end:
        busy = app.state.inflight > 0 or (runtime is not None and not runtime.batcher.idle)
        busy = busy or (runtime is not None and runtime.generation is not None and not runtime.generation.idle)
        if not busy:
            return True
        await asyncio.sleep(0.05)
    log.warning("drain timeout (%.0fs) passed with work still in flight", settings.drain_timeout_s)
    return False
