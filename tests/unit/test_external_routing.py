"""Pure parts of external-replica routing: the health state machine and affinity between upstreams of a profile."""

from __future__ import annotations

import pytest

from bastion.gateway.affinity import UpstreamAffinity
from bastion.gateway.engine_client import UpstreamInfo
from bastion.routing.health import EJECTED, IN_ROTATION, UNKNOWN, HealthState

pytestmark = pytest.mark.unit
RAY = UpstreamInfo("engine-m1--fast-agentic", "m1", "fast-agentic", 2048, 2)
EXT = UpstreamInfo("gpu-box", "m1", "fast-agentic", 2048, 2)
DEEP = UpstreamInfo("engine-m1--deep-context", "m1", "deep-context", 8192, 2)
BODY = {"model": "m1", "messages": [{"role": "user", "content": "hi"}]}


def test_health_ejects_after_n_failures_and_restores_after_m_successes() -> None:
    h = HealthState(failures_to_eject=2, successes_to_restore=2)
    assert h.state == UNKNOWN and h.in_rotation
    assert h.observe(True) and h.state == IN_ROTATION
    assert not h.observe(False, "ConnectError") and h.in_rotation  # one failure is not enough
    assert h.observe(False, "ConnectError") and h.state == EJECTED and h.reason == "ConnectError"
    assert not h.observe(True) and not h.in_rotation  # one success is not enough to come back
    assert h.observe(True) and h.state == IN_ROTATION and h.reason is None


def test_never_seen_alive_is_out_at_the_first_failure_and_eject_is_immediate() -> None:
    h = HealthState(failures_to_eject=3)
    assert h.observe(False, "HTTP 503") and h.state == EJECTED
    live = HealthState(failures_to_eject=3, healthy=True)
    assert live.eject("RemoteProtocolError") and live.state == EJECTED
    assert not live.eject("again")  # already out: no second state change


def test_affinity_narrows_only_profiles_with_several_upstreams() -> None:
    a = UpstreamAffinity()
    single = [RAY, DEEP]
    assert a.narrow(single, {}, "s1", BODY) == (single, None)  # nothing to choose between: no session work

    both = [RAY, EXT, DEEP]
    candidates, key = a.narrow(both, {}, "s1", BODY)
    assert candidates == both and key == "s:s1"
    a.bind(key, "gpu-box")
    candidates, _ = a.narrow(both, {}, "s1", BODY)
    assert candidates == [EXT, DEEP]  # the bound upstream alone stands for its profile; deep stays for overflow
    full, _ = a.narrow(both, {"gpu-box": 2}, "s1", BODY)
    assert full == both  # at its limit: the profile's other upstream may take the turn
    gone, _ = a.narrow([RAY, DEEP, UpstreamInfo("x", "m1", "fast-agentic", 1, 1)], {}, "s1", BODY)
    assert len(gone) == 3  # bound upstream not listed (ejected): no narrowing
    prefix_key = a.narrow(both, {}, None, BODY)[1]
    assert prefix_key is not None and prefix_key.startswith("p:")  # no session id: the conversation prefix
