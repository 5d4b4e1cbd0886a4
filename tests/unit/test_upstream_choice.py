"""The gateway's upstream choice as one object: placing counts the request in flight where routing chose,
failover moves the count (and the conversation) to the next choice, release uncounts it."""

from __future__ import annotations

import pytest

from bastion.bench.doubles import ScriptedEngine
from bastion.gateway.engine_client import UpstreamInfo, UpstreamUnavailable
from bastion.gateway.upstream_choice import UpstreamChoice
from bastion.routing.profiles import RouteRequest, RoutingError

pytestmark = pytest.mark.unit
FAST_A = UpstreamInfo("fast-a", "m", "fast-agentic", 4096, 2)
FAST_B = UpstreamInfo("fast-b", "m", "fast-agentic", 4096, 2)
DEEP = UpstreamInfo("deep", "m", "deep-context", 8192, 2)
ROUTE = RouteRequest(
    model="m", prompt_tokens=10, max_tokens=10, explicit_profile="fast-agentic", explicit_source="alias"
)
BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def test_place_failover_release_keep_the_in_flight_counts() -> None:
    choice = UpstreamChoice(ScriptedEngine([FAST_A, FAST_B, DEEP]))
    upstreams = choice.upstreams_of("m")
    first = choice.place(ROUTE, upstreams, None, BODY)
    assert first.decision.profile == "fast-agentic" and choice.in_flight == {first.decision.upstream: 1}
    moved = choice.failover(first)
    assert moved.decision.upstream != first.decision.upstream and moved.decision.reason.endswith("+failover")
    assert choice.in_flight == {first.decision.upstream: 0, moved.decision.upstream: 1}
    # The conversation follows the request: the next turn of the same conversation goes where it was moved.
    again = choice.place(ROUTE, upstreams, None, BODY)
    assert again.decision.upstream == moved.decision.upstream
    choice.release(moved.decision.upstream)
    choice.release(again.decision.upstream)
    assert sum(choice.in_flight.values()) == 0


def test_failover_with_nowhere_to_go_keeps_the_failed_count_for_release() -> None:
    choice = UpstreamChoice(ScriptedEngine([FAST_A]))
    placed = choice.place(ROUTE, choice.upstreams_of("m"), None, BODY)
    with pytest.raises(UpstreamUnavailable):
        choice.failover(placed)
    assert choice.in_flight == {"fast-a": 1}
    choice.release("fast-a")
    assert choice.in_flight == {"fast-a": 0}


def test_a_routing_refusal_counts_nothing() -> None:
    choice = UpstreamChoice(ScriptedEngine([DEEP]))
    with pytest.raises(RoutingError):
        choice.place(ROUTE, choice.upstreams_of("m"), None, BODY)
    assert choice.in_flight == {}
