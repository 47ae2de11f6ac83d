"""The running service: its parts wired together, plus the request-level operations routes call."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from server.execution.residency import Residency
from server.execution.worker import AnyEngine
from server.http.auth import SHARED_TENANT, KeyRing, Principal
from server.http.problems import ProblemError
from server.metrics import Metrics
from server.registry.store import AdapterStore, VersionMeta
from server.scheduling.batcher import Batcher, DeadlineExceeded, Draining, Job, QueueFull
from server.scheduling.resolve import FusionLookup, Resolved, resolve
from server.scheduling.runner import Task, Work, group_key
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
    keyring: KeyRing
    metrics: Metrics
    engine: AnyEngine
    residency: Residency
    batcher: Batcher
    started: float = field(default_factory=time.time)

    @property
    def max_input_tokens(self) -> int:
        return min(self.settings.max_input_tokens, self.engine.max_positions)

    # -- adapters --------------------------------------------------------------------------------
    def find(self, principal: Principal, name: str) -> VersionMeta | None:
        """A tenant's own adapter first, then a shared one; None (-> 404) for anything else."""
        return self.find_for(principal.tenant, name)

    def find_for(self, tenant: str, name: str) -> VersionMeta | None:
        """What `name` means to `tenant`: its own adapter, else a shared one (for the shared tenant: only shared)."""
        return self.store.latest(tenant, name) or self.store.latest(SHARED_TENANT, name)

    def find_fusion(self, principal: Principal, adapters: tuple[str, ...]) -> VersionMeta | None:
        """The tenant's own AdapterFusion over exactly these adapters (in order), else a shared one."""
        for tenant in (principal.tenant, SHARED_TENANT):
            for meta in self.store.fusions(tenant):
                if tuple(f["name"] for f in meta.fused) == adapters:
                    return meta
        return None

    # -- inputs ----------------------------------------------------------------------------------
    def check_inputs(self, texts: list[str]) -> None:
        if not texts:
            raise ProblemError(422, "no-inputs", "`inputs` must hold at least one string")
        if len(texts) > self.settings.max_inputs:
            raise ProblemError(
                413, "too-many-inputs", f"{len(texts)} inputs in one request; the limit is {self.settings.max_inputs}"
            )

    def tokenize(self, texts: list[str], truncate: bool) -> Tokenized:
        """Token ids per input; over-long inputs are a 422 unless the caller asked to truncate."""
        self.check_inputs(texts)
        limit = self.max_input_tokens
        rows = self.engine.tokenize(texts)
        truncated = [False] * len(rows)
        for i, ids in enumerate(rows):
            if len(ids) > limit:
                if not truncate:
                    raise ProblemError(
                        422, "input-too-long",
                        f"input {i} has {len(ids)} tokens; the limit is {limit}. Shorten it, or send \"truncate\": true "
                        "to keep the first tokens (results then say truncated: true)",
                    )
                rows[i] = self.engine.tokenize_truncated(texts[i], limit)
                truncated[i] = True
        return Tokenized(rows, truncated)

    # -- inference -------------------------------------------------------------------------------
    def resolve(self, principal: Principal, spec: Any, head: str | None, task: str) -> Resolved:
        fusions = FusionLookup(lambda names: self.find_fusion(principal, names), self.store.meta)
        return resolve(spec, lambda n: self.find(principal, n), head, task, fusions)

    async def infer(self, tokens: Tokenized, resolved: Resolved, task: Task) -> Any:
        """Queue the rows and wait for the batch that runs them; maps queue errors to problems."""
        work = Work(resolved, task)
        job = Job(
            rows=tokens.rows, group=group_key(work), payload=work,
            deadline=time.monotonic() + self.settings.request_timeout_s,
            adapters=frozenset(m.internal for m in resolved.metas), solo=resolved.solo,
        )
        self.residency.hold(resolved.metas)
        try:
            try:
                future = self.batcher.submit(job)
            except QueueFull as exc:
                raise ProblemError(429, "queue-full", f"{exc}; retry shortly", {"Retry-After": "1"}) from None
            except Draining as exc:
                raise ProblemError(503, "draining", str(exc), {"Retry-After": "5"}) from None
            try:
                return await future  # cancelling the caller cancels the job (skipped unless running)
            except DeadlineExceeded as exc:
                raise ProblemError(
                    504, "deadline-exceeded", f"{exc} ({self.settings.request_timeout_s:g}s); the server is overloaded, retry later"
                ) from None
            except Draining as exc:
                raise ProblemError(503, "draining", str(exc)) from None
        finally:
            self.residency.release(resolved.metas)


async def runtime_of(request: Request) -> Runtime:
    """FastAPI dependency: the app's runtime (503 until the backbone is loaded)."""
    rt: Runtime | None = getattr(request.app.state, "runtime", None)
    if rt is None:
        raise ProblemError(503, "not-ready", "the server is still loading its backbone")
    return rt


async def settings_of(request: Request) -> Settings:
    """FastAPI dependency: the app's settings."""
    return request.app.state.settings
