"""The generation scheduler: admission under a KV budget, the step loop driver, cancellation, streaming events.

One asyncio task drives the running set: each iteration hands one `generation_step` (cancel, admit, one prefill
chunk, one decode forward over every running sequence) to the inference thread, the same single thread the
batcher uses, so embedding batches interleave between steps. In worker mode that call is one small message each
way (new sequences and cancelled ids out; one token id per running sequence back). Tokens become text here, where
stop strings are checked; a sequence that stops, is cancelled or finishes leaves at the next step and frees its
cache. Admission is FIFO: the head of the queue waits until its worst case (prompt + max_tokens) fits, so nothing
is evicted mid-stream.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from server.errors import (
    AdapterUnavailable,
    ContextTooLong,
    DeadlineExceeded,
    DomainError,
    Draining,
    InferenceFailed,
    QueueFull,
)
from server.execution.generator import KVShape, Limits, Sampling, SeqSpec, StepResult
from server.execution.residency import Residency
from server.execution.seq2seq_generator import generation_kv_shape
from server.metrics import Metrics
from server.scheduling.batcher import cancel_and_wait
from server.scheduling.detokenize import Detokenizer
from server.scheduling.resolve import Resolved
from server.settings import Settings

log = logging.getLogger("adapterserve.generation")
QUEUE_FULL_RETRY_S = 1

Finish = Literal["stop", "length"]


@dataclass(frozen=True)
class Delta:
    index: int
    text: str


@dataclass(frozen=True)
class Done:
    index: int
    finish: Finish
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    index: int
    error: DomainError


Event = Delta | Done | Failed


@dataclass(eq=False)
class Sequence:
    """One prompt of a request from arrival to its last event; events go to the request's queue."""

    index: int  # choice index within its request
    prompt: list[int]
    resolved: Resolved | None  # None: the bare backbone
    max_tokens: int
    sampling: Sampling
    detok: Detokenizer
    events: asyncio.Queue[Event]
    tenant: str
    prefix_tokens: int = 0  # cache columns its prefix-tuning adapters take (written once, before the prompt)
    id: int = 0
    enqueued: float = field(default_factory=time.monotonic)
    deadline: float = 0.0
    last_token_at: float | None = None
    generated: int = 0
    pinned: bool = False
    done: bool = False

    @property
    def reserve(self) -> int:
        """Cache columns it may take: prefixes, prompt and every token it may generate."""
        return self.prefix_tokens + len(self.prompt) + self.max_tokens

    @property
    def block(self) -> Any:
        return None if self.resolved is None else self.resolved.block

    @property
    def metas(self) -> tuple[Any, ...]:
        return () if self.resolved is None else self.resolved.metas


@dataclass(frozen=True)
class GenerationLimits:
    kv_budget_bytes: int
    max_running: int
    queue_size: int
    prefill_chunk: int
    wait_timeout_s: float
    encoder_decoder: bool = False  # prompts sit in cross-attention, new tokens in self-attention: two rectangles


