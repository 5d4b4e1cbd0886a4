"""The control-plane app factory: admin API, console, health, readiness and metrics, with security headers.

`create_app` does no I/O; the lifespan starts the audit writer and closes it and the database on shutdown.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from pydantic import ValidationError
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.exceptions import HTTPException as StarletteHTTPException

from bastion.audit import service as audit_service
from bastion.config import PlatformConfig
from bastion.control import api, console
from bastion.control.admin import AdminService
from bastion.control.deps import ControlContext, principal_from_session, session_of
from bastion.control.errors import ControlError
from bastion.control.local_admin import ensure_local_admin
from bastion.control.oidc import OidcLogin
from bastion.control.session import CookieCodec, key_from_file, key_from_secret
from bastion.control.settings import ControlSettings
from bastion.control.tokens import TokenVerifier
from bastion.db.session import create_engine, ping, session_factory
from bastion.pool.live_poller import PoolStatsPoller
from bastion.pool.live_stats import ReplicaStatsProvider, load_token, no_live_stats
from bastion.tenancy import key_material
from bastion.tenancy.auth_failure_guard import AuthFailureGuard
from bastion.tenancy.invalidation import publisher
from bastion.tenancy.key_service import KeyService

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"


def _csp(settings: ControlSettings) -> str:
    form_action = "'self'"
    if settings.issuer:  # logout posts to the console, which redirects to the provider's logout page
        parts = urlsplit(settings.issuer)
        form_action += f" {parts.scheme}://{parts.netloc}"
    return (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
        f"font-src 'self'; form-action {form_action}; frame-ancestors 'none'; base-uri 'none'; object-src 'none'"
    )


def _metrics(registry: CollectorRegistry) -> dict[str, Any]:
    return {
        "logins": Counter("bastion_control_logins", "Console logins by outcome", ["outcome"], registry=registry),
        "token_refusals": Counter("bastion_control_token_refusals", "Bearer tokens refused", registry=registry),
        "requests": Counter(
            "bastion_control_requests", "Admin API and console requests", ["method", "status"], registry=registry
        ),
    }


def create_app(
    config: PlatformConfig,
    *,
    settings: ControlSettings | None = None,
    stats_provider: ReplicaStatsProvider | None = None,
    engine: AsyncEngine | None = None,
    pepper: bytes | None = None,
    announce_local_password: bool = True,
) -> FastAPI:
    settings = settings or ControlSettings.from_config(config)
    settings.check()
    owned = engine is None
    db = engine if engine is not None else create_engine(config.database.url)
    sessions = session_factory(db)
    pepper = (
        pepper if pepper is not None else key_material.load_pepper(config.auth.api_key_pepper_file, config.data_dir)
    )
    notify = publisher(config.redis.url) if config.redis.url else None
    writer = audit_service.build_writer(config, db)
    admin = AdminService(config, sessions, db, KeyService(sessions, pepper, notify), writer)
    verifier = login = None
    if settings.oidc:
        assert settings.issuer is not None and settings.audience is not None
        verifier = TokenVerifier(
            settings.issuer,
            settings.audience,
            client_id=settings.client_id,
            refresh_interval_s=settings.jwks_refresh_interval_s,
        )
        login = OidcLogin(settings, verifier)
        key = key_from_secret(settings.client_secret) if settings.client_secret else key_from_file(config.data_dir)
    else:
        key = key_from_file(config.data_dir)
        password = ensure_local_admin(config.data_dir)
        if password is not None and announce_local_password:
            # Printed once, to the terminal of the process that created it; never logged.
            print(f"bastion console: local admin login `admin` with password {password} (shown only once)")
    registry = CollectorRegistry()
    metrics = _metrics(registry)
    poller = None
    if stats_provider is None and settings.pool_stats_url:  # live replica stats from the gateway (docs/control.md)
        live = config.control
        poller = PoolStatsPoller(
            settings.pool_stats_url,
            load_token(config),
            interval_s=live.pool_stats_interval_s,
            history=live.pool_stats_history,
        )
        stats_provider = poller
    guard = AuthFailureGuard(
        config.redis.url,
        config.auth.failed_auth_limit,
        config.auth.failed_auth_window_s,
        service="control",
        registry=registry,
    )
    ctx = ControlContext(
        settings, admin, CookieCodec(key), stats_provider or no_live_stats, verifier, login, metrics, guard
    )

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await writer.start()
        if poller is not None:
            poller.start()
        try:
            yield
        finally:
            if poller is not None:
                await poller.aclose()
            await writer.close()
            if owned:
                await db.dispose()

    app = FastAPI(
        title="Bastion control plane",
        description="Admin API: tenants, keys, limits, usage, audit, pool. Bearer JWTs from the Keycloak realm.",
        openapi_url="/admin/api/openapi.json",
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.control = ctx
    app.state.registry = registry
    app.include_router(api.router)
    app.include_router(console.router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    csp = _csp(settings)

    @app.middleware("http")
    async def security_headers(request: Request, call_next: Any) -> Response:
        response = await call_next(request)
        response.headers["Content-Security-Policy"] = csp
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["Cross-Origin-Opener-Policy"] = "same-origin"
        if settings.cookie_secure:
            response.headers["Strict-Transport-Security"] = "max-age=31536000"
        if not request.url.path.startswith("/static/"):
            response.headers["Cache-Control"] = "no-store"
        if request.url.path not in ("/healthz", "/readyz", "/metrics"):
            metrics["requests"].labels(request.method, str(response.status_code)).inc()
        return response

    def _is_api(request: Request) -> bool:
        return request.url.path.startswith("/admin/api") or "application/json" in request.headers.get("accept", "")

    @app.exception_handler(ControlError)
    async def _control_error(request: Request, exc: ControlError) -> Response:
        if _is_api(request):
            return exc.response()
        data = session_of(request)
        who = principal_from_session(data) if data else None
        if exc.status == 401 and who is None and request.method == "GET":
            return RedirectResponse("/login", status_code=303)
        return console.templates.TemplateResponse(
            request,
            "error.html",
            {"who": who, "csrf": (data or {}).get("csrf", ""), "page": "error", "error": exc},
            exc.status,
        )

    @app.exception_handler(console.LoginRequired)
    async def _login_required(request: Request, exc: console.LoginRequired) -> Response:
        return RedirectResponse("/login", status_code=303)

    @app.exception_handler(ValidationError)  # a model built in a handler (console forms): bad input, not a 500
    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError | ValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = f"{where}: {first.get('msg', 'invalid value')}" if where else "invalid request"
        return await _control_error(request, ControlError(422, "invalid_value", message))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        code = {400: "invalid_body", 404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return await _control_error(request, ControlError(exc.status_code, code, str(exc.detail)))

    async def _database_down(request: Request, exc: Exception) -> Response:
        """The database is unreachable: a retryable 503 in the API's error format, not an internal error."""
        log.warning("control plane: database unavailable (%s) on %s", type(exc).__name__, request.url.path)
        body = {"error": {"code": "database_unavailable", "message": "the database is unavailable; retry shortly"}}
        return JSONResponse(body, status_code=503, headers={"retry-after": "5"})

    # Only "cannot reach the database": a DataError or IntegrityError is a bug or bad input, not an outage.
    for kind in (OperationalError, InterfaceError, ConnectionError):  # asyncpg's refused connect: ConnectionError
        app.add_exception_handler(kind, _database_down)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.error("control plane: unhandled %s on %s", type(exc).__name__, request.url.path)
        body = {"error": {"code": "internal_error", "message": "the control plane failed to handle the request"}}
        return JSONResponse(body, status_code=500)

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False)
    async def readyz() -> Response:
        try:
            await ping(db)
        except Exception as exc:
            log.warning("not ready: database %s", type(exc).__name__)
            return JSONResponse({"status": "database unavailable"}, status_code=503)
        if not writer.healthy:
            return JSONResponse({"status": "audit writer unhealthy"}, status_code=503)
        return JSONResponse({"status": "ready"})

    @app.get("/metrics", include_in_schema=False)
    async def metrics_endpoint() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app
