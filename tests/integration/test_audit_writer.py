"""The durable writer against real databases: an outage through a TCP proxy, replay without duplicates,
two writers at once, content encryption, and the health signal strict tenants depend on."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import delete, func, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from bastion.audit import AdminEvent, AuditWriter, EventContent, InferenceEvent
from bastion.audit.content_keys import decrypt_row
from bastion.audit.crypto import ContentCipher
from bastion.audit.signing import Signer, keygen
from bastion.audit.store import ANCHORS, CHECKPOINTS, EVENTS
from bastion.audit.verify import verify_database
from bastion.db import migrate
from bastion.db.session import create_engine

pytestmark = pytest.mark.integration
SECRET = "quarterly numbers: 4.2M, do not share"


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest) -> str:
    return request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")


async def _reset(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        if conn.dialect.name == "postgresql":  # superuser: triggers off for this transaction only
            await conn.execute(text("SET LOCAL session_replication_role = replica"))
        for table in (EVENTS, CHECKPOINTS, ANCHORS):
            await conn.execute(delete(table))


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    await asyncio.to_thread(migrate.upgrade, database_url)
    engine = create_engine(database_url)
    await _reset(engine)
    try:
        yield engine
    finally:
        await engine.dispose()


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Path]:
    return keygen(tmp_path / "keys")


@pytest.fixture
def signer(keys: dict[str, Path]) -> Signer:
    return Signer.from_file(keys["private"])


def event(i: int, tenant: str = "acme", **extra: Any) -> InferenceEvent:
    return InferenceEvent(tenant_id=tenant, model="m", profile="fast-agentic", status=200, request_id=f"r-{i}", **extra)


async def _stats(engine: AsyncEngine) -> tuple[int, int]:
    async with engine.connect() as conn:
        total = (await conn.execute(select(func.count()).select_from(EVENTS))).scalar_one()
        distinct = (await conn.execute(select(func.count(func.distinct(EVENTS.c.request_id))))).scalar_one()
    return total, distinct


class Proxy:
    """A TCP proxy on 127.0.0.1 in front of PostgreSQL; stop() cuts every live connection, like an outage."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update({writer, up_writer})

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers.difference_update({writer, up_writer})


@pytest.mark.slow
async def test_outage_loses_nothing_and_writes_nothing_twice(pg_url: str, signer: Signer, tmp_path: Path) -> None:
    await asyncio.to_thread(migrate.upgrade, pg_url)
    direct = create_engine(pg_url)
    await _reset(direct)
    proxy = Proxy(make_url(pg_url).port or 5432)
    await proxy.start()
    via_proxy = make_url(pg_url).set(port=proxy.port).render_as_string(hide_password=False)
    writer = AuditWriter(
        via_proxy, spool_dir=tmp_path / "spool", signer=signer, batch_size=20, retry_interval_s=0.05, db_timeout_s=5
    )
    await writer.start()
    total = 600
    try:
        for i in range(total):
            writer.enqueue(event(i, tenant=("acme", "globex")[i % 2]))
            if i % 25 == 0:
                await asyncio.sleep(0.005)  # a stream of requests, not one burst
            if i == 200:
                await proxy.stop()  # mid-stream: live connections cut, new ones refused
            if i == 400:
                await writer.flush()
                assert writer.spooling and writer.spool_bytes > 0
                assert writer.healthy  # durable in the fsync'd spool, so strict tenants are still served
                assert (await _stats(direct))[0] < 400
                await proxy.start()
        await writer.drain(timeout=30)
        assert writer.spool_bytes == 0 and not writer.spooling
        await writer.checkpoint()
    finally:
        await writer.close()
        await proxy.stop()
    try:
        assert await _stats(direct) == (total, total)  # every request once, none twice
        report = await verify_database(direct, signer.verifier)
        assert report.ok, report.first_problem
        assert report.events == total and len(report.chains) == 2
        assert all(chain.checkpoints >= 1 for chain in report.chains)
        assert not list((tmp_path / "spool").glob("*.jsonl"))  # replayed spools are removed
    finally:
        await direct.dispose()


async def test_replay_skips_rows_already_committed(engine: AsyncEngine, signer: Signer, tmp_path: Path) -> None:
    """A batch whose commit succeeded but whose acknowledgement was lost is spooled too: replay must skip it."""
    writer = await AuditWriter(engine, spool_dir=tmp_path / "spool", signer=signer, batch_size=10).start()
    for i in range(30):
        writer.enqueue(event(i))
    await writer.flush()
    assert writer._spool is not None
    committed, _ = await _stats(engine)
    # Simulate the lost acknowledgement: the rows that are in the database are also in the spool.
    async with engine.connect() as conn:
        rows = [dict(r) for r in (await conn.execute(select(EVENTS).order_by(EVENTS.c.id))).mappings()]
    writer._spool.append(rows[-10:])
    for i in range(30, 40):
        writer.enqueue(event(i))
    await writer.drain(timeout=10)
    await writer.close()
    assert committed == 30
    assert await _stats(engine) == (40, 40)
    assert (await verify_database(engine, signer.verifier)).ok


