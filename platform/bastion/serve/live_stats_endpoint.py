"""The gateway's internal endpoint of live replica statistics (bastion.pool.live_stats), read by the control plane.

Served by the gateway ingress because only a process inside Ray holding the engine handles sees every replica:
Serve's routers there get each replica's `record_routing_stats` (serve/replica_registry.py). Deployment
health comes from `serve.status()`. A bearer token shared with the control plane guards it; anything else gets
the same 404 as an unknown path, so the endpoint is invisible to tenants.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from bastion.gateway.errors import ApiError
from bastion.pool.live_stats import POOL_STATS_PATH, authorized
from bastion.serve.replica_registry import live_replicas

log = logging.getLogger(__name__)
STATUS_TIMEOUT_S = 2.0


def _states(counts: dict[Any, int]) -> dict[str, int]:
    return {str(getattr(state, "value", state)): int(n) for state, n in counts.items()}


def _deployment_status() -> dict[str, dict[str, Any]]:
    from ray import serve

    out: dict[str, dict[str, Any]] = {}
    for app in serve.status().applications.values():
        for name, dep in app.deployments.items():
            out[name] = {"status": str(dep.status.value), "replica_states": _states(dep.replica_states)}
    return out


async def deployment_status() -> dict[str, dict[str, Any]]:
    """Serve's view per deployment (status, replicas per state); empty when the controller does not answer."""
    try:
        return await asyncio.wait_for(asyncio.to_thread(_deployment_status), STATUS_TIMEOUT_S)
    except Exception as exc:
        log.warning("serve status unavailable: %s", type(exc).__name__)
        return {}


def add_pool_stats_route(
    app: FastAPI,
    token: str,
    *,
    queues: Callable[[], list[dict[str, Any]]] | None = None,
    serve_stats: bool = True,
) -> None:
    """`queues`: this gateway replica's fair queues per tenant and profile (`FairQueues.snapshot`).
    `serve_stats`: ask Serve for its replicas and deployments (False for a gateway outside Ray: queues only)."""

    @app.get(POOL_STATS_PATH, include_in_schema=False)
    async def pool_replicas(request: Request) -> Response:
        if not authorized(token, request.headers.get("authorization")):
            return ApiError(404, "Not Found", code="not_found").response()
        status = await deployment_status() if serve_stats else {}
        replicas = live_replicas() if serve_stats else {}
        names = sorted(set(status) | set(replicas))
        deployments = {n: {**status.get(n, {}), "replicas": replicas.get(n, [])} for n in names}
        body = {"object": "pool.replicas", "collected_at": time.time(), "deployments": deployments}
        body["queues"] = queues() if queues is not None else []
        return JSONResponse(body)
