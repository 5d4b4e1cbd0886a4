"""Which upstream serves a request, as one object: session affinity → routing choice → in-flight count → failover.

The gateway holds one `UpstreamChoice`. `place` narrows the candidates to the conversation's upstream where a
profile has several (`affinity.py`), lets routing choose among them (`routing/profiles.py`: explicit, tenant
default, automatic, overflow), binds the conversation to the choice and counts the request in flight on it
before any await, so concurrent requests see it when they route. `failover` moves a request whose upstream went
away before answering to the one routing would take without it; `release` uncounts it at the end, or hands the
slot to the next request waiting for that profile (`place_waiting`, `fair_queue.py`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from bastion.gateway.affinity import UpstreamAffinity
from bastion.gateway.engine_client import EngineClient, UpstreamInfo, UpstreamUnavailable
from bastion.gateway.fair_queue import FairQueues, QueueFull
from bastion.routing.profiles import RouteRequest, RoutingDecision, RoutingError, RoutingPolicy, choose


@dataclasses.dataclass
class Placement:
    """Where one request went and what is needed to move it: its routing decision, the question routing was
    asked, and the conversation key affinity bound (None without affinity)."""

    decision: RoutingDecision
    route: RouteRequest
    session_key: str | None


class UpstreamChoice:
    def __init__(
        self, engine: EngineClient, routing: RoutingPolicy | None = None, queues: FairQueues | None = None
    ) -> None:
        self.engine = engine
        self.routing = routing or RoutingPolicy()
        self.in_flight: dict[str, int] = {}
        self.affinity = UpstreamAffinity()  # conversation → upstream, where a profile has several upstreams
        self.queues = queues or FairQueues({})
        self.queues.release = self.release
        self._where: dict[str, tuple[str, str]] = {}  # upstream → (model, profile), for `release`

    def upstreams_of(self, model: str) -> list[UpstreamInfo]:
        return [u for u in self.engine.upstreams() if u.model == model]

    def place(
        self, route: RouteRequest, upstreams: list[UpstreamInfo], session_id: str | None, body: Mapping[str, Any]
    ) -> Placement:
        """Choose and count the request in flight on the choice; RoutingError when no upstream may take it."""
        candidates, key = self.affinity.narrow(upstreams, self.in_flight, session_id, body)
        decision = choose(route, candidates, self.in_flight, self.routing)
        self.affinity.bind(key, decision.upstream)
        self.in_flight[decision.upstream] = self.in_flight.get(decision.upstream, 0) + 1
        return Placement(decision, route, key)

    async def place_waiting(
        self,
        route: RouteRequest,
        upstreams: list[UpstreamInfo],
        session_id: str | None,
        body: Mapping[str, Any],
        tenant: tuple[str, str | None, float | None],
    ) -> Placement:
        """`place`, but when the profile is full, wait in its fair queue for a slot (tenant: id, name, the weight
        in its record); the
        RoutingError (429, with the queue's reason) when the queue is full or the wait passes its bound."""
        try:
            return self.place(route, upstreams, session_id, body)
        except RoutingError as exc:
            queue = self.queues.get(route.model, exc.profile) if exc.status == 429 and exc.profile else None
            if queue is None:
                raise
            try:
                upstream = await queue.wait(tenant[0], self.queues.weight(tenant[1], tenant[2]))
            except QueueFull as full:
                error = RoutingError(429, exc.code, f"{exc} ({full})", profile=exc.profile)
                error.retry_after = full.retry_after
                raise error from None
        info = next(u for u in upstreams if u.name == upstream)
        decision = RoutingDecision(info.profile, info.name, "queued", info.max_context)
        return Placement(decision, route, None)

    def failover(self, placement: Placement) -> Placement:
        """The upstream routing would take without the failed one (same rules: its profile first, overflow if
        allowed), counted there instead; UpstreamUnavailable when there is none (the failed one stays counted,
        `release` uncounts it)."""
        failed = placement.decision.upstream
        others = [u for u in self.upstreams_of(placement.route.model) if u.name != failed]
        try:
            decision = choose(placement.route, others, self.in_flight, self.routing)
        except RoutingError:
            raise UpstreamUnavailable(failed) from None
        self._uncount(failed)
        self.in_flight[decision.upstream] = self.in_flight.get(decision.upstream, 0) + 1
        self.affinity.bind(placement.session_key, decision.upstream)
        moved = dataclasses.replace(decision, reason=f"{decision.reason}+failover")
        return Placement(moved, placement.route, placement.session_key)

    def release(self, upstream: str) -> None:
        """The request on `upstream` is done: its slot goes to the next waiter for that profile, else is freed."""
        where = self._where.get(upstream)
        if where is None:
            where = next(((u.model, u.profile) for u in self.engine.upstreams() if u.name == upstream), None)
            if where is not None:
                self._where[upstream] = where
        queue = self.queues.get(*where, create=False) if where is not None else None
        if queue is not None and queue.length and queue.hand_over(upstream):
            return  # still counted in flight: the slot changed hands
        self._uncount(upstream)

    def _uncount(self, upstream: str) -> None:
        self.in_flight[upstream] = max(self.in_flight.get(upstream, 1) - 1, 0)
