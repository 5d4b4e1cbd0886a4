"""Redis and the database going away under a running gateway, with real services: a private redis-server this
test stops and restarts, and the real PostgreSQL reached through a TCP proxy the test cuts.

Redis down: each tenant's policy applies (fallback to the in-process limiter, with a metric, or refuse with 503)
and the shared limiter is used again once Redis is back. Database down: known keys keep working, a revocation
announced over Redis is honoured, the admin API answers 503, audit events spool and all reach the database
when it returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import redis
from sqlalchemy import func, select

from bastion.bench.doubles import TEST_PEPPER, ScriptedEngine, gateway_stack, platform_config, until, upstreams_for
from bastion.config.schema import LimitsConfig, RedisConfig
from bastion.db import migrate
from bastion.db.models import AuditEvent
from bastion.db.session import create_engine, session_factory

pytestmark = [pytest.mark.integration, pytest.mark.slow]
REDIS_PORT = 18240
PROXY_PORT = 18241
MSG = {"role": "user", "content": "hello there"}


# --- a private Redis the test can stop --------------------------------------------------------------------


class RedisServer:
    def __init__(self, port: int, workdir: Path) -> None:
        self.port, self.workdir = port, workdir
        self.proc: subprocess.Popen | None = None
        self.url = f"redis://127.0.0.1:{port}/0"

    def start(self) -> None:
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.proc = subprocess.Popen([*args, "--dir", str(self.workdir)], stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                if redis.Redis(port=self.port, socket_timeout=0.5).ping():
                    return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed (scripts/install-tools.sh)")
    server = RedisServer(REDIS_PORT, tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def database_url(pg_url: str) -> str:
    migrate.upgrade(pg_url)
    return pg_url


async def _chat(client: httpx.AsyncClient, token: str, **extra) -> httpx.Response:
    body = {"model": "m1", "messages": [MSG], **extra}
    return await client.post("/v1/chat/completions", json=body, headers={"authorization": f"Bearer {token}"})


async def _tenant(stack, limits: LimitsConfig | None = None) -> tuple[str, str]:
    name = f"t-{uuid.uuid4().hex[:8]}"
    await stack.tenants().create(name, limits=limits)
    return name, (await stack.keys().create(name, scopes=["inference"])).token


def _metric(text: str, name: str) -> float:
    line = next(x for x in text.splitlines() if x.startswith(name + " "))
    return float(line.split()[1])


async def test_redis_down_follows_each_tenants_policy_and_recovers(
    tmp_path: Path, database_url: str, private_redis: RedisServer
) -> None:
    config = platform_config(str(tmp_path), database_url, ["m1"], redis_url=private_redis.url)
    strict_name = f"strict-{uuid.uuid4().hex[:6]}"
    redis_config = RedisConfig(url=private_redis.url, tenant_policies={strict_name: "refuse"})
    config = config.model_copy(update={"redis": redis_config})
    engine = ScriptedEngine(upstreams_for(["m1"], ongoing=100), record_bodies=False)
    async with gateway_stack(config, engine) as stack:
        _, lenient = await _tenant(stack, LimitsConfig(requests_per_minute=1000, concurrent_requests=8))
        _, capped = await _tenant(stack, LimitsConfig(requests_per_minute=3))
        await stack.tenants().create(strict_name, limits=LimitsConfig(requests_per_minute=1000))
        strict = (await stack.keys().create(strict_name, scopes=["inference"])).token
        for token in (lenient, strict):
            assert (await _chat(stack.client, token)).status_code == 200
        assert redis.Redis(port=REDIS_PORT).keys("bastion:rl*"), "the shared limiter counts in Redis"

        private_redis.stop()
        # fallback (the platform default): served by the in-process limiter, which still enforces limits
        assert [(await _chat(stack.client, lenient)).status_code for _ in range(3)] == [200] * 3
        assert [(await _chat(stack.client, capped)).status_code for _ in range(4)] == [200, 200, 200, 429]
        stream = await _chat(stack.client, lenient, stream=True)
        assert stream.status_code == 200 and stream.text.rstrip().endswith("data: [DONE]")
        # refuse: a 503 in OpenAI's format with a retry hint
        refused = await _chat(stack.client, strict)
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "limiter_unavailable"
        assert refused.headers["retry-after"] == "1"
        metrics = await stack.scrape()
        assert _metric(metrics, "bastion_limiter_redis_unavailable") == 1
        assert _metric(metrics, "bastion_limiter_fallback_admissions_total") >= 7
        assert _metric(metrics, "bastion_limiter_redis_refusals_total") >= 1

        private_redis.start()  # empty (no persistence): recovery needs nothing from an operator
        statuses: list[int] = []

        async def strict_served() -> bool:
            statuses.append((await _chat(stack.client, strict)).status_code)
            return statuses[-1] == 200

        deadline = time.monotonic() + 10
        while not await strict_served():
            assert time.monotonic() < deadline, f"still refused after Redis came back: {statuses[-5:]}"
            await asyncio.sleep(0.2)
        assert redis.Redis(port=REDIS_PORT).keys("bastion:rl*"), "counting is back in the shared Redis"
        metrics = await stack.scrape()
        assert _metric(metrics, "bastion_limiter_redis_unavailable") == 0
        print(  # the figures docs/reliability.md quotes (pytest -s)
            f"\nRELIABILITY redis: {len(statuses)} tries until the refusing tenant was served again "
            f"(+{time.monotonic() - (deadline - 10):.1f} s after redis-server restarted)"
        )


# --- the database behind a proxy the test can cut -----------------------------------------------------------


class CuttableProxy:
    """A loopback TCP proxy to PostgreSQL: `cut()` closes the listener and every open connection."""

    def __init__(self, port: int, target: tuple[str, int]) -> None:
        self.port, self.target = port, target
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port, reuse_address=True)

    async def cut(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None
        for writer in list(self.writers):
            writer.transport.abort()
        self.writers.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self.writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self.writers -= {writer, up_writer}


@pytest.fixture
async def proxy() -> AsyncIterator[CuttableProxy]:
    p = CuttableProxy(PROXY_PORT, ("127.0.0.1", 5432))
    await p.start()
    try:
        yield p
    finally:
        await p.cut()


def _session_cookie(config) -> str:
    """A local platform admin's console session, sealed as the login would."""
    from bastion.control.principal import PLATFORM_ADMIN
    from bastion.control.session import SESSION_COOKIE, CookieCodec, key_from_file

    data = {"sub": "admin", "user": "admin", "roles": [PLATFORM_ADMIN], "tenant": None, "via": "local", "csrf": "x"}
    return CookieCodec(key_from_file(config.data_dir)).seal(SESSION_COOKIE, data, 3600)


