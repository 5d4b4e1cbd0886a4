"""Shared set-up for the schema, bad-input and security tests: a fresh PostgreSQL database, the gateway under
uvicorn over it (scripted engine, real Redis), tenants and keys made through the real services."""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "oidc"))
import idp_harness as h

from bastion.bench.doubles import TEST_PEPPER, ScriptedEngine, platform_config, upstreams_for
from bastion.config.schema import LimitsConfig
from bastion.db import migrate
from secret_scan import register_secret
from testbed import PG_ADMIN_DSN, pg_exec

_issue_token = h.TestIdp.token


def _registered_token(self: h.TestIdp, username: str, password: str = h.PASSWORD) -> str:
    """Admin bearer tokens from the test provider are credentials too: scanned for at the end of the run."""
    return register_secret(_issue_token(self, username, password))


h.TestIdp.token = _registered_token  # type: ignore[method-assign]
REDIS_URL = os.environ.get("BASTION_TEST_REDIS", "redis://127.0.0.1:6379")
GENEROUS = LimitsConfig(requests_per_minute=100_000, tokens_per_minute=10_000_000, concurrent_requests=64)


@contextmanager
def fresh_pg() -> Iterator[str]:
    """A migrated PostgreSQL database of its own (random tenants made here never meet other modules' names)."""
    name = f"bastion_sec_{uuid.uuid4().hex[:10]}"
    pg_exec(f'CREATE DATABASE "{name}"')
    url = f"{PG_ADMIN_DSN.rsplit('/', 1)[0]}/{name}".replace("postgresql://", "postgresql+asyncpg://", 1)
    try:
        migrate.upgrade(url)
        yield url
    finally:
        pg_exec(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def flush_redis(db: int) -> str:
    import redis

    url = f"{REDIS_URL}/{db}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    client.close()
    return url


async def _make_tenant(url: str, name: str, scopes: list[str], **kwargs: Any) -> str:
    from bastion.db.session import create_engine, session_factory
    from bastion.tenancy.key_service import KeyService
    from bastion.tenancy.tenants import TenantService

    engine = create_engine(url)
    try:
        sessions = session_factory(engine)
        await TenantService(sessions).create(name, **kwargs)
        return (await KeyService(sessions, TEST_PEPPER).create(name, scopes=scopes)).token
    finally:
        await engine.dispose()


def tenant_with_key(url: str, name: str, scopes: list[str] | None = None, **kwargs: Any) -> str:
    """A tenant and one key (its secret registered for the end-of-run log scan), from a loop of its own."""
    kwargs.setdefault("limits", GENEROUS)
    token = asyncio.run(_make_tenant(url, name, scopes or ["inference", "usage:read"], **kwargs))
    return register_secret(token)


@dataclass
class Gateway:
    url: str
    app: Any
    engine: ScriptedEngine
    database_url: str


@contextmanager
def served_gateway(
    tmp: Path, database_url: str, redis_url: str | None, *, auth: dict[str, Any] | None = None, **config: Any
) -> Iterator[Gateway]:
    """The gateway app under uvicorn on 127.0.0.1 (its database engine and Redis clients live in its loop)."""
    from bastion.config.schema import PlatformConfig
    from bastion.serve.gateway_app import create_gateway_app

    base = platform_config(str(tmp), database_url, ["m1", "m2"], redis_url=redis_url, **config)
    if auth:
        data = base.model_dump(mode="json", exclude_unset=True)
        data["auth"] = {**data.get("auth", {}), **auth}
        base = PlatformConfig.model_validate(data)
    engine = ScriptedEngine(upstreams_for(["m1", "m2"]))
    app = create_gateway_app(base, engine, pepper=TEST_PEPPER)
    with h.ServerThread(app, h.free_port()) as server:
        yield Gateway(server.url, app, engine, database_url)
