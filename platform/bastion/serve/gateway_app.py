"""Composing the gateway: what `create_gateway_app(config, engine_client)` opens and wires, in one place.

The gateway package holds the request handling (`gateway/service.py`) and its HTTP surface (`gateway/app.py`);
it opens nothing. Here the database engine (unless a session factory is given), the limiter (Redis, or in
process when there is no Redis URL), the budget tracker, the authenticator with its refused-credential guard,
the usage counters, metrics and tracing are built from the platform file and handed to one GatewayService. The
Ray Serve ingress (`serve/ingress.py`), the benchmarks and the tests all build the gateway through this function.
No Ray import: tests and benchmarks use it without a cluster.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Literal

from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bastion.config.schema import PlatformConfig
from bastion.config.token_files import read_token
from bastion.db.session import create_engine, session_factory
from bastion.gateway.app import create_app
from bastion.gateway.engine_client import EngineClient
from bastion.gateway.fair_queue import FairQueues
from bastion.gateway.service import GatewayParts, GatewayService
from bastion.gateway.upstream_choice import UpstreamChoice
from bastion.pool.live_stats import load_token
from bastion.records import RequestRecorder
from bastion.routing.profiles import RoutingPolicy
from bastion.serve.live_stats_endpoint import add_pool_stats_route
from bastion.telemetry.metrics import GatewayMetrics
from bastion.telemetry.tracing import GatewayTracing
from bastion.tenancy import key_material
from bastion.tenancy.auth_failure_guard import AuthFailureGuard
from bastion.tenancy.authenticator import Authenticator
from bastion.tenancy.budgets import BudgetTracker
from bastion.tenancy.invalidation import InvalidationListener
from bastion.tenancy.limiter import Limiter
from bastion.tenancy.usage import UsageRecorder


def metrics_token_of(config: PlatformConfig) -> str:
    """`telemetry.metrics_token_file`, else the internal token the gateway already shares with the control plane
    (`control.pool_stats_token_file`, a Secret in the Helm chart): one more file only for who wants one."""
    configured = config.telemetry.metrics_token_file
    if configured is None:
        return load_token(config)
    return read_token(configured, "telemetry.metrics_token_file")


def create_gateway_app(
    config: PlatformConfig,
    engine_client: EngineClient,
    *,
    sessions: async_sessionmaker[AsyncSession] | None = None,
    redis_url: str | None = None,
    recorders: Sequence[RequestRecorder] = (),
    pepper: bytes | None = None,
    routing: RoutingPolicy | None = None,
    auth_cache_ttl_s: float = 0.5,
    flush_interval_s: float = 1.0,
    policy_enabled: bool = True,
    tracing: GatewayTracing | None = None,
    pool_stats: Literal["off", "queues", "serve"] = "off",
) -> FastAPI:
    """The gateway app over `engine_client`. Defaults come from the platform file: a session factory from
    `database.url` (closed with the app), `redis.url` (None: in-process limits), the pepper from
    `auth.api_key_pepper_file`, tracing from `telemetry.otlp_endpoint`. `recorders` (e.g. the audit recorder)
    get every RequestRecord after the usage counters and metrics."""
    on_close: list[Callable[[], Awaitable[None]]] = []
    if sessions is None:
        database = create_engine(config.database.url)
        sessions = session_factory(database)
        on_close.append(database.dispose)
    redis_url = redis_url if redis_url is not None else config.redis.url
    if pepper is None:
        pepper = key_material.load_pepper(config.auth.api_key_pepper_file, config.data_dir)
    limiter = Limiter(
        redis_url, when_unavailable=config.redis.when_unavailable, tenant_policies=config.redis.tenant_policies
    )
    metrics = GatewayMetrics(config.telemetry.max_tenant_labels)
    tracing = tracing or GatewayTracing.from_config(config.telemetry)
    guard = AuthFailureGuard(
        redis_url or None,
        config.auth.failed_auth_limit,
        config.auth.failed_auth_window_s,
        service="gateway",
        registry=metrics.registry,
    )
    authenticator = Authenticator(
        sessions,
        pepper,
        config.tenant_defaults,
        ttl=auth_cache_ttl_s,
        stale_s=config.gateway.key_cache_when_db_down_s,
        guard=guard,
    )
    queues = FairQueues(
        {name: (p.queue.max_length, p.queue.max_wait_s) for name, p in config.profiles.items()},
        config.gateway.tenant_weights,
        on_wait=metrics.observe_queue_wait,
    )
    parts = GatewayParts(
        upstreams=UpstreamChoice(engine_client, routing, queues),
        auth=authenticator,
        limiter=limiter,
        budgets=BudgetTracker(sessions, limiter.redis),
        usage=UsageRecorder(sessions),
        recorders=[*recorders, metrics],
        tracing=tracing,
        listener=InvalidationListener(redis_url, authenticator.invalidate) if redis_url else None,
    )
    gateway = GatewayService(parts, max_body_bytes=config.gateway.max_body_bytes, flush_interval_s=flush_interval_s)
    metrics.watch_in_flight(lambda: gateway.in_flight)
    metrics.watch_queues(queues.depth)
    metrics.watch_limiter(limiter)
    app = create_app(
        config,
        gateway,
        metrics=metrics,
        metrics_token=metrics_token_of(config),
        tracing=tracing,
        on_close=on_close,
        policy_enabled=policy_enabled,
    )
    if pool_stats != "off":  # the control plane's live pool view: this replica's queues, and Serve's replicas
        serve_stats = pool_stats == "serve"  # inside Ray (the ingress); "queues": a gateway outside Ray (tests)
        add_pool_stats_route(app, load_token(config), queues=queues.snapshot, serve_stats=serve_stats)
    return app
