"""ExternalEngineClient against a real HTTP server on loopback (a scripted one): relaying, speculation per kind,
token counting, error mapping, health ejection within 2 s and return to rotation, and the gateway failing over
from a dead external replica to another upstream of the same profile."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from external_fake import FakeUpstream

from bastion.bench.doubles import ScriptedEngine, Stack, gateway_stack, platform_config, until
from bastion.config.external import ExternalReplicaConfig
from bastion.db import migrate
from bastion.gateway.combined_client import CombinedEngineClient
from bastion.gateway.engine_client import UpstreamInfo, UpstreamUnavailable
from bastion.gateway.external import ExternalEngineClient

pytestmark = pytest.mark.unit
PORTS = itertools.cycle(range(18201, 18210))  # this helper's loopback ports; uvicorn reuses addresses
BODY = {"model": "m1", "messages": [{"role": "user", "content": "hello there"}]}


def ext_config(fake: FakeUpstream, **overrides: Any) -> ExternalReplicaConfig:
    data = {
        "name": "box",
        "base_url": fake.base_url,
        "model": "m1",
        "profile": "fast-agentic",
        "max_context": 2048,
        "kind": fake.behaviour.style if fake.behaviour.style != "plain" else "openai",
        "health": {"path": "/health"},
        **overrides,
    }
    return ExternalReplicaConfig.model_validate(data)


@pytest.fixture
def fake() -> Iterator[FakeUpstream]:
    server = FakeUpstream(next(PORTS)).start()
    yield server
    server.stop()


@pytest.fixture
async def client(fake: FakeUpstream) -> AsyncIterator[ExternalEngineClient]:
    c = ExternalEngineClient([ext_config(fake)])
    c.start()
    yield c
    await c.aclose()


async def collect(stream: AsyncIterator[str]) -> list[str]:
    return [event async for event in stream]


def usage_chunk(events: list[str]) -> dict[str, Any]:
    chunks = [json.loads(e[5:]) for e in events if e.startswith("data: {")]
    return next(c for c in chunks if c.get("usage"))


async def test_llama_server_answers_carry_speculation_in_vllm_shape(client: ExternalEngineClient) -> None:
    answer = await client.complete("box", "chat", BODY)
    assert answer.status == 200
    assert answer.body["choices"][0]["message"]["content"] == "one two three"
    assert answer.body["metrics"]["speculative_decoding"]["num_accepted_draft_tokens"] == 3
    events = await collect(client.stream("box", "chat", {**BODY, "stream": True}))
    assert events[-1] == "data: [DONE]\n\n"
    assert usage_chunk(events)["metrics"]["speculative_decoding"]["num_draft_tokens"] == 4
    # llama-server's /apply-template + /tokenize: "hello there" → 2 words + BOS in the fake
    assert await client.count_prompt_tokens("box", "chat", BODY) == 3


async def test_vllm_kind_and_model_rename(fake: FakeUpstream, monkeypatch: pytest.MonkeyPatch) -> None:
    fake.behaviour.style = "vllm"
    monkeypatch.setenv("BOX_KEY", "sk-upstream-secret-123456")
    c = ExternalEngineClient([ext_config(fake, upstream_model="served-name", api_key_env="BOX_KEY")])
    c.start()
    try:
        answer = await c.complete("box", "chat", BODY)
        assert fake.behaviour.requests[-1]["model"] == "served-name"  # the upstream gets its own name
        assert answer.body["model"] == "m1"  # the tenant sees the name it asked for
        assert fake.behaviour.auth[-1] == "Bearer sk-upstream-secret-123456"
        assert answer.body["metrics"]["speculative_decoding"]["num_draft_tokens"] == 6
        events = await collect(c.stream("box", "chat", {**BODY, "stream": True}))
        assert all('"served-name"' not in e for e in events)
        assert usage_chunk(events)["metrics"]["speculative_decoding"]["num_accepted_draft_tokens"] == 5
        assert await c.count_prompt_tokens("box", "chat", BODY) == 7
    finally:
        await c.aclose()


async def test_no_statistics_means_unknown(fake: FakeUpstream) -> None:
    fake.behaviour.style = "plain"
    c = ExternalEngineClient([ext_config(fake, kind="ollama")])
    c.start()
    try:
        answer = await c.complete("box", "chat", BODY)
        assert "metrics" not in answer.body
        events = await collect(c.stream("box", "chat", {**BODY, "stream": True}))
        assert "metrics" not in usage_chunk(events)
        assert await c.count_prompt_tokens("box", "chat", BODY) >= 2  # estimated: no tokenizer endpoint
    finally:
        await c.aclose()


async def test_upstream_errors_are_mapped_without_internals(fake: FakeUpstream, client: ExternalEngineClient) -> None:
    fake.behaviour.fail_status = 500
    fake.behaviour.fail_body = {"detail": f"Traceback: {fake.base_url} crashed"}
    answer = await client.complete("box", "chat", BODY)
    assert answer.status == 502 and str(fake.port) not in json.dumps(answer.body)
    events = await collect(client.stream("box", "chat", {**BODY, "stream": True}))
    assert len(events) == 1 and json.loads(events[0][5:])["error"]["code"] == 502
    assert str(fake.port) not in events[0] and "Traceback" not in events[0]
    fake.behaviour.fail_status = 503  # busy or broken: the request may go elsewhere
    with pytest.raises(UpstreamUnavailable):
        await client.complete("box", "chat", BODY)


async def test_dead_upstream_leaves_rotation_within_2s_and_returns(fake: FakeUpstream) -> None:
    c = ExternalEngineClient([ext_config(fake)])
    c.start()
    try:
        await until(lambda: c.states()[0]["state"] == "healthy", 5)
        fake.stop()
        stopped = time.monotonic()
        await until(lambda: c.states()[0]["state"] == "ejected", 5)
        assert time.monotonic() - stopped < 2.0
        assert c.states()[0]["reason"] == "ConnectError"
        with pytest.raises(UpstreamUnavailable):  # refused at once, no connection attempt
            await c.complete("box", "chat", BODY)
        fake.start()
        await until(lambda: c.states()[0]["state"] == "healthy", 5)
        assert (await c.complete("box", "chat", BODY)).status == 200
    finally:
        await c.aclose()


async def test_failing_health_check_ejects(fake: FakeUpstream, client: ExternalEngineClient) -> None:
    await until(lambda: client.states()[0]["state"] == "healthy", 5)
    fake.behaviour.healthy = False
    await until(lambda: client.states()[0]["state"] == "ejected", 2)
    assert client.states()[0]["reason"] == "HTTP 503"
    fake.behaviour.healthy = True
    await until(lambda: client.states()[0]["state"] == "healthy", 2)


async def test_connection_error_during_a_request_ejects_at_once() -> None:
    port = next(PORTS)  # nothing listens here
    cfg = ExternalReplicaConfig.model_validate(
        {
            "name": "gone",
            "base_url": f"http://127.0.0.1:{port}/v1",
            "model": "m1",
            "profile": "fast-agentic",
            "max_context": 2048,
            "health": {"interval_s": 30},
        }
    )
    c = ExternalEngineClient([cfg])
    c.start()
    try:
        await asyncio.sleep(0)  # the first probe may not have run: the request finds out itself
        with pytest.raises(UpstreamUnavailable):
            await c.complete("gone", "chat", BODY)
        assert c.states()[0]["state"] == "ejected"
        # the only upstream of its model and profile stays listed, so the gateway answers 503, not 404
        assert [u.name for u in c.upstreams()] == ["gone"]
    finally:
        await c.aclose()


# --- through the gateway: same auth, routing, usage; failover to another upstream of the profile --------------


class Collect:
    def __init__(self) -> None:
        self.records: list = []

    def record(self, record) -> None:
        self.records.append(record)


@pytest.fixture
def database_url(sqlite_url: str) -> str:
    migrate.upgrade(sqlite_url)
    return sqlite_url


@pytest.fixture
async def stack(tmp_path: Path, database_url: str, fake: FakeUpstream) -> AsyncIterator[tuple[Stack, Any, Collect]]:
    config = platform_config(str(tmp_path), database_url, ["m1"])
    ray_like = ScriptedEngine(
        [UpstreamInfo("engine-m1--fast-agentic", "m1", "fast-agentic", 2048, 8)],
        speculation={"num_draft_tokens": 2, "num_accepted_draft_tokens": 1},
    )
    external = ExternalEngineClient([ext_config(fake)])
    external.start()
    combined = CombinedEngineClient([ray_like, external])
    recorder = Collect()
    async with gateway_stack(config, combined, recorders=[recorder]) as s:
        yield s, external, recorder
    await combined.aclose()


async def token(s: Stack) -> str:
    name = f"t-{uuid.uuid4().hex[:8]}"
    await s.tenants().create(name)
    return (await s.keys().create(name)).token


async def test_gateway_fails_over_and_keeps_sessions(stack, fake: FakeUpstream) -> None:
    s, external, recorder = stack
    auth = {"authorization": f"Bearer {await token(s)}", "x-session-id": "conv-1"}
    await until(lambda: external.states()[0]["state"] == "healthy", 5)
    s.gateway.in_flight["engine-m1--fast-agentic"] = 1  # the external one is now the least loaded
    first = await s.client.post("/v1/chat/completions", json=BODY, headers=auth)
    assert first.status_code == 200 and first.json()["choices"][0]["message"]["content"] == "one two three"
    s.gateway.in_flight["engine-m1--fast-agentic"] = 0
    again = await s.client.post("/v1/chat/completions", json=BODY, headers=auth)  # affinity beats equal load
    assert again.json()["choices"][0]["message"]["content"] == "one two three"
    assert recorder.records[-1].upstream == "box" and recorder.records[-1].speculation.draft_tokens == 4

    fake.stop()  # killed: the next request of the session must not fail
    moved = await s.client.post("/v1/chat/completions", json=BODY, headers=auth)
    assert moved.status_code == 200
    assert recorder.records[-1].upstream == "engine-m1--fast-agentic"
    assert recorder.records[-1].routing_reason.endswith("+failover") or external.states()[0]["state"] == "ejected"
    streamed = await s.client.post("/v1/chat/completions", json={**BODY, "stream": True}, headers=auth)
    assert streamed.status_code == 200 and "[DONE]" in streamed.text
    assert all(r.status == 200 for r in recorder.records)

    fake.start()
    await until(lambda: external.states()[0]["state"] == "healthy", 5)
    assert "box" in [u.name for u in s.gateway.engine.upstreams()]


async def test_gateway_answers_503_in_openai_format_when_nothing_is_left(stack, fake: FakeUpstream) -> None:
    s, external, _ = stack
    auth = {"authorization": f"Bearer {await token(s)}"}
    s.gateway.engine.clients[0].unavailable.add("engine-m1--fast-agentic")
    s.gateway.engine.clients[0].upstream_list.clear()
    fake.stop()
    await until(lambda: external.states()[0]["state"] == "ejected", 3)
    answer = await s.client.post("/v1/chat/completions", json=BODY, headers=auth)
    assert answer.status_code == 503
    assert answer.json()["error"]["code"] == "no_upstream"
    assert str(fake.port) not in answer.text


async def test_busy_upstream_fails_over_before_any_token(stack, fake: FakeUpstream) -> None:
    s, external, recorder = stack
    auth = {"authorization": f"Bearer {await token(s)}"}
    await until(lambda: external.states()[0]["state"] == "healthy", 5)
    fake.behaviour.fail_status = 503  # alive (health passes) but turning requests away
    for stream in (False, True):
        s.gateway.in_flight["engine-m1--fast-agentic"] = 1  # routing picks the external one first
        # (another conversation each time: affinity would keep the second on the upstream the first moved to)
        body = {**BODY, "messages": [{"role": "user", "content": f"stream={stream}"}], "stream": stream}
        answer = await s.client.post("/v1/chat/completions", json=body, headers=auth)
        assert answer.status_code == 200
        s.gateway.in_flight["engine-m1--fast-agentic"] = 0
        want = 2 if stream else 1
        await until(lambda: len(recorder.records) >= want)  # noqa: B023 (awaited within the iteration)
        record = recorder.records[-1]
        assert record.upstream == "engine-m1--fast-agentic" and record.routing_reason.endswith("+failover")
    assert len(fake.behaviour.requests) == 2  # it was tried first, each time
