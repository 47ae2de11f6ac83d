"""Durable adapter store: <root>/<tenant>/<adapter>/<version>/ with meta.json; atomic, crash-safe writes."""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

log = logging.getLogger("adapterserve.store")

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
SHARED_TENANT = "_shared"  # the store folder of adapters every tenant sees (managed by admins)
META_FILE = "meta.json"
TMP_DIR = ".tmp"
TRASH_DIR = ".trash"
LOCK_DIR = ".locks"
STALE_AFTER_S = 3600.0


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1024 * 1024):
            h.update(chunk)
    return h.hexdigest()


def overall_sha256(files: dict[str, FileInfo]) -> str:
    """One checksum for the version: sha256 over the sorted 'name sha256' lines (independent of upload form)."""
    lines = "".join(f"{name} {files[name].sha256}\n" for name in sorted(files))
    return hashlib.sha256(lines.encode()).hexdigest()


@dataclass(frozen=True)
class FileInfo:
    sha256: str
    size: int


@dataclass(frozen=True)
class VersionMeta:
    """What meta.json says about one stored version."""

    tenant: str
    name: str
    version: int
    created: str
    uploader: str
    method: str
    methods: tuple[str, ...]
    has_head: bool
    nbytes: int
    files: dict[str, FileInfo]
    sha256: str
    size: int
    head: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.tenant, self.name, self.version)

    @property
    def internal(self) -> str:
        """The model-side name ([A-Za-z0-9_]+), unique per stored version even across delete/re-upload."""
        raw = f"{self.tenant}/{self.name}/{self.version}/{self.sha256}/{self.created}"
        return "a_" + hashlib.sha256(raw.encode()).hexdigest()[:24]

    @property
    def fused(self) -> tuple[dict[str, Any], ...]:
        """An AdapterFusion's adapters, in order, pinned to the versions current at its upload:
        ({tenant, name, version, internal}, ...); empty for an adapter."""
        return tuple(self.extra.get("fuses", ()))

    @property
    def fused_internals(self) -> tuple[str, ...]:
        return tuple(str(f["internal"]) for f in self.fused)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["methods"] = list(self.methods)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> VersionMeta:
        d = dict(d)
        d["files"] = {k: FileInfo(**v) for k, v in d["files"].items()}
        d["methods"] = tuple(d.get("methods", ()))
        return cls(**d)


@dataclass(frozen=True)
class TenantUsage:
    """What a tenant holds in the store: its adapter names and the bytes of all their versions."""

    names: tuple[str, ...]
    nbytes: int


