"""The running service: its parts wired together, plus the request-level operations routes call."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from server.errors import DeadlineExceeded, InputTooLong, NoInputs, TooManyInputs
from server.execution.residency import Residency
from server.execution.worker import AnyEngine, WorkerEngine
from server.metrics import Metrics
from server.registry.store import AdapterStore
from server.scheduling.batcher import Batcher, Job
from server.scheduling.generation import GenerationScheduler, generation_scheduler
from server.scheduling.resolve import FusionLookup, Resolved, resolve
from server.scheduling.runner import Task, Work, group_key, make_runner
from server.settings import Settings

log = logging.getLogger("adapterserve")


@dataclass
class Tokenized:
    rows: list[list[int]]
    truncated: list[bool]

    @property
    def tokens(self) -> int:
        return sum(len(r) for r in self.rows)


@dataclass
class Runtime:
    """Everything one app instance owns (one backbone, one store, one queue)."""

    settings: Settings
    store: AdapterStore
    metrics: Metrics
    engine: AnyEngine
    residency: Residency
    batcher: Batcher
    started: float = field(default_factory=time.time)
    generation: GenerationScheduler | None = None

    @property
    def max_input_tokens(self) -> int:
        return min(self.settings.max_input_tokens, self.engine.max_positions)

    # -- inputs ----------------------------------------------------------------------------------
    def check_inputs(self, texts: list[str]) -> None:
        if not texts:
            raise NoInputs("`inputs` must hold at least one string")
        if len(texts) > self.settings.max_inputs:
            raise TooManyInputs(f"{len(texts)} inputs in one request; the limit is {self.settings.max_inputs}")

    def tokenize(self, texts: list[str], truncate: bool) -> Tokenized:
        """Token ids per input; over-long inputs are an error unless the caller asked to truncate."""
        self.check_inputs(texts)
        limit = self.max_input_tokens
        rows = self.engine.tokenize(texts)
        truncated = [False] * len(rows)
        for i, ids in enumerate(rows):
            if len(ids) > limit:
                if not truncate:
                    raise InputTooLong(
                        f"input {i} has {len(ids)} tokens; the limit is {limit}. Shorten it, or send \"truncate\": true "
                        "to keep the first tokens (results then say truncated: true)"
                    )
                rows[i] = self.engine.tokenize_truncated(texts[i], limit)
                truncated[i] = True
        return Tokenized(rows, truncated)

    # -- inference -------------------------------------------------------------------------------
    async def resolve(self, tenant: str, spec: Any, head: str | None, task: str) -> Resolved:
        """The composition as `tenant` means it, pinned to stored versions. The store reads (a stat and maybe a
        meta.json per adapter, slow on an RWX/NFS volume) run on a worker thread, never on the event loop."""
        fusions = FusionLookup(lambda names: self.store.find_fusion(tenant, names), self.store.meta)
        return await asyncio.to_thread(resolve, spec, lambda n: self.store.find(tenant, n), head, task, fusions)

    async def infer(self, tokens: Tokenized, resolved: Resolved, task: Task) -> Any:
        """Queue the rows and wait for the batch that runs them; the batcher's domain errors pass through."""
        work = Work(resolved, task)
        job = Job(
            rows=tokens.rows, group=group_key(work), payload=work,
            deadline=time.monotonic() + self.settings.request_timeout_s,
            adapters=frozenset(m.internal for m in resolved.metas), solo=resolved.solo,
        )
        self.residency.hold(resolved.metas)
        try:
            future = self.batcher.submit(job)
            try:
                return await future  # cancelling the caller cancels the job (skipped unless running)
            except DeadlineExceeded as exc:
                raise DeadlineExceeded(
                    f"{exc.detail} ({self.settings.request_timeout_s:g}s); the server is overloaded, retry later"
                ) from None
        finally:
            self.residency.release(resolved.metas)


def build_runtime(settings: Settings, metrics: Metrics, engine: AnyEngine) -> Runtime:
    """Wire store, residency and batcher around a loaded engine (call on the event loop)."""
    store = AdapterStore(settings.store_dir)
    residency = Residency(engine, settings.adapter_cache_bytes, metrics, lambda m: store.version_dir(m.tenant, m.name, m.version))
    batcher = Batcher(
        make_runner(engine, residency), metrics, max_batch_size=settings.max_batch_size,
        max_batch_tokens=settings.max_batch_tokens, max_wait_s=settings.max_wait_ms / 1000.0, queue_size=settings.queue_size,
    )
    residency.on_doomed = lambda: batcher.executor.submit(residency.unload_pending)
    if isinstance(engine, WorkerEngine):
        engine.on_restart = metrics.worker_restarts.inc
        engine.on_lost = residency.drop
    runtime = Runtime(settings, store, metrics, engine, residency, batcher)
    if engine.causal_lm:
        runtime.generation = generation_scheduler(settings, engine, residency, batcher.executor, metrics)
    return runtime
