"""Refused credentials per client address: after `max_failures` in `window_s`, that address gets 429.

Guessing a 256-bit key secret is hopeless anyway; the guard keeps floods of bad keys or tokens from costing
database reads, JWKS fetches and log lines. Failures are counted in the `limits` library's fixed windows, in
Redis when configured (so every gateway and control replica adds to one count) or in process. Only a request
that presents a credential and is refused counts; a missing one does not. Once an address is over, this
replica refuses it (even with a valid credential) until the window ends, without any Redis round trip: the
check on the hot path is a dict lookup. Redis errors never block anyone (the guard fails open).
The client address is the TCP peer; X-Forwarded-For is not trusted (a client could spoof it).
"""

from __future__ import annotations

import logging
import math
import time

from limits import RateLimitItemPerSecond
from limits.aio.storage import MemoryStorage, RedisStorage, Storage
from limits.aio.strategies import FixedWindowRateLimiter
from prometheus_client import CollectorRegistry, Counter

log = logging.getLogger(__name__)
_MAX_BLOCKED = 10_000


class AuthFailureGuard:
    def __init__(
        self,
        redis_url: str | None,
        max_failures: int,
        window_s: int,
        *,
        service: str,
        registry: CollectorRegistry | None = None,
    ) -> None:
        storage: Storage = (
            RedisStorage("async+" + redis_url, implementation="redispy", key_prefix="bastion:authfail")
            if redis_url
            else MemoryStorage()
        )
        self._limiter = FixedWindowRateLimiter(storage)
        self._item = RateLimitItemPerSecond(max_failures, window_s)
        self._service = service
        self._blocked: dict[str, float] = {}  # address → monotonic time its block ends (this replica)
        self.counter = (
            Counter(
                "bastion_auth_failures",
                "Refused credentials, and requests throttled for too many of them, per outcome",
                ["service", "outcome"],
                registry=registry,
            )
            if registry is not None
            else None
        )

    def retry_after(self, address: str | None) -> int | None:
        """Seconds until `address` may try again, or None when it is not blocked here."""
        until = self._blocked.get(address or "")
        if until is None:
            return None
        left = until - time.monotonic()
        if left <= 0:
            self._blocked.pop(address or "", None)
            return None
        self._count("throttled")
        return max(1, math.ceil(left))

    async def failed(self, address: str | None) -> int | None:
        """Count one refused credential; returns the Retry-After seconds when the address is now over the limit."""
        address = address or "unknown"
        self._count("refused")
        try:
            if await self._limiter.hit(self._item, "auth", address):
                return None
            stats = await self._limiter.get_window_stats(self._item, "auth", address)
        except Exception as exc:  # the limiter's store is down: do not turn a 401 into a 500
            log.warning("auth failure count unavailable: %s", type(exc).__name__)
            return None
        wait = max(1, math.ceil(stats.reset_time - time.time()))
        if len(self._blocked) >= _MAX_BLOCKED:
            self._blocked.clear()
        if address not in self._blocked:
            log.warning("%s: too many refused credentials from %s; throttled for %d s", self._service, address, wait)
        self._blocked[address] = time.monotonic() + wait
        self._count("throttled")
        return wait

    def _count(self, outcome: str) -> None:
        if self.counter is not None:
            self.counter.labels(self._service, outcome).inc()