async def test_two_writers_two_chains_both_verify(engine: AsyncEngine, signer: Signer, tmp_path: Path) -> None:
    writers = [
        await AuditWriter(engine, spool_dir=tmp_path / "spool", signer=signer, batch_size=16).start() for _ in range(2)
    ]

    async def stream(writer: AuditWriter, offset: int) -> None:
        for i in range(150):
            writer.enqueue(event(offset + i))
            if i % 10 == 0:
                await asyncio.sleep(0)

    await asyncio.gather(stream(writers[0], 0), stream(writers[1], 1000))
    for writer in writers:
        await writer.close()
    report = await verify_database(engine, signer.verifier)
    assert report.ok, report.first_problem
    assert sorted(c.chain_id for c in report.chains) == sorted(f"{w.writer_id}:acme" for w in writers)
    assert [c.events for c in report.chains] == [150, 150]
    assert await _stats(engine) == (300, 300)


async def test_content_is_encrypted_and_nowhere_else(
    engine: AsyncEngine, keys: dict[str, Path], signer: Signer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    cipher = ContentCipher.from_file(keys["content"])
    writer = await AuditWriter(engine, signer=signer, cipher=cipher).start()
    writer.enqueue(event(1, content=EventContent(prompt=SECRET, completion=f"re: {SECRET}")))
    writer.enqueue(event(2))  # a tenant that did not opt in: the gateway passes no content
    await writer.close()
    plain = AuditWriter(engine, signer=signer)  # no content key: content is dropped, never stored in clear
    await plain.start()
    plain.enqueue(event(3, content=EventContent(prompt=SECRET)))
    await plain.close()

    async with engine.connect() as conn:
        rows = [dict(r) for r in (await conn.execute(select(EVENTS).order_by(EVENTS.c.id))).mappings()]
        as_text = (await conn.execute(text("SELECT * FROM audit_events"))).all()
    assert SECRET not in repr(as_text) and SECRET.encode() not in b"".join(r["content"] or b"" for r in rows)
    assert SECRET not in caplog.text
    assert await decrypt_row(engine, rows[0], cipher) == {"prompt": SECRET, "completion": f"re: {SECRET}"}
    assert rows[1]["content"] is None and await decrypt_row(engine, rows[1], cipher) is None
    assert rows[2]["content"] is None and rows[2]["payload"]["content_dropped"]
    assert (await verify_database(engine, signer.verifier)).ok


async def test_health_and_orphan_spool_adoption(pg_url: str, signer: Signer, tmp_path: Path) -> None:
    """No database and no spool: unhealthy. A dead writer's spool is replayed by the next writer."""
    await asyncio.to_thread(migrate.upgrade, pg_url)
    unreachable = make_url(pg_url).set(port=1).render_as_string(hide_password=False)
    nowhere = await AuditWriter(unreachable, retry_interval_s=0.05).start()
    assert nowhere.healthy  # nothing has failed yet
    nowhere.enqueue(event(0))
    for _ in range(200):  # the first insert fails at once (connection refused); allow for a slow machine
        if not nowhere.healthy:
            break
        await asyncio.sleep(0.025)
    assert not nowhere.healthy  # strict tenants must be refused now
    await nowhere.close(timeout=0.5)

    spool = tmp_path / "spool"
    first = await AuditWriter(unreachable, spool_dir=spool, signer=signer, retry_interval_s=0.05).start()
    for i in range(12):
        first.enqueue(event(i))
    await first.flush(timeout=10)
    assert first.healthy and first.spool_bytes > 0
    await first.close(timeout=0.5)  # the database never came back: the spool stays on disk
    assert (spool / f"{first.writer_id}.jsonl").stat().st_size > 0

    direct = create_engine(pg_url)
    await _reset(direct)
    second = await AuditWriter(direct, spool_dir=spool, signer=signer).start()
    second.enqueue(event(100))
    await second.drain(timeout=10)
    await second.close()
    try:
        assert await _stats(direct) == (13, 13)
        report = await verify_database(direct, signer.verifier)
        assert report.ok and sorted(c.events for c in report.chains) == [1, 12]
        assert [p.name for p in spool.iterdir()] == []
    finally:
        await direct.dispose()


async def test_an_unserializable_event_is_dropped_without_breaking_the_chain(
    engine: AsyncEngine, signer: Signer, caplog: pytest.LogCaptureFixture
) -> None:
    writer = await AuditWriter(engine, signer=signer).start()
    writer.enqueue(event(1))
    bad = AdminEvent(tenant_id="acme", actor="alice", action="set", target_type="tenant", after={"r": float("nan")})
    writer.enqueue(bad)  # same tenant, so the same chain as its neighbours
    writer.enqueue(event(2))
    with pytest.raises(TypeError):
        writer.enqueue({"kind": "inference"})  # type: ignore[arg-type]
    await writer.close()
    assert writer.dropped == 1 and "dropped" in caplog.text
    report = await verify_database(engine, signer.verifier)
    assert report.ok and report.events == 2 and [c.last_sequence for c in report.chains] == [2]


async def test_a_different_event_at_a_taken_position_is_an_alarm_not_a_loss(
    engine: AsyncEngine, signer: Signer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Someone with INSERT rights (the app role can insert) takes the writer's next position first: the genuine
    event is neither dropped nor written over; it is kept fsync'd, counted, and named in an error log."""
    from bastion.audit.chain import ChainHead
    from bastion.audit.store import insert_events
    from bastion.telemetry.metrics import GatewayMetrics

    spool = tmp_path / "spool"
    writer = await AuditWriter(engine, spool_dir=spool, signer=signer).start()
    writer.enqueue(event(1))
    await writer.drain(timeout=10)
    chain = f"{writer.writer_id}:acme"
    async with engine.connect() as conn:
        first = (await conn.execute(select(EVENTS).where(EVENTS.c.chain_id == chain))).mappings().one()
    forged = ChainHead(chain, sequence=1, hash=first["hash"]).seal(event(666).record() | {"content": None})
    async with engine.begin() as conn:
        assert await insert_events(conn, [forged]) == []
    writer.enqueue(event(2))
    writer.enqueue(event(3))
    await writer.drain(timeout=10)
    metrics = GatewayMetrics(max_tenant_labels=5)
    metrics.watch_audit(writer)
    assert "bastion_audit_conflicts_total 1.0" in metrics.render().decode()
    await writer.close()

    assert writer.conflicts == 1
    kept = (spool / "conflicts" / f"{writer.writer_id}.jsonl").read_text().splitlines()
    assert [(json.loads(line)["sequence"], json.loads(line)["request_id"]) for line in kept] == [(2, "r-2")]
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert [m for m in errors if "audit conflict" in m] == [
        f"audit conflict: chain {chain} sequence 2 already holds a different event; ours (hash "
        f"{json.loads(kept[0])['hash']}) kept {spool / 'conflicts' / (writer.writer_id + '.jsonl')}"
    ]
    async with engine.connect() as conn:
        stored = (await conn.execute(select(EVENTS.c.sequence, EVENTS.c.request_id).order_by(EVENTS.c.sequence))).all()
    assert [tuple(r) for r in stored] == [(1, "r-1"), (2, "r-666"), (3, "r-3")]
    problem = (await verify_database(engine, signer.verifier)).first_problem
    assert problem is not None and (problem.sequence, problem.what) == (3, "bad prev hash")


async def test_the_same_row_twice_in_one_replay_is_written_once(engine: AsyncEngine) -> None:
    from bastion.audit.chain import ChainHead
    from bastion.audit.store import insert_events

    head = ChainHead("w:acme")
    rows = [head.seal(event(i).record() | {"content": None}) for i in range(3)]
    async with engine.begin() as conn:
        assert await insert_events(conn, rows[:2]) == []
    async with engine.begin() as conn:  # a lost acknowledgement: the spool holds rows 1-2 twice, then row 3
        assert await insert_events(conn, [rows[0], rows[1], rows[0], rows[1], rows[2]]) == []
    assert await _stats(engine) == (3, 3)


async def test_content_during_an_outage_is_dropped_not_waited_for(
    pg_url: str, signer: Signer, keys: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """No data key without the database: the event is spooled at once with `content_dropped`, one lookup tried."""
    unreachable = make_url(pg_url).set(port=1).render_as_string(hide_password=False)
    spool = tmp_path / "spool"
    cipher = ContentCipher.from_file(keys["content"])
    writer = await AuditWriter(
        unreachable, spool_dir=spool, signer=signer, cipher=cipher, retry_interval_s=0.05
    ).start()
    for i in range(20):
        writer.enqueue(event(i, content=EventContent(prompt=SECRET)))
    await writer.flush(timeout=10)
    await writer.close(timeout=0.5)
    rows = [json.loads(line) for line in (spool / f"{writer.writer_id}.jsonl").read_text().splitlines()]
    assert len(rows) == 20 and all(r["content"] is None for r in rows)
    assert {r["payload"]["content_dropped"] for r in rows} == {"tenant data key unavailable"}
    assert caplog.text.count("no data key for tenant acme") == 1 and SECRET not in caplog.text
