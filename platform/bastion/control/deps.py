"""Who is calling: a bearer JWT (admin API clients) or the console's session cookie (with a CSRF header or form
field on anything that changes state). The shared context lives on `app.state.control`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from bastion.control.admin import AdminService
from bastion.control.errors import ControlError, unauthorized
from bastion.control.oidc import OidcLogin
from bastion.control.principal import Principal, principal_from_claims
from bastion.control.session import SESSION_COOKIE, CookieCodec, csrf_ok
from bastion.control.settings import ControlSettings
from bastion.control.tokens import TokenVerifier
from bastion.pool.live_stats import ReplicaStatsProvider
from bastion.tenancy.auth_failure_guard import AuthFailureGuard

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
CSRF_HEADER = "X-CSRF-Token"


@dataclass
class ControlContext:
    settings: ControlSettings
    admin: AdminService
    codec: CookieCodec
    stats: ReplicaStatsProvider
    verifier: TokenVerifier | None = None
    login: OidcLogin | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    guard: AuthFailureGuard | None = None  # refused tokens and passwords per client address


def context(request: Request) -> ControlContext:
    return request.app.state.control


def session_of(request: Request) -> dict[str, Any] | None:
    return context(request).codec.open(SESSION_COOKIE, request.cookies.get(SESSION_COOKIE))


def principal_from_session(data: dict[str, Any]) -> Principal:
    return Principal(
        subject=str(data.get("sub", "")),
        username=str(data.get("user", "unknown")),
        roles=frozenset(data.get("roles", [])),
        tenant=data.get("tenant"),
        via=str(data.get("via", "oidc")),
    )


async def api_principal(request: Request) -> Principal:
    ctx = context(request)
    header = request.headers.get("authorization")
    if header is not None:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise unauthorized("use an Authorization: Bearer token")
        if ctx.verifier is None:
            raise unauthorized("bearer tokens need an OIDC issuer (auth.oidc_issuer)")
        address = client_address(request)
        if ctx.guard is not None and (wait := ctx.guard.retry_after(address)) is not None:
            raise throttled(wait)
        try:
            claims = await ctx.verifier.verify(token.strip())
        except ControlError:
            ctx.metrics["token_refusals"].inc()
            if ctx.guard is not None and (wait := await ctx.guard.failed(address)) is not None:
                raise throttled(wait) from None
            raise
        return principal_from_claims(claims, ctx.settings.client_id)
    data = session_of(request)
    if data is None:
        raise unauthorized()
    if request.method not in SAFE_METHODS and not csrf_ok(data, request.headers.get(CSRF_HEADER)):
        raise ControlError(403, "csrf", "missing or wrong CSRF token")
    return principal_from_session(data)


def throttled(wait: int) -> ControlError:
    message = f"too many failed authentication attempts from your address; retry in {wait} s"
    return ControlError(429, "too_many_auth_failures", message, {"Retry-After": str(wait)})


def client_address(request: Request) -> str | None:
    return request.client.host if request.client else None
