"""Limits across gateway replicas: two app instances share one real Redis (and one database); also the
in-process limiter. Requests per minute are exact, revocation reaches both replicas within a second, and
concurrency, tokens per minute and budgets are enforced and reported the way OpenAI clients expect."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from bastion.bench.doubles import ScriptedEngine, Stack, gateway_stack, platform_config, until, upstreams_for
from bastion.config.schema import LimitsConfig
from bastion.db import migrate
from bastion.db.models import KeyUsageCounter

pytestmark = pytest.mark.integration
MSG = {"role": "user", "content": "one two three four five six seven eight nine ten"}  # 13 prompt tokens


@pytest.fixture
def database_url(pg_url: str) -> str:
    migrate.upgrade(pg_url)
    return pg_url


@pytest.fixture
def engine() -> ScriptedEngine:
    return ScriptedEngine(upstreams_for(["m1", "m2"], ongoing=1000), record_bodies=False)


@pytest.fixture
async def pair(
    request: pytest.FixtureRequest, tmp_path: Path, database_url: str, redis_url: str, engine: ScriptedEngine
) -> AsyncIterator[list[Stack]]:
    """Two gateway replicas: separate apps, caches and limiters; one Redis, one database."""
    config = platform_config(str(tmp_path), database_url, ["m1", "m2"], redis_url=redis_url)
    ttl = getattr(request, "param", 0.5)  # the key cache's TTL
    async with AsyncExitStack() as stack:
        yield [await stack.enter_async_context(gateway_stack(config, engine, auth_cache_ttl_s=ttl)) for _ in range(2)]


@pytest.fixture(params=["redis", "in-process"])
async def single(
    request: pytest.FixtureRequest, tmp_path: Path, database_url: str, engine: ScriptedEngine
) -> AsyncIterator[Stack]:
    redis = request.getfixturevalue("redis_url") if request.param == "redis" else None
    config = platform_config(str(tmp_path), database_url, ["m1"], redis_url=redis)
    async with gateway_stack(config, engine) as s:
        yield s


async def tenant_with_key(stack: Stack, limits: LimitsConfig | None = None, **kwargs) -> tuple[str, str]:
    name = f"t-{uuid.uuid4().hex[:8]}"
    await stack.tenants().create(name, limits=limits, **kwargs)
    token = (await stack.keys().create(name, scopes=["inference", "usage:read"])).token
    return name, token


async def chat(stack: Stack, token: str, model: str = "m1", **extra):
    body = {"model": model, "messages": [MSG], **extra}
    return await stack.client.post("/v1/chat/completions", json=body, headers={"authorization": f"Bearer {token}"})


async def test_rpm_is_exact_across_two_replicas(pair: list[Stack]) -> None:
    n = 10
    _, token = await tenant_with_key(pair[0], LimitsConfig(requests_per_minute=n))
    responses = await asyncio.gather(*(chat(pair[i % 2], token) for i in range(5 * n)))
    statuses = [r.status_code for r in responses]
    assert statuses.count(200) == n and statuses.count(429) == 4 * n
    # the count is shared: now neither replica admits another request
    assert [(await chat(s, token)).status_code for s in pair] == [429, 429]
    refused = next(r for r in responses if r.status_code == 429)
    assert refused.json()["error"]["code"] == "requests_per_minute"
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert refused.headers["x-ratelimit-limit-requests"] == str(n)
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert refused.headers["x-ratelimit-reset-requests"].endswith("s")


@pytest.mark.parametrize(("pair", "notify"), [(0.8, True), (0.8, False)], ids=["pubsub", "ttl-only"], indirect=["pair"])
async def test_revocation_reaches_both_replicas_within_a_second(pair: list[Stack], notify: bool) -> None:
    _, token = await tenant_with_key(pair[0])
    assert [(await chat(s, token)).status_code for s in pair] == [200, 200]  # both caches now hold the key
    for s in pair:
        await asyncio.wait_for(s.gateway.listener.ready.wait(), 5)
    prefix = token.split("_")[1]
    await pair[0].keys(notify=notify).revoke(prefix)
    revoked_at = time.monotonic()
    pending = set(range(2))
    while pending and time.monotonic() - revoked_at < 2.0:
        for i in list(pending):
            response = await chat(pair[i], token)
            if response.status_code == 401:
                assert "revoked" in response.json()["error"]["message"]
                pending.discard(i)
        await asyncio.sleep(0.02)
    # With the longest TTL allowed (0.8 s): the guarantee holds without notices; with them it is much faster.
    assert not pending and time.monotonic() - revoked_at < (0.4 if notify else 1.0)


async def test_rotation_keeps_the_old_key_for_the_grace_period(pair: list[Stack]) -> None:
    _, old = await tenant_with_key(pair[0])
    rotated = await pair[0].keys().rotate(old.split("_")[1], grace=timedelta(seconds=1.2))
    assert rotated.token != old and rotated.info.scopes == ("inference", "usage:read")
    assert (await chat(pair[0], old)).status_code == 200
    assert (await chat(pair[1], rotated.token)).status_code == 200
    await asyncio.sleep(1.3)
    for s in pair:
        response = await chat(s, old)
        assert response.status_code == 401 and "expired" in response.json()["error"]["message"]
        assert (await chat(s, rotated.token)).status_code == 200
    listed = {k.prefix: k for k in await pair[0].keys().list()}
    assert listed[old.split("_")[1]].replaced_by == rotated.info.id


async def test_concurrency_is_shared_across_replicas(pair: list[Stack], engine: ScriptedEngine) -> None:
    _, token = await tenant_with_key(pair[0], LimitsConfig(concurrent_requests=3))
    engine.gate = asyncio.Event()
    tasks = [asyncio.create_task(chat(pair[i % 2], token)) for i in range(10)]
    await until(lambda: sum(t.done() for t in tasks) >= 7)
    await asyncio.sleep(0.2)  # and no more than 7 finish while three are held
    refused = [t for t in tasks if t.done()]
    assert len(refused) == 7 and all(t.result().status_code == 429 for t in refused)
    engine.gate.set()
    statuses = [r.status_code for r in await asyncio.gather(*tasks)]
    assert statuses.count(200) == 3 and statuses.count(429) == 7
    assert [(await chat(s, token)).status_code for s in pair] == [200, 200]  # all slots came back


async def test_concurrency_limit(single: Stack, engine: ScriptedEngine) -> None:
    _, token = await tenant_with_key(single, LimitsConfig(concurrent_requests=2))
    engine.gate = asyncio.Event()
    held = [asyncio.create_task(chat(single, token)) for _ in range(2)]
    await until(lambda: sum(single.gateway.in_flight.values()) == 2)  # both hold their slot, in the engine
    refused = await asyncio.gather(*(chat(single, token) for _ in range(3)))
    assert [r.status_code for r in refused] == [429] * 3
    assert refused[0].json()["error"]["code"] == "concurrent_requests" and refused[0].headers["retry-after"] == "1"
    engine.gate.set()
    assert [r.status_code for r in await asyncio.gather(*held)] == [200, 200]
    assert (await chat(single, token)).status_code == 200  # slots were given back
    stream = await chat(single, token, stream=True)
    assert stream.status_code == 200 and "[DONE]" in stream.text
    assert [r.status_code for r in await asyncio.gather(*(chat(single, token) for _ in range(2)))] == [200, 200]


async def test_tokens_per_minute_reserves_then_settles(single: Stack) -> None:
    _, token = await tenant_with_key(single, LimitsConfig(tokens_per_minute=40))
    first = await chat(single, token, max_tokens=10)  # reserves 13 + 10 = 23; uses 13 + 5 = 18
    assert first.status_code == 200 and first.headers["x-ratelimit-limit-tokens"] == "40"
    assert first.headers["x-ratelimit-remaining-tokens"] == "17"  # at admission: the whole reservation
    second = await chat(single, token, max_tokens=10)  # 18 settled + 23 > 40: the worst case does not fit
    assert second.status_code == 429 and second.json()["error"]["code"] == "tokens_per_minute"
    assert "reserves 23 tokens" in second.json()["error"]["message"]
    assert second.headers["x-ratelimit-remaining-tokens"] == "22"  # the unused 5 were refunded at the end
    third = await chat(single, token, max_tokens=5)  # 18 + 18 <= 40
    assert third.status_code == 200 and third.headers["x-ratelimit-remaining-tokens"] == "4"
    # without max_tokens a request reserves up to the profile's context: far past this limit
    assert (await chat(single, token)).json()["error"]["code"] == "tokens_per_minute"


async def test_per_key_limit_under_a_generous_tenant(single: Stack) -> None:
    tenant, token = await tenant_with_key(single, LimitsConfig(requests_per_minute=100))
    key_id = (await single.keys().list(tenant))[0].id
    await single.tenants().set_limits(tenant, LimitsConfig(requests_per_minute=1), key_id=key_id)
    single.gateway.auth.invalidate()
    assert (await chat(single, token)).status_code == 200
    second = await chat(single, token)
    assert second.status_code == 429 and "for this key" in second.json()["error"]["message"]
    other = (await single.keys().create(tenant)).token  # another key of the tenant is not limited by it
    assert (await chat(single, other)).status_code == 200


async def test_daily_budget_persists_in_the_database(
    single: Stack, tmp_path: Path, database_url: str, engine: ScriptedEngine
) -> None:
    _, token = await tenant_with_key(single, LimitsConfig(daily_token_budget=30))
    served = await chat(single, token, max_tokens=5)  # 18 tokens reserved and used
    assert served.status_code == 200 and served.headers["x-bastion-budget-remaining-tokens"] == "12"
    refused = await chat(single, token, max_tokens=5)  # 18 + 18 > 30
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "insufficient_quota"
    assert int(refused.headers["retry-after"]) <= 86400
    await single.gateway.flush()
    # A fresh replica without Redis knows only the database: it must refuse too.
    config = platform_config(str(tmp_path), database_url, ["m1"])
    async with gateway_stack(config, engine) as fresh:
        again = await chat(fresh, token, max_tokens=5)
        assert again.status_code == 429 and again.json()["error"]["type"] == "insufficient_quota"
    usage = await single.client.get("/v1/usage", headers={"authorization": f"Bearer {token}"})
    day = [r for r in usage.json()["data"] if len(r["period"]) == 10]
    assert (
        day[0]["prompt_tokens"] + day[0]["completion_tokens"] == 18 and day[0]["errors"] == 2
    )  # the fresh replica recorded its refusal too


async def test_per_key_monthly_budget(single: Stack) -> None:
    tenant, token = await tenant_with_key(single)
    key_id = (await single.keys().list(tenant))[0].id
    await single.tenants().set_limits(tenant, LimitsConfig(monthly_token_budget=20), key_id=key_id)
    single.gateway.auth.invalidate()
    assert (await chat(single, token, max_tokens=5)).status_code == 200  # 18 tokens
    refused = await chat(single, token, max_tokens=5)
    assert refused.status_code == 429 and "for this key" in refused.json()["error"]["message"]
    other = (await single.keys().create(tenant)).token
    assert (await chat(single, other)).status_code == 200  # the tenant itself has no budget
    await single.gateway.flush()
    async with single.sessions() as session:
        row = (await session.execute(select(KeyUsageCounter).where(KeyUsageCounter.key_id == key_id))).scalars()
        assert sorted((r.requests, r.tokens) for r in row) == [(2, 18), (2, 18)]  # day and month; refusal: 0


async def test_tenants_are_isolated(pair: list[Stack]) -> None:
    a, token_a = await tenant_with_key(pair[0], allowed_models=["m1"])
    b, token_b = await tenant_with_key(pair[0], allowed_models=["m2"])
    assert (await chat(pair[0], token_b, model="m2")).status_code == 200
    denied = await chat(pair[1], token_a, model="m2")
    assert denied.status_code == 403 and denied.json()["error"]["code"] == "model_not_allowed"
    assert (await chat(pair[1], token_a, model="m2@deep-context")).status_code == 403
    usage_a = await pair[1].client.get("/v1/usage", headers={"authorization": f"Bearer {token_a}"})
    assert usage_a.json()["tenant"] == a
    assert all(r["model"] != "m2" or r["requests"] == r["errors"] for r in usage_a.json()["data"])
    usage_b = await pair[0].client.get("/v1/usage", headers={"authorization": f"Bearer {token_b}"})
    assert usage_b.json()["tenant"] == b and {r["model"] for r in usage_b.json()["data"]} == {"m2"}
    # usage is the caller's own: no parameter selects another tenant
    other = await pair[0].client.get(f"/v1/usage?tenant={b}", headers={"authorization": f"Bearer {token_a}"})
    assert other.json()["tenant"] == a


async def test_last_used_is_written_in_batches(single: Stack) -> None:
    tenant, token = await tenant_with_key(single)
    assert (await single.keys().list(tenant))[0].last_used_at is None
    for _ in range(3):
        assert (await chat(single, token)).status_code == 200
    assert (await single.keys().list(tenant))[0].last_used_at is None  # not one write per request
    await single.gateway.flush()
    assert (await single.keys().list(tenant))[0].last_used_at is not None