class GenerationScheduler:
    def __init__(self, engine: Any, residency: Residency, executor: Executor, metrics: Metrics, shape: KVShape,
                 limits: GenerationLimits) -> None:
        self.engine = engine
        self.residency = residency
        self.executor = executor
        self.metrics = metrics
        self.shape = shape
        self.limits = limits
        self._ids = itertools.count(1)
        self._waiting: deque[Sequence] = deque()
        self._running: dict[int, Sequence] = {}
        self._cancels: list[int] = []
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.accepting = True
        self.steps = 0
        self.peak_running = 0  # most sequences admitted at once (for tests and benchmarks)

    # -- requests --------------------------------------------------------------------------------
    def check_fits(self, reserve: int, prefix_tokens: int = 0) -> None:
        """A single sequence's worst case must fit the KV budget on its own, or it would wait forever."""
        need = self.shape.bytes(1, reserve + prefix_tokens)
        if need > self.limits.kv_budget_bytes:
            prefixes = f" (+ {prefix_tokens} prefix tokens)" if prefix_tokens else ""
            raise ContextTooLong(
                f"prompt + max_tokens = {reserve} tokens{prefixes} need {need / 2**20:.1f} MiB of KV cache; the budget is "
                f"{self.limits.kv_budget_bytes / 2**20:.1f} MiB (ADAPTERSERVE_KV_CACHE_MB); lower max_tokens or shorten the prompt",
            )

    def submit(self, seqs: list[Sequence]) -> None:
        """Queue a request's sequences (all or none): QueueFull when the waiting queue has no room."""
        if not self.accepting:
            raise Draining("the server is draining and accepts no new requests", retry_after=5)
        if len(self._waiting) + len(seqs) > self.limits.queue_size:
            raise QueueFull(f"the generation queue is full ({self.limits.queue_size} sequences); retry shortly",
                            retry_after=QUEUE_FULL_RETRY_S)
        now = time.monotonic()
        for seq in seqs:
            seq.id = next(self._ids)
            seq.enqueued, seq.deadline = now, now + self.limits.wait_timeout_s
            self._waiting.append(seq)
        self._publish()
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="generation")
        self._wakeup.set()

    def cancel(self, seq: Sequence) -> None:
        """The caller went away or stopped reading: drop the sequence now (waiting) or at the next step (running)."""
        if seq.done:
            return
        seq.done = True
        if seq in self._waiting:
            self._waiting.remove(seq)
            self._publish()
            return
        if seq.id in self._running:
            self._cancels.append(seq.id)
            self._wakeup.set()

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def idle(self) -> bool:
        return not self._running and not self._waiting

    async def stop(self) -> None:
        """Fail everything not finished with Draining and end the driver."""
        self.accepting = False
        await cancel_and_wait(self._task)
        for seq in [*self._waiting, *self._running.values()]:
            self._fail(seq, Draining("the server stopped before this sequence finished"))
        self._waiting.clear()
        self._running.clear()
        self._publish()

    # -- the driver ------------------------------------------------------------------------------
    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._expire()
            admit = self._admissible()
            cancels, self._cancels = self._cancels, []
            if not admit and not cancels and not self._running:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            for seq in admit:
                self._running[seq.id] = seq
            self.peak_running = max(self.peak_running, len(self._running))
            self._publish()
            try:
                result, refused = await loop.run_in_executor(self.executor, self._on_thread, admit, cancels)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.exception("generation step failed")
                self._fail_all(exc)
                continue
            self.steps += 1
            for seq, err in refused:
                self._finish(seq)
                self._fail(seq, err)
            for seq_id in cancels:
                if (seq := self._running.get(seq_id)) is not None:
                    self._finish(seq)
            self._dispatch(result)
            self.metrics.kv_cache_bytes.set(result.kv_bytes)
            self.metrics.kv_cache_used_bytes.set(result.kv_used_bytes)
            self._publish()

    def _on_thread(self, admit: list[Sequence], cancels: list[int]) -> tuple[StepResult, list[tuple[Sequence, DomainError]]]:
        """On the inference thread: pin new sequences' adapters, then one step."""
        refused: list[tuple[Sequence, DomainError]] = []
        specs: list[SeqSpec] = []
        for seq in admit:
            try:
                self.residency.prepare(seq.metas)
            except AdapterUnavailable as exc:
                refused.append((seq, exc))
                continue
            seq.pinned = True
            specs.append(SeqSpec(seq.id, tuple(seq.prompt), seq.block, seq.max_tokens, seq.sampling))
        limits = Limits(self.limits.kv_budget_bytes, self.limits.max_running, self.limits.prefill_chunk)
        self.engine.read_ahead(self.residency.upcoming())  # waiting sequences' cold loads, read during the step
        return self.engine.generation_step(specs, cancels, limits), refused

    def _admissible(self) -> list[Sequence]:
        """Waiting sequences that fit now, in arrival order (the head blocks the rest: no starvation). The cache is
        budgeted as rows x the longest prompt + max_tokens (causal LMs), or rows x (the longest prompt + the longest
        max_tokens) for an encoder-decoder, whose prompts and new tokens fill two buffers of their own."""
        out: list[Sequence] = []
        rows = len(self._running)
        longest = (0, 0, 0)  # prompt, max_tokens, both
        for s in self._running.values():
            longest = _longest(longest, s)
        while self._waiting:
            head = self._waiting[0]
            grown = _longest(longest, head)
            length = grown[0] + grown[1] if self.limits.encoder_decoder else grown[2]
            if rows + 1 > self.limits.max_running or self.shape.bytes(rows + 1, length) > self.limits.kv_budget_bytes:
                break
            self._waiting.popleft()
            out.append(head)
            rows, longest = rows + 1, grown
        return out

    def _expire(self) -> None:
        now = time.monotonic()
        while self._waiting and self._waiting[0].deadline < now:
            seq = self._waiting.popleft()
            self._fail(seq, DeadlineExceeded(
                f"the sequence waited {now - seq.enqueued:.1f}s for room in the KV cache; the server is overloaded, retry later"))

    def _dispatch(self, result: StepResult) -> None:
        now = time.monotonic()
        for ev in result.events:
            seq = self._running.get(ev.id)
            if seq is None:
                continue
            if ev.finish == "error":
                self._finish(seq)
                self._fail(seq, InferenceFailed(ev.error or "generation failed"))
                continue
            seq.generated += 1
            self._observe(seq, now)
            if seq.done:  # cancelled or stopped: its cache goes with the next step
                continue
            text = seq.detok.push(ev.token) if ev.token is not None else ""
            if seq.detok.stopped:
                self._emit(seq, text)
                self._close(seq, "stop")
                self._end_by_stop(seq, ended=ev.finish is not None)
                continue
            if ev.finish is not None:
                self._emit(seq, text + seq.detok.flush())
                self._close(seq, "length" if ev.finish == "length" else "stop")
                self._finish(seq)
                continue
            self._emit(seq, text)

    def _end_by_stop(self, seq: Sequence, ended: bool) -> None:
        """A running sequence we ended ourselves (stop string): if the generator still holds it, drop it next step."""
        if ended:
            self._finish(seq)
        else:
            self._cancels.append(seq.id)

    def _observe(self, seq: Sequence, now: float) -> None:
        if seq.last_token_at is None:
            self.metrics.ttft_seconds.observe(now - seq.enqueued)
        else:
            self.metrics.inter_token_seconds.observe(now - seq.last_token_at)
        seq.last_token_at = now
        self.metrics.generated_tokens.inc()
        self.metrics.tenant_generated_tokens.labels(tenant=self.metrics.tenant_label(seq.tenant)).inc()

    # -- endings ---------------------------------------------------------------------------------
    def _emit(self, seq: Sequence, text: str) -> None:
        if text:
            seq.events.put_nowait(Delta(seq.index, text))

    def _close(self, seq: Sequence, finish: Finish) -> None:
        seq.done = True
        seq.events.put_nowait(Done(seq.index, finish, len(seq.prompt), seq.generated))

    def _fail(self, seq: Sequence, error: DomainError) -> None:
        seq.done = True
        seq.events.put_nowait(Failed(seq.index, error))

    def _finish(self, seq: Sequence) -> None:
        """The generator no longer holds the sequence: unpin its adapters and forget it."""
        self._running.pop(seq.id, None)
        if seq.pinned:
            seq.pinned = False
            self.residency.unpin_metas(seq.metas)

    def _fail_all(self, exc: Exception) -> None:
        """The step raised (e.g. the inference worker died): every running sequence ends with an error."""
        detail = f"generation failed: {type(exc).__name__}: {exc}"
        for seq in list(self._running.values()):
            self._finish(seq)
            if not seq.done:
                self._fail(seq, InferenceFailed(detail))
        self._cancels.clear()
        try:
            self.executor.submit(self.engine.generation_reset)
        except RuntimeError:
            pass
        self.metrics.kv_cache_bytes.set(0)
        self.metrics.kv_cache_used_bytes.set(0)
        self._publish()

    def _publish(self) -> None:
        self.metrics.sequences_running.set(len(self._running))
        self.metrics.sequences_waiting.set(len(self._waiting))


def _longest(longest: tuple[int, int, int], seq: Sequence) -> tuple[int, int, int]:
    return max(longest[0], len(seq.prompt)), max(longest[1], seq.max_tokens), max(longest[2], seq.reserve)


def generation_scheduler(settings: Settings, engine: Any, residency: Residency, executor: Executor,
                         metrics: Metrics) -> GenerationScheduler:
    """The scheduler for a causal or encoder-decoder LM engine, sized by the ADAPTERSERVE_* generation settings."""
    shape = generation_kv_shape(engine.config, getattr(torch, settings.dtype))
    limits = GenerationLimits(settings.kv_cache_bytes, settings.max_running_sequences, settings.generation_queue_size,
                              settings.prefill_chunk_tokens, settings.request_timeout_s, bool(engine.seq2seq_lm))
    return GenerationScheduler(engine, residency, executor, metrics, shape, limits)
