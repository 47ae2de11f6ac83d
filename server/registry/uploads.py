"""One upload after the HTTP edge parsed it: parts -> staging folder -> checks -> quotas -> atomic commit.

Everything here blocks (file copies, hashing, fsync, the meta-device shape check), so the caller runs `ingest`
on a worker thread; it takes plain values (tenant, uploader, limits), never a request or a principal.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from server.errors import InvalidName, QuotaExceeded, UploadRejected
from server.registry.archives import extract_archive
from server.registry.intake import ByteBudget, UploadBudget, accepted_name, clear, copy_limited
from server.registry.lm_head import BackboneHead, lm_head_in
from server.registry.store import NAME_RE, SHARED_TENANT, AdapterStore, Upload, VersionMeta
from server.registry.validation import Inspector, validate_upload

log = logging.getLogger("adapterserve.uploads")


class FilePart(Protocol):
    """One uploaded file as the HTTP edge received it (a multipart part: its filename and a readable file)."""

    filename: str | None
    file: BinaryIO


@dataclass(frozen=True)
class UploadLimits:
    """The limits one upload is held to (from the settings)."""

    max_upload_bytes: int
    tenant_max_adapters: int
    tenant_max_store_mb: float

    @property
    def tenant_max_store_bytes(self) -> int:
        return int(self.tenant_max_store_mb * 1024 * 1024)


def check_name(name: object) -> str:
    """`name` if the store can hold an adapter of that name, else InvalidName."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise InvalidName(f"adapter name must match {NAME_RE.pattern}, got {name!r}")
    return name


def upload_budget(max_upload_bytes: int, lm_head: BackboneHead | None) -> UploadBudget:
    """The upload limit for the adapter's files; on a causal LM backbone a budget of its own for an LM head."""
    return UploadBudget(ByteBudget(max_upload_bytes), None if lm_head is None else lm_head.budget(max_upload_bytes))


def _stage(staged: Path, files: Sequence[FilePart], archive: FilePart | None, budget: UploadBudget) -> None:
    """Copy the parts (or unpack the archive) into `staged`, each file within its budget, streamed in chunks."""
    if archive is not None:
        raw = staged.parent / (staged.name + ".archive")
        try:
            archive.file.seek(0)
            copy_limited(archive.file, raw, ByteBudget(budget.limit))
            extract_archive(raw, archive.filename or "archive", staged, budget)
        finally:
            raw.unlink(missing_ok=True)
        return
    seen: set[str] = set()
    for part in files:
        base = accepted_name(part.filename)
        if base is None:
            continue
        if base in seen:
            raise UploadRejected(422, "bad-upload", f"{base} was sent twice")
        seen.add(base)
        part.file.seek(0)
        copy_limited(part.file, staged / base, budget.for_file(base))


def _member(store: AdapterStore, tenant: str, name: str) -> tuple[VersionMeta, Path] | None:
    """An adapter a fusion stored under `tenant` may fuse: the tenant's own, else a shared one (a shared
    fusion, visible to every tenant, may fuse shared adapters only)."""
    meta = store.find(tenant, name)
    return None if meta is None else (meta, store.version_dir(meta.tenant, meta.name, meta.version))


def _check_kind(store: AdapterStore, tenant: str, name: str, upload: Upload) -> None:
    """A name stays an adapter or an AdapterFusion across its versions (requests address the two differently)."""
    previous = store.latest(tenant, name)
    if previous is not None and (previous.method == "fusion") != (upload.method == "fusion"):
        kinds = ("an AdapterFusion", "an adapter") if previous.method == "fusion" else ("an adapter", "an AdapterFusion")
        raise UploadRejected(422, "kind-change", f"{name!r} is {kinds[0]}; a new version cannot be {kinds[1]}; use another name")


def _check_quota(store: AdapterStore, tenant: str, name: str, staged: Path, limits: UploadLimits) -> None:
    """Run under store.tenant_lock(tenant), so no other upload of the tenant commits between check and commit."""
    if tenant == SHARED_TENANT:
        return
    usage = store.usage(tenant)
    if name not in usage.names and len(usage.names) >= limits.tenant_max_adapters:
        raise QuotaExceeded(f"tenant {tenant!r} already has {limits.tenant_max_adapters} adapters (the quota); delete one first")
    incoming = sum(p.stat().st_size for p in staged.iterdir())
    if usage.nbytes + incoming > limits.tenant_max_store_bytes:
        raise QuotaExceeded(f"tenant {tenant!r} would exceed its storage quota of {limits.tenant_max_store_mb:g} MiB")


def ingest(
    store: AdapterStore, inspector: Inspector, *, tenant: str, name: str, files: Sequence[FilePart],
    archive: FilePart | None, uploader: str, limits: UploadLimits,
) -> VersionMeta:
    """Store a new version of `tenant`'s `name` from the parts; nothing is stored unless every check passes.
    The inspector probes a meta-device copy of the architecture, so this need not wait for the inference thread.
    Only an LM head's file may go beyond the upload limit (server.registry.lm_head), and it is never stored: one
    equal to the backbone's LM head is dropped, any other is refused."""
    staged = store.staging_dir()
    try:
        budget = upload_budget(limits.max_upload_bytes, inspector.lm_head)
        _stage(staged, files, archive, budget)
        if budget.head is not None and lm_head_in(staged) is None:
            budget.charge_head_to_main()
        upload = validate_upload(staged, inspector, lambda n: _member(store, tenant, n))
        with store.tenant_lock(tenant):
            _check_kind(store, tenant, name, upload)
            _check_quota(store, tenant, name, staged, limits)
            return store.commit(tenant, name, staged, upload, uploader)
    finally:
        clear(staged)
