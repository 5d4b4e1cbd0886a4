"""Profile selection as pure logic: explicit, tenant default, automatic by size and tools, overflow."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from bastion.routing.profiles import RouteRequest, RoutingError, RoutingPolicy, choose, fits, split_model

pytestmark = pytest.mark.unit


@dataclass(frozen=True)
class Up:
    name: str
    model: str
    profile: str
    max_context: int
    max_ongoing_requests: int = 4


UPS = [
    Up("deep", "m", "deep-context", 8192),
    Up("fast", "m", "fast-agentic", 2048),
    Up("other", "x", "deep-context", 9),
]
BOTH = frozenset({"deep-context", "fast-agentic"})


def req(prompt: int = 10, max_tokens: int | None = 16, **kwargs) -> RouteRequest:
    return RouteRequest(model="m", prompt_tokens=prompt, max_tokens=max_tokens, allowed_profiles=BOTH, **kwargs)


def test_split_model() -> None:
    assert split_model("m") == ("m", None)
    assert split_model("m@fast-agentic") == ("m", "fast-agentic")
    assert split_model("m@") == ("m", None)


def test_fits_counts_at_least_one_completion_token() -> None:
    assert fits(UPS[1], 2047, None) and not fits(UPS[1], 2048, None)
    assert fits(UPS[1], 2000, 48) and not fits(UPS[1], 2000, 49)


@pytest.mark.parametrize(
    ("request_", "profile", "reason"),
    [
        (req(explicit_profile="deep-context", explicit_source="alias"), "deep-context", "explicit:alias"),
        (req(explicit_profile="fast-agentic", explicit_source="header"), "fast-agentic", "explicit:header"),
        (req(tenant_default="deep-context"), "deep-context", "tenant_default"),
        (req(prompt=100), "fast-agentic", "auto:short_prompt"),
        (req(prompt=1500, has_tools=True), "fast-agentic", "auto:tools"),
        (req(prompt=1500), "deep-context", "auto:long_prompt"),
        (req(prompt=2000, max_tokens=100), "deep-context", "auto:context"),
        (req(prompt=3000, max_tokens=None, has_tools=True), "deep-context", "auto:context"),
        (req(prompt=2000, max_tokens=100, tenant_default="fast-agentic"), "deep-context", "auto:context"),
    ],
)
def test_selection(request_: RouteRequest, profile: str, reason: str) -> None:
    decision = choose(request_, UPS, {})
    assert (decision.profile, decision.reason) == (profile, reason)
    assert decision.upstream == {"deep-context": "deep", "fast-agentic": "fast"}[profile]


def test_short_threshold_is_configurable() -> None:
    assert choose(req(prompt=300), UPS, {}, RoutingPolicy(short_prompt_tokens=200)).profile == "deep-context"


def test_overflow_when_saturated_and_the_request_fits() -> None:
    decision = choose(req(prompt=100), UPS, {"fast": 4})
    assert (decision.profile, decision.reason, decision.overflow_from) == (
        "deep-context",
        "auto:short_prompt+overflow",
        "fast-agentic",
    )
    with pytest.raises(RoutingError) as err:  # does not fit fast: nowhere to go
        choose(req(prompt=4000), UPS, {"deep": 4})
    assert err.value.status == 429 and err.value.code == "capacity_exhausted"
    with pytest.raises(RoutingError) as pinned:  # explicit profiles do not overflow
        choose(req(explicit_profile="fast-agentic"), UPS, {"fast": 4})
    assert pinned.value.status == 429 and pinned.value.code == "profile_saturated"


def test_errors() -> None:
    with pytest.raises(RoutingError) as too_long:
        choose(req(prompt=8000, max_tokens=500), UPS, {})
    assert too_long.value.status == 400 and too_long.value.code == "context_length_exceeded"
    assert "8192" in str(too_long.value) and too_long.value.param == "max_tokens"
    with pytest.raises(RoutingError) as explicit_too_long:
        choose(req(prompt=2000, max_tokens=100, explicit_profile="fast-agentic"), UPS, {})
    assert "2048" in str(explicit_too_long.value)
    with pytest.raises(RoutingError) as unknown:
        choose(req(explicit_profile="turbo"), UPS, {})
    assert unknown.value.status == 404
    only_deep = RouteRequest("m", 10, 10, explicit_profile="fast-agentic", allowed_profiles=frozenset({"deep-context"}))
    with pytest.raises(RoutingError) as denied:
        choose(only_deep, UPS, {})
    assert denied.value.status == 403
    restricted = RouteRequest("m", 10, 10, has_tools=True, allowed_profiles=frozenset({"deep-context"}))
    assert choose(restricted, UPS, {}).profile == "deep-context"
    with pytest.raises(RoutingError) as missing:
        choose(RouteRequest("nope", 1, 1), UPS, {})
    assert missing.value.status == 404
