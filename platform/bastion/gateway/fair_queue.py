"""The fair queue in front of each profile: when every upstream of a profile is at max_ongoing_requests, a request
waits here instead of failing at once, and the slot a finishing request frees is handed to the next waiter.

Without it a full profile refused every tenant's next request, whoever had been using the pool, so one tenant's
burst of agents locked the others out. Waiters are served by deficit round robin across tenants (each start
costs 1; a tenant's quantum is its weight, `gateway.tenant_weights`): a flooding tenant gets its share and no
more, a tenant with one request waiting starts within one round. A freed slot goes straight to the waiter (the
in-flight count is not lowered), so a request arriving later cannot take it first. Bounded by length and wait
per profile (`profiles.<name>.queue`); past either, 429 with Retry-After. One queue per gateway replica: with
several replicas each shares its own view of the upstreams' slots (docs/gateway.md).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field


class QueueFull(Exception):
    """No room in the queue, or the wait passed its bound; `retry_after` in seconds."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class _Waiter:
    tenant: str  # the tenant's id (metric label)
    weight: float
    future: asyncio.Future[str] = field(repr=False)  # resolved with the upstream whose slot it was handed


class ProfileQueue:
    """One (model, profile)'s waiting requests, in one FIFO per tenant, served by deficit round robin."""

    def __init__(
        self,
        profile: str,
        max_length: int,
        max_wait_s: float,
        on_wait: Callable[[str, str, float], None] | None,
        release: Callable[[str], None],
    ) -> None:
        self.profile = profile
        self._release = release
        self.max_length = max_length
        self.max_wait_s = max_wait_s
        self._on_wait = on_wait
        self._fifo: dict[str, deque[_Waiter]] = {}
        self._order: deque[str] = deque()  # tenants with waiters, in round-robin order; [0] has the turn
        self._deficit: dict[str, float] = {}
        self.length = 0

    def depth(self) -> dict[str, int]:
        return {tenant: len(fifo) for tenant, fifo in self._fifo.items() if fifo}

    async def wait(self, tenant: str, weight: float) -> str:
        """The upstream whose slot this request was handed; QueueFull when full or past the wait bound."""
        if self.length >= self.max_length:
            raise QueueFull(f"its queue is full ({self.max_length} waiting)", max(1, round(self.max_wait_s)))
        waiter = _Waiter(tenant, weight, asyncio.get_running_loop().create_future())
        if tenant not in self._fifo or not self._fifo[tenant]:
            self._fifo[tenant] = deque()
            self._order.append(tenant)
            self._deficit[tenant] = weight if len(self._order) == 1 else 0.0
        self._fifo[tenant].append(waiter)
        self.length += 1
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.max_wait_s):
                return await asyncio.shield(waiter.future)
        except TimeoutError:
            if waiter.future.done() and not waiter.future.cancelled():  # handed a slot at the last moment
                return waiter.future.result()
            self._discard(waiter)
            raise QueueFull(f"no slot freed within {self.max_wait_s:g} s", max(1, round(self.max_wait_s))) from None
        except asyncio.CancelledError:  # the client went away: give back a slot it may have been handed
            if waiter.future.done() and not waiter.future.cancelled():
                self._release(waiter.future.result())
            else:
                self._discard(waiter)
            raise
        finally:
            if self._on_wait is not None:
                self._on_wait(tenant, self.profile, time.perf_counter() - started)

    def hand_over(self, upstream: str) -> bool:
        """Give `upstream`'s freed slot to the next waiter by fair share; False when nobody waits."""
        waiter = self._next()
        if waiter is None:
            return False
        waiter.future.set_result(upstream)
        return True

    def _next(self) -> _Waiter | None:
        while self.length:
            tenant = self._order[0]
            if self._deficit[tenant] >= 1:
                self._deficit[tenant] -= 1
                fifo = self._fifo[tenant]
                waiter = fifo.popleft()
                self.length -= 1
                if not fifo:
                    self._leave(tenant)
                if not waiter.future.done():
                    return waiter
                continue
            self._order.rotate(-1)  # its turn is over: the next tenant's quantum
            self._deficit[self._order[0]] += self._fifo[self._order[0]][0].weight
        return None

    def _leave(self, tenant: str) -> None:
        """A tenant with nobody left waiting leaves the round; the next tenant's turn starts."""
        self._order.remove(tenant)
        del self._deficit[tenant]
        self._fifo.pop(tenant, None)
        if self._order:
            head = self._order[0]
            self._deficit[head] = max(self._deficit[head], 0.0) + self._fifo[head][0].weight

    def _discard(self, waiter: _Waiter) -> None:
        fifo = self._fifo.get(waiter.tenant)
        if fifo is None or waiter not in fifo:
            return
        fifo.remove(waiter)
        self.length -= 1
        if not fifo:
            self._leave(waiter.tenant)


class FairQueues:
    """The queues of every (model, profile), built from the platform file's `profiles.<name>.queue`."""

    def __init__(
        self,
        limits: Mapping[str, tuple[int, float]],  # profile → (max_length, max_wait_s)
        weights: Mapping[str, float] | None = None,  # tenant name → weight (default 1)
        on_wait: Callable[[str, str, float], None] | None = None,  # (tenant, profile, seconds) per waiter
    ) -> None:
        self._limits = dict(limits)
        self._weights = dict(weights or {})
        self._on_wait = on_wait
        self._queues: dict[tuple[str, str], ProfileQueue] = {}
        self.release: Callable[[str], None] = lambda upstream: None  # set by UpstreamChoice: a slot given back

    def weight(self, tenant_name: str | None) -> float:
        return self._weights.get(tenant_name or "", 1.0)

    def get(self, model: str, profile: str, *, create: bool = True) -> ProfileQueue | None:
        """The profile's queue (None when its max_length is 0)."""
        queue = self._queues.get((model, profile))
        if queue is None and create:
            max_length, max_wait_s = self._limits.get(profile, (0, 1.0))
            if max_length <= 0:
                return None
            queue = ProfileQueue(profile, max_length, max_wait_s, self._on_wait, lambda up: self.release(up))
            self._queues[(model, profile)] = queue
        return queue

    def depth(self) -> dict[tuple[str, str], int]:
        """Waiting requests per (tenant, profile), summed over models: the depth gauge."""
        out: dict[tuple[str, str], int] = {}
        for (_, profile), queue in self._queues.items():
            for tenant, n in queue.depth().items():
                out[(tenant, profile)] = out.get((tenant, profile), 0) + n
        return out
