"""Which adapters are loaded into the model now: byte budget, LRU eviction, pins, deferred unloads.

Loading and unloading touch the model, so `prepare`/`unload_pending` run only on the inference
thread; `hold`/`release`/`retire` are called from request handlers. One lock guards the books; files are
removed only after it is released.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from server.errors import AdapterUnavailable
from server.metrics import Metrics
from server.registry.store import VersionMeta, file_sha256

log = logging.getLogger("adapterserve.residency")


@dataclass(frozen=True)
class Loaded:
    """What a load left in the model: the bytes it holds, and whether its files had been read ahead."""

    nbytes: int
    read_ahead: bool = False


class AdapterLoader(Protocol):
    """What residency needs from the model side."""

    def load(self, path: Path, internal: str, fuses: tuple[str, ...] = ()) -> Loaded: ...

    def unload(self, internal: str) -> None: ...  # an adapter's unload also unloads the fusions over it


@dataclass
class _Entry:
    meta: VersionMeta
    nbytes: int
    pins: int = 0


@dataclass
class _Retired:
    trash: Path
    internals: set[str] = field(default_factory=set)


class Residency:
    """LRU cache of loaded adapters keyed by internal (per-version) name."""

    def __init__(self, loader: AdapterLoader, budget_bytes: int, metrics: Metrics, path_of: Callable[[VersionMeta], Path]) -> None:
        self.loader = loader
        self.budget = budget_bytes
        self.metrics = metrics
        self._path_of = path_of
        self._lock = threading.Lock()
        self._resident: OrderedDict[str, _Entry] = OrderedDict()  # LRU order: oldest first
        self._inflight: dict[str, int] = {}  # internal -> queued or running requests using it
        self._wanted: dict[str, VersionMeta] = {}  # the same keys, in the order requests first asked for them
        self._moved: dict[str, Path] = {}  # internal -> version folder in the trash after a delete
        self._retired: dict[str, _Retired] = {}  # internal -> its trash record
        self._doomed: set[str] = set()  # deleted and resident: unload once no request uses it
        self._verified: dict[str, tuple] = {}  # internal -> (file, size, mtime) seen at its checksummed load
        self.on_doomed: Callable[[], None] | None = None  # asks the inference thread to run unload_pending

    # -- event-loop side -------------------------------------------------------------------------
    def hold(self, metas: Iterable[VersionMeta]) -> None:
        """A request resolved to these versions: keep their files until `release`."""
        with self._lock:
            for m in metas:
                self._inflight[m.internal] = self._inflight.get(m.internal, 0) + 1
                self._wanted.setdefault(m.internal, m)

    def release(self, metas: Iterable[VersionMeta]) -> None:
        gone: list[Path] = []
        with self._lock:
            for m in metas:
                n = self._inflight.get(m.internal, 0) - 1
                if n > 0:
                    self._inflight[m.internal] = n
                    continue
                self._inflight.pop(m.internal, None)
                self._wanted.pop(m.internal, None)
                if (trash := self._settle(m.internal)) is not None:
                    gone.append(trash)
        for trash in gone:
            _remove(trash)

    def retire(self, metas: Iterable[VersionMeta], trash: Path) -> None:
        """The adapter was deleted from the store (moved to `trash`): unload and remove its files
        once the requests that resolved it have finished."""
        record = _Retired(trash)
        with self._lock:
            for m in metas:
                record.internals.add(m.internal)
                self._moved[m.internal] = trash / str(m.version)
                self._retired[m.internal] = record
            for internal in list(record.internals):
                self._settle(internal)
            done = not record.internals
        if done:
            _remove(trash)

    def _settle(self, internal: str) -> Path | None:
        """Called under the lock when nothing in flight may use `internal` any more; returns the trash folder to
        remove once the lock is released (when this was the last version in it)."""
        if internal not in self._retired or self._inflight.get(internal):
            return None
        if internal in self._resident:
            self._doomed.add(internal)  # the inference thread unloads it
            if self.on_doomed is not None:
                self.on_doomed()
            return None
        return self._forget(internal)

    def _forget(self, internal: str) -> Path | None:
        """Under the lock: drop a retired version's records; the trash folder to remove if it was the last one."""
        self._verified.pop(internal, None)
        record = self._retired.pop(internal, None)
        self._moved.pop(internal, None)
        if record is None:
            return None
        record.internals.discard(internal)
        return None if record.internals else record.trash

    def upcoming(self, limit: int = 16) -> list[Path]:
        """Folders of adapters that queued or running requests use and the model does not hold (fusions left
        out), oldest request first: what the next batches will load, for the engine to read ahead."""
        with self._lock:
            out = [self._moved.get(internal) or self._path_of(meta) for internal, meta in self._wanted.items()
                   if internal not in self._resident and not meta.fused_internals]
        return out[:limit]

    # -- inference-thread side -------------------------------------------------------------------
    def prepare(self, metas: Iterable[VersionMeta]) -> None:
        """Make every adapter resident and pinned (load on demand, evict LRU to fit the budget).

        Raises AdapterUnavailable naming the first adapter that cannot be loaded; nothing stays pinned then.
        """
        wanted = list({m.internal: m for m in metas}.values())
        self.unload_pending()
        pinned: list[str] = []
        try:
            for meta in wanted:
                self._ensure(meta)
                with self._lock:
                    self._resident[meta.internal].pins += 1
                    pinned.append(meta.internal)
        except Exception:
            self.unpin(pinned)
            raise

    def unpin(self, internals: Iterable[str]) -> None:
        with self._lock:
            for internal in internals:
                entry = self._resident.get(internal)
                if entry is not None and entry.pins > 0:
                    entry.pins -= 1

    def unpin_metas(self, metas: Iterable[VersionMeta]) -> None:
        self.unpin({m.internal for m in metas})

    def _ensure(self, meta: VersionMeta) -> None:
        internal = meta.internal
        with self._lock:
            entry = self._resident.get(internal)
            if entry is not None:
                self._resident.move_to_end(internal)
                return
            path = self._moved.get(internal) or self._path_of(meta)
        self._make_room(meta.nbytes)
        method = self.metrics.method_label(meta.method)
        start = time.perf_counter()
        try:
            self._verify(meta, path)
            loaded = self.loader.load(path, internal, meta.fused_internals)
        except Exception as exc:
            self.metrics.adapter_loads.labels(result="error", method=method).inc()
            log.error("loading %s/%s v%d failed: %s", meta.tenant, meta.name, meta.version, exc)
            raise AdapterUnavailable(f"adapter {meta.name!r} (version {meta.version}) cannot be loaded: {exc}") from exc
        self.metrics.adapter_loads.labels(result="ok", method=method).inc()
        self.metrics.adapter_load_seconds.labels(method=method).observe(time.perf_counter() - start)
        if not meta.fused_internals:
            self.metrics.adapter_read_ahead.labels(result="hit" if loaded.read_ahead else "miss").inc()
        with self._lock:
            self._resident[internal] = _Entry(meta, loaded.nbytes)
            self._publish()

    def _verify(self, meta: VersionMeta, path: Path) -> None:
        """Refuse files whose checksum no longer matches meta.json (corruption on the volume).

        The checksum is read on a version's first load in this process; a reload after an eviction only
        compares each file's size and modification time with what that verified load saw (a rewrite shows
        there), so a busy cache does not hash the same bytes at every reload.
        """
        if not path.is_dir():
            raise FileNotFoundError(f"{path} is gone (the adapter was deleted)")
        stamps = tuple((name, *_stamp(path / name)) for name in meta.files)
        if self._verified.get(meta.internal) == stamps:
            return
        for name, info in meta.files.items():
            if file_sha256(path / name) != info.sha256:
                raise ValueError(f"{name} does not match its stored sha256")
        with self._lock:
            self._verified[meta.internal] = stamps

    def _make_room(self, incoming: int) -> None:
        while True:
            with self._lock:
                used = sum(e.nbytes for e in self._resident.values())
                if used + incoming <= self.budget:
                    return
                victim = next((k for k, e in self._resident.items() if e.pins == 0), None)
                if victim is None:  # everything resident is pinned by this batch: exceed the budget briefly
                    log.warning("adapter cache over budget: all %d resident adapters are in use", len(self._resident))
                    return
                method = self.metrics.method_label(self._resident[victim].meta.method)
            self._unload(victim)
            self.metrics.adapter_evictions.labels(method=method).inc()

    def _unload(self, internal: str) -> None:
        try:
            self.loader.unload(internal)
        finally:
            self.drop(internal)
            with self._lock:
                dependents = [k for k, e in self._resident.items() if internal in e.meta.fused_internals]
            for fusion in dependents:  # the model dropped them with the adapter they fuse
                self.drop(fusion)

    def drop(self, internal: str) -> None:
        """Forget a resident adapter without unloading it: after `_unload`, or when the model lost it on its own
        (a restarted inference worker could not load it again), so the next request that needs it loads it,
        or answers 503."""
        trash = None
        with self._lock:
            self._resident.pop(internal, None)
            self._doomed.discard(internal)
            if internal in self._retired and not self._inflight.get(internal):
                trash = self._forget(internal)
            self._publish()
        if trash is not None:
            _remove(trash)

    def unload_pending(self) -> None:
        """Unload deleted adapters that no request uses any more."""
        with self._lock:
            doomed = [i for i in self._doomed if not self._inflight.get(i) and not self._pins(i)]
        for internal in doomed:
            self._unload(internal)

    def _pins(self, internal: str) -> int:
        entry = self._resident.get(internal)
        return entry.pins if entry is not None else 0

    def _publish(self) -> None:
        self.metrics.adapters_resident.set(len(self._resident))
        self.metrics.adapter_cache_bytes.set(sum(e.nbytes for e in self._resident.values()))

    # -- introspection ---------------------------------------------------------------------------
    def resident(self) -> list[str]:
        with self._lock:
            return list(self._resident)

    def is_resident(self, internal: str) -> bool:
        with self._lock:
            return internal in self._resident


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def _remove(trash: Path) -> None:
    """Delete a retired adapter's files; never under the lock (on an RWX/NFS volume this can take long)."""
    shutil.rmtree(trash, ignore_errors=True)
