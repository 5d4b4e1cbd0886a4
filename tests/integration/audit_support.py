"""Helpers for the audit completeness tests on PostgreSQL: an attacker who owns the audit tables, events,
platform files for the CLI, and `bastion audit verify --json` run as an auditor would."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from bastion.audit import AuditWriter, InferenceEvent
from bastion.audit.chain import row_hash
from bastion.audit.events import utcnow
from bastion.audit.signing import Signer, keygen
from bastion.audit.store import CHECKPOINTS, EVENTS
from bastion.db import migrate
from bastion.db.session import create_engine
from testbed import pg_exec

ROOT = Path(__file__).resolve().parents[2]
BASTION = str(Path(sys.executable).parent / "bastion")
AUDIT_TABLES = ("audit_events", "audit_checkpoints", "audit_anchors", "audit_records")


def event(i: int, tenant: str = "acme", age_days: float = 0) -> InferenceEvent:
    occurred = utcnow() - timedelta(days=age_days)
    return InferenceEvent(
        tenant_id=tenant, model="m", profile="p", status=200, request_id=f"r{i}", occurred_at=occurred
    )


async def reset(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await conn.execute(text("SET LOCAL session_replication_role = replica"))
        for table in AUDIT_TABLES:
            await conn.execute(text(f"DELETE FROM {table}"))  # noqa: S608 - fixed table names


@pytest.fixture
async def engine(pg_url: str) -> AsyncIterator[AsyncEngine]:
    await asyncio.to_thread(migrate.upgrade, pg_url)
    engine = create_engine(pg_url)
    await reset(engine)
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


@pytest.fixture
async def owner(pg_url: str, engine: AsyncEngine) -> AsyncIterator[AsyncEngine]:
    """An engine logged in as a role that owns the audit tables but is no superuser: the attacker who can
    switch the append-only trigger off (ALTER TABLE ... DISABLE TRIGGER) and then run any SQL."""
    role = f"auditv_owner_{uuid.uuid4().hex[:8]}"
    database = make_url(pg_url).database
    await asyncio.to_thread(pg_exec, f'CREATE ROLE "{role}" LOGIN NOSUPERUSER')
    owns = [f'ALTER TABLE {t} OWNER TO "{role}"' for t in AUDIT_TABLES]
    # The owner of the tables owns retention's SECURITY DEFINER function too (migration 0006), as in a deployment.
    owns.append(f'ALTER FUNCTION bastion_audit_prune(integer) OWNER TO "{role}"')
    await asyncio.to_thread(_as_admin, database, owns)
    attacker = create_engine(make_url(pg_url).set(username=role).render_as_string(hide_password=False))
    try:
        yield attacker
    finally:
        await attacker.dispose()
        revert = [f'REASSIGN OWNED BY "{role}" TO CURRENT_USER', f'DROP OWNED BY "{role}"']
        await asyncio.to_thread(_as_admin, database, revert)
        await asyncio.to_thread(pg_exec, f'DROP ROLE IF EXISTS "{role}"')


def _as_admin(database: str | None, statements: list[str]) -> None:
    import psycopg2

    from testbed import PG_ADMIN_DSN

    conn = psycopg2.connect(PG_ADMIN_DSN.rsplit("/", 1)[0] + f"/{database}")
    conn.autocommit = True
    try:
        with conn.cursor() as cursor:
            for statement in statements:
                cursor.execute(statement)
    finally:
        conn.close()


async def as_owner(owner: AsyncEngine, *statements: str, params: dict[str, Any] | None = None) -> None:
    """Raw SQL by the table owner, with the append-only triggers switched off for the transaction."""
    async with owner.begin() as conn:
        assert (
            await conn.execute(text("SELECT rolsuper FROM pg_roles WHERE rolname = current_user"))
        ).scalar() is False
        for table in AUDIT_TABLES:
            await conn.execute(text(f"ALTER TABLE {table} DISABLE TRIGGER USER"))
        for statement in statements:
            await conn.execute(text(statement), params or {})
        for table in AUDIT_TABLES:
            await conn.execute(text(f"ALTER TABLE {table} ENABLE TRIGGER USER"))


async def rewrite_from(owner: AsyncEngine, chain: str, first: int, request_id: str = "rewritten") -> None:
    """The owner rewrites event `first` and re-hashes every later row (SHA-256 needs no key)."""
    async with owner.begin() as conn:
        for table in AUDIT_TABLES:
            await conn.execute(text(f"ALTER TABLE {table} DISABLE TRIGGER USER"))
        rows = [
            dict(r)
            for r in (
                await conn.execute(select(EVENTS).where(EVENTS.c.chain_id == chain).order_by(EVENTS.c.sequence))
            ).mappings()
        ]
        prev = next(r["hash"] for r in rows if r["sequence"] == first - 1) if first > 1 else "0" * 64
        for row in rows:
            if row["sequence"] < first:
                continue
            if row["sequence"] == first:
                row["request_id"] = request_id
            row["prev_hash"] = prev
            row["hash"] = prev = row_hash(prev, row)
            await conn.execute(
                EVENTS.update()
                .where(EVENTS.c.id == row["id"])
                .values(request_id=row["request_id"], prev_hash=row["prev_hash"], hash=row["hash"])
            )
        for table in AUDIT_TABLES:
            await conn.execute(text(f"ALTER TABLE {table} ENABLE TRIGGER USER"))


async def write(engine: AsyncEngine, signer: Signer, n: int, tenant: str = "acme", **options: Any) -> str:
    """n events by one writer that closes properly; returns the chain id."""
    writer = await AuditWriter(engine, signer=signer, **options).start()
    for i in range(n):
        writer.enqueue(event(i, tenant))
    await writer.close()
    return f"{writer.writer_id}:{tenant}"


async def heads(engine: AsyncEngine, chain: str) -> list[tuple[str, int]]:
    async with engine.connect() as conn:
        query = select(CHECKPOINTS.c.kind, CHECKPOINTS.c.sequence).where(CHECKPOINTS.c.chain_id == chain)
        return [(r.kind, r.sequence) for r in (await conn.execute(query.order_by(CHECKPOINTS.c.id))).all()]


def problems(report: Any) -> list[tuple[str, int, str]]:
    return [(p.chain_id, p.sequence, p.what) for p in report.problems]


def platform_file(tmp_path: Path, pg_url: str, audit: dict[str, Any], name: str = "platform") -> Path:
    """A platform file on this PostgreSQL database with the given audit section."""
    url = pg_url
    text_ = (ROOT / "deploy/local/bastion.yaml").read_text().replace("data_dir: .bastion-data", f"data_dir: {tmp_path}")
    text_ = text_.replace('url: "sqlite+aiosqlite:///{data_dir}/bastion.db"', f'url: "{url}"')
    assert url in text_
    text_ += "\naudit:\n" if audit else ""
    text_ += "".join(f"  {k}: {json.dumps(v) if not isinstance(v, Path) else v}\n" for k, v in audit.items())
    path = tmp_path / f"{name}.yaml"
    path.write_text(text_)
    return path


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([BASTION, *args], capture_output=True, text=True, cwd=ROOT, timeout=120, check=False)


def verify_json(*args: str) -> tuple[int, dict[str, Any], str]:
    """`bastion audit verify --json ...`: exit code, report, stderr."""
    result = cli("audit", "verify", "--json", *args)
    try:
        report = json.loads(result.stdout)
    except json.JSONDecodeError:
        report = {}
    return result.returncode, report, result.stderr
