"""One upload, start to finish: multipart parts -> staging folder -> checks -> quotas -> atomic commit."""

from __future__ import annotations

import logging
from pathlib import Path

from fastapi import Request
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException

from server.http.auth import SHARED_TENANT, Principal
from server.http.problems import ProblemError
from server.registry.intake import ByteBudget, accepted_name, clear, copy_limited, extract_archive
from server.registry.store import NAME_RE, Upload, VersionMeta
from server.registry.validation import validate_upload
from server.scheduling.runtime import Runtime

log = logging.getLogger("adapterserve.uploads")
MAX_PARTS = 16


def owner_tenant(principal: Principal, shared: bool) -> str:
    """Where a write goes: the caller's tenant, or the shared tenant for admins."""
    if not shared:
        return principal.tenant
    if not principal.is_admin:
        raise ProblemError(403, "forbidden", "only admin keys may manage shared adapters")
    return SHARED_TENANT


def check_name(name: object) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ProblemError(422, "invalid-name", f"adapter name must match {NAME_RE.pattern}, got {name!r}")
    return name


async def read_form(request: Request) -> tuple[dict[str, str], list[UploadFile], UploadFile | None]:
    """Parse the multipart body (size is limited by the middleware and the byte budget)."""
    ctype = request.headers.get("content-type", "")
    if not ctype.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        raise ProblemError(415, "unsupported-media-type", "upload adapters as multipart/form-data (fields: name, files or archive)")
    try:
        form = await request.form(max_files=MAX_PARTS, max_fields=MAX_PARTS, max_part_size=64 * 1024)
    except MultiPartException as exc:
        raise ProblemError(400, "bad-multipart", f"cannot parse the multipart body: {exc.message}") from None
    fields: dict[str, str] = {}
    files: list[UploadFile] = []
    archive: UploadFile | None = None
    for key, value in form.multi_items():
        if isinstance(value, UploadFile):
            if key == "files":
                files.append(value)
            elif key == "archive":
                if archive is not None:
                    raise ProblemError(422, "bad-upload", "send one `archive` part")
                archive = value
            else:
                raise ProblemError(422, "bad-upload", f"unexpected file part {key!r}; use `files` or `archive`")
        else:
            fields[key] = value
    if files and archive is not None:
        raise ProblemError(422, "bad-upload", "send either `files` parts or one `archive` part, not both")
    if not files and archive is None:
        raise ProblemError(422, "bad-upload", "no adapter files: send `files` parts or one `archive` part")
    return fields, files, archive


def _stage(staged: Path, files: list[UploadFile], archive: UploadFile | None, limit: int) -> None:
    budget = ByteBudget(limit)
    if archive is not None:
        raw = staged.parent / (staged.name + ".archive")
        try:
            archive.file.seek(0)
            copy_limited(archive.file, raw, ByteBudget(limit))
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
            raise ProblemError(422, "bad-upload", f"{base} was sent twice")
        seen.add(base)
        part.file.seek(0)
        copy_limited(part.file, staged / base, budget)


def _member(rt: Runtime, tenant: str, name: str) -> tuple[VersionMeta, Path] | None:
    """An adapter a fusion stored under `tenant` may fuse: the tenant's own, else a shared one (a shared
    fusion, visible to every tenant, may fuse shared adapters only)."""
    meta = rt.find_for(tenant, name)
    return None if meta is None else (meta, rt.store.version_dir(meta.tenant, meta.name, meta.version))


def _check_kind(rt: Runtime, tenant: str, name: str, upload: Upload) -> None:
    """A name stays an adapter or an AdapterFusion across its versions (requests address the two differently)."""
    previous = rt.store.latest(tenant, name)
    if previous is not None and (previous.method == "fusion") != (upload.method == "fusion"):
        kinds = ("an AdapterFusion", "an adapter") if previous.method == "fusion" else ("an adapter", "an AdapterFusion")
        raise ProblemError(422, "kind-change", f"{name!r} is {kinds[0]}; a new version cannot be {kinds[1]}; use another name")


def _check_quota(rt: Runtime, tenant: str, name: str, staged: Path) -> None:
    if tenant == SHARED_TENANT:
        return
    if not rt.store.versions(tenant, name) and len(rt.store.names(tenant)) >= rt.settings.tenant_max_adapters:
        raise ProblemError(
            403, "quota-exceeded", f"tenant {tenant!r} already has {rt.settings.tenant_max_adapters} adapters (the quota); delete one first"
        )
    incoming = sum(p.stat().st_size for p in staged.iterdir())
    if rt.store.tenant_bytes(tenant) + incoming > rt.settings.tenant_max_store_bytes:
        raise ProblemError(403, "quota-exceeded", f"tenant {tenant!r} would exceed its storage quota of {rt.settings.tenant_max_store_mb:g} MiB")


async def ingest(rt: Runtime, request: Request, principal: Principal, name: str | None, shared: bool) -> VersionMeta:
    """Store a new version of `name` (from the form when None); nothing is stored unless every check passes."""
    tenant = owner_tenant(principal, shared)
    fields, files, archive = await read_form(request)
    if name is None:
        name = check_name(fields.get("name"))
    elif "name" in fields and fields["name"] != name:
        raise ProblemError(422, "invalid-name", f"form field name {fields['name']!r} differs from the URL's {name!r}")
    staged = rt.store.staging_dir()
    try:
        await run_in_threadpool(_stage, staged, files, archive, rt.settings.max_upload_bytes)
        # the library probes a meta-device copy of the architecture, so this need not wait for the inference thread
        upload = await run_in_threadpool(validate_upload, staged, rt.engine, lambda n: _member(rt, tenant, n))
        _check_kind(rt, tenant, name, upload)
        _check_quota(rt, tenant, name, staged)
        uploader = f"{principal.tenant}:{principal.key_id}"
        return await run_in_threadpool(rt.store.commit, tenant, name, staged, upload, uploader)
    finally:
        clear(staged)
        for part in (*files, *([archive] if archive else [])):
            await part.close()
