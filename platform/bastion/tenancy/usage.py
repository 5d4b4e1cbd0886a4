"""Usage accounting: the batched usage-counter writer, one of the recorders each RequestRecord (records.py) goes to.

`RequestRecorder.record()` must not block or raise: the gateway calls it on the request path after the response
is done. The audit writer implements the same protocol; `UsageRecorder` aggregates records in memory and
upserts `usage_counters` (one row per tenant, period, model and profile; day and month periods) in one
transaction per flush, so the database sees a few statements a second rather than one per request.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bastion.db.models import KeyUsageCounter, UsageCounter, utcnow
from bastion.records import RequestRecord
from bastion.tenancy.budgets import day_period, month_period


@dataclass
class _Bucket:
    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0


class UsageRecorder:
    """Aggregates inference records into usage counters; `flush()` writes them (the gateway calls it each second)."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions
        self._pending: dict[tuple[str, str, str, str], _Bucket] = defaultdict(_Bucket)
        self._keys: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])  # (key, period) → [requests, tokens]

    def record(self, record: RequestRecord) -> None:
        if (
            record.tenant_id is None
            or record.model is None
            or record.endpoint not in ("chat", "completion", "messages")
        ):
            return
        profile = record.profile or ""
        for period in (day_period(record.started_at), month_period(record.started_at)):
            bucket = self._pending[(record.tenant_id, period, record.model, profile)]
            bucket.requests += 1
            bucket.errors += record.status >= 400
            bucket.prompt_tokens += record.prompt_tokens
            bucket.completion_tokens += record.completion_tokens
            if record.speculation is not None:
                bucket.draft_tokens += record.speculation.draft_tokens
                bucket.accepted_tokens += record.speculation.accepted_tokens
            if record.key_id is not None:
                totals = self._keys[(record.key_id, period)]
                totals[0] += 1
                totals[1] += record.total_tokens

    async def for_tenant(self, tenant_id: str, *, periods: list[str] | None = None) -> list[UsageRow]:
        """The tenant's counters as written so far (the gateway's `/v1/usage` flushes first)."""
        return await usage_for_tenant(self._sessions, tenant_id, periods=periods)

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def flush(self) -> int:
        """Upsert every pending bucket in one transaction; on failure the buckets are kept for the next flush."""
        if not self._pending and not self._keys:
            return 0
        pending, self._pending = self._pending, defaultdict(_Bucket)
        key_totals, self._keys = self._keys, defaultdict(lambda: [0, 0])
        try:
            async with self._sessions() as session:
                dialect = session.bind.dialect.name if session.bind is not None else "sqlite"
                insert = pg_insert if dialect == "postgresql" else sqlite_insert
                now = utcnow()
                for (key_id, period), (requests, tokens) in key_totals.items():
                    stmt = insert(KeyUsageCounter).values(
                        key_id=key_id, period=period, requests=requests, tokens=tokens, updated_at=now
                    )
                    cols = KeyUsageCounter.__table__.c
                    stmt = stmt.on_conflict_do_update(
                        index_elements=["key_id", "period"],
                        set_={"requests": cols.requests + requests, "tokens": cols.tokens + tokens, "updated_at": now},
                    )
                    await session.execute(stmt)
                for (tenant_id, period, model, profile), b in pending.items():
                    values = {
                        "requests": b.requests,
                        "errors": b.errors,
                        "prompt_tokens": b.prompt_tokens,
                        "completion_tokens": b.completion_tokens,
                        "draft_tokens": b.draft_tokens,
                        "accepted_tokens": b.accepted_tokens,
                    }
                    stmt = insert(UsageCounter).values(
                        tenant_id=tenant_id, period=period, model=model, profile=profile, updated_at=now, **values
                    )
                    stmt = stmt.on_conflict_do_update(
                        index_elements=["tenant_id", "period", "model", "profile"],
                        set_={
                            **{k: getattr(UsageCounter.__table__.c, k) + v for k, v in values.items()},
                            "updated_at": now,
                        },
                    )
                    await session.execute(stmt)
                await session.commit()
        except Exception:  # the caller logs (once a minute while it lasts): buckets are kept, nothing is lost
            for key, b in pending.items():
                mine = self._pending[key]
                for name in vars(b):
                    setattr(mine, name, getattr(mine, name) + getattr(b, name))
            for key, (requests, tokens) in key_totals.items():
                self._keys[key][0] += requests
                self._keys[key][1] += tokens
            raise
        return len(pending)


@dataclass(frozen=True)
class UsageRow:
    period: str
    model: str
    profile: str
    requests: int
    errors: int
    prompt_tokens: int
    completion_tokens: int
    draft_tokens: int
    accepted_tokens: int


async def usage_for_tenant(
    sessions: async_sessionmaker[AsyncSession], tenant_id: str, *, periods: list[str] | None = None
) -> list[UsageRow]:
    """The tenant's counters (optionally only some periods), newest period first."""
    query = select(UsageCounter).where(UsageCounter.tenant_id == tenant_id)
    if periods:
        query = query.where(UsageCounter.period.in_(periods))
    query = query.order_by(UsageCounter.period.desc(), UsageCounter.model, UsageCounter.profile)
    async with sessions() as session:
        rows = (await session.execute(query)).scalars().all()
    return [
        UsageRow(
            r.period,
            r.model,
            r.profile,
            r.requests,
            r.errors,
            r.prompt_tokens,
            r.completion_tokens,
            r.draft_tokens,
            r.accepted_tokens,
        )
        for r in rows
    ]


async def acceptance_by_profile(sessions: async_sessionmaker[AsyncSession], days: int = 30) -> dict[str, Any]:
    """Per profile and day: accepted ÷ drafted speculative tokens over all tenants (None on days without drafts)."""
    query = (
        select(
            UsageCounter.period,
            UsageCounter.profile,
            func.sum(UsageCounter.draft_tokens),
            func.sum(UsageCounter.accepted_tokens),
        )
        .where(func.length(UsageCounter.period) == 10)
        .group_by(UsageCounter.period, UsageCounter.profile)
        .order_by(UsageCounter.period)
    )
    async with sessions() as session:
        rows = (await session.execute(query)).all()
    periods = sorted({r[0] for r in rows})[-days:]
    series: dict[str, dict[str, float | None]] = defaultdict(dict)
    for period, profile, drafts, accepted in rows:
        if period in periods:
            series[profile or "-"][period] = (accepted or 0) / drafts if drafts else None
    return {"periods": periods, "profiles": {p: [v.get(d) for d in periods] for p, v in series.items()}}
