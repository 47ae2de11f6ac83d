"""Bounded request queue -> batches -> one forward pass at a time on a single inference thread.

The event loop only queues, groups and resolves futures; `runner` (the model work) always runs on
the one-thread executor, so the loop never blocks on a forward pass. While a batch runs, a full next
batch (max size or max tokens reached: waiting cannot improve it) is handed to the executor at once,
so the model starts it the moment the running one ends instead of after the event loop has answered
the finished batch's callers. A partial batch still waits for the running one, as more rows may come.
Every job has a timer at its deadline: a job that has not begun running by then is taken out of the queue (or
skipped by the batch it was taken into) and answered DeadlineExceeded at once, not when it would leave the queue.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from server.errors import DeadlineExceeded, Draining, QueueFull
from server.metrics import Metrics

log = logging.getLogger("adapterserve.batcher")
QUEUE_FULL_RETRY_S = 1  # a slot frees as soon as the running batch ends
DRAINING_RETRY_S = 5  # another replica (or this one, restarted) takes the retry


@dataclass(eq=False)
class Job:
    """One request's rows plus everything the runner needs; `group` says which jobs may share a forward."""

    rows: list[list[int]]
    group: Hashable  # jobs with equal groups may share one forward pass (e.g. task kind)
    payload: Any  # what the runner needs (resolved composition, head, ...)
    deadline: float  # time.monotonic() after which the job is dropped unstarted
    adapters: frozenset[str] = frozenset()  # distinct adapter versions used (for the metric)
    solo: bool = False  # must run alone (e.g. Parallel replicates the batch)
    enqueued: float = field(default_factory=time.monotonic)
    future: asyncio.Future[Any] | None = None

    @property
    def ntokens(self) -> int:
        return sum(len(r) for r in self.rows)


@dataclass(eq=False)
class _Flight:
    """A batch handed to the executor; `started` flips (on the inference thread) when its runner begins."""

    jobs: list[Job]
    started: bool = False


# The runner gets one group of jobs and returns, per job, its result or the exception to raise.
Runner = Callable[[Sequence[Job]], list[Any]]


