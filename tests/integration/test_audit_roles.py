"""Append-only by roles (migration 0006), on PostgreSQL with the attacker's real privileges: each test connects
as a login role that is a member of bastion_app, bastion_retention or bastion_auditor, never as the owner."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path

import psycopg2
import pytest
from sqlalchemy import func, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from bastion.audit import AuditWriter, InferenceEvent
from bastion.audit.events import utcnow
from bastion.audit.retention import apply_retention
from bastion.audit.signing import Signer, keygen
from bastion.audit.store import ANCHORS, CHECKPOINTS, EVENTS
from bastion.audit.verify import verify_database
from bastion.db import migrate
from bastion.db.session import create_engine

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
BASTION = str(Path(sys.executable).parent / "bastion")
DENIED = "42501"  # insufficient_privilege


def _dsn(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


def _admin(url: str, *statements: str) -> None:
    """As the superuser that owns the tables, in the test database."""
    conn = psycopg2.connect(_dsn(url))
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            for statement in statements:
                cur.execute(statement)
    finally:
        conn.close()


@pytest.fixture(scope="module")
def logins(pg_url: str) -> Iterator[dict[str, str]]:
    """One login role per group role (unique names: roles are cluster-wide), dropped afterwards; `rogue` is an
    app login someone carelessly granted DELETE, UPDATE and TRUNCATE on the audit tables."""
    migrate.upgrade(pg_url)
    suffix = uuid.uuid4().hex[:8]
    names = {kind: f"bastion_t_{kind}_{suffix}" for kind in ("app", "retention", "auditor", "rogue")}
    groups = {
        "app": "bastion_app",
        "retention": "bastion_retention",
        "auditor": "bastion_auditor",
        "rogue": "bastion_app",
    }
    _admin(pg_url, *(f"CREATE ROLE {names[k]} LOGIN IN ROLE {groups[k]}" for k in names))
    _admin(
        pg_url, f"GRANT DELETE, UPDATE, TRUNCATE ON audit_events, audit_checkpoints, audit_anchors TO {names['rogue']}"
    )
    try:
        yield {k: make_url(pg_url).set(username=v).render_as_string(hide_password=False) for k, v in names.items()}
    finally:
        _admin(pg_url, *(f"DROP OWNED BY {n}" for n in names.values()), *(f"DROP ROLE {n}" for n in names.values()))


def _empty_audit_tables(url: str) -> None:
    """The session database is shared: as superuser, triggers off for this one transaction."""
    _admin(
        url,
        "BEGIN; SET LOCAL session_replication_role = replica; "
        "DELETE FROM audit_events; DELETE FROM audit_checkpoints; DELETE FROM audit_anchors; COMMIT",
    )


@pytest.fixture
async def owner(pg_url: str, logins: dict[str, str]) -> AsyncIterator[AsyncEngine]:
    _empty_audit_tables(pg_url)
    engine = create_engine(pg_url)
    try:
        yield engine
    finally:
        await engine.dispose()


@pytest.fixture
def signer(tmp_path: Path) -> Signer:
    return Signer.from_file(keygen(tmp_path / "keys")["private"])


def event(i: int, age_days: float = 0) -> InferenceEvent:
    occurred = utcnow() - timedelta(days=age_days, minutes=-i)
    return InferenceEvent(
        tenant_id="acme", model="m", profile="p", status=200, request_id=f"r-{i}", occurred_at=occurred
    )


async def _write(url: str, signer: Signer, n: int, age_days: float = 0) -> str:
    writer = await AuditWriter(url, signer=signer).start()
    for i in range(n):
        writer.enqueue(event(i, age_days))
    await writer.checkpoint()
    await writer.close()
    return f"{writer.writer_id}:acme"


# The newest signed head past the genesis (a chain holds its genesis, a periodic head and its final head).
LAST_HEAD = select(CHECKPOINTS.c.id).where(CHECKPOINTS.c.kind != "genesis").order_by(CHECKPOINTS.c.id.desc()).limit(1)


async def _refusal(url: str, *statements: str) -> tuple[str, str] | None:
    """Run the statements in one transaction as the login of `url`: (SQLSTATE, first line) of the refusal."""
    engine = create_engine(url)
    try:
        async with engine.begin() as conn:
            for statement in statements:
                await conn.execute(text(statement))
    except DBAPIError as exc:
        cause = exc.orig
        state = getattr(cause, "sqlstate", None) or getattr(cause.__cause__, "sqlstate", "")
        return state, str(cause).split(">: ", 1)[-1].splitlines()[0]
    finally:
        await engine.dispose()
    return None


async def _counts(engine: AsyncEngine) -> tuple[int, int, int]:
    async with engine.connect() as conn:
        return tuple(  # type: ignore[return-value]
            [
                (await conn.execute(select(func.count()).select_from(t))).scalar_one()
                for t in (EVENTS, CHECKPOINTS, ANCHORS)
            ]
        )


OPENERS = (
    (),
    ("SET bastion.retention = 'on'",),  # what opened the trigger before 0006
    ("SET bastion.audit_prune = 'on'",),  # the marker bastion_audit_prune sets: counts only with the owner's rights
    ("SET LOCAL bastion.audit_prune = 'on'", "SET LOCAL bastion.retention = 'on'"),
)


async def test_the_app_role_cannot_change_or_remove_anything_whatever_it_sets(
    owner: AsyncEngine, logins: dict[str, str], signer: Signer
) -> None:
    await _write(logins["app"], signer, 3)  # the gateway's role writes events and checkpoints
    before = await _counts(owner)
    assert before[0] == 3 and before[1] >= 2  # events; the signed genesis and heads
    async with owner.connect() as conn:
        cp_id = (await conn.execute(LAST_HEAD)).scalar_one()
    attacks = {
        "DELETE FROM audit_events": "permission denied for table audit_events",
        "UPDATE audit_events SET actor = 'mallory'": "permission denied for table audit_events",
        "TRUNCATE audit_events": "permission denied for table audit_events",
        "DELETE FROM audit_checkpoints": "permission denied for table audit_checkpoints",
        "UPDATE audit_checkpoints SET hash = 'x'": "permission denied for table audit_checkpoints",
        "INSERT INTO audit_anchors VALUES ('c', 1, 'h', 1, 0, now())": "permission denied for table audit_anchors",
        f"SELECT bastion_audit_prune({cp_id})": "permission denied for function bastion_audit_prune",
        "UPDATE audit_content_keys SET wrapped = NULL": "permission denied for table audit_content_keys",  # erase
        "DELETE FROM audit_records": "permission denied for table audit_records",  # signed retention records
        "ALTER TABLE audit_events DISABLE TRIGGER ALL": "must be owner of table audit_events",
        "DROP TRIGGER audit_events_append_only ON audit_events": "must be owner of relation audit_events",
    }
    for opener in OPENERS:
        for statement, message in attacks.items():
            assert await _refusal(logins["app"], *opener, statement) == (DENIED, message), (opener, statement)
    # Openers that need more than the app role has are refused themselves.
    assert await _refusal(logins["app"], "SET session_replication_role = replica") == (
        DENIED,
        'permission denied to set parameter "session_replication_role"',
    )
    assert await _refusal(logins["app"], "SET ROLE bastion_retention") == (
        DENIED,
        'permission denied to set role "bastion_retention"',
    )
    assert await _counts(owner) == before
    assert (await verify_database(owner, signer.verifier)).ok


async def test_the_trigger_checks_the_role_not_the_privileges(
    owner: AsyncEngine, logins: dict[str, str], signer: Signer
) -> None:
    """Even a role granted DELETE, UPDATE and TRUNCATE by mistake is refused by the trigger, whatever it sets."""
    await _write(logins["app"], signer, 2)
    before = await _counts(owner)
    attacks = [
        ("DELETE FROM audit_events", "DELETE on audit_events"),
        ("UPDATE audit_events SET sequence = sequence", "UPDATE on audit_events"),
        ("TRUNCATE audit_events", "TRUNCATE on audit_events"),
        ("DELETE FROM audit_checkpoints", "DELETE on audit_checkpoints"),
        ("UPDATE audit_checkpoints SET hash = hash", "UPDATE on audit_checkpoints"),
        ("TRUNCATE audit_checkpoints", "TRUNCATE on audit_checkpoints"),
        ("TRUNCATE audit_anchors", "TRUNCATE on audit_anchors"),  # no anchor rows yet: the statement trigger
    ]
    for opener in OPENERS:
        for statement, what in attacks:
            expected = (DENIED, f"audit log is append-only: {what} refused")
            assert await _refusal(logins["rogue"], *opener, statement) == expected, (opener, statement)
    assert await _counts(owner) == before


async def test_retention_deletes_only_through_its_function(
    owner: AsyncEngine, logins: dict[str, str], signer: Signer
) -> None:
    chain = await _write(logins["app"], signer, 5, age_days=40)
    for opener in OPENERS:  # the retention role itself holds no DELETE: only the function removes rows
        assert await _refusal(logins["retention"], *opener, "DELETE FROM audit_events") == (
            DENIED,
            "permission denied for table audit_events",
        )
    retention = create_engine(logins["retention"])
    try:
        results = await apply_retention(retention, signer, {"acme": 30})
    finally:
        await retention.dispose()
    assert [(r.chain_id, r.up_to_sequence, r.deleted) for r in results] == [(chain, 5, 5)]
    async with owner.connect() as conn:
        anchor = (await conn.execute(select(ANCHORS))).one()
    assert (anchor.chain_id, anchor.sequence, anchor.deleted) == (chain, 5, 5)
    report = await verify_database(owner, signer.verifier)
    assert report.ok and [(c.start_sequence, c.events) for c in report.chains] == [(5, 0)]
    for opener in OPENERS:  # the anchor now exists: moving or removing it is refused to a careless grant too
        for statement, what in (
            ("UPDATE audit_anchors SET sequence = 1", "UPDATE on audit_anchors"),
            ("DELETE FROM audit_anchors", "DELETE on audit_anchors"),
        ):
            expected = (DENIED, f"audit log is append-only: {what} refused")
            assert await _refusal(logins["rogue"], *opener, statement) == expected, (opener, statement)

    await _write(logins["app"], signer, 2)
    app = create_engine(logins["app"])  # the app may not prune, whatever cut-off it claims
    try:
        with pytest.raises(DBAPIError, match="permission denied for function bastion_audit_prune"):
            await apply_retention(app, signer, {"acme": 30}, now=utcnow() + timedelta(days=400))
    finally:
        await app.dispose()


async def test_the_prune_function_refuses_young_events_and_old_checkpoints(
    owner: AsyncEngine, logins: dict[str, str], signer: Signer
) -> None:
    await _write(logins["app"], signer, 3)  # written now
    before = await _counts(owner)
    async with owner.connect() as conn:
        cp_id = (await conn.execute(LAST_HEAD)).scalar_one()
    assert await _refusal(logins["retention"], f"SELECT bastion_audit_prune({cp_id})") == (
        "22023",
        f"events up to checkpoint {cp_id} are not all a day old",
    )
    assert await _refusal(logins["retention"], "SELECT bastion_audit_prune(-1)") == ("P0002", "no audit checkpoint -1")
    assert await _counts(owner) == before


async def test_the_auditor_role_reads_and_verifies_but_writes_nothing(
    owner: AsyncEngine, logins: dict[str, str], signer: Signer
) -> None:
    await _write(logins["app"], signer, 4)
    auditor = create_engine(logins["auditor"])
    try:
        report = await verify_database(auditor, signer.verifier)
    finally:
        await auditor.dispose()
    assert report.ok and report.events == 4
    assert await _refusal(
        logins["auditor"],
        "INSERT INTO audit_events (chain_id, sequence, prev_hash, hash, occurred_at, kind, payload) "
        "VALUES ('c', 1, 'p', 'h', now(), 'admin', '{}')",
    ) == (DENIED, "permission denied for table audit_events")
    assert await _refusal(logins["auditor"], "SELECT name FROM tenants") == (  # only id and retention_days
        DENIED,
        "permission denied for table tenants",
    )


@pytest.mark.slow
def test_verify_and_export_as_a_select_only_auditor(pg_url: str, logins: dict[str, str], tmp_path: Path) -> None:
    """No spool, no waiting, no files but the export; the command says its own event was not recorded."""
    _empty_audit_tables(pg_url)
    keys = keygen(tmp_path / "keys")
    asyncio.run(_write(logins["app"], Signer.from_file(keys["private"]), 3))
    data = tmp_path / "data"
    config = tmp_path / "platform.yaml"
    platform = (ROOT / "deploy/local/bastion.yaml").read_text().replace("data_dir: .bastion-data", f"data_dir: {data}")
    platform = platform.replace('"sqlite+aiosqlite:///{data_dir}/bastion.db"', f'"{logins["auditor"]}"')
    config.write_text(
        platform + f"\naudit:\n  signing_key_file: {keys['private']}\n  content_key_file: {keys['content']}\n"
    )

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [BASTION, "audit", *args, "--config", str(config)], capture_output=True, text=True, timeout=60
        )

    before = asyncio.run(_count_as(pg_url))
    verified = run("verify", "--public-key", str(keys["public"]))
    assert verified.returncode == 0, verified.stderr
    assert "ok: 1 chains, 3 events" in verified.stdout
    assert "note: this verification was not recorded in the audit log: the database role may not write it" in (
        " ".join(verified.stderr.split())
    )
    exported = run("export", "--out", str(tmp_path / "export"))
    assert exported.returncode == 0, exported.stderr
    assert "3 events exported" in exported.stdout and "this export was not recorded" in " ".join(
        exported.stderr.split()
    )
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == [
        "checkpoints.jsonl",
        "events.jsonl",
        "manifest.json",
        "manifest.sig",
    ]
    chain = _chain_of(pg_url)
    read = run("content", "--chain", chain, "--sequence", "1")  # reading content is never unaudited
    assert read.returncode == 1 and "content not read: the reading must be audited" in " ".join(read.stderr.split())
    assert not data.exists()  # no spool folder, nothing else left behind
    assert asyncio.run(_count_as(pg_url)) == before == 3


async def _count_as(url: str) -> int:
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            return int((await conn.execute(select(func.count()).select_from(EVENTS))).scalar_one())
    finally:
        await engine.dispose()


async def test_only_retention_erases_content_keys(
    owner: AsyncEngine, logins: dict[str, str], signer: Signer, tmp_path: Path
) -> None:
    from bastion.audit import EventContent
    from bastion.audit.content_keys import erase
    from bastion.audit.crypto import ContentCipher

    tenant = f"t{uuid.uuid4().hex[:8]}"
    cipher = ContentCipher.from_file(keygen(tmp_path / "content")["content"])
    writer = await AuditWriter(logins["app"], signer=signer, cipher=cipher).start()  # the app creates the key
    writer.enqueue(
        InferenceEvent(tenant_id=tenant, model="m", profile="p", status=200, content=EventContent(prompt="x"))
    )
    await writer.close()
    app, retention = create_engine(logins["app"]), create_engine(logins["retention"])
    try:
        with pytest.raises(DBAPIError, match="permission denied for table audit_content_keys"):
            await erase(app, tenant)
        assert await erase(retention, tenant) == 1
    finally:
        await app.dispose()
        await retention.dispose()
    assert (await verify_database(owner, signer.verifier)).ok


def _chain_of(url: str) -> str:
    conn = psycopg2.connect(_dsn(url))
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT chain_id FROM audit_events LIMIT 1")
            return cur.fetchone()[0]
    finally:
        conn.close()