@dataclass(frozen=True)
class Upload:
    """What validation learned about a staged upload, recorded in meta.json."""

    method: str
    methods: tuple[str, ...]
    has_head: bool
    nbytes: int
    head: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class AdapterStore:
    """The source of truth for adapters; every process sharing `root` sees the same versions."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / TMP_DIR).mkdir(exist_ok=True)
        (self.root / TRASH_DIR).mkdir(exist_ok=True)
        (self.root / LOCK_DIR).mkdir(exist_ok=True)
        self._lock = threading.Lock()
        self._tenant_locks: dict[str, threading.Lock] = {}
        self._meta_cache: dict[tuple[str, str, int], tuple[tuple[int, int], VersionMeta]] = {}
        self._versions_cache: dict[str, tuple[tuple[int, int], list[int]]] = {}
        self._fusion_names: dict[str, tuple[tuple[int, int], list[str]]] = {}
        self._tag = f"{socket.gethostname()}-{os.getpid()}"
        self.cleanup()

    # -- housekeeping -------------------------------------------------------------------------
    def cleanup(self) -> None:
        """Remove leftovers of crashed uploads and deletes (stale ones only: replicas may share the root)."""
        now = time.time()
        for sub in (TMP_DIR, TRASH_DIR):
            for entry in (self.root / sub).iterdir():
                try:
                    if entry.name.startswith(self._tag + "-") or now - entry.stat().st_mtime > STALE_AFTER_S:
                        shutil.rmtree(entry, ignore_errors=True)
                except OSError:
                    pass

    def staging_dir(self) -> Path:
        """A fresh temp folder on the store's filesystem (so the final rename is atomic)."""
        path = self.root / TMP_DIR / f"{self._tag}-{uuid.uuid4().hex}"
        path.mkdir()
        return path

    # -- reading ------------------------------------------------------------------------------
    def adapter_dir(self, tenant: str, name: str) -> Path:
        return self.root / tenant / name

    def version_dir(self, tenant: str, name: str, version: int) -> Path:
        return self.root / tenant / name / str(version)

    def versions(self, tenant: str, name: str) -> list[int]:
        """Committed versions, ascending (a version folder exists only once fully written). The listing is
        cached per folder and re-read when the folder's inode or mtime changes (a version added or removed)."""
        path = self.adapter_dir(tenant, name)
        try:
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            return []
        stamp = (st.st_ino, st.st_mtime_ns)
        cached = self._versions_cache.get(str(path))
        if cached is not None and cached[0] == stamp:
            return list(cached[1])
        try:
            entries = os.listdir(path)
        except (FileNotFoundError, NotADirectoryError):
            return []
        found = sorted(int(e) for e in entries if e.isdigit())
        self._versions_cache[str(path)] = (stamp, found)
        return list(found)

    def meta(self, tenant: str, name: str, version: int) -> VersionMeta | None:
        """meta.json of one version; cached, but re-read if the file changed (another replica may have
        deleted and re-created the adapter on the shared volume)."""
        key = (tenant, name, version)
        path = self.version_dir(tenant, name, version) / META_FILE
        try:
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            self._meta_cache.pop(key, None)
            return None
        stamp = (st.st_ino, st.st_mtime_ns)
        cached = self._meta_cache.get(key)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        try:
            meta = VersionMeta.from_json(json.loads(path.read_text()))
        except FileNotFoundError:
            return None
        self._meta_cache[key] = (stamp, meta)
        return meta

    def latest(self, tenant: str, name: str) -> VersionMeta | None:
        """The newest version of an adapter, or None if the tenant has no such adapter."""
        if not NAME_RE.match(name):
            return None
        for version in reversed(self.versions(tenant, name)):
            meta = self.meta(tenant, name, version)
            if meta is not None:
                return meta
        return None

    def find(self, tenant: str, name: str) -> VersionMeta | None:
        """What `name` means to `tenant`: its own adapter, else a shared one (for the shared tenant: only shared)."""
        return self.latest(tenant, name) or self.latest(SHARED_TENANT, name)

    def find_fusion(self, tenant: str, adapters: tuple[str, ...]) -> VersionMeta | None:
        """The tenant's own AdapterFusion over exactly these adapters (in order), else a shared one."""
        for owner in (tenant, SHARED_TENANT):
            for meta in self.fusions(owner):
                if tuple(f["name"] for f in meta.fused) == adapters:
                    return meta
        return None

    def names(self, tenant: str) -> list[str]:
        try:
            entries = sorted(os.listdir(self.root / tenant))
        except FileNotFoundError:
            return []
        return [e for e in entries if NAME_RE.match(e) and self.versions(tenant, e)]

    def list(self, tenant: str) -> list[VersionMeta]:
        """The latest version of each of a tenant's adapters."""
        out = []
        for name in self.names(tenant):
            meta = self.latest(tenant, name)
            if meta is not None:
                out.append(meta)
        return out

    def fusions(self, tenant: str) -> list[VersionMeta]:
        """The latest version of each of a tenant's AdapterFusions. Which names are fusions is cached per tenant
        folder and re-read when its inode or mtime changes (a name added or removed): a name keeps its kind
        across versions, so a new version cannot turn an adapter into a fusion or back."""
        try:
            st = os.stat(self.root / tenant)
        except (FileNotFoundError, NotADirectoryError):
            return []
        stamp = (st.st_ino, st.st_mtime_ns)
        cached = self._fusion_names.get(tenant)
        if cached is None or cached[0] != stamp:
            cached = (stamp, [m.name for m in self.list(tenant) if m.method == "fusion"])
            self._fusion_names[tenant] = cached
        return [m for n in cached[1] if (m := self.latest(tenant, n)) is not None and m.method == "fusion"]

    def all_versions(self, tenant: str, name: str) -> list[VersionMeta]:
        return [m for v in self.versions(tenant, name) if (m := self.meta(tenant, name, v)) is not None]

    def usage(self, tenant: str) -> TenantUsage:
        """The tenant's adapter names and stored bytes, listed from the folders without the listing caches
        (a quota check must see what another upload committed a moment ago)."""
        names: list[str] = []
        size = 0
        try:
            entries = sorted(os.listdir(self.root / tenant))
        except FileNotFoundError:
            entries = []
        for name in filter(NAME_RE.match, entries):
            try:
                versions = [int(v) for v in os.listdir(self.adapter_dir(tenant, name)) if v.isdigit()]
            except (FileNotFoundError, NotADirectoryError):
                continue
            if versions:
                names.append(name)
                size += sum(m.size for v in versions if (m := self.meta(tenant, name, v)) is not None)
        return TenantUsage(tuple(names), size)

    @contextmanager
    def tenant_lock(self, tenant: str) -> Iterator[None]:
        """Hold one tenant's quota window (check, then commit) alone: a thread lock in this process, then an
        exclusive flock on <root>/.locks/<tenant>.lock, which also excludes other processes on this host,
        and replicas on other hosts where the shared filesystem implements flock across clients (NFSv4,
        CephFS and EFS do; see docs/operations.md)."""
        with self._lock:
            local = self._tenant_locks.setdefault(tenant, threading.Lock())
        with local, (self.root / LOCK_DIR / f"{tenant}.lock").open("a") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    # -- writing ------------------------------------------------------------------------------
    def commit(self, tenant: str, name: str, staged: Path, upload: Upload, uploader: str) -> VersionMeta:
        """Move a validated staging folder into place as the next version (fsync, then one rename)."""
        if not NAME_RE.match(name):
            raise ValueError(f"invalid adapter name {name!r}")
        files: dict[str, FileInfo] = {}
        for path in sorted(staged.iterdir()):
            if path.name == META_FILE:
                continue
            files[path.name] = FileInfo(file_sha256(path), path.stat().st_size)
        with self._lock:
            (self.root / tenant / name).mkdir(parents=True, exist_ok=True)
            for _attempt in range(100):
                current = self.versions(tenant, name)
                version = (current[-1] if current else 0) + 1
                meta = VersionMeta(
                    tenant=tenant, name=name, version=version,
                    created=datetime.now(UTC).isoformat(timespec="microseconds"), uploader=uploader,
                    method=upload.method, methods=upload.methods, has_head=upload.has_head, nbytes=upload.nbytes,
                    files=files, sha256=overall_sha256(files), size=sum(f.size for f in files.values()),
                    head=upload.head, extra=upload.extra,
                )
                meta_path = staged / META_FILE
                with meta_path.open("w") as f:
                    json.dump(meta.to_json(), f, indent=2, sort_keys=True)
                    f.flush()
                    os.fsync(f.fileno())
                _fsync_dir(staged)
                target = self.version_dir(tenant, name, version)
                try:
                    os.rename(staged, target)  # atomic; fails if another replica took this version
                except OSError:
                    if target.exists():
                        continue
                    raise
                self._versions_cache.pop(str(target.parent), None)  # its mtime may not have moved (coarse clocks)
                _fsync_dir(target.parent)
                _fsync_dir(target.parent.parent)
                log.info("stored %s/%s version %d (%s, %d bytes)", tenant, name, version, meta.method, meta.size)
                return meta
        raise RuntimeError(f"could not allocate a version for {tenant}/{name}")

    def delete(self, tenant: str, name: str) -> Path | None:
        """Atomically remove an adapter (all versions) from the store; returns its new home in the trash
        (removed by the caller once in-flight requests are done), or None if it did not exist."""
        src = self.adapter_dir(tenant, name)
        if not NAME_RE.match(name) or not src.is_dir():
            return None
        dest = self.root / TRASH_DIR / f"{self._tag}-{uuid.uuid4().hex}"
        with self._lock:
            os.rename(src, dest)
            _fsync_dir(src.parent)
            for key in [k for k in self._meta_cache if k[0] == tenant and k[1] == name]:
                del self._meta_cache[key]
        log.info("deleted %s/%s", tenant, name)
        return dest
