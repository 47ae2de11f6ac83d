"""What a queued job asks for, which jobs may share a forward pass, and the batch runner that turns a group of
jobs into engine segments (residency + engine, on the inference thread).

It lives in scheduling, not execution: it speaks in scheduling's terms (Job, Resolved) and calls down into
execution (Engine, Residency), which never learns about jobs."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from server.errors import AdapterUnavailable, InferenceFailed, InvalidComposition
from server.execution.engine import Engine, Segment
from server.execution.residency import Residency
from server.execution.worker import WorkerEngine
from server.scheduling.batcher import Job, Runner
from server.scheduling.resolve import Resolved

log = logging.getLogger("adapterserve.inference")

Task = Literal["embedding", "classification"]


@dataclass(frozen=True)
class Work:
    """What a queued job asks for."""

    resolved: Resolved
    task: Task


def group_key(work: Work) -> str:
    """Jobs that may share one forward pass: the same task kind (classification jobs with different heads
    share it too: each segment of rows goes through its own head)."""
    return "classification" if work.task == "classification" and work.resolved.head is not None else "embedding"


def segments_for(jobs: Sequence[Job]) -> list[Segment]:
    """Consecutive jobs with the same composition become one segment (one BatchSplit child)."""
    segs: list[Segment] = []
    for job in jobs:
        work: Work = job.payload
        head = work.resolved.head.internal if work.task == "classification" and work.resolved.head else None
        if segs and segs[-1].block == work.resolved.block and segs[-1].head == head and work.resolved.parallel_width == 1:
            segs[-1] = Segment(segs[-1].block, segs[-1].rows + job.rows, head)
        else:
            segs.append(Segment(work.resolved.block, list(job.rows), head, work.resolved.parallel_width))
    return segs


def _split(outputs: list[Any], jobs: Sequence[Job]) -> list[Any]:
    """Per-segment outputs back to per-job outputs (a segment may hold several jobs)."""
    results: list[Any] = []
    seg_iter = iter(outputs)
    current, offset = None, 0
    for job in jobs:
        if current is None or offset >= len(current):
            current, offset = next(seg_iter), 0
        n = len(job.rows)
        results.append(current[offset : offset + n])
        offset += n
    return results


def humanize(message: str, jobs: Sequence[Job]) -> str:
    """Replace model-side adapter names in a library message by the names callers know."""
    for job in jobs:
        for meta in job.payload.resolved.metas:
            message = message.replace(meta.internal, meta.name)
    return message


def make_runner(engine: Engine | WorkerEngine, residency: Residency) -> Runner:
    """A runner for the batcher: load/pin the jobs' adapters, run one forward, unpin."""

    def forward(jobs: Sequence[Job]) -> list[Any]:
        """Jobs with the same composition are made adjacent (fewer BatchSplit children); results come
        back in the callers' order."""
        order = sorted(range(len(jobs)), key=lambda i: jobs[i].payload.resolved.key)
        outs = forward_in_order([jobs[i] for i in order])
        results: list[Any] = [None] * len(jobs)
        for pos, i in enumerate(order):
            results[i] = outs[pos]
        return results

    def forward_in_order(jobs: Sequence[Job]) -> list[Any]:
        segs = segments_for(jobs)
        if any(s.head for s in segs):
            labels = {}
            for job in jobs:
                head = job.payload.resolved.head
                if head is not None and head.head:
                    labels[head.internal] = {int(k): v for k, v in head.head.get("id2label", {}).items()}
            return _split(engine.classify(segs, labels), jobs)
        if segs[0].width > 1:
            return engine.embed(segs)
        return _split(engine.embed(segs), jobs)

    def run(jobs: Sequence[Job]) -> list[Any]:
        results: list[Any] = [None] * len(jobs)
        ready: list[int] = []
        for i, job in enumerate(jobs):
            try:
                residency.prepare(job.payload.resolved.metas)
                ready.append(i)
            except AdapterUnavailable as exc:
                results[i] = exc
        if not ready:
            return results
        engine.read_ahead(residency.upcoming())  # the next batches' cold loads, read while this one runs
        batch = [jobs[i] for i in ready]
        try:
            try:
                outs = forward(batch)
            except ValueError:
                if len(batch) == 1:
                    raise
                outs = []  # something in the mix cannot share a pass: isolate each job
                for job in batch:
                    try:
                        outs.append(forward([job])[0])
                    except ValueError as exc:
                        outs.append(InvalidComposition(humanize(str(exc), [job])))
            for i, out in zip(ready, outs, strict=True):
                results[i] = out
        except ValueError as exc:
            results[ready[0]] = InvalidComposition(humanize(str(exc), batch))
        except Exception as exc:
            log.exception("forward pass failed")
            for i in ready:
                results[i] = InferenceFailed(f"the forward pass failed: {type(exc).__name__}: {exc}")
        finally:
            for job in batch:
                residency.unpin_metas(job.payload.resolved.metas)
        return results

    return run
