"""Daily and monthly token budgets per tenant and per key, persisted in the database, cached as running totals.

A total is read from the database once per subject and period (tenants: the sum of `usage_counters`; keys:
`key_usage_counters`), then kept in Redis (shared by all gateway replicas) or in process memory (embedded),
and advanced as requests finish. The database stays the record: the usage recorder writes the same tokens
there in batches.
"""

from __future__ import annotations

import asyncio
import calendar
import functools
from datetime import UTC, datetime, timedelta

from redis.asyncio import Redis
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bastion.db.models import KeyUsageCounter, UsageCounter
from bastion.tenancy.limiter_plan import REDIS_DOWN, Subject

_PREFIX = "bastion:budget:"


@functools.lru_cache(maxsize=64)
def _periods(year: int, month: int, day: int) -> tuple[str, str]:
    return f"{year:04d}-{month:02d}-{day:02d}", f"{year:04d}-{month:02d}"


def day_period(at: datetime) -> str:
    utc = at.astimezone(UTC)
    return _periods(utc.year, utc.month, utc.day)[0]  # strftime per request is measurable on the hot path


def month_period(at: datetime) -> str:
    utc = at.astimezone(UTC)
    return _periods(utc.year, utc.month, utc.day)[1]


def seconds_until_next_day(at: datetime) -> float:
    at = at.astimezone(UTC)
    nxt = datetime(at.year, at.month, at.day, tzinfo=UTC) + timedelta(days=1)
    return (nxt - at).total_seconds()


def seconds_until_next_month(at: datetime) -> float:
    at = at.astimezone(UTC)
    days = calendar.monthrange(at.year, at.month)[1]
    nxt = datetime(at.year, at.month, 1, tzinfo=UTC) + timedelta(days=days)
    return (nxt - at).total_seconds()


class BudgetExhausted(Exception):
    def __init__(self, limit: str, scope: str, budget: int, used: int, retry_after: float) -> None:
        super().__init__(f"{limit} of {budget} tokens for this {scope} reached ({used} used)")
        self.limit = limit
        self.scope = scope
        self.budget = budget
        self.used = used
        self.retry_after = retry_after


class BudgetTracker:
    def __init__(self, sessions: async_sessionmaker[AsyncSession], redis: Redis | None = None) -> None:
        self._sessions = sessions
        self._redis = redis
        self._local: dict[tuple[str, str], int] = {}
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}

    async def _db_total(self, scope: str, subject_id: str, period: str) -> int:
        if scope == "key":
            query = select(func.coalesce(func.sum(KeyUsageCounter.tokens), 0)).where(
                KeyUsageCounter.key_id == subject_id, KeyUsageCounter.period == period
            )
        else:
            query = select(
                func.coalesce(func.sum(UsageCounter.prompt_tokens + UsageCounter.completion_tokens), 0)
            ).where(UsageCounter.tenant_id == subject_id, UsageCounter.period == period)
        async with self._sessions() as session:
            return int(await session.scalar(query) or 0)

    async def used(self, scope: str, subject_id: str, period: str) -> int:
        """Tokens used by the tenant or key in the period, seeded from the database on first use."""
        key = (f"{scope}:{subject_id}", period)
        if self._redis is not None:
            try:
                return await self._redis_used(scope, subject_id, period)
            except REDIS_DOWN:  # Redis down: the database's total, counted on in this process until it returns
                pass
        if key in self._local:
            return self._local[key]
        async with self._locks.setdefault(key, asyncio.Lock()):
            if key not in self._local:
                self._local[key] = await self._db_total(scope, subject_id, period)
        return self._local[key]

    async def _redis_used(self, scope: str, subject_id: str, period: str) -> int:
        assert self._redis is not None
        rkey = f"{_PREFIX}{scope}:{subject_id}:{period}"
        value = await self._redis.get(rkey)
        if value is not None:
            return int(value)
        seed = await self._db_total(scope, subject_id, period)
        ttl = 3 * 86400 if len(period) == 10 else 33 * 86400
        await self._redis.set(rkey, seed, nx=True, ex=ttl)
        return int(await self._redis.get(rkey) or 0)

    async def check(self, subjects: list[Subject], prompt_tokens: int, now: datetime) -> None:
        """Raise BudgetExhausted when the prompt would take a tenant or key past a daily or monthly budget."""
        for s in subjects:
            checks = (
                ("daily_token_budget", s.limits.daily_token_budget, day_period(now), seconds_until_next_day(now)),
                (
                    "monthly_token_budget",
                    s.limits.monthly_token_budget,
                    month_period(now),
                    seconds_until_next_month(now),
                ),
            )
            for name, budget, period, retry in checks:
                if budget is None:
                    continue
                used = await self.used(s.scope, s.id, period)
                if used + prompt_tokens > budget:
                    raise BudgetExhausted(name, s.scope, budget, used, retry)

    async def add(self, subjects: list[Subject], tokens: int, at: datetime) -> None:
        """Advance the running totals of every subject that has a budget (others are not tracked)."""
        if tokens <= 0:
            return
        for s in subjects:
            periods = []
            if s.limits.daily_token_budget is not None:
                periods.append(day_period(at))
            if s.limits.monthly_token_budget is not None:
                periods.append(month_period(at))
            for period in periods:
                await self.used(s.scope, s.id, period)  # seed first, so the running total includes history
                local = (f"{s.scope}:{s.id}", period)
                if self._redis is not None:
                    try:
                        await self._redis.incrby(f"{_PREFIX}{s.scope}:{s.id}:{period}", tokens)
                        continue
                    except REDIS_DOWN:
                        pass
                if local in self._local:
                    self._local[local] += tokens
