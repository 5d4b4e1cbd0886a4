"""Routing through the gateway: explicit alias and header, tenant default, automatic, overflow when the
chosen upstream is saturated; the decision recorded with the request's usage matches what happened."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bastion.bench.doubles import ScriptedEngine, Stack, gateway_stack, platform_config, until, upstreams_for
from bastion.db import migrate
from bastion.records import RequestRecord

pytestmark = pytest.mark.integration
SPEC = {"num_draft_tokens": 10, "num_accepted_draft_tokens": 7, "draft_acceptance_rate": 0.7, "num_spec_steps": 5}


class Collect:
    """A RequestRecorder as the audit writer would be: takes records without blocking."""

    def __init__(self) -> None:
        self.records: list[RequestRecord] = []

    def record(self, record: RequestRecord) -> None:
        self.records.append(record)


@pytest.fixture
def engine() -> ScriptedEngine:
    return ScriptedEngine(upstreams_for(["m1"], fast_context=256, deep_context=4096, ongoing=1), speculation=SPEC)


@pytest.fixture
def recorder() -> Collect:
    return Collect()


@pytest.fixture
def database_url(sqlite_url: str) -> str:
    migrate.upgrade(sqlite_url)
    return sqlite_url


@pytest.fixture
async def stack(tmp_path: Path, database_url: str, engine: ScriptedEngine, recorder: Collect) -> AsyncIterator[Stack]:
    config = platform_config(str(tmp_path), database_url, ["m1"], queue={"max_length": 0})  # full: refused at once
    async with gateway_stack(config, engine, recorders=[recorder]) as s:
        yield s


async def key_for(stack: Stack, **tenant) -> str:
    name = f"t-{uuid.uuid4().hex[:8]}"
    await stack.tenants().create(name, **tenant)
    return (await stack.keys().create(name)).token


async def chat(stack: Stack, token: str, words: int = 3, model: str = "m1", headers=None, **extra):
    body = {"model": model, "messages": [{"role": "user", "content": " ".join(["w"] * words)}], **extra}
    sent = {"authorization": f"Bearer {token}", **(headers or {})}
    return await stack.client.post("/v1/chat/completions", json=body, headers=sent)


async def test_explicit_default_and_automatic(stack: Stack, recorder: Collect) -> None:
    token = await key_for(stack)
    cases = [
        (chat(stack, token, model="m1@deep-context"), "deep-context", "explicit:alias"),
        (chat(stack, token, headers={"x-bastion-profile": "deep-context"}), "deep-context", "explicit:header"),
        (chat(stack, token), "fast-agentic", "auto:short_prompt"),
        (chat(stack, token, words=200, max_tokens=10), "deep-context", "auto:long_prompt"),
        (
            chat(stack, token, words=200, max_tokens=10, tools=[{"type": "function", "function": {"name": "f"}}]),
            "fast-agentic",
            "auto:tools",
        ),
        (chat(stack, token, words=300), "deep-context", "auto:context"),
    ]
    for call, profile, reason in cases:
        response = await call
        assert response.status_code == 200, response.text
        assert response.headers["x-bastion-profile"] == profile
        assert response.headers["x-bastion-routing-reason"] == reason
        record = recorder.records[-1]
        assert (record.profile, record.routing_reason) == (profile, reason)
        assert record.upstream == f"engine-m1--{profile}" and record.status == 200
        assert record.ttft_ms is not None and record.latency_ms >= record.ttft_ms
        assert (record.speculation is not None) == (profile == "fast-agentic")

    defaulted = await key_for(stack, default_profile="deep-context")
    response = await chat(stack, defaulted)
    assert response.headers["x-bastion-routing-reason"] == "tenant_default"
    conflict = await chat(stack, token, model="m1@fast-agentic", headers={"x-bastion-profile": "deep-context"})
    assert conflict.status_code == 400 and conflict.json()["error"]["param"] == "model"


async def test_overflow_when_saturated(stack: Stack, engine: ScriptedEngine, recorder: Collect) -> None:
    token = await key_for(stack)
    engine.gate = asyncio.Event()
    held = asyncio.create_task(chat(stack, token))  # takes fast-agentic's only slot
    await until(lambda: stack.gateway.in_flight.get("engine-m1--fast-agentic") == 1)
    assert stack.gateway.in_flight == {"engine-m1--fast-agentic": 1}
    overflow = asyncio.create_task(chat(stack, token))  # short prompt → fast, full → deep
    await until(lambda: stack.gateway.in_flight.get("engine-m1--deep-context") == 1)
    pinned = await chat(stack, token, model="m1@fast-agentic")  # explicit: no overflow
    assert pinned.status_code == 429 and pinned.json()["error"]["code"] == "profile_saturated"
    full = await chat(stack, token)  # both full
    assert full.status_code == 429 and full.json()["error"]["code"] == "capacity_exhausted"
    assert full.headers["retry-after"] == "1"
    engine.gate.set()
    first, second = await asyncio.gather(held, overflow)
    assert second.headers["x-bastion-routing-reason"] == "auto:short_prompt+overflow"
    assert second.headers["x-bastion-profile"] == "deep-context" and first.status_code == 200
    assert stack.gateway.in_flight == {"engine-m1--fast-agentic": 0, "engine-m1--deep-context": 0}
    overflowed = [r for r in recorder.records if r.routing_reason == "auto:short_prompt+overflow"]
    assert len(overflowed) == 1 and overflowed[0].upstream == "engine-m1--deep-context"


async def test_streaming_record_has_usage_and_speculation(stack: Stack, recorder: Collect) -> None:
    token = await key_for(stack)
    response = await chat(stack, token, stream=True)
    assert response.status_code == 200 and '"usage"' not in response.text
    record = recorder.records[-1]
    assert record.stream and record.completion_tokens == 5 and record.prompt_tokens == 6
    assert record.speculation is not None and record.speculation.accepted_tokens == 7
    assert record.speculation.acceptance_rate == pytest.approx(0.7)


async def test_rejections_are_recorded_without_secrets(stack: Stack, recorder: Collect) -> None:
    response = await stack.client.post(
        "/v1/chat/completions", json={"model": "m1", "messages": []}, headers={"authorization": "Bearer bst_bad"}
    )
    assert response.status_code == 401
    record = recorder.records[-1]
    assert record.status == 401 and record.tenant_id is None and record.error_code == "invalid_api_key"
    assert "bst_bad" not in repr(record) and record.key_prefix is None
    token = await key_for(stack)
    prefix, secret = token.split("_", 2)[1:]
    response = await stack.client.post(
        "/v1/chat/completions",
        json={"model": "m1", "messages": [{"role": "user", "content": "x"}]},
        headers={"authorization": f"Bearer bst_{prefix}_{'Z' * 43}"},
    )
    assert response.status_code == 401
    assert recorder.records[-1].key_prefix == prefix and secret not in repr(recorder.records[-1])
    assert (await chat(stack, token)).status_code == 200
    assert recorder.records[-1].key_prefix == prefix and secret not in repr(recorder.records[-1])


async def test_session_id_reaches_the_engine_and_the_replica_is_recorded(
    stack: Stack, engine: ScriptedEngine, recorder: Collect
) -> None:
    engine.replica_id = "r-1"
    token = await key_for(stack)
    assert (await chat(stack, token, headers={"x-session-id": "conv-42"})).status_code == 200
    response = await chat(stack, token, stream=True, headers={"x-session-id": "conv-42"})
    assert response.status_code == 200
    assert "bastion-replica" not in response.text  # the replica notice is the gateway's, never the client's
    assert engine.sessions[-2:] == ["conv-42", "conv-42"]
    for record in recorder.records[-2:]:
        assert record.replica == f"{record.upstream}#r-1"
        assert (record.profile, record.routing_reason) == ("fast-agentic", "auto:short_prompt")
    assert (await chat(stack, token)).status_code == 200
    assert engine.sessions[-1] is None


@pytest.mark.parametrize("bad", ["x" * 257, "caf\u00e9", "tab\there"])
async def test_a_malformed_session_id_is_refused(stack: Stack, bad: str) -> None:
    token = await key_for(stack)
    response = await chat(stack, token, headers={"x-session-id": bad.encode("utf-8")})
    assert response.status_code == 400
    assert "x-session-id" in response.json()["error"]["message"]
