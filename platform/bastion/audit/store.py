"""Database access shared by the writer, verification, export and retention: batched inserts and paged reads."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Select, func, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from bastion.audit.chain import SEALED_PAYLOAD
from bastion.audit.events import format_time, parse_time
from bastion.db.models import AuditAnchor, AuditCheckpoint, AuditEvent, AuditRecord
from bastion.db.session import create_engine

EVENTS = AuditEvent.__table__
CHECKPOINTS = AuditCheckpoint.__table__
ANCHORS = AuditAnchor.__table__
RECORDS = AuditRecord.__table__
GENESIS_KEY = "_genesis"  # a sealed row may carry its chain's signed genesis, inserted in the same transaction
ROW_COLUMNS = (
    "chain_id",
    "sequence",
    "prev_hash",
    "hash",
    "occurred_at",
    "kind",
    "tenant_id",
    "actor",
    "request_id",
    "payload",
    "content",
)

_PG_INSERT = (  # the columns of ROW_COLUMNS, in that order
    "INSERT INTO audit_events (chain_id, sequence, prev_hash, hash, occurred_at, kind, tenant_id, actor, request_id, "
    "payload, content) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
)


# Sorted keys: for an ASCII payload the stored text is then its canonical form, which verification hashes as is.
_PAYLOAD = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def _payload_text(row: dict[str, Any]) -> str:
    """The sealed row's canonical payload text when it is ASCII (then it is exactly what _PAYLOAD writes)."""
    text = row.get(SEALED_PAYLOAD)
    return text if text is not None and text.isascii() else _PAYLOAD.encode(row["payload"])


def _insert(dialect: str, table: Any):  # -> a dialect Insert with ON CONFLICT support
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return insert(table)


