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
from typing import Any


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
        on_wait: Callable[[str, str, float, float], None] | None,  # tenant, profile, seconds, weight
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

    def weight_of(self, tenant: str) -> float | None:
        """The weight the tenant's first waiter waits with; None when it has nobody waiting."""
        fifo = self._fifo.get(tenant)
        return fifo[0].weight if fifo else None

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
                self._on_wait(tenant, self.profile, time.perf_counter() - started, weight)

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


WAIT_WINDOW_S = 300.0  # the console's wait figures cover this much recent time
_WAITS_KEPT = 1024  # per tenant and profile, the most recent waits inside the window


@dataclass
class _Waits:
    """Recent waits of one tenant in one profile's queue: (monotonic end, seconds), and the weight it waited with."""

    weight: float = 1.0
    ends: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=_WAITS_KEPT))

    def recent(self, now: float) -> list[float]:
        while self.ends and self.ends[0][0] < now - WAIT_WINDOW_S:
            self.ends.popleft()
        return [seconds for _, seconds in self.ends]


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
        self._metric = on_wait
        self._waits: dict[tuple[str, str], _Waits] = {}  # (tenant id, profile) → recent waits, for `snapshot`
        self._queues: dict[tuple[str, str], ProfileQueue] = {}
        self.release: Callable[[str], None] = lambda upstream: None  # set by UpstreamChoice: a slot given back

    def weight(self, tenant_name: str | None, recorded: float | None = None) -> float:
        """The tenant's weight: its record's (`recorded`, set in the console, admin API or CLI) wins; else the
        platform file's `gateway.tenant_weights` by name; else 1."""
        if recorded is not None:
            return recorded
        return self._weights.get(tenant_name or "", 1.0)

    def get(self, model: str, profile: str, *, create: bool = True) -> ProfileQueue | None:
        """The profile's queue (None when its max_length is 0)."""
        queue = self._queues.get((model, profile))
        if queue is None and create:
            max_length, max_wait_s = self._limits.get(profile, (0, 1.0))
            if max_length <= 0:
                return None
            queue = ProfileQueue(profile, max_length, max_wait_s, self._waited, lambda up: self.release(up))
            self._queues[(model, profile)] = queue
        return queue

    def depth(self) -> dict[tuple[str, str], int]:
        """Waiting requests per (tenant, profile), summed over models: the depth gauge."""
        out: dict[tuple[str, str], int] = {}
        for (_, profile), queue in self._queues.items():
            for tenant, n in queue.depth().items():
                out[(tenant, profile)] = out.get((tenant, profile), 0) + n
        return out

    def _waited(self, tenant: str, profile: str, seconds: float, weight: float) -> None:
        waits = self._waits.setdefault((tenant, profile), _Waits())
        waits.weight = weight
        waits.ends.append((time.monotonic(), seconds))
        if self._metric is not None:
            self._metric(tenant, profile, seconds)

    def snapshot(self) -> list[dict[str, Any]]:
        """Per (tenant id, profile) with requests waiting now or waits in the last WAIT_WINDOW_S: how many wait
        now, the weight they wait with, and the count, mean and max of the recent waits (those that got a slot
        and those that gave up). This gateway replica's queues: the control plane shows it on the pool page."""
        now, depth, out = time.monotonic(), self.depth(), []
        for (tenant, profile), waits in list(self._waits.items()):
            recent = waits.recent(now)
            if not recent and not depth.get((tenant, profile)):
                del self._waits[(tenant, profile)]  # tenants come and go: keep only what is recent
        for tenant, profile in sorted(set(depth) | set(self._waits)):
            waits = self._waits.get((tenant, profile))
            recent = waits.recent(now) if waits is not None else []
            weight = waits.weight if waits is not None else self._weight_waiting(tenant, profile)
            out.append(
                {
                    "tenant_id": tenant,
                    "profile": profile,
                    "waiting": depth.get((tenant, profile), 0),
                    "weight": weight,
                    "waited": len(recent),
                    "mean_wait_s": sum(recent) / len(recent) if recent else None,
                    "max_wait_s": max(recent) if recent else None,
                    "window_s": WAIT_WINDOW_S,
                }
            )
        return out

    def _weight_waiting(self, tenant: str, profile: str) -> float:
        """The weight of the tenant's first waiter in the profile's queue (nobody has finished waiting yet)."""
        for (_, name), queue in self._queues.items():
            if name == profile:
                weight = queue.weight_of(tenant)
                if weight is not None:
                    return weight
        return 1.0
