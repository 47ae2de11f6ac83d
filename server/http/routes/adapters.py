"""Adapter registry routes: upload (new adapter or version), list, get, delete."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from server.http.auth import SHARED_TENANT, Principal, authenticate, owner_label
from server.http.problems import ProblemError, problem_responses
from server.http.schemas import UPLOAD_SCHEMA, AdapterList, AdapterOut, Deleted, FileOut, FusedOut
from server.registry.store import VersionMeta
from server.registry.uploads import check_name, ingest, owner_tenant
from server.scheduling.runtime import Runtime, runtime_of

router = APIRouter(tags=["adapters"])
Auth = Annotated[Principal, Depends(authenticate)]
Rt = Annotated[Runtime, Depends(runtime_of)]
Shared = Annotated[bool, Query(description="admins: act on the shared adapters (visible to every tenant)")]


def adapter_out(meta: VersionMeta, versions: list[int] | None = None) -> AdapterOut:
    fuses = [FusedOut(name=f["name"], version=f["version"], owner=owner_label(f["tenant"])) for f in meta.fused] or None
    return AdapterOut(
        name=meta.name, version=meta.version, owner=owner_label(meta.tenant),
        sha256=meta.sha256, method=meta.method, methods=list(meta.methods), has_head=meta.has_head, head=meta.head,
        nbytes=meta.nbytes, size=meta.size, files={k: FileOut(sha256=v.sha256, size=v.size) for k, v in meta.files.items()},
        created=meta.created, uploader=meta.uploader, versions=versions, fuses=fuses,
    )


def _created(meta: VersionMeta) -> JSONResponse:
    body = adapter_out(meta, None).model_dump()
    return JSONResponse(body, status_code=201, headers={"Location": f"/v1/adapters/{meta.name}"})


UPLOAD_ERRORS = problem_responses(400, 401, 403, 404, 413, 415, 422, 503)


@router.post(
    "/v1/adapters", status_code=201, response_model=AdapterOut, responses=UPLOAD_ERRORS, openapi_extra=UPLOAD_SCHEMA,
    summary="Upload an adapter (a new name, or a new version of an existing one)",
)
async def upload_adapter(request: Request, principal: Auth, rt: Rt, shared: Shared = False) -> JSONResponse:
    meta = await ingest(rt, request, principal, None, shared)
    return _created(meta)


@router.post(
    "/v1/adapters/{name}/versions", status_code=201, response_model=AdapterOut, responses=UPLOAD_ERRORS,
    openapi_extra=UPLOAD_SCHEMA, summary="Upload a new version of an existing adapter",
)
async def upload_version(name: str, request: Request, principal: Auth, rt: Rt, shared: Shared = False) -> JSONResponse:
    tenant = owner_tenant(principal, shared)
    if rt.store.latest(tenant, check_name(name)) is None:
        raise ProblemError(404, "unknown-adapter", f"no adapter named {name!r} for this tenant; POST /v1/adapters creates one")
    meta = await ingest(rt, request, principal, name, shared)
    return _created(meta)


@router.get("/v1/adapters", response_model=AdapterList, responses=problem_responses(401, 503), summary="List your and the shared adapters")
async def list_adapters(principal: Auth, rt: Rt) -> AdapterList:
    own = await run_in_threadpool(rt.store.list, principal.tenant)
    shared = await run_in_threadpool(rt.store.list, SHARED_TENANT)
    return AdapterList(data=[adapter_out(m) for m in own + shared])


@router.get("/v1/adapters/{name}", response_model=AdapterOut, responses=problem_responses(401, 404, 503), summary="One adapter (latest version)")
async def get_adapter(name: str, principal: Auth, rt: Rt) -> AdapterOut:
    meta = rt.find(principal, name)
    if meta is None:
        raise ProblemError(404, "unknown-adapter", f"no adapter named {name!r} for this tenant")
    return adapter_out(meta, rt.store.versions(meta.tenant, meta.name))


@router.delete(
    "/v1/adapters/{name}", response_model=Deleted, responses=problem_responses(401, 403, 404, 503),
    summary="Delete an adapter (all versions); requests already queued still finish",
)
async def delete_adapter(name: str, principal: Auth, rt: Rt, shared: Shared = False) -> Deleted:
    tenant = owner_tenant(principal, shared)
    metas = rt.store.all_versions(tenant, name)
    if not metas:
        if not shared and rt.store.latest(SHARED_TENANT, name) is not None:
            raise ProblemError(403, "forbidden", f"{name!r} is a shared adapter; admins delete it with ?shared=true")
        raise ProblemError(404, "unknown-adapter", f"no adapter named {name!r} for this tenant")
    trash = await run_in_threadpool(rt.store.delete, tenant, name)
    if trash is not None:
        rt.residency.retire(metas, trash)
    return Deleted(name=name, versions=[m.version for m in metas])
