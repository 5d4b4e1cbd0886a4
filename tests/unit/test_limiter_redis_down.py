"""The limiter when its Redis cannot be reached (a loopback port nothing listens on): each tenant's policy."""

from __future__ import annotations

import pytest

from bastion.config.schema import LimitsConfig
from bastion.tenancy.limiter import Limiter
from bastion.tenancy.limiter_plan import LimitExceeded, RedisUnavailable, Subject

pytestmark = pytest.mark.unit
NOWHERE = "redis://127.0.0.1:18243/0"  # nothing listens here: connections are refused at once


def _subjects(rpm: int = 2) -> list[Subject]:
    return [Subject("tenant", "t1", LimitsConfig(requests_per_minute=rpm, concurrent_requests=5))]


async def test_fallback_limits_in_process_and_counts() -> None:
    limiter = Limiter(NOWHERE, retry_s=60)
    try:
        first = await limiter.admit("r1", _subjects(), 3, tenant="acme")
        assert first.local and limiter.redis_down and limiter.fallback_admissions == 1
        await limiter.admit("r2", _subjects(), 3, tenant="acme")
        with pytest.raises(LimitExceeded):  # the in-process windows still hold the limit
            await limiter.admit("r3", _subjects(), 3, tenant="acme")
        await limiter.finish(first, 5)  # releases the in-process slot, no Redis call
    finally:
        await limiter.aclose()


async def test_refuse_policy_per_tenant() -> None:
    limiter = Limiter(NOWHERE, when_unavailable="fallback", tenant_policies={"strict": "refuse"}, retry_s=60)
    try:
        with pytest.raises(RedisUnavailable):
            await limiter.admit("r1", _subjects(), 3, tenant="strict")
        assert limiter.redis_refusals == 1
        assert (await limiter.admit("r2", _subjects(), 3, tenant="other")).local
    finally:
        await limiter.aclose()


async def test_platform_default_refuse() -> None:
    limiter = Limiter(NOWHERE, when_unavailable="refuse", retry_s=0)
    try:
        for _ in range(2):  # retry_s=0: Redis is tried again on every request, and refused every time
            with pytest.raises(RedisUnavailable):
                await limiter.admit("r", _subjects(), 3, tenant="any")
        assert limiter.redis_refusals == 2
    finally:
        await limiter.aclose()
