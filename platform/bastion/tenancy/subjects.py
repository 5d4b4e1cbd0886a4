"""Who a limit or budget applies to (`Subject`) and what "Redis is down" looks like: the words the limiter
(`limiter_plan.py`) and the budgets (`budgets.py`) share, in a module of their own so that neither imports the
other to name them (a limiter admission carries a budget reservation)."""

from __future__ import annotations

from dataclasses import dataclass

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from bastion.config.schema import LimitsConfig

# What "Redis is down" looks like from redis-py: refused or dropped connections, timeouts.
REDIS_DOWN = (RedisConnectionError, RedisTimeoutError, ConnectionError, TimeoutError, OSError)


@dataclass(frozen=True)
class Subject:
    """One level a limit applies at: ("tenant", tenant id) or ("key", key id)."""

    scope: str
    id: str
    limits: LimitsConfig
