"""The admin REST API under /admin/api (in the app's OpenAPI document). Thin: AdminService decides and audits."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request, Security
from fastapi.responses import FileResponse
from fastapi.security import HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from bastion.audit.search import AuditQuery
from bastion.config.schema import MAX_TENANT_WEIGHT, MIN_TENANT_WEIGHT, LimitsConfig
from bastion.control import audit_view, pool_view
from bastion.control.admin import key_view, parse_time, tenant_view
from bastion.control.deps import api_principal, context
from bastion.control.errors import bad_request, not_found
from bastion.control.principal import Principal
from bastion.pool.catalog import PoolError
from bastion.tenancy.apis import ApiName
from bastion.tenancy.usage import acceptance_by_profile


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorBody(BaseModel):
    """Every error of the admin API (control/errors.py); declared so clients and schemathesis know each answer."""

    error: ErrorDetail


_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "The body is not valid UTF-8 or cannot be parsed"},
    401: {"model": ErrorBody, "description": "No credential, or a refused bearer token"},
    403: {"model": ErrorBody, "description": "The role does not allow this, or a missing CSRF token"},
    404: {"model": ErrorBody, "description": "Not found (also another tenant's things, for a tenant-admin)"},
    409: {"model": ErrorBody, "description": "Already exists"},
    422: {"model": ErrorBody, "description": "Invalid body, path or query value"},
    429: {"model": ErrorBody, "description": "Too many failed authentications from this address (Retry-After)"},
    503: {"model": ErrorBody, "description": "The database is unavailable (Retry-After)"},
}
_BEARER = HTTPBearer(auto_error=False, description="A JWT from the Keycloak realm (api_principal checks it)")
router = APIRouter(prefix="/admin/api", tags=["admin"], responses=_ERRORS, dependencies=[Security(_BEARER)])
Who = Annotated[Principal, Depends(api_principal)]
Period = Annotated[str, StringConstraints(pattern=r"^\d{4}-\d{2}(-\d{2})?$")]  # a month or a day


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


# A tenant's share of a full profile's fair queue; null: the platform file's `gateway.tenant_weights`, else 1.
Weight = Annotated[
    float | None,
    Field(default=None, ge=MIN_TENANT_WEIGHT, le=MAX_TENANT_WEIGHT, allow_inf_nan=False, strict=True),
]


class TenantCreate(Body):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    allowed_models: list[str] = Field(default_factory=list)
    allowed_profiles: list[str] = Field(default_factory=list)
    default_profile: str | None = None
    limits: LimitsConfig | None = None
    fair_share_weight: Weight = None
    log_content: bool = Field(default=False, description="store prompts and completions, encrypted, in the audit log")
    allowed_apis: list[ApiName] = Field(default_factory=list, description="The APIs the tenant may use; empty: all")


class TenantUpdate(Body):
    allowed_models: list[str] | None = None
    allowed_profiles: list[str] | None = None
    default_profile: str | None = None
    clear_default_profile: bool = False
    fair_share_weight: Weight = None
    clear_fair_share_weight: bool = False
    log_content: bool | None = Field(default=None, description="store prompts and completions (encrypted) or stop")
    allowed_apis: list[ApiName] | None = Field(default=None, description="The APIs the tenant may use; empty: all")


class KeyCreate(Body):
    name: str = Field(default="", max_length=64)
    scopes: list[str] = Field(default_factory=lambda: ["inference"])
    expires_at: datetime | None = None


class KeyRotate(Body):
    grace_seconds: int = Field(default=86_400, ge=0, le=30 * 86_400)


class ExportRequest(Body):
    format: Literal["jsonl", "csv", "parquet"] = "jsonl"
    tenant: str | None = None
    time_from: str | None = Field(default=None, alias="from")
    time_to: str | None = Field(default=None, alias="to")


def _created(created: Any) -> dict[str, Any]:
    return {"key": key_view(created.info), "secret": created.token}


@router.get("/me")
async def me(who: Who) -> dict[str, Any]:
    return who.as_dict()


# --- tenants -------------------------------------------------------------------------------------------


@router.get("/tenants")
async def list_tenants(request: Request, who: Who) -> list[dict[str, Any]]:
    return [tenant_view(t) for t in await context(request).admin.list_tenants(who)]


@router.post("/tenants", status_code=201)
async def create_tenant(request: Request, who: Who, body: TenantCreate) -> dict[str, Any]:
    fields = body.model_dump(exclude={"name", "limits"})
    info = await context(request).admin.create_tenant(who, body.name, limits=body.limits, **fields)
    return tenant_view(info)


@router.get("/tenants/{tenant}")
async def get_tenant(request: Request, who: Who, tenant: str) -> dict[str, Any]:
    admin = context(request).admin
    admin.require(who, tenant_admin=True)
    return tenant_view(await admin.tenant(who, tenant))


@router.patch("/tenants/{tenant}")
async def update_tenant(request: Request, who: Who, tenant: str, body: TenantUpdate) -> dict[str, Any]:
    return tenant_view(await context(request).admin.update_tenant(who, tenant, **body.model_dump()))


@router.post("/tenants/{tenant}/suspend")
async def suspend_tenant(request: Request, who: Who, tenant: str) -> dict[str, Any]:
    return tenant_view(await context(request).admin.set_status(who, tenant, "suspended"))


@router.post("/tenants/{tenant}/resume")
async def resume_tenant(request: Request, who: Who, tenant: str) -> dict[str, Any]:
    return tenant_view(await context(request).admin.set_status(who, tenant, "active"))


# --- limits and budgets --------------------------------------------------------------------------------


@router.get("/tenants/{tenant}/limits")
async def get_tenant_limits(request: Request, who: Who, tenant: str) -> dict[str, Any]:
    return await context(request).admin.get_limits(who, tenant)


@router.put("/tenants/{tenant}/limits")
async def set_tenant_limits(request: Request, who: Who, tenant: str, body: LimitsConfig) -> dict[str, Any]:
    await context(request).admin.set_limits(who, tenant, body)
    return body.model_dump()


@router.get("/tenants/{tenant}/keys/{key}/limits")
async def get_key_limits(request: Request, who: Who, tenant: str, key: str) -> dict[str, Any]:
    return await context(request).admin.get_limits(who, tenant, key_id=await _key_id(request, who, tenant, key))


@router.put("/tenants/{tenant}/keys/{key}/limits")
async def set_key_limits(request: Request, who: Who, tenant: str, key: str, body: LimitsConfig) -> dict[str, Any]:
    key_id = await _key_id(request, who, tenant, key)
    await context(request).admin.set_limits(who, tenant, body, key_id=key_id)
    return body.model_dump()


async def _key_id(request: Request, who: Who, tenant: str, key: str) -> str:
    admin = context(request).admin
    admin.require(who, tenant_admin=True)
    for info in await admin.list_keys(who, tenant):
        if key in (info.id, info.prefix):
            return info.id
    raise not_found("API key")


# --- keys ----------------------------------------------------------------------------------------------


@router.get("/tenants/{tenant}/keys")
async def list_keys(request: Request, who: Who, tenant: str) -> list[dict[str, Any]]:
    return [key_view(k) for k in await context(request).admin.list_keys(who, tenant)]


@router.post("/tenants/{tenant}/keys", status_code=201)
async def create_key(request: Request, who: Who, tenant: str, body: KeyCreate) -> dict[str, Any]:
    """The response's `secret` is the only time the key's secret is ever shown."""
    created = await context(request).admin.create_key(
        who, tenant, name=body.name, scopes=body.scopes, expires_at=body.expires_at
    )
    return _created(created)


@router.post("/tenants/{tenant}/keys/{key}/rotate", status_code=201)
async def rotate_key(request: Request, who: Who, tenant: str, key: str, body: KeyRotate | None = None) -> dict:
    grace = (body or KeyRotate()).grace_seconds
    return _created(await context(request).admin.rotate_key(who, tenant, key, grace))


@router.post("/tenants/{tenant}/keys/{key}/revoke")
async def revoke_key(request: Request, who: Who, tenant: str, key: str) -> dict[str, Any]:
    return key_view(await context(request).admin.revoke_key(who, tenant, key))


# --- usage ---------------------------------------------------------------------------------------------


@router.get("/tenants/{tenant}/usage")
async def usage(
    request: Request, who: Who, tenant: str, period: Annotated[list[Period] | None, Query()] = None
) -> list[dict[str, Any]]:
    """Counters per period (`2026-11-29` days, `2026-11` months), model and profile; filter with `period=`."""
    return await context(request).admin.usage(who, tenant, periods=period)


# --- audit ---------------------------------------------------------------------------------------------


@router.get("/audit/events")
async def audit_events(
    request: Request,
    who: Who,
    tenant: str | None = None,
    kind: str | None = None,
    actor: str | None = None,
    time_from: Annotated[str | None, Query(alias="from")] = None,
    time_to: Annotated[str | None, Query(alias="to")] = None,
    before_id: int | None = None,
    limit: int = 100,
) -> list[dict[str, Any]]:
    ctx = context(request)
    scope = await ctx.admin.audit_scope(who, tenant)
    query = AuditQuery(
        tenant_id=scope,
        kind=kind or None,
        actor=actor or None,
        start=parse_time(time_from, "from"),
        end=parse_time(time_to, "to"),
        before_id=before_id,
        limit=limit,
    )
    return await audit_view.search(ctx.admin.engine, query)


@router.post("/audit/exports", status_code=201)
async def create_export(request: Request, who: Who, body: ExportRequest) -> dict[str, Any]:
    ctx = context(request)
    scope = await ctx.admin.audit_scope(who, body.tenant)
    meta = await audit_view.run_export(
        ctx.admin.config,
        body.format,
        actor=who.actor,
        tenant_id=scope,
        start=parse_time(body.time_from, "from"),
        end=parse_time(body.time_to, "to"),
    )
    return {**meta, "download": f"/admin/api/audit/exports/{meta['id']}"}


@router.get("/audit/exports/{export_id}", response_class=FileResponse)
async def download_export(request: Request, who: Who, export_id: str) -> FileResponse:
    ctx = context(request)
    scope = await ctx.admin.audit_scope(who, None)
    found = audit_view.find_export(ctx.admin.config, export_id)
    if found is None or (scope is not None and found[0].get("tenant_id") != scope):
        raise not_found("export")
    meta, path = found
    return FileResponse(path, media_type="application/zip", filename=f"bastion-audit-{meta['id']}.zip")


# --- pool, profiles and capacity -----------------------------------------------------------------------


@router.get("/pool")
async def pool(request: Request, who: Who) -> dict[str, Any]:
    """Profiles and deployments from the platform file, each with its live replicas (health, queue depth, tok/s,
    acceptance, counters) as the gateway's Serve routers last saw them, and Serve's status of the deployment."""
    ctx = context(request)
    ctx.admin.require(who)
    return await pool_view.pool_status(ctx.admin.config, ctx.stats, await ctx.admin.tenant_names())


@router.get("/pool/live")
async def pool_live(request: Request, who: Who) -> dict[str, Any]:
    """Recent tok/s and draft acceptance per profile, one point per poll of the gateway (in this control-plane
    replica's memory: `control.pool_stats_history` points every `control.pool_stats_interval_s`)."""
    ctx = context(request)
    ctx.admin.require(who)
    history = pool_view.live_history(ctx.stats)
    if history is None:
        raise not_found("live pool statistics (no gateway connected)")
    return history


@router.get("/pool/acceptance")
async def acceptance(request: Request, who: Who, days: int = Query(default=30, ge=1, le=366)) -> dict[str, Any]:
    ctx = context(request)
    ctx.admin.require(who)
    return await acceptance_by_profile(ctx.admin.sessions, days)


@router.get("/pool/capacity")
async def capacity(request: Request, who: Who) -> list[dict[str, Any]]:
    ctx = context(request)
    ctx.admin.require(who)
    return pool_view.configured_capacity(ctx.admin.config)


@router.post("/pool/plan")
async def plan(request: Request, who: Who, body: pool_view.PlanRequest) -> list[dict[str, Any]]:
    ctx = context(request)
    ctx.admin.require(who)
    try:
        return pool_view.plan_for(ctx.admin.config, body)
    except PoolError as exc:
        raise bad_request(str(exc)) from None
