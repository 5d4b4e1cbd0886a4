"""The limiter's two backends answer alike: the same scenarios against real Redis and in process.

All-or-none is the point of the Redis script: a request refused by one counter must not have consumed any
other (a window charged, a slot taken at another level), or a busy tenant would starve itself."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime

import pytest
import redis
from sqlalchemy.ext.asyncio import async_sessionmaker

from bastion.config.schema import LimitsConfig
from bastion.db import migrate
from bastion.db.session import create_engine, session_factory
from bastion.tenancy.budgets import BudgetExhausted, BudgetTracker, day_period
from bastion.tenancy.limiter import Limiter
from bastion.tenancy.limiter_plan import LimitExceeded, Subject

pytestmark = pytest.mark.integration


@pytest.fixture(params=["redis", "in-process"])
async def limiter(request: pytest.FixtureRequest, redis_url: str) -> AsyncIterator[Limiter]:
    made = Limiter(redis_url if request.param == "redis" else None)
    yield made
    await made.aclose()


def _subjects(tenant: LimitsConfig, key: LimitsConfig | None = None) -> list[Subject]:
    ids = uuid.uuid4().hex[:8]  # fresh counters per test, whatever ran before on the same Redis database
    out = [Subject("tenant", f"t-{ids}", tenant)]
    return out + ([Subject("key", f"k-{ids}", key)] if key is not None else [])


async def test_a_refused_request_takes_nothing(limiter: Limiter) -> None:
    subjects = _subjects(LimitsConfig(requests_per_minute=5, tokens_per_minute=10, concurrent_requests=2))
    with pytest.raises(LimitExceeded) as err:
        await limiter.admit("big", subjects, 20)
    assert err.value.limit == "tokens_per_minute" and "20 prompt tokens" in str(err.value)
    assert err.value.headers.tokens.remaining == 10 and err.value.headers.requests.remaining == 4
    first = await limiter.admit("a", subjects, 4)
    assert (first.headers.requests.remaining, first.headers.tokens.remaining) == (4, 6)
    assert 55 <= first.headers.requests.reset_s <= 60
    second = await limiter.admit("b", subjects, 1)  # both slots now held: the refused request took none
    with pytest.raises(LimitExceeded) as err:
        await limiter.admit("c", subjects, 1)
    assert err.value.limit == "concurrent_requests" and err.value.headers.requests is not None
    await limiter.finish(first, 3)
    await limiter.finish(first, 3)  # idempotent
    third = await limiter.admit("d", subjects, 1)  # the slot came back; 4 + 3 + 1 + 1 = 9 tokens
    assert third.headers.tokens.remaining == 1
    await limiter.cancel(third)  # undone: its request and tokens come back
    again = await limiter.admit("e", subjects, 1)
    assert (again.headers.requests.remaining, again.headers.tokens.remaining) == (2, 1)
    await limiter.finish(second, 0)


async def test_all_or_none_across_levels(limiter: Limiter) -> None:
    subjects = _subjects(
        LimitsConfig(requests_per_minute=100, concurrent_requests=5), LimitsConfig(concurrent_requests=1)
    )
    held = await limiter.admit("a", subjects, 0)
    for n in range(3):  # the key's slot is full: the tenant's slot must not be taken on the way
        with pytest.raises(LimitExceeded) as err:
            await limiter.admit(f"x{n}", subjects, 0)
        assert err.value.limit == "concurrent_requests" and err.value.scope == "key"
    assert held.headers.requests.remaining == 99
    other_key = [subjects[0], Subject("key", "k-other", LimitsConfig(concurrent_requests=1))]
    for n in range(4):  # the tenant still has 4 free slots and 99 requests
        await limiter.admit(f"o{n}", [other_key[0], Subject("key", f"k-{n}", LimitsConfig())], 0)
    with pytest.raises(LimitExceeded) as err:
        await limiter.admit("full", other_key, 0)
    assert err.value.scope == "tenant"


async def test_the_tightest_window_is_reported(limiter: Limiter) -> None:
    subjects = _subjects(LimitsConfig(requests_per_minute=100), LimitsConfig(requests_per_minute=3))
    admitted = await limiter.admit("a", subjects, 0)
    assert (admitted.headers.requests.limit, admitted.headers.requests.remaining) == (3, 2)


async def test_redis_counters_use_the_limits_library_keys(redis_url: str) -> None:
    """Gateway replicas of the previous release (the `limits` library's calls) share the same counters."""
    limiter = Limiter(redis_url)
    try:
        subjects = _subjects(LimitsConfig(requests_per_minute=7))
        await limiter.admit("a", subjects, 0)
        key = f"bastion:rl:LIMITER/tenant/{subjects[0].id}/requests_per_minute/7/1/minute"
        client = redis.Redis.from_url(redis_url)
        assert client.get(key) == b"1" and 55 <= client.ttl(key) <= 60
        client.close()
    finally:
        await limiter.aclose()


async def test_tokens_are_reserved_then_settled(limiter: Limiter) -> None:
    subjects = _subjects(LimitsConfig(tokens_per_minute=100))
    first = await limiter.admit("a", subjects, 10, reserve=60)  # prompt 10, max_tokens 50
    assert first.headers.tokens.remaining == 40
    with pytest.raises(LimitExceeded) as err:  # 60 + 50 > 100: refused on the worst case, having taken nothing
        await limiter.admit("b", subjects, 10, reserve=50)
    assert "reserves 50 tokens" in str(err.value) and err.value.headers.tokens.remaining == 40
    await limiter.finish(first, 5)  # used 15: 45 refunded
    second = await limiter.admit("b", subjects, 10, reserve=50)
    assert second.headers.tokens.remaining == 35
    await limiter.finish(second, 0, used=70)  # the engine counted more than reserved: the excess is charged
    with pytest.raises(LimitExceeded):
        await limiter.admit("c", subjects, 10, reserve=16)  # 85 + 16 > 100
    assert (await limiter.admit("d", subjects, 10, reserve=15)).headers.tokens.remaining == 0


@pytest.fixture
def sessions(sqlite_url: str) -> Iterator[async_sessionmaker]:
    migrate.upgrade(sqlite_url)  # its own event loop: in a sync fixture, before the test's loop
    db = create_engine(sqlite_url)
    yield session_factory(db)
    asyncio.run(db.dispose())


async def test_budgets_join_the_admission_all_or_none(limiter: Limiter, sessions: async_sessionmaker) -> None:
    """A budget refusal takes no slot or window; a slot or window refusal reserves no budget; a settlement
    replaces the reservation by the tokens used; a cancel gives the reservation back whole."""
    budgets = BudgetTracker(sessions, limiter.redis)
    subjects = _subjects(
        LimitsConfig(requests_per_minute=10, concurrent_requests=1), LimitsConfig(daily_token_budget=100)
    )
    with pytest.raises(BudgetExhausted) as refused:  # 120 > 100: the request slot and the window stay free
        await limiter.admit("big", subjects, 20, reserve=120, budgets=budgets)
    assert refused.value.scope == "key" and refused.value.reserved == 120
    first = await limiter.admit("a", subjects, 10, reserve=60, budgets=budgets)
    assert first.budget is not None and first.budget.remaining == 40
    assert first.headers.requests.remaining == 9  # the refused request took no request from the window
    with pytest.raises(LimitExceeded) as full:  # the slot is held: no budget reserved on the way
        await limiter.admit("b", subjects, 10, reserve=30, budgets=budgets)
    assert full.value.limit == "concurrent_requests"
    await limiter.finish(first, 5)  # 15 used: 45 given back
    second = await limiter.admit("c", subjects, 10, reserve=85, budgets=budgets)  # 15 + 85 = 100 fits exactly
    assert second.budget is not None and second.budget.remaining == 0
    await limiter.cancel(second)  # given back whole
    third = await limiter.admit("d", subjects, 10, reserve=85, budgets=budgets)
    await limiter.finish(third, 0, used=20)
    assert await budgets.used("key", subjects[1].id, day_period(datetime.now(UTC))) == 15 + 20


async def test_one_script_per_admission_and_per_settlement(redis_url: str, sessions: async_sessionmaker) -> None:
    """With a budget too, admission and settlement send one script each (they sent two)."""
    limiter = Limiter(redis_url)
    try:
        budgets = BudgetTracker(sessions, limiter.redis)
        subjects = _subjects(
            LimitsConfig(requests_per_minute=10, tokens_per_minute=1000, concurrent_requests=2, daily_token_budget=500),
            LimitsConfig(monthly_token_budget=500),
        )
        warm = await limiter.admit("seed", subjects, 1, budgets=budgets)  # seeds the totals (GET/SET), loads scripts
        await limiter.finish(warm, 0)
        calls: list[str] = []
        redis_client = limiter.redis
        assert redis_client is not None
        sent = redis_client.execute_command

        async def counted(*args, **kwargs):
            calls.append(str(args[0]))
            return await sent(*args, **kwargs)

        redis_client.execute_command = counted  # type: ignore[method-assign]
        admitted = await limiter.admit("a", subjects, 10, reserve=60, budgets=budgets)
        assert calls == ["EVALSHA"]
        await limiter.finish(admitted, 5)
        assert calls == ["EVALSHA", "EVALSHA"]
        assert admitted.budget is not None and admitted.budget.settled
    finally:
        await limiter.aclose()
