"""Tenancy services on real SQLite and PostgreSQL (and Redis for budgets): tenants, keys stored only as
peppered HMACs, the authenticator's cache, batched usage counters, budgets seeded from the database."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
from sqlalchemy import event, select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from bastion.config.schema import LimitsConfig, TenantDefaultsConfig
from bastion.db import migrate
from bastion.db.models import ApiKey, UsageCounter, utcnow
from bastion.db.session import create_engine, session_factory
from bastion.records import RequestRecord, SpeculationStats
from bastion.tenancy import key_material
from bastion.tenancy.authenticator import Authenticator, AuthFailure
from bastion.tenancy.budgets import BudgetExhausted, BudgetTracker, day_period, month_period
from bastion.tenancy.key_service import KeyService
from bastion.tenancy.limiter_plan import Subject
from bastion.tenancy.tenants import TenancyError, TenantService
from bastion.tenancy.usage import UsageRecorder, usage_for_tenant

pytestmark = pytest.mark.integration
PEPPER = b"x" * 32


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest) -> str:
    url = request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")
    migrate.upgrade(url)
    return url


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(database_url)
    yield engine
    await engine.dispose()


@pytest.fixture
def sessions(db: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return session_factory(db)


def unique() -> str:
    return f"t-{uuid.uuid4().hex[:8]}"


async def test_tenant_lifecycle(sessions) -> None:
    service = TenantService(sessions)
    name = unique()
    made = await service.create(name, allowed_models=["m1"], default_profile="deep-context")
    assert made.status == "active" and made.allowed_models == ("m1",)
    with pytest.raises(TenancyError, match="exists"):
        await service.create(name)
    with pytest.raises(TenancyError, match="default profile"):
        await service.create(unique(), allowed_profiles=["fast-agentic"], default_profile="deep-context")
    assert (await service.update(name, allowed_models=["m1", "m2"])).allowed_models == ("m1", "m2")
    assert (await service.suspend(made.id)).status == "suspended"
    assert (await service.resume(name)).status == "active"
    assert name in [t.name for t in await service.list()]
    await service.set_limits(name, LimitsConfig(requests_per_minute=5))
    await service.set_limits(name, LimitsConfig(requests_per_minute=7, daily_token_budget=100))
    assert await service.get_limits(name) == LimitsConfig(requests_per_minute=7, daily_token_budget=100)
    with pytest.raises(TenancyError, match="no tenant"):
        await service.get("nobody-" + uuid.uuid4().hex)


async def test_keys_are_stored_only_as_peppered_hmac(sessions) -> None:
    tenant = unique()
    await TenantService(sessions).create(tenant)
    service = KeyService(sessions, PEPPER)
    created = await service.create(tenant, name="ci", scopes=["usage:read", "inference"])
    prefix, secret = key_material.parse(created.token)
    assert created.info.prefix == prefix and created.info.scopes == ("inference", "usage:read")
    async with sessions() as session:
        row = (await session.execute(select(ApiKey).where(ApiKey.prefix == prefix))).scalar_one()
        assert row.secret_hash == key_material.hash_secret(PEPPER, secret)
        assert secret.encode() not in repr(vars(row)).encode()
    listed = await service.list(tenant)
    assert [k.prefix for k in listed] == [prefix] and not hasattr(listed[0], "secret_hash")
    with pytest.raises(TenancyError, match="unknown scope"):
        await service.create(tenant, scopes=["admin"])
    revoked = await service.revoke(prefix)
    assert revoked.state(utcnow()) == "revoked"
    with pytest.raises(TenancyError, match="revoked or expired"):
        await service.rotate(prefix)


async def test_authenticator_cache_needs_no_database_on_hits(db: AsyncEngine, sessions) -> None:
    tenant = unique()
    await TenantService(sessions).create(tenant, limits=LimitsConfig(concurrent_requests=3))
    token = (await KeyService(sessions, PEPPER).create(tenant)).token
    auth = Authenticator(sessions, PEPPER, TenantDefaultsConfig(), ttl=0.5)
    statements: list[str] = []
    event.listen(db.sync_engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    principal = await auth.authenticate(token)
    assert principal.tenant_name == tenant and principal.tenant_limits == LimitsConfig(concurrent_requests=3)
    loaded = len(statements)
    assert loaded >= 1
    results = await asyncio.gather(*(auth.authenticate(token) for _ in range(50)))
    assert all(r == principal for r in results) and len(statements) == loaded  # cache hits: no queries
    prefix = token.split("_")[1]
    with pytest.raises(AuthFailure):
        await auth.authenticate(f"bst_{prefix}_{'A' * 43}")  # right prefix, wrong secret
    unknown = "bst_" + "0" * 12 + "_" + "A" * 43
    for _ in range(3):
        with pytest.raises(AuthFailure):
            await auth.authenticate(unknown)
    assert len(statements) == loaded + 1  # the unknown prefix is cached too
    await asyncio.sleep(0.55)
    await auth.authenticate(token)
    assert len(statements) > loaded + 1  # after the TTL the row is read again
    assert await auth.flush_last_used() == 1 and await auth.flush_last_used() == 0
    with pytest.raises(ValueError, match="within a second"):
        Authenticator(sessions, PEPPER, TenantDefaultsConfig(), ttl=0.9)


async def test_usage_counters_accumulate_in_batches(sessions) -> None:
    tenant = await TenantService(sessions).create(unique())
    recorder = UsageRecorder(sessions)
    now = utcnow()

    def record(status: int = 200, spec: SpeculationStats | None = None) -> RequestRecord:
        return RequestRecord(
            request_id=uuid.uuid4().hex,
            tenant_id=tenant.id,
            key_id=None,
            endpoint="chat",
            model="m1",
            profile="fast-agentic",
            upstream="u",
            routing_reason="auto:tools",
            status=status,
            error_code=None,
            stream=False,
            prompt_tokens=10,
            completion_tokens=5,
            started_at=now,
            latency_ms=1.0,
            speculation=spec,
        )

    for _ in range(3):
        recorder.record(record(spec=SpeculationStats(draft_tokens=4, accepted_tokens=3)))
    assert recorder.pending == 2  # one day bucket and one month bucket
    assert await recorder.flush() == 2
    recorder.record(record(status=500))
    await recorder.flush()
    rows = await usage_for_tenant(sessions, tenant.id, periods=[day_period(now)])
    assert len(rows) == 1
    row = rows[0]
    assert (row.requests, row.errors, row.prompt_tokens, row.completion_tokens) == (4, 1, 40, 20)
    assert (row.draft_tokens, row.accepted_tokens) == (12, 9)
    async with sessions() as session:
        assert len((await session.execute(select(UsageCounter).where(UsageCounter.tenant_id == tenant.id))).all()) == 2


async def test_budgets_seed_from_the_database(sessions, redis_url: str) -> None:
    from redis.asyncio import Redis

    tenant = await TenantService(sessions).create(unique())
    key = (await KeyService(sessions, PEPPER).create(tenant.name)).info
    now = utcnow()
    recorder = UsageRecorder(sessions)
    recorder.record(
        RequestRecord(uuid.uuid4().hex, tenant.id, key.id, "chat", "m1", "deep-context", "u", "r", 200, None, False,
                      70, 20, now, 1.0)
    )  # fmt: skip
    await recorder.flush()
    tenant_level = [Subject("tenant", tenant.id, LimitsConfig(daily_token_budget=100))]
    key_level = [Subject("key", key.id, LimitsConfig(monthly_token_budget=95))]
    client = Redis.from_url(redis_url)
    try:
        for backend in (client, None):
            budgets = BudgetTracker(sessions, backend)
            await budgets.check(tenant_level, 10, now)  # 90 + 10 fits
            with pytest.raises(BudgetExhausted, match="daily_token_budget of 100 tokens for this tenant"):
                await budgets.check(tenant_level, 11, now)
            await budgets.check(key_level, 5, now)
            with pytest.raises(BudgetExhausted, match="monthly_token_budget of 95 tokens for this key"):
                await budgets.check(key_level, 6, now)
        shared = BudgetTracker(sessions, client)
        await shared.add(tenant_level + key_level, 5, now)
        peer = BudgetTracker(sessions, client)
        assert await peer.used("tenant", tenant.id, day_period(now)) == 95  # seen by a peer at once
        assert await peer.used("key", key.id, month_period(now)) == 95
        with pytest.raises(BudgetExhausted):
            await peer.check(key_level, 1, now + timedelta(seconds=1))
    finally:
        await client.aclose()


async def test_bootstrap_tenant_only_on_an_empty_database(sqlite_url: str) -> None:
    from bastion.tenancy.bootstrap import ensure_bootstrap

    await asyncio.to_thread(migrate.upgrade, sqlite_url)
    engine = create_engine(sqlite_url)
    try:
        sessions = session_factory(engine)
        created = await ensure_bootstrap(sessions, PEPPER)
        assert created is not None and created.info.scopes == ("inference", "usage:read")
        auth = Authenticator(sessions, PEPPER, TenantDefaultsConfig())
        assert (await auth.authenticate(created.token)).tenant_name == "default"
        assert await ensure_bootstrap(sessions, PEPPER) is None
    finally:
        await engine.dispose()


async def test_fair_share_weight_is_validated_set_and_cleared(sessions) -> None:
    tenants = TenantService(sessions)
    name = unique()
    for bad in (0.0, 0.05, 100.5, float("inf"), float("nan"), -1.0):
        with pytest.raises(TenancyError, match="fair_share_weight"):
            await tenants.create(name, fair_share_weight=bad)
    created = await tenants.create(name, fair_share_weight=2.5)
    assert created.fair_share_weight == 2.5
    with pytest.raises(TenancyError, match="fair_share_weight"):
        await tenants.update(name, fair_share_weight=1000)
    with pytest.raises(TenancyError, match="not both"):
        await tenants.update(name, fair_share_weight=3, clear_fair_share_weight=True)
    assert (await tenants.update(name, allowed_models=["m1"])).fair_share_weight == 2.5  # unchanged when not given
    assert (await tenants.update(name, fair_share_weight=0.1)).fair_share_weight == 0.1
    assert (await tenants.update(name, clear_fair_share_weight=True)).fair_share_weight is None
    assert (await tenants.get(name)).fair_share_weight is None
