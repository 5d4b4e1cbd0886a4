"""A full profile queues requests and shares its freed slots fairly across tenants: tenant A floods a saturated
profile, and tenant B's requests still start within B's fair share, not behind A's whole burst (scripted engine
replicas, the gateway's real queue, routing and limits; B's wait is measured and bounded)."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import pytest

from bastion.bench.doubles import ScriptedEngine, Stack, gateway_stack, platform_config, until, upstreams_for
from bastion.db import migrate

pytestmark = pytest.mark.integration
SERVICE_S = 0.1  # each request holds its slot this long
SLOTS = 2  # the profile's max_ongoing_requests


@pytest.fixture
def database_url(sqlite_url: str) -> str:
    migrate.upgrade(sqlite_url)
    return sqlite_url


async def _key(stack: Stack) -> tuple[str, str]:
    name = f"t-{uuid.uuid4().hex[:8]}"
    tenant = await stack.tenants().create(name)
    return tenant.id, (await stack.keys().create(name)).token


async def _timed(stack: Stack, token: str) -> tuple[int, float, dict[str, str]]:
    body = {"model": "m1@fast-agentic", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    started = time.perf_counter()
    response = await stack.client.post("/v1/chat/completions", json=body, headers={"authorization": f"Bearer {token}"})
    return response.status_code, time.perf_counter() - started, dict(response.headers)


@pytest.mark.timeout(60)
async def test_a_flooding_tenant_cannot_starve_another(tmp_path: Path, database_url: str) -> None:
    config = platform_config(str(tmp_path), database_url, ["m1"], queue={"max_length": 64, "max_wait_s": 30})
    engine = ScriptedEngine(upstreams_for(["m1"], ongoing=SLOTS), delay_s=SERVICE_S)
    async with gateway_stack(config, engine) as stack:
        a_id, a = await _key(stack)
        b_id, b = await _key(stack)
        flood = [asyncio.create_task(_timed(stack, a)) for _ in range(40)]
        await until(lambda: stack.gateway.upstreams.queues.depth().get((a_id, "fast-agentic"), 0) >= 20)
        scraped = await stack.scrape()
        assert f'bastion_queue_depth{{profile="fast-agentic",tenant="{a_id}"}}' in scraped
        b_results = await asyncio.gather(*(_timed(stack, b) for _ in range(3)))
        a_results = await asyncio.gather(*flood)
        scraped = await stack.scrape()
    assert {s for s, _, _ in a_results + b_results} == {200}
    b_waits = [latency for _, latency, _ in b_results]
    # Fair share: B's 3 requests alternate with A's, 2 slots → all of B's start within ~3 service times. In arrival
    # order B would wait behind 20 or more of A's requests: 20 / 2 slots * 0.1 s = 1 s at least.
    assert max(b_waits) < 8 * SERVICE_S, b_waits
    assert max(latency for _, latency, _ in a_results) > 15 * SERVICE_S  # A's burst really was queued
    assert any(h["x-bastion-routing-reason"] == "queued" for _, _, h in b_results)
    assert f'bastion_queue_wait_seconds_count{{profile="fast-agentic",tenant="{b_id}"}} 3.0' in scraped
    print(
        f"B's latency with A's burst of 40 queued: max {max(b_waits) * 1000:.0f} ms (service {SERVICE_S * 1000:.0f} ms)"
    )


@pytest.mark.timeout(60)
async def test_past_the_wait_bound_a_429_with_retry_after(tmp_path: Path, database_url: str) -> None:
    config = platform_config(str(tmp_path), database_url, ["m1"], queue={"max_length": 8, "max_wait_s": 0.2})
    engine = ScriptedEngine(upstreams_for(["m1"], ongoing=1))
    engine.gate = asyncio.Event()
    async with gateway_stack(config, engine) as stack:
        _, a = await _key(stack)
        held = asyncio.create_task(_timed(stack, a))
        await until(lambda: stack.gateway.in_flight.get("engine-m1--fast-agentic") == 1)
        status, waited, headers = await _timed(stack, a)
        assert status == 429 and waited >= 0.2 and headers["retry-after"] == "1"
        engine.gate.set()
        assert (await held)[0] == 200
        assert stack.gateway.in_flight == {"engine-m1--fast-agentic": 0}
