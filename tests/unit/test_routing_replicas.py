"""Replica choice within a profile: session affinity, least outstanding requests by two choices, failover."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from bastion.routing.replicas import ReplicaChooser, ReplicaLoad, session_key
from bastion.serve.options import REQUEST_ROUTER_CLASS

pytestmark = pytest.mark.unit


def _loads(**queues: int | None) -> list[ReplicaLoad]:
    return [ReplicaLoad(rid, q, 4) for rid, q in queues.items()]


def test_two_choices_prefers_the_less_loaded_of_the_pair() -> None:
    chooser = ReplicaChooser(rng=random.Random(7))
    replicas = _loads(a=3, b=0, c=2, d=1)
    for _ in range(200):
        choice = chooser.choose(replicas)
        first, second = choice.ranks[0]
        q = {r.replica_id: r.queue_len for r in replicas}
        assert q[first] <= q[second]
        assert choice.reason == "least_loaded"
        assert sorted(choice.ranks[0] + choice.ranks[1]) == ["a", "b", "c", "d"]  # the rest is the fallback rank


def test_two_choices_spreads_but_avoids_the_busiest() -> None:
    chooser = ReplicaChooser(rng=random.Random(1))
    replicas = _loads(a=3, b=0, c=2, d=1)
    firsts = Counter(chooser.choose(replicas).first for _ in range(3000))
    assert firsts["a"] == 0  # the most loaded one never wins a pair
    assert firsts["b"] > firsts["c"] > 0 and firsts["d"] > firsts["c"]  # b wins every pair it is in (1/2 of draws)
    assert 1300 < firsts["b"] < 1700


def test_saturated_replica_loses_to_any_with_room() -> None:
    chooser = ReplicaChooser(rng=random.Random(3))
    replicas = [ReplicaLoad("full", 4, 4), ReplicaLoad("busy", 3, 4)]
    assert all(chooser.choose(replicas).first == "busy" for _ in range(50))


def test_unknown_queue_counts_as_idle() -> None:
    chooser = ReplicaChooser(rng=random.Random(0))
    replicas = _loads(a=2, b=None)
    assert chooser.choose(replicas).first == "b"


def test_session_sticks_while_the_replica_is_alive() -> None:
    chooser = ReplicaChooser(rng=random.Random(5))
    replicas = _loads(a=0, b=0, c=0)
    session = session_key("conv-1")
    first = chooser.choose(replicas, session)
    assert first.reason == "least_loaded"
    chooser.bind(session, "c")
    for busy in (0, 1, 3):  # even when c is busier than the others, while it has room
        replicas = [ReplicaLoad("a", 0, 4), ReplicaLoad("b", 0, 4), ReplicaLoad("c", busy, 4)]
        choice = chooser.choose(replicas, session)
        assert choice.ranks[0] == ("c",) and choice.reason == "affinity"
        assert set(choice.ranks[1]) == {"a", "b"}
    other = chooser.choose(replicas, session_key("conv-2"))
    assert other.reason == "least_loaded"


def test_saturated_sticky_replica_is_tried_last() -> None:
    chooser = ReplicaChooser(rng=random.Random(5))
    session = session_key("conv")
    chooser.bind(session, "a")
    choice = chooser.choose([ReplicaLoad("a", 4, 4), ReplicaLoad("b", 1, 4)], session)
    assert choice.reason == "affinity:saturated"
    assert choice.ranks == (("b",), ("a",))
    assert chooser.replica_for(session) == "a"  # still bound: it returns once the replica has room


def test_failover_when_the_replica_is_gone() -> None:
    chooser = ReplicaChooser(rng=random.Random(5))
    session = session_key("conv")
    chooser.bind(session, "dead")
    choice = chooser.choose(_loads(a=0, b=2), session)
    assert choice.reason == "failover"
    assert choice.first == "a"
    assert chooser.replica_for(session) is None
    chooser.bind(session, choice.first)  # the router binds the replica the request went to
    assert chooser.choose(_loads(a=3, b=0), session).ranks[0] == ("a",)


def test_forget_replica_and_retain() -> None:
    chooser = ReplicaChooser()
    chooser.bind("s1", "a")
    chooser.bind("s2", "b")
    chooser.bind("s3", "b")
    chooser.forget_replica("b")
    assert len(chooser) == 1 and chooser.replica_for("s1") == "a"
    chooser.retain({"c"})
    assert len(chooser) == 0


def test_sessions_are_bounded_and_expire() -> None:
    now = [0.0]
    chooser = ReplicaChooser(max_sessions=2, session_ttl_s=10, clock=lambda: now[0])
    chooser.bind("s1", "a")
    chooser.bind("s2", "a")
    chooser.bind("s3", "a")
    assert chooser.replica_for("s1") is None and len(chooser) == 2
    now[0] = 11
    assert chooser.replica_for("s3") is None


def test_no_replicas() -> None:
    assert ReplicaChooser().choose([], "s").ranks == ()


def test_session_key_prefers_header_then_conversation_prefix() -> None:
    body = {"model": "m", "messages": [{"role": "system", "content": "x"}, {"role": "user", "content": "hi"}]}
    assert session_key("abc", body) == "s:abc"
    key = session_key(None, body)
    assert key is not None and key.startswith("p:")
    # the next turn of the same conversation has the same key
    longer = {**body, "messages": [*body["messages"], {"role": "assistant", "content": "hello"}]}
    assert session_key(None, longer) == key
    assert session_key(None, {**body, "model": "other"}) != key
    assert session_key(None, {"prompt": "abc"}) == session_key(None, {"prompt": "abc", "max_tokens": 3})
    assert session_key(None, {}) is None and session_key(None, None) is None


def test_router_import_path_resolves() -> None:
    import importlib

    module, _, name = REQUEST_ROUTER_CLASS.partition(":")
    cls = getattr(importlib.import_module(module), name)
    from ray.serve.request_router import RequestRouter

    assert issubclass(cls, RequestRouter)
