"""Retention on SQLite and PostgreSQL: only signed prefixes go, the deletion is audited, the chain still verifies."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import delete, func, select, text, update
from sqlalchemy.ext.asyncio import AsyncEngine

from bastion.audit import AuditError, AuditWriter, InferenceEvent
from bastion.audit.events import utcnow
from bastion.audit.retention import apply_retention, tenant_policies
from bastion.audit.signing import Signer, keygen
from bastion.audit.store import ANCHORS, CHECKPOINTS, EVENTS
from bastion.audit.verify import verify_database
from bastion.db import migrate
from bastion.db.models import Tenant
from bastion.db.session import create_engine

pytestmark = pytest.mark.integration


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest) -> str:
    return request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")


async def _superuser_tx(engine: AsyncEngine, *statements: Any) -> None:
    async with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            await conn.execute(text("SET LOCAL session_replication_role = replica"))
        for statement in statements:
            await conn.execute(statement)


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    await asyncio.to_thread(migrate.upgrade, database_url)
    engine = create_engine(database_url)
    await _superuser_tx(engine, delete(EVENTS), delete(CHECKPOINTS), delete(ANCHORS))
    try:
        yield engine
    finally:
        await engine.dispose()


@pytest.fixture
def signer(tmp_path: Path) -> Signer:
    return Signer.from_file(keygen(tmp_path / "keys")["private"])


def event(i: int, tenant: str, age_days: float) -> InferenceEvent:
    occurred = utcnow() - timedelta(days=age_days, minutes=-i)
    return InferenceEvent(
        tenant_id=tenant, model="m", profile="p", status=200, request_id=f"r{i}", occurred_at=occurred
    )


async def _count(engine: AsyncEngine, tenant: str) -> int:
    async with engine.connect() as conn:
        query = select(func.count()).select_from(EVENTS).where(EVENTS.c.tenant_id == tenant)
        return int((await conn.execute(query)).scalar_one())


async def test_retention_deletes_signed_prefix_audits_it_and_still_verifies(
    engine: AsyncEngine, signer: Signer
) -> None:
    writer = await AuditWriter(engine, signer=signer).start()
    for i in range(10):
        writer.enqueue(event(i, "acme", age_days=40))
    await writer.checkpoint()  # signs acme at 10: everything under it is older than 30 days
    for i in range(10, 13):
        writer.enqueue(event(i, "acme", age_days=35))  # old, but the next checkpoint also covers young events
    for i in range(13, 18):
        writer.enqueue(event(i, "acme", age_days=0))
    for i in range(5):
        writer.enqueue(event(100 + i, "globex", age_days=40))  # no retention policy
    await writer.checkpoint()
    chain = f"{writer.writer_id}:acme"

    results = await apply_retention(engine, signer, {"acme": 30})
    assert [(r.chain_id, r.up_to_sequence, r.deleted) for r in results] == [(chain, 10, 10)]
    assert await _count(engine, "acme") == 8 and await _count(engine, "globex") == 5
    for result in results:
        writer.enqueue(result.event(actor="ops@example.com"))  # the deletion itself is audited
    await writer.close()

    report = await verify_database(engine, signer.verifier)
    assert report.ok, report.first_problem
    acme = next(c for c in report.chains if c.chain_id == chain)
    assert (acme.start_sequence, acme.last_sequence, acme.events) == (10, 19, 9)
    async with engine.connect() as conn:
        audited = (await conn.execute(select(EVENTS.c.payload).where(EVENTS.c.kind == "retention"))).scalar_one()
    assert audited["up_to_sequence"] == 10 and audited["deleted"] == 10 and audited["chain_id"] == chain

    assert await apply_retention(engine, signer, {"acme": 30}) == []  # nothing more is covered

    # A deleted prefix without a retention anchor is not retention: verification reports it.
    await _superuser_tx(engine, delete(ANCHORS))
    problem = (await verify_database(engine, signer.verifier)).first_problem
    assert problem is not None and (problem.chain_id, problem.sequence, problem.what) == (chain, 1, "deleted")


async def test_retention_refuses_to_delete_a_tampered_prefix(engine: AsyncEngine, signer: Signer) -> None:
    writer = await AuditWriter(engine, signer=signer).start()
    for i in range(6):
        writer.enqueue(event(i, "acme", age_days=40))
    await writer.close()  # closing signs the head
    await _superuser_tx(engine, update(EVENTS).where(EVENTS.c.sequence == 3).values(request_id="changed"))
    with pytest.raises(AuditError, match=r"retention refused.*sequence 3: modified"):
        await apply_retention(engine, signer, {"acme": 30})
    assert await _count(engine, "acme") == 6


async def test_policies_come_from_tenants_then_the_platform_default(engine: AsyncEngine, signer: Signer) -> None:
    acme, globex = (f"{name}-{uuid.uuid4().hex[:8]}" for name in ("acme", "globex"))  # tenants table is shared
    async with engine.begin() as conn:
        await conn.execute(Tenant.__table__.insert().values(**_tenant(acme, 30)))
        await conn.execute(Tenant.__table__.insert().values(**_tenant(globex, None)))
    writer = await AuditWriter(engine, signer=signer).start()
    writer.enqueue(event(1, globex, age_days=1))
    await writer.close()
    assert (await tenant_policies(engine, None)).get(acme) == 30
    assert globex not in await tenant_policies(engine, None)
    with_default = await tenant_policies(engine, 365)
    assert (with_default[acme], with_default[globex]) == (30, 365)
    with pytest.raises(AuditError, match="at least 1"):
        await apply_retention(engine, signer, {acme: 0})


def _tenant(tenant_id: str, days: int | None) -> dict[str, Any]:
    now = utcnow()
    return {
        "id": tenant_id,
        "name": tenant_id,
        "status": "active",
        "allowed_models": [],
        "allowed_profiles": [],
        "log_content": False,
        "audit_strict": False,
        "retention_days": days,
        "created_at": now,
        "updated_at": now,
    }
