"""The policy path of one inference request: key → tenant → body → model → tokens → profile → limits.

Each step raises ApiError with the status and code a client can act on; the handler in `service.py` relays.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from fastapi import Request

from bastion.db.models import utcnow
from bastion.gateway.engine_client import Endpoint
from bastion.gateway.errors import ApiError
from bastion.gateway.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    MessagesRequest,
    ValidationError,
    first_error,
)
from bastion.gateway.upstream_choice import Placement
from bastion.records import SpeculationStats
from bastion.routing.profiles import RoutingDecision
from bastion.telemetry.tracing import RequestTrace
from bastion.tenancy import key_material
from bastion.tenancy.authenticator import Authenticator, AuthFailure, KeyStoreUnavailable, Principal
from bastion.tenancy.budgets import BudgetExhausted, BudgetHold, BudgetTracker
from bastion.tenancy.limiter import Limiter
from bastion.tenancy.limiter_plan import Admission, LimitExceeded, RateHeaders, RedisUnavailable, Subject

PROFILE_HEADER = "x-bastion-profile"
_PROFILE_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")  # config/schema.py's profile names
SESSION_HEADER = "x-session-id"
MAX_SESSION_ID = 256


@dataclass
class RequestContext:
    """Everything known about one request so far; becomes its RequestRecord at the end."""

    request_id: str
    endpoint: str
    started: float = field(default_factory=time.perf_counter)
    started_at: datetime = field(default_factory=utcnow)
    principal: Principal | None = None
    model: str | None = None
    stream: bool = False
    placement: Placement | None = None  # the upstream it went to, counted in flight there until the end
    admission: Admission | None = None
    budget_hold: BudgetHold | None = None  # the reservation against daily/monthly budgets, settled at the end
    prompt_tokens: int = 0
    completion_tokens: int = 0
    status: int = 200
    error_code: str | None = None
    ttft: float | None = None
    speculation: SpeculationStats | None = None
    finished: bool = False
    session_id: str | None = None  # the client's X-Session-Id, handed to the router for affinity
    replica: str | None = None  # the replica that served the request, as the upstream named it
    key_prefix: str | None = None
    client_address: str | None = None
    trace: RequestTrace | None = None  # the request's spans, when tracing is on
    # Only for tenants with log_content: what the audit log stores, encrypted. Never logged, never in repr.
    prompt: Any = field(default=None, repr=False)
    completion: Any = field(default=None, repr=False)

    @property
    def decision(self) -> RoutingDecision | None:
        return self.placement.decision if self.placement is not None else None


def bearer(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


async def authenticate(
    auth: Authenticator, request: Request, scope: str, ctx: RequestContext | None = None
) -> Principal:
    token = bearer(request)
    address = request.client.host if request.client else None
    if ctx is not None:
        parsed = key_material.parse(token or "")
        ctx.key_prefix = parsed[0] if parsed else None
        ctx.client_address = address
    guard = auth.guard
    if guard is not None and (wait := guard.retry_after(address)) is not None:
        raise _auth_throttled(wait)
    try:
        principal = await auth.authenticate(token)
    except AuthFailure as exc:
        presented = request.headers.get("authorization") is not None
        if guard is not None and presented and (wait := await guard.failed(address)) is not None:
            raise _auth_throttled(wait) from None
        raise ApiError(401, f"Incorrect API key provided: {exc}", code="invalid_api_key") from None
    except KeyStoreUnavailable:
        message = "The API key cannot be checked right now (database unavailable); retry shortly"
        raise ApiError(503, message, code="key_store_unavailable", headers={"retry-after": "5"}) from None
    if not principal.tenant_active:
        raise ApiError(403, "Your organization is suspended", code="tenant_suspended")
    if scope not in principal.scopes:
        raise ApiError(403, f"This API key lacks the `{scope}` scope", code="insufficient_scope")
    return principal


def _auth_throttled(wait: int) -> ApiError:
    return ApiError(
        429,
        f"Too many failed authentication attempts from your address; retry in {wait} s",
        code="too_many_auth_failures",
        type="rate_limit_error",
        headers={"retry-after": str(wait)},
    )


def session_id(request: Request) -> str | None:
    """The client's session id: printable ASCII of bounded length, so it is safe to log, hash and route on."""
    value = request.headers.get(SESSION_HEADER)
    if not value:
        return None
    if len(value) > MAX_SESSION_ID or not value.isascii() or not value.isprintable():
        raise ApiError(
            400, f"{SESSION_HEADER} must be printable ASCII of at most {MAX_SESSION_ID} characters", param="header"
        )
    return value


