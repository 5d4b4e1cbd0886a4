"""The data-plane app's HTTP surface: routes, error handlers, request ids, `/metrics`, over a GatewayService.

It opens nothing: the database, limiter, authenticator and recorders are composed in `serve/gateway_app.py`
(`create_gateway_app(config, engine_client)`, the same for Ray Serve and tests). `policy_enabled=False` mounts no
inference routes: the benchmark's bare relay (`bench/bare.py`) mounts its own on that app, so the gateway never
imports a benchmark.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Awaitable, Callable, Sequence
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bastion.config.schema import PlatformConfig
from bastion.config.token_files import bearer_matches
from bastion.gateway import anthropic, openapi, policy
from bastion.gateway.errors import ApiError
from bastion.gateway.service import GatewayService
from bastion.telemetry import metrics as telemetry_metrics
from bastion.telemetry.logging import request_id_var
from bastion.telemetry.tracing import GatewayTracing
from bastion.tenancy.authenticator import Principal

log = logging.getLogger("bastion.gateway")
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
REQUEST_ID = "x-request-id"
Handler = Callable[[Request], Awaitable[Response]]


class RequestIdMiddleware:
    """Pure ASGI (cheaper than BaseHTTPMiddleware): a client's safe x-request-id is kept, else one is made."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((v for k, v in scope["headers"] if k == b"x-request-id"), None)
        text = given.decode("latin-1") if given else ""
        rid = text if _SAFE_ID.match(text) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        request_id_var.set(rid)  # for log records (telemetry.logging)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k != b"x-request-id"]
                headers.append((b"x-request-id", rid.encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_id)


def add_inference_routes(app: FastAPI, chat: Handler, completions: Handler) -> None:
    """Plain Starlette routes: the handlers read the body themselves, so FastAPI's dependency solving (~20 µs
    per request) would buy nothing; their schema is `openapi.py`'s document."""
    app.router.add_route("/v1/chat/completions", chat, methods=["POST"], include_in_schema=False)
    app.router.add_route("/v1/completions", completions, methods=["POST"], include_in_schema=False)


def _rid(request: Request) -> str:
    return request.scope.get("state", {}).get("request_id") or uuid.uuid4().hex


def create_app(
    config: PlatformConfig,
    gateway: GatewayService,
    *,
    metrics: telemetry_metrics.GatewayMetrics,
    metrics_token: str,
    tracing: GatewayTracing | None = None,
    on_close: Sequence[Callable[[], Awaitable[None]]] = (),
    policy_enabled: bool = True,
) -> FastAPI:
    """The gateway's HTTP surface over a composed GatewayService (`serve/gateway_app.py` composes one).

    The returned app's `state.gateway` is the GatewayService (tests flush/close it), `state.metrics` its
    GatewayMetrics (own registry, at `/metrics`), `state.tracing` its tracer or None. The lifespan starts the
    service and, on shutdown, closes it, then runs `on_close` (what the composer opened), then ends tracing."""
    engine_client = gateway.engine

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        gateway.start()
        try:
            yield
        finally:
            await gateway.aclose()
            for close in on_close:
                await close()
            if tracing is not None:
                tracing.shutdown()

    app = FastAPI(title="Bastion gateway", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.gateway = gateway
    app.state.metrics = metrics
    app.state.tracing = tracing
    app.add_middleware(RequestIdMiddleware)

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> Response:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return ApiError(exc.status_code, str(exc.detail), code=code).response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> Response:
        return ApiError(400, "Invalid request", code="invalid_value").response()

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> Response:
        log.error("unhandled %s", type(exc).__name__)
        return ApiError(500, "The gateway failed to handle the request", code="internal_error").response()

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    api_document = openapi.document(config.models[0].name if config.models else "MODEL")

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi_document() -> Response:
        return JSONResponse(api_document)

    # Metrics name tenants and their usage: only Prometheus, with its own token, may read them (tenants' API
    # keys reach this port); anyone else gets the 404 of an unknown path.
    app.state.metrics_token = metrics_token  # tests scrape in process

    def scraper(request: Request) -> bool:
        return bearer_matches(metrics_token, request.headers.get("authorization"))

    @app.get("/metrics")
    async def prometheus_metrics(request: Request) -> Response:
        if not scraper(request):
            return ApiError(404, "Not Found", code="not_found").response()
        return Response(metrics.render(), media_type=telemetry_metrics.CONTENT_TYPE)

    @app.get("/metrics/engines")
    async def prometheus_engine_metrics(request: Request) -> Response:
        if not scraper(request):
            return ApiError(404, "Not Found", code="not_found").response()
        parts = [({"upstream": info.name}, text) for info, text in await engine_client.engine_metrics()]
        return Response(telemetry_metrics.merge_expositions(parts), media_type=telemetry_metrics.CONTENT_TYPE)

    if not policy_enabled:
        return app

    async def chat(request: Request) -> Response:
        return await gateway.inference(request, "chat", _rid(request))

    async def completions(request: Request) -> Response:
        return await gateway.inference(request, "completion", _rid(request))

    add_inference_routes(app, chat, completions)

    async def messages(request: Request) -> Response:
        anthropic.with_api_key_as_bearer(request)
        try:
            return anthropic.anthropic_response(await gateway.inference(request, "messages", _rid(request)))
        except ApiError as exc:  # raised before the service (a body over the limit, say)
            return anthropic.anthropic_response(exc.response())

    app.router.add_route("/v1/messages", messages, methods=["POST"], include_in_schema=False)

    def visible_models(principal: Principal) -> list[dict[str, object]]:
        """The names this key may use: each model and its `model@profile` aliases, as OpenAI model objects."""
        data: list[dict[str, object]] = []
        seen: set[str] = set()
        for up in engine_client.upstreams():
            allowed = not principal.allowed_profiles or up.profile in principal.allowed_profiles
            if not principal.may_use_model(up.model) or not allowed:
                continue
            for name in (up.model, f"{up.model}@{up.profile}"):
                if name not in seen:
                    seen.add(name)
                    data.append({"id": name, "object": "model", "created": 0, "owned_by": "bastion"})
        return data

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        principal = await policy.authenticate(gateway.auth, request, "inference")
        return JSONResponse({"object": "list", "data": visible_models(principal)})

    @app.get("/v1/models/{model:path}")  # `:path`: a model name may hold a slash (org/name)
    async def model(request: Request, model: str) -> Response:
        """One model: a name the key may not use answers the same 404 as an unknown one (no existence probe)."""
        principal = await policy.authenticate(gateway.auth, request, "inference")
        found = next((m for m in visible_models(principal) if m["id"] == model), None)
        if found is None:
            raise ApiError(404, f"The model `{model}` does not exist", code="model_not_found", param="model")
        return JSONResponse(found)

    @app.get("/v1/usage")
    async def usage(request: Request, period: str | None = None) -> Response:
        principal = await policy.authenticate(gateway.auth, request, "usage:read")
        if period is not None and not re.fullmatch(r"\d{4}-\d{2}(-\d{2})?", period):
            raise ApiError(400, "period is YYYY-MM or YYYY-MM-DD", param="period", code="invalid_value")
        await gateway.usage.flush()
        rows = await gateway.usage.for_tenant(principal.tenant_id, periods=[period] if period else None)
        return JSONResponse(
            {
                "object": "usage",
                "tenant": principal.tenant_name,
                "data": [{"object": "usage.bucket", **vars(r)} for r in rows],
            }
        )

    return app
