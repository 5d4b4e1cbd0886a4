"""The web console: server-rendered pages (Jinja2, htmx for partial refreshes), login and logout.

Every form carries the session's CSRF token; the login form carries a pre-session one from the login cookie.
The pages call the same AdminService as the REST API, so a role sees exactly what the API would give it.
"""

from __future__ import annotations

import asyncio
import math
import secrets
import time
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Form, Request
from fastapi.responses import FileResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from bastion.audit.events import KINDS
from bastion.audit.search import AuditQuery
from bastion.config.schema import LimitsConfig, weight_problem
from bastion.control import audit_view, pool_view
from bastion.control.admin import key_view, parse_time, tenant_view
from bastion.control.deps import client_address, context, principal_from_session, session_of, throttled
from bastion.control.errors import ControlError, not_found
from bastion.control.local_admin import check_local_admin
from bastion.control.principal import PLATFORM_ADMIN, Principal
from bastion.control.session import LOGIN_COOKIE, SESSION_COOKIE, csrf_ok
from bastion.tenancy.usage import acceptance_by_profile

router = APIRouter(include_in_schema=False)
templates = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))
LOGIN_TTL_S = 600


class LoginRequired(Exception):
    """Raised by console pages without a session: the app answers with a redirect to /login."""


def _cookie(request: Request, response: Response, name: str, value: str, max_age: int) -> None:
    settings = context(request).settings
    response.set_cookie(
        name, value, max_age=max_age, httponly=True, secure=settings.cookie_secure, samesite="lax", path="/"
    )


def _who(request: Request) -> tuple[Principal, dict[str, Any]]:
    data = session_of(request)
    if data is None:
        raise LoginRequired
    return principal_from_session(data), data


def _check_csrf(data: dict[str, Any], token: str) -> None:
    if not csrf_ok(data, token):
        raise ControlError(403, "csrf", "the form expired or did not come from this console; reload and retry")


def _page(request: Request, name: str, data: dict[str, Any], who: Principal, status: int = 200, **ctx: Any):
    return templates.TemplateResponse(
        request, name, {"who": who, "csrf": data.get("csrf", ""), "page": name.removesuffix(".html"), **ctx}, status
    )


def _base(request: Request) -> str:
    public = context(request).settings.public_url
    return (public or str(request.base_url)).rstrip("/")


# --- login and logout ----------------------------------------------------------------------------------


@router.get("/")
async def index(request: Request) -> Response:
    return RedirectResponse("/console/tenants" if session_of(request) else "/login", status_code=303)


@router.get("/login")
async def login(request: Request) -> Response:
    ctx = context(request)
    if ctx.login is not None:
        url, state = await ctx.login.start(f"{_base(request)}/auth/callback")
        response: Response = RedirectResponse(url, status_code=303)
        _cookie(request, response, LOGIN_COOKIE, ctx.codec.seal(LOGIN_COOKIE, state, LOGIN_TTL_S), LOGIN_TTL_S)
        return response
    csrf = secrets.token_urlsafe(24)
    response = templates.TemplateResponse(request, "login.html", {"csrf": csrf, "who": None, "error": None})
    _cookie(request, response, LOGIN_COOKIE, ctx.codec.seal(LOGIN_COOKIE, {"csrf": csrf}, LOGIN_TTL_S), LOGIN_TTL_S)
    return response


@router.post("/login")
async def local_login(
    request: Request, username: str = Form(""), password: str = Form(""), csrf_token: str = Form("")
) -> Response:
    ctx = context(request)
    pending = ctx.codec.open(LOGIN_COOKIE, request.cookies.get(LOGIN_COOKIE))
    if ctx.login is not None or pending is None or not csrf_ok(pending, csrf_token):
        return RedirectResponse("/login", status_code=303)
    address = client_address(request)
    if ctx.guard is not None and (wait := ctx.guard.retry_after(address)) is not None:
        raise throttled(wait)
    ok = await asyncio.to_thread(check_local_admin, ctx.settings.data_dir, username, password)
    if not ok:
        ctx.metrics["logins"].labels("failed").inc()
        if ctx.guard is not None and (wait := await ctx.guard.failed(address)) is not None:
            raise throttled(wait)
        await asyncio.sleep(0.5)  # slows guessing; the password is 144 random bits anyway
        return templates.TemplateResponse(
            request, "login.html", {"csrf": pending["csrf"], "who": None, "error": "Wrong user name or password."}, 401
        )
    who = Principal(subject=username, username=username, roles=frozenset({PLATFORM_ADMIN}), via="local")
    return _signed_in(request, who)


