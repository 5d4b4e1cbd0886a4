"""Every chain's life is signed (PostgreSQL): genesis, periodic heads, final head, a dead writer's replayed head;
and what the table owner can do outside signed ranges is reported with its exact location."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from audit_support import as_owner, engine, event, heads, keys, owner, problems, reset, signer, write
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from bastion.audit import AuditWriter
from bastion.audit.chain import row_hash
from bastion.audit.signing import Signer
from bastion.audit.store import EVENTS
from bastion.audit.verify import AFTER_FINAL, NO_GENESIS, UNSIGNED, verify_database

pytestmark = pytest.mark.integration
__all__ = ["engine", "keys", "owner", "signer"]  # fixtures


async def test_a_closed_chain_has_genesis_periodic_heads_and_a_final_head(engine: AsyncEngine, signer: Signer) -> None:
    writer = await AuditWriter(engine, signer=signer, checkpoint_interval_s=0.2, batch_size=10).start()
    for i in range(25):
        writer.enqueue(event(i))
    await writer.flush()
    await asyncio.sleep(0.6)  # at least one interval: the heads in the database get signed while the writer runs
    chain = f"{writer.writer_id}:acme"
    running = await heads(engine, chain)
    assert running[0] == ("genesis", 0) and ("head", 25) in running
    for i in range(25, 30):
        writer.enqueue(event(i))
    await writer.close()
    assert (await heads(engine, chain))[-1] == ("final", 30)
    report = await verify_database(engine, signer.verifier)
    assert report.ok, report.problems
    (result,) = report.chains
    assert (result.final_sequence, result.signed_sequence, result.unsigned_events) == (30, 30, 0)


async def test_heads_every_n_events_under_continuous_load(engine: AsyncEngine, signer: Signer) -> None:
    """A busy writer never has an empty batch: heads are signed for what reached the database anyway."""
    writer = await AuditWriter(engine, signer=signer, checkpoint_every=100, batch_size=50).start()
    for i in range(1000):
        writer.enqueue(event(i))
        if i % 50 == 0:
            await asyncio.sleep(0)
    await writer.flush()
    chain = f"{writer.writer_id}:acme"
    signed = [seq for kind, seq in await heads(engine, chain) if kind == "head"]
    await writer.close()
    assert signed and max(b - a for a, b in zip([0, *signed], signed, strict=False)) <= 150, signed


async def test_owner_forging_a_chain_or_appending_after_final_is_located(
    engine: AsyncEngine, owner: AsyncEngine, signer: Signer
) -> None:
    chain = await write(engine, signer, 10)
    forged_chain = "forger-1-00000000:acme"
    prev, forged = "0" * 64, []
    async with engine.connect() as conn:
        template = dict(
            (await conn.execute(select(EVENTS).where(EVENTS.c.chain_id == chain).limit(1))).mappings().one()
        )
    template.pop("id")
    for seq in (1, 2, 3):  # a whole chain with correct hashes: SHA-256 needs no key
        row = {**template, "chain_id": forged_chain, "sequence": seq, "prev_hash": prev}
        row["hash"] = prev = row_hash(prev, row)
        forged.append(row)
    eleventh = {**template, "sequence": 11, "request_id": "late"}
    async with engine.connect() as conn:
        last = (
            await conn.execute(select(EVENTS.c.hash).where(EVENTS.c.chain_id == chain, EVENTS.c.sequence == 10))
        ).scalar_one()
    eleventh["prev_hash"] = last
    eleventh["hash"] = row_hash(last, eleventh)
    async with owner.begin() as conn:  # plain INSERTs: the trigger never stopped inserts
        await conn.execute(EVENTS.insert(), [*forged, eleventh])

    report = await verify_database(engine, signer.verifier, max_unsigned_s=3600)
    assert sorted(problems(report)) == sorted(
        [
            (chain, 11, AFTER_FINAL),  # an event after the signed final head
            (forged_chain, 0, NO_GENESIS),  # a chain no trusted writer opened
        ]
    )
    forged_result = next(c for c in report.chains if c.chain_id == forged_chain)
    assert (forged_result.unsigned_events, forged_result.signed_sequence) == (3, 0)


async def test_crashed_writer_tail_is_counted_and_bounded(
    engine: AsyncEngine, owner: AsyncEngine, signer: Signer
) -> None:
    """A writer that dies without closing leaves an unsigned tail: counted always, failed past --max-unsigned-s;
    deleting the genesis as the table owner is caught too."""
    writer = await AuditWriter(engine, signer=signer, checkpoint_every=5, batch_size=5).start()
    for i in range(5):
        writer.enqueue(event(i))
    await writer.checkpoint()
    for i in range(5, 8):
        writer.enqueue(event(i))
    await writer.flush()
    writer._task.cancel()
    chain = f"{writer.writer_id}:acme"

    report = await verify_database(engine, signer.verifier)
    assert report.ok
    (result,) = report.chains
    assert (result.signed_sequence, result.unsigned_events, result.final_sequence) == (5, 3, None)
    assert result.unsigned_since is not None
    await asyncio.sleep(1.1)
    report = await verify_database(engine, signer.verifier, max_unsigned_s=1)
    assert problems(report) == [(chain, 6, UNSIGNED)]
    assert "3 events no signature covers" in report.problems[0].detail

    await as_owner(owner, "DELETE FROM audit_checkpoints WHERE sequence = 0")
    assert problems(await verify_database(engine, signer.verifier)) == [(chain, 0, NO_GENESIS)]


async def test_a_dead_writers_spool_is_replayed_and_its_head_signed(
    engine: AsyncEngine, signer: Signer, tmp_path: Path, pg_url: str
) -> None:
    """The genesis travels in the spool with the chain's first row; the replaying writer signs `replayed`."""
    spool = tmp_path / "spool"
    unreachable = "postgresql+asyncpg://nobody@127.0.0.1:9/none"
    dead = await AuditWriter(unreachable, spool_dir=spool, signer=signer, retry_interval_s=0.05, db_timeout_s=1).start()
    for i in range(7):
        dead.enqueue(event(i))
    await dead.close(timeout=1)  # the database never answered: everything stays in the spool
    chain = f"{dead.writer_id}:acme"
    assert '"_genesis"' in next(spool.glob("*.jsonl")).read_text()

    heir = await AuditWriter(engine, spool_dir=spool, signer=signer).start()
    await heir.drain()
    heir.enqueue(event(100, "globex"))
    await heir.close()
    assert await heads(engine, chain) == [("genesis", 0), ("replayed", 7)]
    report = await verify_database(engine, signer.verifier)
    assert report.ok, report.problems
    replayed = next(c for c in report.chains if c.chain_id == chain)
    assert (replayed.events, replayed.final_sequence, replayed.unsigned_events) == (7, 7, 0)
    async with engine.connect() as conn:
        assert (await conn.execute(select(func.count()).select_from(EVENTS))).scalar_one() == 8
    await reset(engine)
