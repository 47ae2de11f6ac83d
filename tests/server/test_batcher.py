"""Batcher unit tests with an injected runner (no model)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import pytest

from server.errors import DeadlineExceeded, Draining, QueueFull
from server.metrics import Metrics
from server.scheduling.batcher import Batcher, Job


def _job(n: int, group: str = "g", adapter: str = "a", deadline_s: float = 30.0, solo: bool = False) -> Job:
    return Job(rows=[[1, 2, 3]] * n, group=group, payload=adapter, deadline=time.monotonic() + deadline_s,
               adapters=frozenset({adapter}), solo=solo)


class Recorder:
    def __init__(self, block: threading.Event | None = None) -> None:
        self.calls: list[list[Job]] = []
        self.threads: set[str] = set()
        self.block = block

    def __call__(self, jobs: Sequence[Job]) -> list[object]:
        self.threads.add(threading.current_thread().name)
        if self.block is not None:
            self.block.wait(10)
        self.calls.append(list(jobs))
        return [f"{j.payload}:{len(j.rows)}" for j in jobs]


@asynccontextmanager
async def gated_batcher(**settings: Any) -> AsyncIterator[tuple[Batcher, Recorder, threading.Event]]:
    """A started batcher whose runner holds every batch at `gate` until the test sets it; stopped on exit."""
    gate = threading.Event()
    rec = Recorder(gate)
    b = Batcher(rec, Metrics(), **settings)
    b.start()
    try:
        yield b, rec, gate
    finally:
        gate.set()
        await b.stop()


def test_batches_group_and_resolve_each_future() -> None:
    async def main() -> Recorder:
        rec = Recorder()
        b = Batcher(rec, Metrics(), max_batch_size=8, max_wait_s=0.05)
        b.start()
        jobs = [_job(2, group="emb" if i % 2 else "cls", adapter=f"a{i}") for i in range(6)]
        futures = [b.submit(j) for j in jobs]
        results = await asyncio.gather(*futures)
        await b.stop()
        assert results == [f"a{i}:2" for i in range(6)]
        return rec

    rec = asyncio.run(main())
    assert all(name.startswith("inference") for name in rec.threads)
    assert threading.main_thread().name not in rec.threads
    for call in rec.calls:
        assert len({j.group for j in call}) == 1  # one task kind per forward
        assert sum(len(j.rows) for j in call) <= 8


def test_max_batch_size_splits_batches() -> None:
    async def main() -> Recorder:
        rec = Recorder()
        b = Batcher(rec, Metrics(), max_batch_size=4, max_wait_s=0.05)
        b.start()
        await asyncio.gather(*[b.submit(_job(1, adapter=f"a{i}")) for i in range(10)])
        await b.stop()
        return rec

    rec = asyncio.run(main())
    assert all(sum(len(j.rows) for j in c) <= 4 for c in rec.calls)
    assert sum(len(c) for c in rec.calls) == 10


def test_full_queue_raises_queue_full() -> None:
    async def main() -> None:
        async with gated_batcher(max_batch_size=1, max_wait_s=0, queue_size=2) as (b, _, gate):
            first = b.submit(_job(1))
            await asyncio.sleep(0.1)  # the first job is now running (blocked), the queue is empty
            b.submit(_job(1))
            b.submit(_job(1))
            with pytest.raises(QueueFull):
                b.submit(_job(1))
            gate.set()
            await first

    asyncio.run(main())


def test_expired_job_is_dropped_before_running() -> None:
    async def main() -> Recorder:
        async with gated_batcher(max_batch_size=1, max_wait_s=0) as (b, rec, gate):
            blocker = b.submit(_job(1, adapter="blocker"))
            await asyncio.sleep(0.05)
            late = b.submit(_job(1, adapter="late", deadline_s=0.01))
            await asyncio.sleep(0.1)
            gate.set()
            await blocker
            with pytest.raises(DeadlineExceeded):
                await late
        return rec

    rec = asyncio.run(main())
    assert [j.payload for c in rec.calls for j in c] == ["blocker"]


def test_runner_exception_per_job_and_idle() -> None:
    def runner(jobs: Sequence[Job]) -> list[object]:
        return [ValueError("bad") if j.payload == "bad" else "ok" for j in jobs]

    async def main() -> None:
        b = Batcher(runner, Metrics(), max_batch_size=8, max_wait_s=0.02)
        b.start()
        ok, bad = b.submit(_job(1, adapter="ok")), b.submit(_job(1, adapter="bad"))
        assert await ok == "ok"
        with pytest.raises(ValueError):
            await bad
        assert await b.wait_idle(5)
        assert b.idle
        await b.stop()

    asyncio.run(main())


def test_solo_job_runs_alone() -> None:
    async def main() -> Recorder:
        rec = Recorder()
        b = Batcher(rec, Metrics(), max_batch_size=16, max_wait_s=0.05)
        b.start()
        await asyncio.gather(b.submit(_job(1, adapter="x")), b.submit(_job(1, adapter="p", solo=True)), b.submit(_job(1, adapter="y")))
        await b.stop()
        return rec

    rec = asyncio.run(main())
    solo_calls = [c for c in rec.calls if any(j.solo for j in c)]
    assert solo_calls and all(len(c) == 1 for c in solo_calls)


def test_full_batch_starts_without_the_event_loop() -> None:
    """While a batch runs, a full next batch is handed to the executor at once: it starts when the first ends
    even if the event loop is busy then; a partial batch waits in the queue for more rows."""

    async def main() -> Recorder:
        async with gated_batcher(max_batch_size=2, max_wait_s=0.05) as (b, rec, gate):
            first = b.submit(_job(2, adapter="first"))
            await asyncio.sleep(0.1)  # running, held at the gate
            second = b.submit(_job(2, adapter="second"))  # a full batch
            partial = b.submit(_job(1, adapter="partial"))  # could still grow
            await asyncio.sleep(0.1)
            assert b.depth == 2  # the staged batch still counts as waiting (queue bound, 429, metric)
            gate.set()
            time.sleep(0.5)  # the event loop is blocked: only the executor can start the next batch
            assert [c[0].payload for c in rec.calls] == ["first", "second"]
            assert await asyncio.gather(first, second, partial) == ["first:2", "second:2", "partial:1"]
        return rec

    rec = asyncio.run(main())
    assert [[j.payload for j in c] for c in rec.calls] == [["first"], ["second"], ["partial"]]


def test_stop_fails_running_staged_and_queued_jobs() -> None:
    """stop() answers every job it will not finish: the one running, the one handed to the executor behind it (a
    second group of the same batch) and the one still queued; none of their callers waits forever."""

    async def main() -> None:
        gate = threading.Event()
        b = Batcher(Recorder(gate), Metrics(), max_batch_size=2, max_wait_s=0.05)
        b.start()
        try:
            running = b.submit(_job(1, group="g1", adapter="running"))
            staged = b.submit(_job(1, group="g2", adapter="staged"))  # same batch, next flight
            await asyncio.sleep(0.2)  # the batch runs (held at the gate); its second flight waits for the executor
            queued = b.submit(_job(1, adapter="queued"))
            await b.stop()
            results = await asyncio.wait_for(asyncio.gather(running, staged, queued, return_exceptions=True), 2)
        finally:
            gate.set()
        assert all(isinstance(r, Draining) for r in results), results
        assert b.depth == 0

    asyncio.run(main())


def test_batch_distinct_adapters_counts_adapter_versions() -> None:
    """Two requests with one composition over three adapter versions, and one with another composition over
    two of them: one batch, two compositions, three adapter versions (and the help text says so)."""

    async def main() -> Metrics:
        metrics = Metrics()
        b = Batcher(Recorder(), metrics, max_batch_size=8, max_wait_s=0.05)
        b.start()
        jobs = [_job(1, adapter="abc"), _job(1, adapter="abc"), _job(1, adapter="ab")]
        for job, used in zip(jobs, ({"a", "b", "c"}, {"a", "b", "c"}, {"a", "b"}), strict=True):
            job.adapters = frozenset(used)
        await asyncio.gather(*[b.submit(j) for j in jobs])
        await b.stop()
        return metrics

    text = asyncio.run(main()).render().decode()
    assert "# HELP adapterserve_batch_distinct_adapters Distinct adapter versions per batch\n" in text
    assert "adapterserve_batch_distinct_adapters_count 1.0" in text
    assert "adapterserve_batch_distinct_adapters_sum 3.0" in text