async def insert_events(conn: AsyncConnection, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Insert sealed rows atomically; return the conflicts: rows whose (chain, sequence) already holds a
    *different* event. Those are not written and must not be dropped (the caller keeps and reports them).

    The same row again (a replay after a lost acknowledgement) is skipped: that is idempotence, not a conflict.
    The fast path is one plain batch insert inside a savepoint; only a unique violation takes the slow path."""
    if not rows:
        return []
    try:
        async with conn.begin_nested():
            await _insert_rows(conn, rows)
        return []
    except Exception as exc:
        if not _unique_violation(exc):
            raise
    existing = await _existing(conn, rows)
    fresh: dict[tuple[str, int], dict[str, Any]] = {}
    conflicts: list[dict[str, Any]] = []
    for row in rows:
        key = (row["chain_id"], int(row["sequence"]))
        have = existing.get(key) or (_link(fresh[key]) if key in fresh else None)
        if have is None:
            fresh[key] = row
        elif have != _link(row):
            conflicts.append(row)
    if fresh:
        await _insert_rows(conn, list(fresh.values()))
    return conflicts


def _link(row: Mapping[str, Any]) -> tuple[str, str]:
    return row["prev_hash"], row["hash"]  # the hash covers every other column: equal links, equal rows


def _unique_violation(exc: BaseException) -> bool:
    cause = getattr(exc, "orig", None) or exc
    if getattr(cause, "sqlstate", None) == "23505":  # PostgreSQL (asyncpg)
        return True
    return isinstance(exc, IntegrityError) and "UNIQUE" in str(cause)  # SQLite


async def _existing(conn: AsyncConnection, rows: Sequence[dict[str, Any]]) -> dict[tuple[str, int], tuple[str, str]]:
    """(prev_hash, hash) of the rows already stored at the batch's positions (one query per chain)."""
    by_chain: dict[str, list[int]] = {}
    for row in rows:
        by_chain.setdefault(row["chain_id"], []).append(int(row["sequence"]))
    found: dict[tuple[str, int], tuple[str, str]] = {}
    for chain_id, sequences in by_chain.items():
        query = select(EVENTS.c.sequence, EVENTS.c.prev_hash, EVENTS.c.hash).where(
            EVENTS.c.chain_id == chain_id, EVENTS.c.sequence.between(min(sequences), max(sequences))
        )
        for seq, prev_hash, hash_hex in (await conn.execute(query)).all():
            found[(chain_id, int(seq))] = (prev_hash, hash_hex)
    return found


async def _insert_rows(conn: AsyncConnection, rows: Sequence[dict[str, Any]]) -> None:
    if conn.dialect.name == "postgresql":
        # asyncpg's own executemany: about twice SQLAlchemy's rate, and atomic (all rows or none).
        raw = (await conn.get_raw_connection()).driver_connection
        # ASCII-escaped JSON text: a NUL or odd code point inside a string cannot make PostgreSQL refuse the row.
        values = [(*(r[c] for c in ROW_COLUMNS[:9]), _payload_text(r), r["content"]) for r in rows]
        await raw.executemany(_PG_INSERT, values)
        return
    await conn.execute(EVENTS.insert(), [{c: r.get(c) for c in ROW_COLUMNS} for r in rows])


async def insert_checkpoints(conn: AsyncConnection, rows: Sequence[dict[str, Any]]) -> None:
    if not rows:
        return
    stmt = _insert(conn.dialect.name, CHECKPOINTS).on_conflict_do_nothing(
        index_elements=["chain_id", "sequence", "kind"]
    )
    await conn.execute(stmt, list(rows))


async def insert_records(conn: AsyncConnection, rows: Sequence[dict[str, Any]]) -> None:
    if rows:
        await conn.execute(RECORDS.insert(), list(rows))


async def signed_heads(engine: AsyncEngine, chain_id: str | None = None) -> list[Any]:
    """Checkpoint rows (all kinds) in (chain, sequence) order."""
    query = select(CHECKPOINTS).order_by(CHECKPOINTS.c.chain_id, CHECKPOINTS.c.sequence, CHECKPOINTS.c.id)
    if chain_id is not None:
        query = query.where(CHECKPOINTS.c.chain_id == chain_id)
    async with engine.connect() as conn:
        return list((await conn.execute(query)).all())


async def signed_records(engine: AsyncEngine, kind: str) -> list[Any]:
    async with engine.connect() as conn:
        query = select(RECORDS).where(RECORDS.c.kind == kind).order_by(RECORDS.c.id)
        return list((await conn.execute(query)).all())


def writer_engine(url: str) -> AsyncEngine:
    """An engine whose connects and statements time out, so an unreachable database means spooling, not hanging."""
    args: dict[str, Any] = {}
    if make_url(url).get_backend_name().startswith("postgres"):
        args = {"connect_args": {"timeout": 5, "command_timeout": 30}, "pool_size": 2, "max_overflow": 2}
    return create_engine(url, **args)


def row_to_json(row: dict[str, Any]) -> dict[str, Any]:
    """A sealed row as JSON-safe values (spool lines and exports): fixed time format, content in base64."""
    out = {c: row.get(c) for c in ROW_COLUMNS}
    if isinstance(out["occurred_at"], datetime):
        out["occurred_at"] = format_time(out["occurred_at"])
    out["content"] = base64.b64encode(out["content"]).decode() if out["content"] else None
    genesis = row.get(GENESIS_KEY)
    if genesis is not None:  # spool lines only: the chain's signed genesis travels with its first row
        out[GENESIS_KEY] = {
            **genesis,
            "signed_at": format_time(genesis["signed_at"]),
            "signature": base64.b64encode(genesis["signature"]).decode(),
        }
    return out


def row_from_json(data: dict[str, Any]) -> dict[str, Any]:
    out = {c: data.get(c) for c in ROW_COLUMNS}
    out["occurred_at"] = parse_time(out["occurred_at"])
    out["sequence"] = int(out["sequence"])
    out["content"] = base64.b64decode(out["content"]) if out["content"] else None
    genesis = data.get(GENESIS_KEY)
    if genesis is not None:
        out[GENESIS_KEY] = {
            **genesis,
            "signed_at": parse_time(genesis["signed_at"]),
            "signature": base64.b64decode(genesis["signature"]),
        }
    return out


async def chain_ids(engine: AsyncEngine, tenant_id: str | None = None) -> list[str]:
    """Every chain with rows, checkpoints or an anchor, so a chain whose rows were all deleted still counts."""
    queries: list[Select[Any]] = [select(EVENTS.c.chain_id).distinct()]
    if tenant_id is None:
        queries += [select(CHECKPOINTS.c.chain_id).distinct(), select(ANCHORS.c.chain_id)]
    else:
        queries[0] = queries[0].where(EVENTS.c.tenant_id == tenant_id)
    found: set[str] = set()
    async with engine.connect() as conn:
        for query in queries:
            found.update((await conn.execute(query)).scalars())
    return sorted(found)


async def chain_rows(
    engine: AsyncEngine, chain_id: str, after: int = 0, until: int | None = None, page: int = 5000
) -> AsyncIterator[dict[str, Any]]:
    """A chain's rows in sequence order, a page at a time (keyset on sequence: constant memory)."""
    if engine.dialect.name == "postgresql":
        async for row in _pg_chain_rows(engine, chain_id, after, until, page):
            yield row
        return
    last = after
    while True:
        query = select(EVENTS).where(EVENTS.c.chain_id == chain_id, EVENTS.c.sequence > last)
        if until is not None:
            query = query.where(EVENTS.c.sequence <= until)
        async with engine.connect() as conn:
            rows = (await conn.execute(query.order_by(EVENTS.c.sequence).limit(page))).mappings().all()
        for row in rows:
            yield dict(row)
        if len(rows) < page:
            return
        last = rows[-1]["sequence"]


_PG_SELECT = (
    "SELECT id, chain_id, sequence, prev_hash, hash, occurred_at, kind, tenant_id, actor, request_id, "
    "payload::text AS _payload_text, content "
    "FROM audit_events WHERE chain_id = $1 AND sequence > $2 AND sequence <= $3 ORDER BY sequence LIMIT $4"
)


async def _pg_chain_rows(
    engine: AsyncEngine, chain_id: str, after: int, until: int | None, page: int
) -> AsyncIterator[dict[str, Any]]:
    """asyncpg's own fetch, the next page fetched while this one is hashed: verification reads every row."""
    bound = until if until is not None else 2**62

    async def fetch(last: int) -> list[Any]:
        async with engine.connect() as conn:
            raw = (await conn.get_raw_connection()).driver_connection
            return list(await raw.fetch(_PG_SELECT, chain_id, last, bound, page))

    pending: asyncio.Task[list[Any]] | None = asyncio.ensure_future(fetch(after))
    try:
        while pending is not None:
            records = await pending
            pending = asyncio.ensure_future(fetch(records[-1]["sequence"])) if len(records) == page else None
            for record in records:
                row = dict(record.items())
                row["payload"] = None  # parsed only if the stored text is not the canonical form (hashes_to_stored)
                yield row
    finally:
        if pending is not None:
            pending.cancel()


async def find_one(engine: AsyncEngine, chain_id: str, **where: Any) -> dict[str, Any] | None:
    """One row of a chain matching column values (used only to explain a failure, so a scan is fine)."""
    query = select(EVENTS).where(EVENTS.c.chain_id == chain_id)
    for column, value in where.items():
        query = query.where(EVENTS.c[column] == value)
    async with engine.connect() as conn:
        row = (await conn.execute(query.limit(1))).mappings().first()
    return dict(row) if row else None


async def count_events(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(select(func.count()).select_from(EVENTS))).scalar_one())