async def _audit_count(url: str, request_ids: list[str]) -> int:
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            query = select(func.count()).select_from(AuditEvent).where(AuditEvent.request_id.in_(request_ids))
            return int(await conn.scalar(query) or 0)
    finally:
        await engine.dispose()


async def test_database_down_keeps_known_keys_spools_audit_and_admin_answers_503(
    tmp_path: Path, database_url: str, redis_url: str, proxy: CuttableProxy
) -> None:
    from bastion.audit.recorder import AuditRecorder
    from bastion.audit.service import build_writer
    from bastion.control.app import create_app as create_control
    from bastion.control.session import SESSION_COOKIE
    from bastion.control.settings import ControlSettings
    from bastion.tenancy.invalidation import publisher
    from bastion.tenancy.key_service import KeyService

    proxied = database_url.replace("@127.0.0.1:5432/", f"@127.0.0.1:{PROXY_PORT}/")
    assert proxied != database_url
    config = platform_config(str(tmp_path), proxied, ["m1"], redis_url=redis_url)
    writer = await build_writer(config, retry_interval_s=0.2).start()
    engine = ScriptedEngine(upstreams_for(["m1"], ongoing=100), record_bodies=False)
    control = create_control(config, settings=ControlSettings.from_config(config, cookie_secure=False))
    admin = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=control),
        base_url="http://control.test",
        cookies={SESSION_COOKIE: _session_cookie(config)},
    )
    answered: list[tuple[str, int]] = []  # (request id, status) of every inference request

    async def chat(token: str, **extra) -> httpx.Response:
        response = await _chat(stack.client, token, **extra)
        answered.append((response.headers["x-request-id"], response.status_code))
        return response

    async with gateway_stack(config, engine, recorders=[AuditRecorder(writer)]) as stack:
        assert stack.gateway.listener is not None
        _, known = await _tenant(stack)
        _, doomed = await _tenant(stack)
        assert (await admin.get("/admin/api/tenants")).status_code == 200
        assert [(await chat(t)).status_code for t in (known, doomed)] == [200, 200]
        await asyncio.wait_for(stack.gateway.listener.ready.wait(), 5)

        await proxy.cut()
        cut_at = time.monotonic()
        while time.monotonic() - cut_at < 2.5:  # well past the key cache's TTL: every load fails now
            assert (await chat(known)).status_code == 200
            await asyncio.sleep(0.1)
        down_served = sum(status == 200 for _, status in answered) - 2
        streamed = await chat(known, stream=True)
        assert streamed.status_code == 200 and streamed.text.rstrip().endswith("data: [DONE]")
        assert stack.gateway.auth.db_down

        # A revocation made where the database is reachable (the control plane) reaches this gateway over Redis.
        direct = create_engine(database_url)
        try:
            keys = KeyService(session_factory(direct), TEST_PEPPER, publisher(redis_url))
            await keys.revoke(doomed.split("_")[1])
        finally:
            await direct.dispose()
        await until(lambda: doomed.split("_")[1] not in stack.gateway.auth._cache, timeout_s=5)
        refused = await chat(doomed)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "key_store_unavailable"
        never_seen = await chat("bst_zzzzzzzzzzzz_" + "x" * 43)
        assert never_seen.status_code in (401, 503)

        # The admin API answers 503 in its JSON error format, not a 500.
        down = await admin.get("/admin/api/tenants")
        assert down.status_code == 503, down.text
        assert down.json()["error"]["code"] == "database_unavailable"

        await until(lambda: writer.spool_bytes > 0, timeout_s=10)  # audit events wait in the spool

        await proxy.start()
        await until(lambda: writer.spool_bytes == 0, timeout_s=30)
        await writer.drain(timeout=30)
        assert (await admin.get("/admin/api/tenants")).status_code == 200
        deadline = time.monotonic() + 10  # the key store is tried again at most once a second
        while stack.gateway.auth.db_down:
            assert (await chat(known)).status_code == 200
            assert time.monotonic() < deadline, "the key cache still serves stale entries 10 s after recovery"
            await asyncio.sleep(0.2)

    await writer.close(timeout=10)
    await admin.aclose()
    # Every request served or refused as unauthorized has its audit row: none lost while the database was away.
    # (A key that cannot be checked belongs to no known tenant: its 503 is counted in metrics, not audited.)
    expected = [rid for rid, status in answered if status != 503]
    assert len(expected) > 20
    assert await _audit_count(database_url, expected) == len(expected)
    print(
        f"\nRELIABILITY database: {len(answered)} requests, {sum(s == 200 for _, s in answered)} served "
        f"({down_served} while the database was cut), {len(expected)} audit rows expected and found"
    )
