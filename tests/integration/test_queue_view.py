"""Fair-share weights from the tenant record and the queue figures the console shows, end to end below the
control plane's HTTP layer: a tenant's weight set through the admin path (TenantService + the key-change
announcement over real Redis) reaches a running gateway at once and wins over `gateway.tenant_weights`; a
saturated profile's waiters show up per tenant and profile on the gateway's internal pool endpoint, read by the
control plane's real poller (`PoolStatsPoller`) and pool view (`pool_view.pool_status`, with tenant names).
Scripted engine replicas, SQLite, real Redis."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import httpx
import pytest

from bastion.bench.doubles import ScriptedEngine, Stack, gateway_stack, platform_config, until, upstreams_for
from bastion.control import pool_view
from bastion.db import migrate
from bastion.pool.live_poller import PoolStatsPoller
from bastion.pool.live_stats import POOL_STATS_PATH, load_token

pytestmark = pytest.mark.integration
SERVICE_S = 0.3  # each request holds the profile's one slot this long


@pytest.fixture
def database_url(sqlite_url: str) -> str:
    migrate.upgrade(sqlite_url)
    return sqlite_url


async def _tenant(stack: Stack, name: str) -> tuple[str, str]:
    tenant = await stack.tenants().create(name)
    return tenant.id, (await stack.keys().create(name)).token


async def _chat(stack: Stack, token: str) -> int:
    body = {"model": "m1@fast-agentic", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    response = await stack.client.post("/v1/chat/completions", json=body, headers={"authorization": f"Bearer {token}"})
    return response.status_code


@pytest.mark.timeout(90)
async def test_recorded_weights_and_queue_figures_reach_the_pool_view(
    tmp_path: Path, database_url: str, redis_url: str
) -> None:
    suffix = uuid.uuid4().hex[:6]
    heavy, light = f"heavy-{suffix}", f"light-{suffix}"
    config = platform_config(
        str(tmp_path),
        database_url,
        ["m1"],
        redis_url=redis_url,
        queue={"max_length": 64, "max_wait_s": 30},
        gateway={"tenant_weights": {heavy: 2.0, light: 5.0}},  # the file's weights; heavy's record overrides its own
    )
    engine = ScriptedEngine(upstreams_for(["m1"], ongoing=1), delay_s=SERVICE_S)
    async with gateway_stack(config, engine, pool_stats="queues") as stack:
        heavy_id, heavy_key = await _tenant(stack, heavy)
        light_id, light_key = await _tenant(stack, light)
        assert await _chat(stack, heavy_key) == 200  # starts the key-change listener
        listener = stack.gateway.listener
        assert listener is not None and await asyncio.wait_for(listener.ready.wait(), 10)
        assert await _chat(stack, heavy_key) == 200  # heavy's key is cached now, its principal without a weight
        cached = stack.gateway.auth._cache
        assert cached
        await stack.tenants().update(heavy, fair_share_weight=4.0)  # what AdminService.update_tenant does, then:
        await stack.keys().tenant_changed(heavy_id)  # announced: the gateway drops heavy's cached key
        await until(lambda: not cached, timeout_s=5)  # the notice crossed Redis (the TTL would bound it anyway)

        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=stack.app), base_url="http://gateway.test")
        poller = PoolStatsPoller("http://gateway.test" + POOL_STATS_PATH, load_token(config), client=client)
        try:
            flood = [asyncio.create_task(_chat(stack, heavy_key)) for _ in range(5)]
            flood += [asyncio.create_task(_chat(stack, light_key)) for _ in range(2)]
            depth = stack.gateway.upstreams.queues.depth
            await until(
                lambda: depth().get((heavy_id, "fast-agentic"), 0) >= 2 and (light_id, "fast-agentic") in depth()
            )
            await poller.poll_once()
            names = {heavy_id: heavy, light_id: light}
            waiting = await pool_view.pool_status(config, poller, names)
            rows = {(q["tenant"], q["profile"]): q for q in waiting["queues"]}
            assert rows[(heavy, "fast-agentic")]["waiting"] >= 2
            assert rows[(heavy, "fast-agentic")]["weight"] == 4.0  # the record's weight, not the file's 2
            assert rows[(light, "fast-agentic")]["weight"] == 5.0  # no record: the platform file's
            assert {await task for task in flood} == {200}

            await poller.poll_once()
            done = {
                (q["tenant"], q["profile"]): q for q in (await pool_view.pool_status(config, poller, names))["queues"]
            }
        finally:
            await poller.aclose()
    after = done[(heavy, "fast-agentic")]
    assert after["waiting"] == 0 and after["waited"] >= 4  # the burst's waits stay on the page for a while
    assert SERVICE_S * 0.5 <= after["max_wait_s"] < 30 and 0 < after["mean_wait_s"] <= after["max_wait_s"]
    assert done[(light, "fast-agentic")]["waited"] >= 1


async def test_the_internal_endpoint_needs_the_token(tmp_path: Path, database_url: str) -> None:
    """The queues (tenant ids, waits) are not for tenants: without the shared token, the same 404 as anywhere."""
    config = platform_config(str(tmp_path), database_url, ["m1"])
    async with gateway_stack(config, ScriptedEngine(upstreams_for(["m1"])), pool_stats="queues") as stack:
        refused = await stack.client.get(POOL_STATS_PATH, headers={"authorization": "Bearer not-the-token"})
        answered = await stack.client.get(POOL_STATS_PATH, headers={"authorization": f"Bearer {load_token(config)}"})
    assert refused.status_code == 404
    assert answered.status_code == 200 and answered.json()["queues"] == [] and answered.json()["deployments"] == {}