class Batcher:
    """Collects jobs for up to max_wait_s, up to max_batch_size rows / max_batch_tokens tokens."""

    def __init__(
        self,
        runner: Runner,
        metrics: Metrics,
        *,
        max_batch_size: int = 32,
        max_batch_tokens: int = 8192,
        max_wait_s: float = 0.005,
        queue_size: int = 1024,
        executor: ThreadPoolExecutor | None = None,
    ) -> None:
        self.runner = runner
        self.metrics = metrics
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_wait_s = max_wait_s
        self.queue_size = queue_size
        self.executor = executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self._pending: deque[Job] = deque()
        self._rows = 0
        self._tokens = 0
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._flights: dict[asyncio.Task[None], list[Job]] = {}  # batches launched and not landed
        self._staged: list[_Flight] = []  # handed to the executor, runner not begun yet
        self._running = 0  # batches handed to the executor and not finished
        self._idle = asyncio.Event()
        self._idle.set()
        self.accepting = True
        self.batches = 0

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="batcher")

    async def stop(self) -> None:
        """Cancel the loop and the batches in flight, and fail every job not answered yet (queued, staged for the
        executor, or running) with Draining, so no caller waits forever. A forward pass already running ends on
        the inference thread; nobody waits for its result."""
        self.accepting = False
        await cancel_and_wait(self._task)
        unanswered = [job for jobs in self._flights.values() for job in jobs]
        for task in list(self._flights):
            task.cancel()
        if self._flights:
            await asyncio.gather(*self._flights, return_exceptions=True)
        unanswered += self._pending
        self._pending.clear()
        self._staged.clear()
        self._rows = self._tokens = 0
        for job in unanswered:
            if job.future is not None and not job.future.done():
                job.future.set_exception(Draining("the server stopped before this request ran"))
        self._publish()
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until nothing is queued or running; False if `timeout` passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except TimeoutError:
            return False

    @property
    def idle(self) -> bool:
        """Nothing queued and no forward pass running."""
        return not self._pending and self._running == 0

    @property
    def depth(self) -> int:
        """Jobs waiting: queued, or in a batch handed to the executor that has not begun."""
        staged = sum(1 for f in self._staged if not f.started for j in f.jobs if j.future is None or not j.future.done())
        return len(self._pending) + staged

    # -- submit ----------------------------------------------------------------------------------
    def submit(self, job: Job) -> asyncio.Future[Any]:
        """Queue a job; QueueFull when the queue is at capacity, Draining when shutting down."""
        if not self.accepting:
            raise Draining("the server is draining and accepts no new requests", retry_after=DRAINING_RETRY_S)
        if self.depth >= self.queue_size:
            raise QueueFull(f"the inference queue is full ({self.queue_size} requests); retry shortly", retry_after=QUEUE_FULL_RETRY_S)
        loop = asyncio.get_running_loop()
        job.future = loop.create_future()
        timer = loop.call_later(max(0.0, job.deadline - time.monotonic()), self._expire, job)
        job.future.add_done_callback(lambda _: timer.cancel())
        self._pending.append(job)
        self._rows += len(job.rows)
        self._tokens += job.ntokens
        self._idle.clear()
        self._wakeup.set()
        self._publish()
        return job.future

    def _publish(self) -> None:
        self.metrics.queue_depth.set(self.depth)

    def _expire(self, job: Job) -> None:
        """At a job's deadline: unless its batch has begun running, drop it from the queue and answer it."""
        assert job.future is not None
        if job.future.done() or any(f.started and job in f.jobs for f in self._staged):
            return
        if job in self._pending:
            self._pending.remove(job)
            self._rows -= len(job.rows)
            self._tokens -= job.ntokens
            if not self._pending and self._running == 0:
                self._idle.set()
        self.metrics.queue_seconds.observe(time.monotonic() - job.enqueued)
        job.future.set_exception(_late(job, time.monotonic()))
        self._publish()

    # -- the loop --------------------------------------------------------------------------------
    async def _loop(self) -> None:
        while True:
            try:
                prefetch = await self._wait_turn()
                if not prefetch:
                    await self._collect_window()
                batch = self._take()
                if batch:
                    self._launch(batch)
            except asyncio.CancelledError:
                raise
            except Exception:  # never let one bad batch kill the loop
                log.exception("batcher loop error")

    def _full(self) -> bool:
        return self._rows >= self.max_batch_size or self._tokens >= self.max_batch_tokens

    async def _wait_turn(self) -> bool:
        """Until a batch may be taken: the executor is free and work is queued (returns False: collect a
        window first), or one batch runs and a full one is queued (returns True: take it now)."""
        while True:
            if self._pending and self._running == 0:
                return False
            if self._running == 1 and self._pending and self._full():
                return True
            self._wakeup.clear()
            await self._wakeup.wait()

    async def _collect_window(self) -> None:
        end = time.monotonic() + self.max_wait_s
        while not self._full():
            remaining = end - time.monotonic()
            if remaining <= 0 or not self._pending or self._pending[0].solo:  # a job may expire meanwhile
                break
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                break

    def _launch(self, batch: list[Job]) -> None:
        self._running += 1
        self._idle.clear()
        task = asyncio.get_running_loop().create_task(self._run(batch), name="batch")
        self._flights[task] = batch
        task.add_done_callback(self._landed)

    def _landed(self, task: asyncio.Task[None]) -> None:
        self._flights.pop(task, None)
        self._running -= 1
        if not task.cancelled() and task.exception() is not None:
            log.error("batch failed", exc_info=task.exception())
        if not self._pending and self._running == 0:
            self._idle.set()
        self._wakeup.set()

    def _take(self) -> list[Job]:
        """Pop jobs in arrival order while they fit (always at least one)."""
        batch: list[Job] = []
        rows = tokens = 0
        while self._pending:
            job = self._pending[0]
            if batch and (
                job.solo or batch[0].solo
                or rows + len(job.rows) > self.max_batch_size
                or tokens + job.ntokens > self.max_batch_tokens
            ):
                break
            self._pending.popleft()
            self._rows -= len(job.rows)
            self._tokens -= job.ntokens
            rows += len(job.rows)
            tokens += job.ntokens
            batch.append(job)
        self._publish()
        return batch

    async def _run(self, batch: list[Job]) -> None:
        now = time.monotonic()
        live: list[Job] = []
        for job in batch:
            assert job.future is not None
            if job.future.done():  # the caller went away
                continue
            self.metrics.queue_seconds.observe(now - job.enqueued)
            if now > job.deadline:
                job.future.set_exception(_late(job, now))
                continue
            live.append(job)
        groups: dict[Hashable, list[Job]] = {}
        for job in live:
            groups.setdefault(job.group, []).append(job)
        loop = asyncio.get_running_loop()
        flights = [_Flight(jobs) for jobs in groups.values()]
        self._staged.extend(flights)
        self._publish()
        for flight in flights:
            jobs = flight.jobs
            try:
                results, seconds = await loop.run_in_executor(self.executor, self._execute, flight, loop)
            except Exception as exc:  # the runner should report per job; this is the fallback
                log.exception("runner failed")
                results, seconds = [exc] * len(jobs), None
            finally:
                self._staged.remove(flight)
                self._publish()
            self.batches += 1
            if seconds is not None:
                self.metrics.inference_seconds.observe(seconds)
                self.metrics.batch_size.observe(sum(len(j.rows) for j in jobs))
                self.metrics.batch_distinct_adapters.observe(len(frozenset().union(*(j.adapters for j in jobs))))
            for job, result in zip(jobs, results, strict=True):
                assert job.future is not None
                if job.future.done():
                    continue
                if isinstance(result, BaseException):
                    job.future.set_exception(result)
                else:
                    job.future.set_result(result)

    def _execute(self, flight: _Flight, loop: asyncio.AbstractEventLoop) -> tuple[list[Any], float | None]:
        """On the inference thread: drop jobs whose deadline passed while the batch waited behind the one
        before it, run the rest, and time the runner alone."""
        flight.started = True
        loop.call_soon_threadsafe(self._publish)
        now = time.monotonic()
        results: list[Any] = [None] * len(flight.jobs)
        live = []
        for i, job in enumerate(flight.jobs):
            if now > job.deadline:
                results[i] = _late(job, now)
            else:
                live.append(i)
        if not live:
            return results, None
        start = time.perf_counter()
        out = self.runner([flight.jobs[i] for i in live])
        for i, result in zip(live, out, strict=True):
            results[i] = result
        return results, time.perf_counter() - start


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel a driver task and wait until it has ended (its CancelledError is the expected outcome)."""
    if task is None:
        return
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass


def _late(job: Job, now: float) -> DeadlineExceeded:
    return DeadlineExceeded(f"the request waited {now - job.enqueued:.1f}s in the queue without starting and passed its deadline")
