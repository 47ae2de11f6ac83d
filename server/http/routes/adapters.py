"""Adapter registry routes: upload (new adapter or version), list, get, delete."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from server.errors import InvalidName, UnknownAdapter
from server.http.auth import Principal, authenticate, owner_label
from server.http.deps import runtime_of
from server.http.multipart import read_form
from server.http.problems import ProblemError, problem_responses
from server.http.schemas import UPLOAD_SCHEMA, AdapterList, AdapterOut, Deleted, FileOut, FusedOut
from server.registry.store import SHARED_TENANT, VersionMeta
from server.registry.uploads import UploadLimits, check_name, ingest
from server.scheduling.runtime import Runtime

router = APIRouter(tags=["adapters"])
Auth = Annotated[Principal, Depends(authenticate)]
Rt = Annotated[Runtime, Depends(runtime_of)]
Shared = Annotated[bool, Query(description="admins: act on the shared adapters (visible to every tenant)")]


def adapter_out(meta: VersionMeta, versions: list[int] | None = None, shadowed: bool = False) -> AdapterOut:
    fuses = [FusedOut(name=f["name"], version=f["version"], owner=owner_label(f["tenant"])) for f in meta.fused] or None
    return AdapterOut(
        name=meta.name, version=meta.version, owner=owner_label(meta.tenant),
        sha256=meta.sha256, method=meta.method, methods=list(meta.methods), has_head=meta.has_head, head=meta.head,
        nbytes=meta.nbytes, size=meta.size, files={k: FileOut(sha256=v.sha256, size=v.size) for k, v in meta.files.items()},
        created=meta.created, uploader=meta.uploader, versions=versions, fuses=fuses,
        warnings=list(meta.extra.get("warnings", ())), shadowed=shadowed, lm_head=meta.extra.get("lm_head"),
    )


def _created(meta: VersionMeta) -> JSONResponse:
    body = adapter_out(meta, None).model_dump()
    return JSONResponse(body, status_code=201, headers={"Location": f"/v1/adapters/{meta.name}"})


async def _upload(rt: Runtime, request: Request, principal: Principal, name: str | None, shared: bool) -> VersionMeta:
    """Parse the form here, then store the version on a worker thread (the registry does the blocking work)."""
    tenant = principal.write_tenant(shared)
    fields, files, archive = await read_form(request)
    if name is None:
        name = check_name(fields.get("name"))
    elif "name" in fields and fields["name"] != name:
        raise InvalidName(f"form field name {fields['name']!r} differs from the URL's {name!r}")
    s = rt.settings
    limits = UploadLimits(s.max_upload_bytes, s.tenant_max_adapters, s.tenant_max_store_mb)
    try:
        return await run_in_threadpool(
            ingest, rt.store, rt.engine, tenant=tenant, name=name, files=files, archive=archive,
            uploader=principal.uploader, limits=limits,
        )
    finally:
        for part in (*files, *([archive] if archive else [])):
            await part.close()


UPLOAD_ERRORS = problem_responses(400, 401, 403, 404, 413, 415, 422, 503)


@router.post(
    "/v1/adapters", status_code=201, response_model=AdapterOut, responses=UPLOAD_ERRORS, openapi_extra=UPLOAD_SCHEMA,
    summary="Upload an adapter (a new name, or a new version of an existing one)",
)
async def upload_adapter(request: Request, principal: Auth, rt: Rt, shared: Shared = False) -> JSONResponse:
    meta = await _upload(rt, request, principal, None, shared)
    return _created(meta)


@router.post(
    "/v1/adapters/{name}/versions", status_code=201, response_model=AdapterOut, responses=UPLOAD_ERRORS,
    openapi_extra=UPLOAD_SCHEMA, summary="Upload a new version of an existing adapter",
)
async def upload_version(name: str, request: Request, principal: Auth, rt: Rt, shared: Shared = False) -> JSONResponse:
    tenant = principal.write_tenant(shared)
    if await run_in_threadpool(rt.store.latest, tenant, check_name(name)) is None:
        raise UnknownAdapter(f"no adapter named {name!r} for this tenant; POST /v1/adapters creates one")
    meta = await _upload(rt, request, principal, name, shared)
    return _created(meta)


@router.get(
    "/v1/adapters", response_model=AdapterList, responses=problem_responses(401, 503),
    summary="List your and the shared adapters (a shared one your own adapter hides is marked shadowed)",
)
async def list_adapters(principal: Auth, rt: Rt) -> AdapterList:
    own = await run_in_threadpool(rt.store.list, principal.tenant)
    shared = await run_in_threadpool(rt.store.list, SHARED_TENANT)
    mine = {m.name for m in own}
    return AdapterList(data=[adapter_out(m) for m in own] + [adapter_out(m, shadowed=m.name in mine) for m in shared])


@router.get("/v1/adapters/{name}", response_model=AdapterOut, responses=problem_responses(401, 404, 503), summary="One adapter (latest version)")
async def get_adapter(name: str, principal: Auth, rt: Rt) -> AdapterOut:
    def lookup() -> AdapterOut:
        meta = rt.store.find(principal.tenant, name)
        if meta is None:
            raise UnknownAdapter(f"no adapter named {name!r} for this tenant")
        return adapter_out(meta, rt.store.versions(meta.tenant, meta.name))

    return await run_in_threadpool(lookup)


@router.delete(
    "/v1/adapters/{name}", response_model=Deleted, responses=problem_responses(401, 403, 404, 503),
    summary="Delete an adapter (all versions); requests already queued still finish",
)
async def delete_adapter(name: str, principal: Auth, rt: Rt, shared: Shared = False) -> Deleted:
    tenant = principal.write_tenant(shared)

    def delete() -> Deleted:
        metas = rt.store.all_versions(tenant, name)
        if not metas:
            if not shared and rt.store.latest(SHARED_TENANT, name) is not None:
                raise ProblemError(403, "forbidden", f"{name!r} is a shared adapter; admins delete it with ?shared=true")
            raise UnknownAdapter(f"no adapter named {name!r} for this tenant")
        trash = rt.store.delete(tenant, name)
        if trash is not None:
            rt.residency.retire(metas, trash)
        return Deleted(name=name, versions=[m.version for m in metas])

    return await run_in_threadpool(delete)