@router.get("/auth/callback")
async def callback(request: Request, code: str = "", state: str = "", error: str = "") -> Response:
    ctx = context(request)
    pending = ctx.codec.open(LOGIN_COOKIE, request.cookies.get(LOGIN_COOKIE))
    if ctx.login is None or pending is None or not state or not secrets.compare_digest(state, pending.get("state", "")):
        raise ControlError(400, "login_failed", "this login is unknown or expired; start again")
    if error or not code:
        raise ControlError(400, "login_failed", "the identity provider did not complete the login")
    try:
        who = await ctx.login.finish(code, pending)
    except ControlError:
        ctx.metrics["logins"].labels("failed").inc()
        raise
    return _signed_in(request, who)


def _signed_in(request: Request, who: Principal) -> Response:
    ctx = context(request)
    ctx.metrics["logins"].labels("ok").inc()
    data = {
        "sub": who.subject,
        "user": who.username,
        "roles": sorted(who.roles),
        "tenant": who.tenant,
        "via": who.via,
        "csrf": secrets.token_urlsafe(24),
    }
    ttl = ctx.settings.session_ttl_s
    start = "/console/tenants" if (who.is_platform_admin or who.is_tenant_admin) else "/console/audit"
    response = RedirectResponse(start, status_code=303)
    _cookie(request, response, SESSION_COOKIE, ctx.codec.seal(SESSION_COOKIE, data, ttl), ttl)
    response.delete_cookie(LOGIN_COOKIE, path="/")
    return response


