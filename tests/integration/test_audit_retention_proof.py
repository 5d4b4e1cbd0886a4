"""Retention proves itself (PostgreSQL): a prune writes a signed record; an anchor the table owner moved,
one whose record is gone or forged, and one the policy does not allow are each reported at the anchor."""

from __future__ import annotations

from datetime import timedelta

import pytest
from audit_support import as_owner, engine, event, keys, owner, problems, signer
from sqlalchemy import select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from bastion.audit import AuditWriter
from bastion.audit.events import utcnow
from bastion.audit.prunes import retention_record
from bastion.audit.retention import apply_retention
from bastion.audit.signing import Signer, keygen
from bastion.audit.store import RECORDS
from bastion.audit.verify import RETENTION_PROBLEM, verify_database

pytestmark = pytest.mark.integration
__all__ = ["engine", "keys", "owner", "signer"]  # fixtures


async def _aged_chain(engine: AsyncEngine, signer: Signer) -> str:
    """acme: 10 events 40 days old (head at 10), 3 more 35 days old (head at 13), 5 young ones (final at 18)."""
    writer = await AuditWriter(engine, signer=signer).start()
    for i in range(10):
        writer.enqueue(event(i, age_days=40))
    await writer.checkpoint()
    for i in range(10, 13):
        writer.enqueue(event(i, age_days=35))
    await writer.checkpoint()
    for i in range(13, 18):
        writer.enqueue(event(i))
    await writer.close()
    return f"{writer.writer_id}:acme"


async def test_a_prune_is_signed_and_checked_against_the_policy(
    engine: AsyncEngine, owner: AsyncEngine, signer: Signer, tmp_path
) -> None:
    chain = await _aged_chain(engine, signer)
    results = await apply_retention(engine, signer, {"acme": 30}, actor="ops@example.com")
    assert [(r.chain_id, r.up_to_sequence, r.deleted) for r in results] == [(chain, 13, 13)]
    async with engine.connect() as conn:
        (record,) = (await conn.execute(select(RECORDS))).all()
    body = record.body
    assert (record.kind, record.chain_id, record.key_id) == ("retention", chain, signer.key_id)
    assert (body["policy_days"], body["from_sequence"], body["to_sequence"], body["deleted"]) == (30, 1, 13, 13)
    assert body["actor"] == "ops@example.com" and body["last_deleted_at"] < body["cutoff"]
    report = await verify_database(engine, signer.verifier, policies={"acme": 30})
    assert report.ok, report.problems
    assert report.chains[0].start_sequence == 13

    # The policy now keeps 60 days: a prune after 30 is reported at the anchor.
    stricter = await verify_database(engine, signer.verifier, policies={"acme": 60})
    assert problems(stricter) == [(chain, 13, RETENTION_PROBLEM)]
    assert "pruned after 30 days; the policy keeps 60 days" in stricter.problems[0].detail

    # The table owner moves the anchor forward (deleting the young events up to the final head at 18).
    await as_owner(
        owner,
        "DELETE FROM audit_events WHERE chain_id = :c",
        "UPDATE audit_anchors SET sequence = 18, hash = (SELECT hash FROM audit_checkpoints "
        "WHERE chain_id = :c AND sequence = 18 AND kind = 'final'), deleted = 18 WHERE chain_id = :c",
        params={"c": chain},
    )
    moved = await verify_database(engine, signer.verifier)
    assert problems(moved) == [(chain, 18, RETENTION_PROBLEM)]
    assert "anchor at 18 but the last signed retention record ends at 13" in moved.problems[0].detail

    # ... and deletes the record, or replaces it with one signed by a key of their own.
    await as_owner(owner, "DELETE FROM audit_records")
    gone = await verify_database(engine, signer.verifier)
    assert problems(gone) == [(chain, 18, RETENTION_PROBLEM)]
    assert "no signed retention record" in gone.problems[0].detail
    mallory = Signer.from_file(keygen(tmp_path / "mallory")["private"])
    now = utcnow()
    forged = retention_record(
        mallory,
        chain_id=chain,
        tenant_id="acme",
        days=30,
        cutoff=now - timedelta(days=30),
        pruned_at=now,
        from_sequence=1,
        to_sequence=18,
        deleted=18,
        total_deleted=18,
        last_deleted_at=now - timedelta(days=31),
        checkpoint_hash="f" * 64,
        actor="mallory",
    )
    async with owner.begin() as conn:
        await conn.execute(RECORDS.insert(), [forged])
    faked = await verify_database(engine, signer.verifier)
    assert problems(faked) == [(chain, 18, RETENTION_PROBLEM)]
    assert "signature does not verify" in faked.problems[0].detail


async def test_a_prune_with_a_clock_moved_forward_is_refused_by_verify(engine: AsyncEngine, signer: Signer) -> None:
    """Even the key holder's retention job cannot prune early unnoticed: pruned_at may not lie in the future.

    PostgreSQL's prune function refuses events younger than a day whatever the job's clock says; within that
    floor (here: events 10 days old under a 30-day policy), verify catches the clock."""
    writer = await AuditWriter(engine, signer=signer).start()
    for i in range(5):
        writer.enqueue(event(i, age_days=10))
    await writer.checkpoint()
    for i in range(5, 8):
        writer.enqueue(event(i))
    await writer.close()
    chain = f"{writer.writer_id}:acme"
    with pytest.raises(DBAPIError, match="not all a day old"):  # 40 days ahead: the young tail too
        await apply_retention(engine, signer, {"acme": 30}, now=utcnow() + timedelta(days=40))
    results = await apply_retention(engine, signer, {"acme": 30}, now=utcnow() + timedelta(days=25))
    assert [(r.chain_id, r.up_to_sequence) for r in results] == [(chain, 5)]  # 10-day-old events deleted
    report = await verify_database(engine, signer.verifier)
    assert problems(report) == [(chain, 5, RETENTION_PROBLEM)]
    assert "is not pruned_at minus 30 days" in report.problems[0].detail
