"""A bare relay of the same engine client: no auth, limits, routing or usage. Only for measuring the gateway's
own overhead (`bench/gateway.py`) — never serve this. Built on the gateway's own app
(`create_gateway_app(policy_enabled=False)`: middleware, error handlers, /metrics) so only the policy differs."""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from bastion.config.schema import PlatformConfig
from bastion.gateway.app import add_inference_routes
from bastion.gateway.engine_client import Endpoint, EngineClient
from bastion.gateway.relay import upstream_body
from bastion.serve.gateway_app import create_gateway_app


def add_bare_routes(app: FastAPI, engine: EngineClient) -> None:
    async def relay(request: Request, endpoint: Endpoint) -> Response:
        body = json.loads(await request.body())
        upstream = next(u for u in engine.upstreams() if u.model == body["model"].partition("@")[0])
        sent = upstream_body(body, upstream.model, bool(body.get("stream")))
        if body.get("stream"):
            return StreamingResponse(engine.stream(upstream.name, endpoint, sent), media_type="text/event-stream")
        answer = await engine.complete(upstream.name, endpoint, sent)
        return JSONResponse(answer.body, status_code=answer.status)

    async def chat(request: Request) -> Response:
        return await relay(request, "chat")

    async def completions(request: Request) -> Response:
        return await relay(request, "completion")

    add_inference_routes(app, chat, completions)  # mounted as the policy app's are, so only the policy differs


def bare_app(config: PlatformConfig, engine: EngineClient, **options: Any) -> FastAPI:
    """The gateway app without its policy: `create_gateway_app(policy_enabled=False)` plus the bare relay routes."""
    app = create_gateway_app(config, engine, policy_enabled=False, **options)
    add_bare_routes(app, engine)
    return app
