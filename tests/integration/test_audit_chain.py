"""Tamper evidence on SQLite and PostgreSQL: each kind of tampering is detected and located; the trigger
refuses changes; exports round-trip in every format and fail verification when one byte changes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import delete, select, text, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from bastion.audit import AuditWriter, EventContent, InferenceEvent
from bastion.audit.chain import row_hash
from bastion.audit.content_keys import decrypt_row
from bastion.audit.crypto import ContentCipher
from bastion.audit.export import MANIFEST, export_events
from bastion.audit.exportcheck import verify_export
from bastion.audit.formats import FORMATS, events_file, read_rows
from bastion.audit.keyring import handover_record
from bastion.audit.signing import Signer, Verifier, keygen
from bastion.audit.store import CHECKPOINTS, EVENTS, RECORDS
from bastion.audit.verify import DELETED, INSERTED, MODIFIED, REORDERED, verify_database
from bastion.db import migrate
from bastion.db.session import create_engine

pytestmark = pytest.mark.integration


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest) -> str:
    return request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")


async def reset_audit(engine: AsyncEngine) -> None:
    """Empty the audit tables (PostgreSQL's session database is shared by the whole test session)."""
    async with engine.begin() as conn:
        await tamper_mode(conn)
        await conn.execute(text("DELETE FROM audit_events"))
        await conn.execute(text("DELETE FROM audit_checkpoints"))
        await conn.execute(text("DELETE FROM audit_anchors"))
        await conn.execute(text("DELETE FROM audit_records"))


async def tamper_mode(conn: AsyncConnection) -> None:
    """As superuser, switch triggers off for this transaction (what an attacker with the owner role could do)."""
    if conn.dialect.name == "postgresql":
        await conn.execute(text("SET LOCAL session_replication_role = replica"))


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    await asyncio.to_thread(migrate.upgrade, database_url)
    engine = create_engine(database_url)
    await reset_audit(engine)
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
    return InferenceEvent(
        tenant_id=tenant, model="m", profile="deep-context", status=200, request_id=f"req-{i}", prompt_tokens=i, **extra
    )


async def write_events(engine: AsyncEngine, signer: Signer, n: int, **options: Any) -> AuditWriter:
    writer = await AuditWriter(engine, signer=signer, **options).start()
    for i in range(n):
        writer.enqueue(event(i))
    await writer.checkpoint()
    await writer.close()
    return writer


async def _row(conn: AsyncConnection, chain: str, seq: int) -> dict[str, Any]:
    query = select(EVENTS).where(EVENTS.c.chain_id == chain, EVENTS.c.sequence == seq)
    return dict((await conn.execute(query)).mappings().one())


async def _set_seq(conn: AsyncConnection, chain: str, old: int, new: int) -> None:
    where = (EVENTS.c.chain_id == chain) & (EVENTS.c.sequence == old)
    await conn.execute(update(EVENTS).where(where).values(sequence=new))


async def tamper(conn: AsyncConnection, chain: str, how: str) -> None:
    """Each attack on event 5 of a 10-event chain, done with plain SQL."""
    where = (EVENTS.c.chain_id == chain) & (EVENTS.c.sequence == 5)
    if how == MODIFIED:
        await conn.execute(update(EVENTS).where(where).values(payload={"status": 200, "prompt_tokens": 0}))
    elif how == DELETED:
        await conn.execute(delete(EVENTS).where(where))
    elif how == REORDERED:  # swap events 5 and 6
        await _set_seq(conn, chain, 5, -1)
        await _set_seq(conn, chain, 6, 5)
        await _set_seq(conn, chain, -1, 6)
    elif how == INSERTED:  # make room at 5, then forge an event there that links correctly to event 4
        for seq in range(10, 4, -1):
            await _set_seq(conn, chain, seq, seq + 1)
        forged = {**(await _row(conn, chain, 4)), "sequence": 5, "request_id": "forged"}
        forged.pop("id")
        forged["prev_hash"] = forged["hash"]
        forged["hash"] = row_hash(forged["prev_hash"], forged)
        await conn.execute(EVENTS.insert().values(**forged))


@pytest.mark.parametrize("how", [MODIFIED, DELETED, INSERTED, REORDERED])
async def test_tampering_is_detected_and_located(engine: AsyncEngine, signer: Signer, how: str) -> None:
    writer = await write_events(engine, signer, 10)
    chain = f"{writer.writer_id}:acme"
    before = await verify_database(engine, signer.verifier)
    assert before.ok and before.events == 10 and before.chains[0].checkpoints == 3  # genesis, head, final
    assert (before.chains[0].final_sequence, before.chains[0].unsigned_events) == (10, 0)

    async with engine.begin() as conn:
        await tamper_mode(conn)
        await tamper(conn, chain, how)

    report = await verify_database(engine, signer.verifier)
    problem = report.first_problem
    assert problem is not None, how
    assert (problem.chain_id, problem.sequence, problem.what) == (chain, 5, how), str(problem)


async def test_forged_checkpoint_and_truncation_are_detected(engine: AsyncEngine, signer: Signer) -> None:
    writer = await write_events(engine, signer, 6)
    chain = f"{writer.writer_id}:acme"
    async with engine.begin() as conn:
        await tamper_mode(conn)
        await conn.execute(update(CHECKPOINTS).values(signature=b"\x00" * 64))
    problems = (await verify_database(engine, signer.verifier)).problems
    assert [(p.chain_id, p.sequence, p.what) for p in problems] == [
        (chain, 0, "bad signature"),  # the genesis
        (chain, 0, "no genesis"),  # so the chain was not opened by a trusted writer
        (chain, 6, "bad signature"),  # the head written by checkpoint()
        (chain, 6, "bad signature"),  # the final head written by close()
    ]

    await reset_audit(engine)
    writer = await write_events(engine, signer, 6)
    chain = f"{writer.writer_id}:acme"
    async with engine.begin() as conn:
        await tamper_mode(conn)
        await conn.execute(delete(EVENTS).where(EVENTS.c.chain_id == chain, EVENTS.c.sequence >= 5))
    problem = (await verify_database(engine, signer.verifier)).first_problem
    assert problem is not None and (problem.sequence, problem.what) == (5, DELETED), str(problem)


async def test_a_rewritten_and_rehashed_chain_is_caught_by_its_checkpoint(engine: AsyncEngine, signer: Signer) -> None:
    """SHA-256 is public: an attacker can re-hash every later row. Only the signed checkpoint then disagrees."""
    writer = await write_events(engine, signer, 10)
    chain = f"{writer.writer_id}:acme"
    async with engine.begin() as conn:
        await tamper_mode(conn)
        prev = (await _row(conn, chain, 4))["hash"]
        for seq in range(5, 11):
            row = await _row(conn, chain, seq)
            if seq == 5:
                row["request_id"] = "rewritten"
            row["prev_hash"] = prev
            row["hash"] = prev = row_hash(prev, row)
            where = (EVENTS.c.chain_id == chain) & (EVENTS.c.sequence == seq)
            values = {"request_id": row["request_id"], "prev_hash": row["prev_hash"], "hash": row["hash"]}
            await conn.execute(update(EVENTS).where(where).values(**values))
    problem = (await verify_database(engine, signer.verifier)).first_problem
    assert problem is not None and (problem.sequence, problem.what) == (10, MODIFIED), str(problem)
    assert "signed head" in problem.detail and "after sequence 0" in problem.detail


async def test_postgresql_trigger_refuses_update_and_delete(pg_url: str, signer: Signer) -> None:
    await asyncio.to_thread(migrate.upgrade, pg_url)
    engine = create_engine(pg_url)
    try:
        await reset_audit(engine)
        await write_events(engine, signer, 3)
        successor = Signer(Ed25519PrivateKey.generate())
        async with engine.begin() as conn:  # a signed record (key hand-over): append-only like the rest
            await conn.execute(RECORDS.insert(), [handover_record(signer, successor, "test")])
        for statement in (
            "UPDATE audit_events SET payload = '{}'",
            "DELETE FROM audit_events",
            "TRUNCATE audit_events",
            "UPDATE audit_checkpoints SET hash = 'x'",
            "DELETE FROM audit_checkpoints",
            "DELETE FROM audit_records",
            "UPDATE audit_records SET key_id = 'x'",
            "TRUNCATE audit_records",
        ):
            with pytest.raises(DBAPIError, match="append-only"):
                async with engine.begin() as conn:
                    await conn.execute(text(statement))
        with pytest.raises(DBAPIError, match="append-only"):  # 0002's setting opens nothing since 0006
            async with engine.begin() as conn:
                await conn.execute(text("SET LOCAL bastion.retention = 'on'"))
                await conn.execute(text("DELETE FROM audit_events"))
        assert (await verify_database(engine, signer.verifier)).events == 3
    finally:
        await engine.dispose()


@pytest.mark.parametrize("fmt", FORMATS)
async def test_export_round_trips_and_one_changed_byte_fails(
    engine: AsyncEngine, keys: dict[str, Path], signer: Signer, tmp_path: Path, fmt: str
) -> None:
    cipher = ContentCipher.from_file(keys["content"])
    writer = await AuditWriter(engine, signer=signer, cipher=cipher).start()
    for i in range(25):
        content = EventContent(prompt=f"prompt {i}", completion="ok") if i % 5 == 0 else None
        writer.enqueue(event(i, tenant="acme" if i % 3 else "other", content=content))
    await writer.checkpoint()
    await writer.close()

    out = tmp_path / "export"
    result = await export_events(engine, out, fmt, signer, tenant="acme", page=7)  # several pages
    async with engine.connect() as conn:
        query = select(EVENTS).where(EVENTS.c.tenant_id == "acme").order_by(EVENTS.c.id)
        expected = [dict(r) for r in (await conn.execute(query)).mappings()]
    exported = list(read_rows(fmt, out / events_file(fmt)))
    assert result.rows == len(exported) == len(expected) == 16
    assert exported == expected  # every column, including timestamps and ciphertext
    encrypted = [r for r in exported if r["content"]]
    assert encrypted and (await decrypt_row(engine, encrypted[0], cipher))["prompt"].startswith("prompt ")

    public = Verifier.from_file(keys["public"])
    report = verify_export(out, public)
    assert report.ok, report.problems
    assert report.rows == 16 and report.checkpoints == 3  # the acme chain's genesis, head and final head

    for name in (events_file(fmt), MANIFEST):
        path = out / name
        original = path.read_bytes()
        changed = bytearray(original)
        changed[len(changed) // 2] ^= 0x01
        path.write_bytes(bytes(changed))
        bad = verify_export(out, public)
        assert not bad.ok and bad.first_problem is not None
        assert name in bad.first_problem
        path.write_bytes(original)
    assert verify_export(out, public).ok
    other = Signer.from_file(keygen(tmp_path / "other")["private"])
    assert not verify_export(out, other.verifier).ok  # someone else's key
