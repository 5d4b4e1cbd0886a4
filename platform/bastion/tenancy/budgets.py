"""Daily and monthly token budgets per tenant and per key, persisted in the database, cached as running totals.

A total is read from the database once per subject and period (tenants: the sum of `usage_counters`; keys:
`key_usage_counters`), then kept in Redis (shared by all gateway replicas) or in process memory (embedded),
and advanced as requests finish. The database stays the record: the usage recorder writes the same tokens
there in batches.

Reserve, then settle: checking a budget against what was already spent lets every request admitted in the
same moment pass (40 at once against 600 tokens served 1,382). So admission reserves the request's worst case
(prompt + max_tokens) against every budget that applies, all or none, and the end settles it (the reservation
is dropped, the tokens really used are added). In Redis this happens inside the limiter's own admission and
release scripts (`limiter_redis.py`: one script per admission and one per settlement, budgets or not); this
module says which budgets apply (`BudgetHold`), seeds their totals from the database, judges the counts, and
keeps the in-process totals and reservations (no Redis, or Redis down). A reservation in Redis is a member of
a sorted set scored by its lease's end: a gateway replica that crashes mid-request leaves reservations that
the next admission sweeps once the lease is over.
"""

from __future__ import annotations

import asyncio
import calendar
import functools
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from redis.asyncio import Redis
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bastion.db.models import KeyUsageCounter, UsageCounter
from bastion.tenancy.subjects import REDIS_DOWN, Subject

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
        super().__init__(f"{limit} of {budget} tokens for this {scope} reached ({used} used or reserved)")
        self.limit = limit
        self.scope = scope
        self.budget = budget
        self.used = used
        self.retry_after = retry_after
        self.reserved = 0  # what the refused request would have reserved

    def __str__(self) -> str:
        text = super().__str__()
        return f"{text}; this request reserves {self.reserved}" if self.reserved else text


@dataclass(frozen=True)
class BudgetLine:
    """One budget a request is held to: a subject's daily or monthly budget, in the period it started in."""

    subject: Subject
    name: str  # daily_token_budget | monthly_token_budget
    budget: int
    period: str
    retry_after: float

    @property
    def local_key(self) -> tuple[str, str]:
        return f"{self.subject.scope}:{self.subject.id}", self.period

    @property
    def redis_key(self) -> str:
        return f"{_PREFIX}{self.subject.scope}:{self.subject.id}:{self.period}"


@dataclass
class BudgetHold:
    """A request's reservation against its budgets, settled once when it ends (`tracker` keeps its totals)."""

    member: str  # "<request id>|<tokens>": the reservation's name in Redis (the sweep reads the tokens from it)
    lines: tuple[BudgetLine, ...]
    reserved: int
    remaining: int  # the tightest budget's tokens left after this reservation (a response header)
    local: bool
    tracker: BudgetTracker = field(repr=False, compare=False)
    settled: bool = False

    @property
    def redis_keys(self) -> list[str]:
        """Per budget: settled total, reservations (sorted set), their sum (the limiter's scripts' layout)."""
        return [k for line in self.lines for k in (line.redis_key, f"{line.redis_key}:resv", f"{line.redis_key}:sum")]


def budget_lines(subjects: list[Subject], now: datetime) -> list[BudgetLine]:
    lines = []
    for s in subjects:
        if s.limits.daily_token_budget is not None:
            lines.append(
                BudgetLine(s, "daily_token_budget", s.limits.daily_token_budget, day_period(now),
                           seconds_until_next_day(now))
            )  # fmt: skip
        if s.limits.monthly_token_budget is not None:
            lines.append(
                BudgetLine(s, "monthly_token_budget", s.limits.monthly_token_budget, month_period(now),
                           seconds_until_next_month(now))
            )  # fmt: skip
    return lines


class BudgetTracker:
    def __init__(
        self, sessions: async_sessionmaker[AsyncSession], redis: Redis | None = None, *, lease_s: float = 900.0
    ) -> None:
        self._sessions = sessions
        self._redis = redis
        self._local: dict[tuple[str, str], int] = {}
        self._reserved: dict[tuple[str, str], int] = {}  # in process: tokens reserved by requests in flight
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self.lease_s = lease_s  # how long a reservation in Redis counts when its request never settles

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
        if self._redis is not None:
            try:
                return await self._redis_used(scope, subject_id, period)
            except REDIS_DOWN:  # Redis down: the database's total, counted on in this process until it returns
                pass
        return await self._local_used(scope, subject_id, period)

    async def _local_used(self, scope: str, subject_id: str, period: str) -> int:
        key = (f"{scope}:{subject_id}", period)
        if key in self._local:
            return self._local[key]
        async with self._locks.setdefault(key, asyncio.Lock()):
            if key not in self._local:
                self._local[key] = await self._db_total(scope, subject_id, period)
        return self._local[key]

    # --- reserve, then settle (the limiter drives these: `Limiter.admit(..., budgets=)`) ------------------------

    def hold(self, request_id: str, subjects: list[Subject], tokens: int, now: datetime) -> BudgetHold | None:
        """The reservation of `tokens` against every budget that applies in `now`'s periods, not yet made; None
        when no budget applies."""
        lines = tuple(budget_lines(subjects, now))
        if not lines:
            return None
        return BudgetHold(f"{request_id}|{tokens}", lines, tokens, 0, local=False, tracker=self)

    async def seed(self, line: BudgetLine) -> None:
        """Put the line's settled total into Redis from the database (the admission script found none)."""
        await self._redis_used(line.subject.scope, line.subject.id, line.period)

    async def prepare_local(self, hold: BudgetHold) -> None:
        """Read the hold's totals into this process (from the database, once per subject and period), so that
        `reserve_local` can check and charge with no await."""
        hold.local = True
        for line in hold.lines:
            await self._local_used(line.subject.scope, line.subject.id, line.period)

    def check_local(self, hold: BudgetHold) -> None:
        """Raise BudgetExhausted when the reservation does not fit this process's totals (after `prepare_local`)."""
        self.judge(hold, [self._local[line.local_key] + self._reserved.get(line.local_key, 0) for line in hold.lines])

    def reserve_local(self, hold: BudgetHold) -> None:
        """Charge the reservation in process (after `check_local`, with no await in between)."""
        for line in hold.lines:
            self._reserved[line.local_key] = self._reserved.get(line.local_key, 0) + hold.reserved

    @staticmethod
    def judge(hold: BudgetHold, used: list[int]) -> None:
        """Raise BudgetExhausted for the first budget the reservation overflows (`used`: settled + reserved per
        line before it), else set `hold.remaining` to the tightest budget's tokens left after it."""
        remaining = None
        for line, spent in zip(hold.lines, used, strict=True):
            if spent + hold.reserved > line.budget:
                s = line.subject
                error = BudgetExhausted(line.name, s.scope, line.budget, spent, line.retry_after)
                error.reserved = hold.reserved
                raise error
            left = line.budget - spent - hold.reserved
            remaining = left if remaining is None else min(remaining, left)
        hold.remaining = remaining or 0

    def settle_local(self, hold: BudgetHold, used: int) -> None:
        """Settle in process: a local reservation is dropped; the tokens used are counted on the totals this
        process holds (also for a Redis reservation whose settlement failed: it lapses with its lease there)."""
        for line in hold.lines:
            key = line.local_key
            if hold.local:
                self._reserved[key] = max(self._reserved.get(key, 0) - hold.reserved, 0)
            if key in self._local:
                self._local[key] += used

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
