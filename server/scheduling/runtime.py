"""The running service: its parts wired together, plus the request-level operations routes call."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from server.errors import DeadlineExceeded, InputTooLong, InvalidInput, NoInputs, TooManyInputs
from server.execution.residency import Residency
from server.execution.worker import AnyEngine, WorkerEngine
from server.metrics import Metrics
from server.registry.store import AdapterStore
from server.scheduling.batcher import Batcher, Job
from server.scheduling.cost import Limits, check_request
from server.scheduling.generation import GenerationScheduler, generation_scheduler
from server.scheduling.resolve import FusionLookup, Resolved, resolve
from server.scheduling.runner import Task, Work, group_key, make_runner
from server.settings import Settings

log = logging.getLogger("adapterserve")
_SURROGATE = re.compile("[\ud800-\udfff]")  # str holds them (JSON's "\ud800" escape); UTF-8 cannot


@dataclass
class Tokenized:
    rows: list[list[int]]
    truncated: list[bool]

    @property
    def tokens(self) -> int:
        return sum(len(r) for r in self.rows)


def check_unicode(texts: list[str], what: str) -> None:
    """InvalidInput naming the first text that holds a lone surrogate (not valid Unicode; tokenizers raise)."""
    for i, text in enumerate(texts):
        if (bad := _SURROGATE.search(text)) is not None:
            raise InvalidInput(
                f"{what} {i} holds a lone surrogate (U+{ord(bad.group()):04X}) at character {bad.start()}; "
                f"{what}s must be valid Unicode text"
            )


@dataclass
class Runtime:
    """Everything one app instance owns (one backbone, one store, one queue)."""

    settings: Settings
    store: AdapterStore
    metrics: Metrics
    engine: AnyEngine
    residency: Residency
    batcher: Batcher
    tokenizers: ThreadPoolExecutor  # tokenization runs here, never on the event loop
    started: float = field(default_factory=time.time)
    generation: GenerationScheduler | None = None

    @property
    def limits(self) -> Limits:
        return Limits.of(self.settings)

    @property
    def max_input_tokens(self) -> int:
        return min(self.settings.max_input_tokens, self.engine.max_positions)

    # -- inputs ----------------------------------------------------------------------------------
    def check_inputs(self, texts: list[str]) -> None:
        if not texts:
            raise NoInputs("`inputs` must hold at least one string")
        if len(texts) > self.settings.max_inputs:
            raise TooManyInputs(f"{len(texts)} inputs in one request; the limit is {self.settings.max_inputs}")

    async def tokenize(self, texts: list[str], truncate: bool) -> Tokenized:
        """Token ids per input, computed on the tokenizer threads (a long text takes the tokenizer a while; the
        event loop keeps answering meanwhile). Over-long inputs are an error unless the caller asked to truncate."""
        self.check_inputs(texts)
        return await asyncio.get_running_loop().run_in_executor(self.tokenizers, self._tokenize, texts, truncate)

    def _tokenize(self, texts: list[str], truncate: bool) -> Tokenized:
        check_unicode(texts, "input")
        limit = self.max_input_tokens
        rows: list[list[int]] = []
        truncated: list[bool] = []
        for i, (ids, length) in enumerate(self.engine.tokenize_capped(texts, limit)):
            if length > limit and not truncate:
                raise InputTooLong(
                    f"input {i} has {length} tokens; the limit is {limit}. Shorten it, or send \"truncate\": true "
                    "to keep the first tokens (results then say truncated: true)"
                )
            rows.append(ids)
            truncated.append(length > limit)
        return Tokenized(rows, truncated)

    def token_ids(self, rows: list[list[int]]) -> Tokenized:
        """Inputs given as token ids: checked against the vocabulary and the token limit, used as they are."""
        self.check_inputs(rows)
        vocab = self.engine.vocab_size
        for i, ids in enumerate(rows):
            if not ids:
                raise InvalidInput(f"input {i} is an empty list of token ids")
            if len(ids) > self.max_input_tokens:
                raise InputTooLong(f"input {i} has {len(ids)} tokens; the limit is {self.max_input_tokens}")
            bad = next((t for t in ids if not 0 <= t < vocab), None)
            if bad is not None:
                raise InvalidInput(f"input {i} holds token id {bad}; ids must be in [0, {vocab}) for this model")
        return Tokenized([list(ids) for ids in rows], [False] * len(rows))

    # -- inference -------------------------------------------------------------------------------
    async def resolve(self, tenant: str, spec: Any, head: str | None, task: str) -> Resolved:
        """The composition as `tenant` means it, pinned to stored versions; a composition over the shape limits is
        refused before any lookup. The store reads (a stat and maybe a meta.json per adapter, slow on an RWX/NFS
        volume) run on a worker thread, never on the event loop."""
        fusions = FusionLookup(lambda names: self.store.find_fusion(tenant, names), self.store.meta)
        return await asyncio.to_thread(
            resolve, spec, lambda n: self.store.find(tenant, n), head, task, fusions, self.limits,
        )

    def check_cost(self, tokens: Tokenized, resolved: Resolved, task: Task) -> None:
        """OverLimit when the request would cost more than max_request_cost or answer more than max_response_values
        numbers (embeddings: copies x hidden size per input; classification: the head's labels)."""
        head = resolved.head.head if resolved.head is not None and task == "classification" else None
        per_input = int(head.get("num_labels", 0)) if head else resolved.shape.width * self.engine.hidden_size
        check_request(tokens.rows, resolved.shape, per_input, self.limits)

    async def infer(self, tokens: Tokenized, resolved: Resolved, task: Task) -> Any:
        """Check the request's cost, queue its rows and wait for the batch that runs them; the batcher's domain
        errors pass through."""
        self.check_cost(tokens, resolved, task)
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
                    f"{exc.detail} (request_timeout_s {self.settings.request_timeout_s:g}s); the server is overloaded, "
                    "retry later"
                ) from None
        finally:
            self.residency.release(resolved.metas)

    def close(self) -> None:
        self.tokenizers.shutdown(wait=False, cancel_futures=True)


def build_runtime(settings: Settings, metrics: Metrics, engine: AnyEngine) -> Runtime:
    """Wire store, residency and batcher around a loaded engine (call on the event loop)."""
    store = AdapterStore(settings.store_dir)
    residency = Residency(engine, settings.adapter_cache_bytes - settings.stack_cache_bytes, metrics, lambda m: store.version_dir(m.tenant, m.name, m.version))
    batcher = Batcher(
        make_runner(engine, residency), metrics, max_batch_size=settings.max_batch_size,
        max_batch_tokens=settings.max_batch_tokens, max_wait_s=settings.max_wait_ms / 1000.0, queue_size=settings.queue_size,
    )
    residency.on_doomed = lambda: batcher.executor.submit(residency.unload_pending)
    if isinstance(engine, WorkerEngine):
        engine.on_restart = metrics.worker_restarts.inc
        engine.on_lost = residency.drop
    tokenizers = ThreadPoolExecutor(settings.tokenize_threads, thread_name_prefix="tokenize")
    runtime = Runtime(settings, store, metrics, engine, residency, batcher, tokenizers)
    if engine.causal_lm or engine.seq2seq_lm:
        runtime.generation = generation_scheduler(settings, engine, residency, batcher.executor, metrics)
    return runtime
