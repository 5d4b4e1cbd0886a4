"""The limiter with its in-process backend: windows, refunds on refusal, concurrency slots, headers."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from bastion.config.schema import LimitsConfig
from bastion.tenancy.budgets import month_period, seconds_until_next_day, seconds_until_next_month
from bastion.tenancy.limiter import Limiter
from bastion.tenancy.limiter_plan import LimitExceeded, Subject

pytestmark = pytest.mark.unit


def tenant(**limits) -> Subject:
    return Subject("tenant", "t1", LimitsConfig(**limits))


async def test_requests_per_minute_and_headers() -> None:
    limiter = Limiter()
    subjects = [tenant(requests_per_minute=2)]
    first = await limiter.admit("r1", subjects, 0)
    assert first.headers.requests is not None and first.headers.requests.remaining == 1
    assert 59 <= first.headers.requests.reset_s <= 60
    await limiter.admit("r2", subjects, 0)
    with pytest.raises(LimitExceeded) as err:
        await limiter.admit("r3", subjects, 0)
    assert err.value.limit == "requests_per_minute" and err.value.scope == "tenant"
    assert 1 <= err.value.retry_after <= 60 and err.value.headers.requests.remaining == 0


async def test_a_refused_request_costs_nothing() -> None:
    limiter = Limiter()
    subjects = [tenant(requests_per_minute=5, tokens_per_minute=10)]
    with pytest.raises(LimitExceeded) as err:
        await limiter.admit("big", subjects, 20)
    assert err.value.limit == "tokens_per_minute" and "20 prompt tokens" in str(err.value)
    admitted = await limiter.admit("small", subjects, 4)
    assert admitted.headers.requests.remaining == 4  # the refused request's hit was refunded
    assert admitted.headers.tokens.remaining == 6
    await limiter.finish(admitted, 5)
    await limiter.finish(admitted, 5)  # idempotent: the completion is added once
    with pytest.raises(LimitExceeded):
        await limiter.admit("next", subjects, 2)  # 4 + 5 + 2 > 10
    assert (await limiter.admit("fits", subjects, 1)).headers.tokens.remaining == 0


async def test_concurrency_slots_are_released() -> None:
    limiter = Limiter()
    subjects = [tenant(concurrent_requests=1), Subject("key", "k1", LimitsConfig(requests_per_minute=100))]
    held = await limiter.admit("a", subjects, 0)
    with pytest.raises(LimitExceeded) as err:
        await limiter.admit("b", subjects, 0)
    assert err.value.limit == "concurrent_requests" and err.value.retry_after == 1
    await limiter.finish(held, 0)
    again = await limiter.admit("c", subjects, 0)
    assert again.headers.requests.limit == 100  # the key's window is the only request window


async def test_the_tightest_window_is_reported() -> None:
    limiter = Limiter()
    subjects = [tenant(requests_per_minute=100), Subject("key", "k1", LimitsConfig(requests_per_minute=3))]
    admitted = await limiter.admit("a", subjects, 0)
    assert (admitted.headers.requests.limit, admitted.headers.requests.remaining) == (3, 2)


def test_budget_periods() -> None:
    at = datetime(2026, 12, 31, 23, 0, tzinfo=UTC)
    assert month_period(at) == "2026-12"
    assert seconds_until_next_day(at) == 3600 and seconds_until_next_month(at) == 3600