def profile_header(request: Request) -> str | None:
    """The client's X-Bastion-Profile: a profile name (the config's pattern) or a 400, never echoed raw."""
    value = request.headers.get(PROFILE_HEADER)
    if not value:
        return None
    if not _PROFILE_NAME.fullmatch(value):
        raise ApiError(400, f"{PROFILE_HEADER} must be a profile name", param="header", code="invalid_value")
    return value


def check_declared_size(request: Request, limit: int) -> None:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise ApiError(400, "Invalid Content-Length header") from None
        if size > limit:
            raise ApiError(413, f"Request body is {size} bytes; the limit is {limit}", code="request_too_large")


async def read_json(request: Request, limit: int) -> dict[str, Any]:
    """The body as a JSON object: 413 past `limit` bytes (however it is sent), 400 for bad UTF-8 or JSON."""
    check_declared_size(request, limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"Request body exceeds the limit of {limit} bytes", code="request_too_large")
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, "Request body is not valid UTF-8", code="invalid_encoding") from None
    try:
        data = json.loads(text)
    except ValueError:
        raise ApiError(
            400,
            "We could not parse the JSON body of your request. The OpenAI API expects a JSON payload.",
            code="invalid_json",
        ) from None
    if not isinstance(data, dict):
        raise ApiError(400, "The request body must be a JSON object", code="invalid_json")
    return data


_BODIES: dict[str, type[ChatCompletionRequest | CompletionRequest | MessagesRequest]] = {
    "chat": ChatCompletionRequest,
    "completion": CompletionRequest,
    "messages": MessagesRequest,
}


def validate(endpoint: Endpoint, body: dict[str, Any]) -> ChatCompletionRequest | CompletionRequest | MessagesRequest:
    model = _BODIES[endpoint]
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        message, param = first_error(exc)
        raise ApiError(400, message, param=param, code="invalid_value") from None


def subjects(principal: Principal) -> list[Subject]:
    out = [Subject("tenant", principal.tenant_id, principal.tenant_limits)]
    if principal.key_limits is not None:
        out.append(Subject("key", principal.key_id, principal.key_limits))
    return out


def _limit_error(exc: LimitExceeded) -> ApiError:
    headers = {"retry-after": str(exc.retry_after), **exc.headers.as_headers()}
    return ApiError(429, str(exc), code=exc.limit, type="rate_limit_error", headers=headers)


def _limiter_down() -> ApiError:
    """The tenant's policy refuses requests while the shared limiter (Redis) is unreachable."""
    message = "Rate limits cannot be checked right now; retry shortly"
    return ApiError(503, message, code="limiter_unavailable", headers={"retry-after": "1"})


def reservation(prompt_tokens: int, max_tokens: int | None, max_context: int | None) -> int:
    """A request's worst case: prompt + max_tokens, or the profile's context when it sets no max_tokens (the
    most the engine would generate)."""
    if max_tokens is not None:
        return prompt_tokens + max_tokens
    if max_context is not None:
        return max(max_context, prompt_tokens)
    return prompt_tokens


async def admit(
    limiter: Limiter,
    budgets: BudgetTracker,
    ctx: RequestContext,
    principal: Principal,
    prompt_tokens: int,
    reserve: int | None = None,
) -> Admission:
    """Budgets, concurrency and windows in one admission (one Redis script), each reserving `reserve` tokens
    (default: the prompt); a refusal anywhere takes nothing. The budget reservation is left on `ctx.budget_hold`."""
    levels = subjects(principal)
    try:
        admitted = await limiter.admit(
            ctx.request_id,
            levels,
            prompt_tokens,
            reserve=reserve,
            tenant=principal.tenant_name,
            budgets=budgets,
            at=ctx.started_at,
        )
    except BudgetExhausted as exc:
        raise ApiError(
            429,
            f"You exceeded your token budget: {exc}",
            code="insufficient_quota",
            type="insufficient_quota",
            headers={"retry-after": str(max(1, int(exc.retry_after)))},
        ) from None
    except LimitExceeded as exc:
        raise _limit_error(exc) from None
    except RedisUnavailable:
        raise _limiter_down() from None
    ctx.budget_hold = admitted.budget
    return admitted


def rate_headers(ctx: RequestContext) -> dict[str, str]:
    headers = ctx.admission.headers.as_headers() if ctx.admission is not None else RateHeaders().as_headers()
    if ctx.budget_hold is not None:
        headers["x-bastion-budget-remaining-tokens"] = str(max(ctx.budget_hold.remaining, 0))
    if ctx.decision is not None:
        headers["x-bastion-profile"] = ctx.decision.profile
        headers["x-bastion-routing-reason"] = ctx.decision.reason
    return headers