@router.post("/logout")
async def logout(request: Request, csrf_token: str = Form("")) -> Response:
    ctx = context(request)
    data = session_of(request)
    if data is not None:
        _check_csrf(data, csrf_token)
    target = ctx.login.logout_url(f"{_base(request)}/login") if ctx.login is not None else "/login"
    response = RedirectResponse(target, status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


# --- tenants and keys ----------------------------------------------------------------------------------


@router.get("/console/tenants")
async def tenants_page(request: Request) -> Response:
    who, data = _who(request)
    admin = context(request).admin
    tenants = [tenant_view(t) for t in await admin.list_tenants(who)]
    for t in tenants:  # the weight the fair queue uses: the record's, else the platform file's, else 1
        t["file_weight"] = admin.config.gateway.tenant_weights.get(t["name"], 1.0)
    return _page(request, "tenants.html", data, who, tenants=tenants, profiles=list(admin.config.profiles))


@router.post("/console/tenants")
async def tenants_create(
    request: Request,
    csrf_token: str = Form(""),
    name: str = Form(""),
    requests_per_minute: str = Form(""),
    tokens_per_minute: str = Form(""),
    monthly_token_budget: str = Form(""),
    log_content: str = Form(""),
) -> Response:
    who, data = _who(request)
    _check_csrf(data, csrf_token)
    limits = LimitsConfig(
        requests_per_minute=_int(requests_per_minute),
        tokens_per_minute=_int(tokens_per_minute),
        monthly_token_budget=_int(monthly_token_budget),
    )
    await context(request).admin.create_tenant(who, name.strip(), limits=limits, log_content=bool(log_content))
    return RedirectResponse("/console/tenants", status_code=303)


@router.post("/console/tenants/{tenant}/content-logging/{action}")
async def tenants_content_logging(request: Request, tenant: str, action: str, csrf_token: str = Form("")) -> Response:
    """Switch a tenant's encrypted prompt and completion logging on or off (audited as tenant.update)."""
    who, data = _who(request)
    _check_csrf(data, csrf_token)
    if action not in ("on", "off"):
        raise not_found("action")
    await context(request).admin.update_tenant(who, tenant, log_content=action == "on")
    return RedirectResponse("/console/tenants", status_code=303)


@router.post("/console/tenants/{tenant}/weight")
async def tenants_weight(
    request: Request, tenant: str, csrf_token: str = Form(""), fair_share_weight: str = Form("")
) -> Response:
    """A tenant's fair-share weight; empty: back to the platform file's (else 1). Audited as `tenant.update`."""
    who, data = _who(request)
    _check_csrf(data, csrf_token)
    weight = _weight(fair_share_weight)
    admin = context(request).admin
    await admin.update_tenant(who, tenant, fair_share_weight=weight, clear_fair_share_weight=weight is None)
    return RedirectResponse("/console/tenants", status_code=303)


@router.post("/console/tenants/{tenant}/status/{action}")
async def tenants_status(request: Request, tenant: str, action: str, csrf_token: str = Form("")) -> Response:
    who, data = _who(request)
    _check_csrf(data, csrf_token)
    if action not in ("suspend", "resume"):
        raise not_found("action")
    await context(request).admin.set_status(who, tenant, "suspended" if action == "suspend" else "active")
    return RedirectResponse("/console/tenants", status_code=303)


async def _keys_page(request: Request, tenant: str, created: Any = None, status: int = 200) -> Response:
    who, data = _who(request)
    admin = context(request).admin
    info = await admin.tenant(who, tenant)
    keys = [key_view(k) for k in await admin.list_keys(who, info.id)]
    limits = await admin.get_limits(who, info.id)
    key_limits = {k["id"]: await admin.get_limits(who, info.id, key_id=k["id"]) for k in keys if k["state"] == "active"}
    return _page(
        request,
        "keys.html",
        data,
        who,
        status,
        tenant=tenant_view(info),
        keys=keys,
        created=created,
        limits=limits,
        key_limits=key_limits,
    )


@router.get("/console/tenants/{tenant}/keys")
async def keys_page(request: Request, tenant: str) -> Response:
    return await _keys_page(request, tenant)


@router.post("/console/tenants/{tenant}/keys")
async def keys_create(
    request: Request, tenant: str, csrf_token: str = Form(""), name: str = Form(""), usage_read: str = Form("")
) -> Response:
    who, data = _who(request)
    _check_csrf(data, csrf_token)
    scopes = ["inference", "usage:read"] if usage_read else ["inference"]
    created = await context(request).admin.create_key(who, tenant, name=name.strip(), scopes=scopes, expires_at=None)
    return await _keys_page(
        request, tenant, created={"key": key_view(created.info), "secret": created.token}, status=201
    )


@router.post("/console/tenants/{tenant}/keys/{key}/limits")
async def key_limits_set(
    request: Request,
    tenant: str,
    key: str,
    csrf_token: str = Form(""),
    requests_per_minute: str = Form(""),
    tokens_per_minute: str = Form(""),
    concurrent_requests: str = Form(""),
    daily_token_budget: str = Form(""),
    monthly_token_budget: str = Form(""),
) -> Response:
    """A key's own limits; empty fields: the tenant's apply. A tenant-admin stays within the tenant's caps
    (AdminService.set_limits refuses more with 422 over_cap, as the API does)."""
    who, data = _who(request)
    _check_csrf(data, csrf_token)
    limits = LimitsConfig(
        requests_per_minute=_int(requests_per_minute),
        tokens_per_minute=_int(tokens_per_minute),
        concurrent_requests=_int(concurrent_requests),
        daily_token_budget=_int(daily_token_budget),
        monthly_token_budget=_int(monthly_token_budget),
    )
    await context(request).admin.set_limits(who, tenant, limits, key_id=key)
    return RedirectResponse(f"/console/tenants/{tenant}/keys", status_code=303)


@router.post("/console/tenants/{tenant}/keys/{key}/{action}")
async def keys_action(request: Request, tenant: str, key: str, action: str, csrf_token: str = Form("")) -> Response:
    who, data = _who(request)
    _check_csrf(data, csrf_token)
    admin = context(request).admin
    if action == "revoke":
        await admin.revoke_key(who, tenant, key)
        return RedirectResponse(f"/console/tenants/{tenant}/keys", status_code=303)
    if action == "rotate":
        created = await admin.rotate_key(who, tenant, key, 86_400)
        return await _keys_page(request, tenant, created={"key": key_view(created.info), "secret": created.token})
    raise not_found("action")


# --- usage, audit, pool --------------------------------------------------------------------------------


@router.get("/console/usage")
async def usage_page(request: Request, tenant: str = "") -> Response:
    who, data = _who(request)
    admin = context(request).admin
    tenants = [tenant_view(t) for t in await admin.list_tenants(who)]
    chosen = tenant or (tenants[0]["name"] if tenants else "")
    rows: list[dict[str, Any]] = []
    if chosen:
        rows = await admin.usage(who, chosen)
    days = sorted({r["period"] for r in rows if len(r["period"]) == 10})
    profiles = sorted({r["profile"] for r in rows})
    totals = {(r["period"], r["profile"]): r["prompt_tokens"] + r["completion_tokens"] for r in rows}
    chart = {
        "type": "bar",
        "labels": days,
        "datasets": [{"label": p, "data": [totals.get((d, p), 0) for d in days]} for p in profiles],
        "title": "Tokens per day and profile",
    }
    months = [r for r in rows if len(r["period"]) == 7]
    return _page(request, "usage.html", data, who, tenants=tenants, chosen=chosen, rows=months, chart=chart)


@router.get("/console/audit")
async def audit_page(
    request: Request,
    tenant: str = "",
    kind: str = "",
    actor: str = "",
    time_from: str = "",
    time_to: str = "",
) -> Response:
    who, data = _who(request)
    admin = context(request).admin
    scope = await admin.audit_scope(who, tenant or None)
    query = AuditQuery(
        tenant_id=scope,
        kind=kind or None,
        actor=actor or None,
        start=parse_time(time_from, "from"),
        end=parse_time(time_to, "to"),
    )
    events = await audit_view.search(admin.engine, query)
    filters = {"tenant": tenant, "kind": kind, "actor": actor, "time_from": time_from, "time_to": time_to}
    return _page(request, "audit.html", data, who, events=events, filters=filters, kinds=KINDS, export=None)


@router.post("/console/audit/export")
async def audit_export(
    request: Request, csrf_token: str = Form(""), tenant: str = Form(""), fmt: str = Form("jsonl")
) -> Response:
    who, data = _who(request)
    _check_csrf(data, csrf_token)
    admin = context(request).admin
    scope = await admin.audit_scope(who, tenant or None)
    if fmt not in ("jsonl", "csv", "parquet"):
        fmt = "jsonl"
    meta = await audit_view.run_export(admin.config, fmt, actor=who.actor, tenant_id=scope, start=None, end=None)
    events = await audit_view.search(admin.engine, AuditQuery(tenant_id=scope))
    filters = {"tenant": tenant, "kind": "", "actor": "", "time_from": "", "time_to": ""}
    return _page(request, "audit.html", data, who, events=events, filters=filters, kinds=KINDS, export=meta)


@router.get("/console/audit/exports/{export_id}")
async def audit_download(request: Request, export_id: str) -> Response:
    who, _ = _who(request)
    admin = context(request).admin
    scope = await admin.audit_scope(who, None)
    found = audit_view.find_export(admin.config, export_id)
    if found is None or (scope is not None and found[0].get("tenant_id") != scope):
        raise not_found("export")
    return FileResponse(found[1], media_type="application/zip", filename=f"bastion-audit-{export_id}.zip")


@router.get("/console/pool/live")
async def pool_live_fragment(request: Request) -> Response:
    """The live replicas table alone, for htmx's periodic refresh of the pool page."""
    who, data = _who(request)
    ctx = context(request)
    ctx.admin.require(who)
    pool = await pool_view.pool_status(ctx.admin.config, ctx.stats, await ctx.admin.tenant_names())
    return _page(request, "_pool_live.html", data, who, pool=pool)


def _live_chart(history: dict[str, Any] | None) -> dict[str, Any] | None:
    if history is None:
        return None
    labels = [time.strftime("%H:%M:%S", time.gmtime(at)) for at in history["at"]]
    datasets = [{"label": p, "data": v["acceptance_rate"]} for p, v in history["profiles"].items()]
    return {"type": "line", "labels": labels, "datasets": datasets, "title": "Draft acceptance (UTC, last polls)"}


@router.get("/console/pool")
async def pool_page(request: Request) -> Response:
    who, data = _who(request)
    ctx = context(request)
    ctx.admin.require(who)
    pool = await pool_view.pool_status(ctx.admin.config, ctx.stats, await ctx.admin.tenant_names())
    live_chart = _live_chart(pool_view.live_history(ctx.stats))
    acceptance = await acceptance_by_profile(ctx.admin.sessions)
    chart = {
        "type": "line",
        "labels": acceptance["periods"],
        "datasets": [{"label": p, "data": v} for p, v in acceptance["profiles"].items()],
        "title": "Draft acceptance rate per profile",
    }
    capacity = pool_view.configured_capacity(ctx.admin.config)
    reference = pool_view.plan_for(ctx.admin.config, pool_view.PlanRequest())
    return _page(
        request,
        "pool.html",
        data,
        who,
        pool=pool,
        chart=chart,
        live_chart=live_chart,
        capacity=capacity,
        reference=reference,
    )


def _weight(text: str) -> float | None:
    text = text.strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    problem = weight_problem(value)
    if problem is not None:
        raise ControlError(422, "invalid_value", f"fair_share_weight: {problem}")
    return value


def _int(text: str) -> int | None:
    text = text.strip()
    if not text:
        return None
    if not text.isdigit() or int(text) < 1:
        raise ControlError(422, "invalid_value", "limits are whole numbers of at least 1")
    return int(text)
