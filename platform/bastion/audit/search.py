"""Audit search: events matching filters, newest first, keyset-paged (`before_id`), read-only. The console and
the admin API read the log through this, not with their own SQL; content (encrypted prompts) is never returned.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from bastion.audit.errors import AuditError
from bastion.audit.events import KINDS
from bastion.audit.store import EVENTS

MAX_PAGE = 500


class AuditQueryError(AuditError):
    """A filter out of range (an unknown kind, a page size past MAX_PAGE): the caller's mistake, a 422."""


@dataclass(frozen=True)
class AuditQuery:
    tenant_id: str | None = None
    kind: str | None = None
    actor: str | None = None
    start: datetime | None = None
    end: datetime | None = None
    before_id: int | None = None
    limit: int = 100

    def check(self) -> None:
        if self.kind is not None and self.kind not in KINDS:
            raise AuditQueryError(f"kind must be one of {', '.join(KINDS)}")
        if not 1 <= self.limit <= MAX_PAGE:
            raise AuditQueryError(f"limit must be 1..{MAX_PAGE}")


async def search(engine: AsyncEngine, q: AuditQuery) -> list[dict[str, Any]]:
    """Events matching the filters, newest first; content (encrypted prompts) is never returned here."""
    q.check()
    cols = [c for c in EVENTS.c if c.name != "content"]
    query = select(*cols)
    if q.tenant_id is not None:
        query = query.where(EVENTS.c.tenant_id == q.tenant_id)
    if q.kind is not None:
        query = query.where(EVENTS.c.kind == q.kind)
    if q.actor:
        query = query.where(EVENTS.c.actor == q.actor)
    if q.start is not None:
        query = query.where(EVENTS.c.occurred_at >= q.start)
    if q.end is not None:
        query = query.where(EVENTS.c.occurred_at < q.end)
    if q.before_id is not None:
        query = query.where(EVENTS.c.id < q.before_id)
    async with engine.connect() as conn:
        rows = (await conn.execute(query.order_by(EVENTS.c.id.desc()).limit(q.limit))).mappings().all()
    return [
        {
            "id": r["id"],
            "occurred_at": r["occurred_at"].isoformat(),
            "kind": r["kind"],
            "tenant_id": r["tenant_id"],
            "actor": r["actor"],
            "request_id": r["request_id"],
            "chain_id": r["chain_id"],
            "sequence": r["sequence"],
            "hash": r["hash"],
            "payload": r["payload"] or {},
        }
        for r in rows
    ]
