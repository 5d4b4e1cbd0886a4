"""Daily and monthly token budgets per tenant and per key, persisted in the database, cached as running totals.

A total is read from the database once per subject and period (tenants: the sum of `usage_counters`; keys:
`key_usage_counters`), then kept in Redis (shared by all gateway replicas) or in process memory (embedded),
and advanced as requests finish. The database stays the record: the usage recorder writes the same tokens
there in batches.

Reserve, then settle: checking a budget against what was already spent lets every request admitted in the
same moment pass (40 at once against 600 tokens served 1,382). So admission reserves the request's worst case
(prompt + max_tokens) against every budget that applies, all or none, in one Redis script (`_RESERVE`) or with
no await between check and charge in process; the end settles it (`_SETTLE`: the reservation is dropped, the
tokens really used are added). A reservation is a member of a sorted set scored by its lease's end: a gateway
replica that crashes mid-request leaves reservations that the next admission sweeps once the lease is over.
"""

from __future__ import annotations

import asyncio
import calendar
import functools
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from redis.asyncio import Redis
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bastion.db.models import KeyUsageCounter, UsageCounter
from bastion.tenancy.limiter_plan import REDIS_DOWN, Subject

_PREFIX = "bastion:budget:"
log = logging.getLogger(__name__)

# KEYS per budget: settled total, reservations (sorted set of "<request id>|<tokens>" scored by lease end), their
# sum. ARGV: now, lease end, member, then per budget: budget, cost. Returns {verdict, used + reserved per budget
# before this request}; verdict 0: reserved everywhere; k > 0: budget k is over (nothing reserved); -k: budget k's
# total is not in Redis yet (the caller seeds it from the database and tries again).
_RESERVE = """
local now, deadline, member = ARGV[1], ARGV[2], ARGV[3]
local n = #KEYS / 3
for k = 1, n do
  if redis.call('exists', KEYS[3 * k - 2]) == 0 then return {-k} end
end
local out = {0}
for k = 1, n do
  local resv, sum = KEYS[3 * k - 1], KEYS[3 * k]
  local stale = redis.call('zrangebyscore', resv, '-inf', now)
  for _, m in ipairs(stale) do redis.call('decrby', sum, tonumber(string.match(m, '|(%d+)$'))) end
  if #stale > 0 then redis.call('zremrangebyscore', resv, '-inf', now) end
  local used = tonumber(redis.call('get', KEYS[3 * k - 2])) + tonumber(redis.call('get', sum) or '0')
  out[#out + 1] = used
  if out[1] == 0 and used + tonumber(ARGV[3 + 2 * k]) > tonumber(ARGV[2 + 2 * k]) then out[1] = k end
end
if out[1] ~= 0 then return out end
for k = 1, n do
  local resv, sum, cost = KEYS[3 * k - 1], KEYS[3 * k], ARGV[3 + 2 * k]
  redis.call('zadd', resv, deadline, member)
  redis.call('incrby', sum, cost)
  local ttl = redis.call('ttl', KEYS[3 * k - 2])
  if ttl > 0 then
    redis.call('expire', resv, ttl)
    redis.call('expire', sum, ttl)
  end
end
return out
"""

# KEYS as _RESERVE's. ARGV: member, its cost, tokens used. A reservation already swept (its lease ended) is not
# refunded twice; the tokens used are added either way.
_SETTLE = """
local member, cost, used = ARGV[1], ARGV[2], tonumber(ARGV[3])
for k = 1, #KEYS / 3 do
  if redis.call('zrem', KEYS[3 * k - 1], member) == 1 then redis.call('decrby', KEYS[3 * k], cost) end
  if used > 0 then redis.call('incrby', KEYS[3 * k - 2], used) end
end
return 0
"""


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
    """A request's reservation against its budgets, settled once when it ends."""

    member: str  # "<request id>|<tokens>": the reservation's name in Redis
    lines: tuple[BudgetLine, ...]
    reserved: int
    remaining: int  # the tightest budget's tokens left after this reservation (a response header)
    local: bool
    settled: bool = False


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
        self.lease_s = lease_s
        if redis is not None:
            self._reserve = redis.register_script(_RESERVE)
            self._settle = redis.register_script(_SETTLE)

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

    # --- reserve, then settle -------------------------------------------------------------------------------

    async def reserve(self, request_id: str, subjects: list[Subject], tokens: int, now: datetime) -> BudgetHold | None:
        """Reserve `tokens` against every budget that applies, or raise BudgetExhausted having reserved nothing.
        None when no budget applies."""
        lines = tuple(budget_lines(subjects, now))
        if not lines:
            return None
        hold = BudgetHold(f"{request_id}|{tokens}", lines, tokens, 0, local=False)
        if self._redis is not None:
            try:
                await self._reserve_redis(hold)
                return hold
            except REDIS_DOWN:  # as `used`: the database's totals, counted on in this process until it returns
                pass
        hold.local = True
        for line in lines:
            await self._local_used(line.subject.scope, line.subject.id, line.period)
        # no await from here: the check and the charge are one step for this process
        used = [self._local[line.local_key] + self._reserved.get(line.local_key, 0) for line in lines]
        self._judge(hold, used)
        for line in lines:
            self._reserved[line.local_key] = self._reserved.get(line.local_key, 0) + tokens
        return hold

    async def _reserve_redis(self, hold: BudgetHold) -> None:
        keys = [k for line in hold.lines for k in (line.redis_key, f"{line.redis_key}:resv", f"{line.redis_key}:sum")]
        for _ in range(len(hold.lines) + 1):
            now = time.time()
            args: list[float | int | str] = [now, now + self.lease_s, hold.member]
            for line in hold.lines:
                args += [line.budget, hold.reserved]
            out = await self._reserve(keys=keys, args=args)
            verdict = int(out[0])
            if verdict < 0:  # not in Redis yet: seed it from the database, then again
                line = hold.lines[-verdict - 1]
                await self._redis_used(line.subject.scope, line.subject.id, line.period)
                continue
            self._judge(hold, [int(u) for u in out[1:]])
            return
        raise RuntimeError("budget totals could not be seeded in Redis")

    @staticmethod
    def _judge(hold: BudgetHold, used: list[int]) -> None:
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

    async def settle(self, hold: BudgetHold, used: int) -> None:
        """Drop the reservation and add the tokens really used (once; a second call does nothing)."""
        if hold.settled:
            return
        hold.settled = True
        if not hold.local:
            lines = hold.lines
            keys = [k for line in lines for k in (line.redis_key, f"{line.redis_key}:resv", f"{line.redis_key}:sum")]
            try:
                await self._settle(keys=keys, args=[hold.member, hold.reserved, used])
                return
            except REDIS_DOWN as exc:  # the reservation lapses with its lease; this process counts the tokens
                log.warning("budget settlement failed (%s): kept in this process", type(exc).__name__)
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
