"""Traces reach a local OTLP/HTTP receiver: one trace per request across the gateway and the engine replica.

The gateway is the real app (create_app) over a real EngineReplica whose vLLM call is replaced by a scripted
answer, so the replica's own tracing code (the private trace key stripped from the body, the span continuing
the propagated context) runs exactly as in Ray Serve. Spans are decoded from the OTLP protobuf the exporters send.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from bastion.bench.doubles import ScriptedEngine, Stack, gateway_stack, platform_config, upstreams_for
from bastion.config.schema import TelemetryConfig
from bastion.db import migrate
from bastion.engine.engine_args import EngineSpec
from bastion.engine.replica import EngineReplica
from bastion.engine.tracing import TRACE_KEY, ReplicaTracing
from bastion.gateway.engine_client import Endpoint, UpstreamResponse
from otlp_receiver import ReceivedSpan, Receiver, running_receiver

pytestmark = pytest.mark.integration
SPEC = {"num_draft_tokens": 12, "num_accepted_draft_tokens": 9, "draft_acceptance_rate": 0.75, "num_spec_steps": 4}
CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    with running_receiver() as rec:
        yield rec


# --- the gateway over real EngineReplicas whose vLLM call is scripted -------------------------------------


class ScriptedReplica(EngineReplica):
    """EngineReplica with its tracing, stripping and tracking intact; only the vLLM call is scripted."""

    def __init__(self, script: ScriptedEngine, upstream: str, model: str, profile: str) -> None:
        super().__init__(EngineSpec(model, profile, "/nonexistent", model, 8192))
        self.script, self.upstream = script, upstream
        self.bodies: list[dict[str, Any]] = []

    async def _complete(self, endpoint: Endpoint, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        self.bodies.append(body)
        answer = await ScriptedEngine.complete(self.script, self.upstream, endpoint, body)
        return answer.status, answer.body

    async def _stream(self, endpoint: Endpoint, body: dict[str, Any]) -> AsyncIterator[str]:
        self.bodies.append(body)
        async for chunk in ScriptedEngine.stream(self.script, self.upstream, endpoint, body):
            yield chunk


@dataclass
class ReplicaClient(ScriptedEngine):
    """The EngineClient seam in process: calls go to the ScriptedReplica of each upstream, as Ray handles would."""

    replicas: dict[str, ScriptedReplica] = field(default_factory=dict)

    async def complete(
        self, upstream: str, endpoint: Endpoint, body: dict[str, Any], *, session_id: str | None = None
    ) -> UpstreamResponse:
        status, data = await self.replicas[upstream].complete(endpoint, body)
        return UpstreamResponse(status, data)

    def stream(
        self, upstream: str, endpoint: Endpoint, body: dict[str, Any], *, session_id: str | None = None
    ) -> AsyncIterator[str]:
        return self.replicas[upstream].stream(endpoint, body)


def _client(tracing: ReplicaTracing | None) -> ReplicaClient:
    client = ReplicaClient(upstreams_for(["m1"]), speculation=SPEC)
    for up in client.upstream_list:
        replica = ScriptedReplica(ScriptedEngine(client.upstream_list, speculation=SPEC), up.name, up.model, up.profile)
        replica.tracing = tracing
        client.replicas[up.name] = replica
    return client


@pytest.fixture
def database_url(sqlite_url: str) -> str:
    migrate.upgrade(sqlite_url)
    return sqlite_url


@contextlib.asynccontextmanager
async def _stack(tmp_path: Path, url: str, endpoint: str | None, client: ReplicaClient) -> AsyncIterator[Stack]:
    config = platform_config(str(tmp_path), url, ["m1"])
    config = config.model_copy(update={"telemetry": TelemetryConfig(otlp_endpoint=endpoint, service_name="gw-test")})
    async with gateway_stack(config, client) as stack:
        yield stack


async def _token(stack: Stack) -> str:
    name = f"t-{uuid.uuid4().hex[:8]}"
    await stack.tenants().create(name)
    return (await stack.keys().create(name)).token


def _flush(stack: Stack, tracing: ReplicaTracing | None) -> None:
    assert stack.app.state.tracing.force_flush()
    if tracing is not None:
        assert tracing.force_flush()


GATEWAY_STEPS = {"authenticate", "count_tokens", "route", "limits", "engine.call", "audit.hand_off"}


async def test_one_trace_across_gateway_and_replica_keeps_the_client_trace_id(
    tmp_path: Path, database_url: str, receiver: Receiver
) -> None:
    tracing = ReplicaTracing.create(receiver.url, "engine-test")
    client = _client(tracing)
    async with _stack(tmp_path, database_url, receiver.url, client) as stack:
        token = await _token(stack)
        response = await stack.client.post(
            "/v1/chat/completions",
            json={"model": "m1@fast-agentic", "messages": [{"role": "user", "content": "secret prompt"}]},
            headers={"authorization": f"Bearer {token}", "traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"},
        )
        assert response.status_code == 200
        _flush(stack, tracing)

    spans = receiver.wait_for(CLIENT_TRACE, {"gateway.request", "engine.replica.complete", *GATEWAY_STEPS})
    root = spans["gateway.request"]
    assert root.parent_id == CLIENT_SPAN  # the client's trace continues
    assert root.service == "gw-test"
    assert root.attributes["http.response.status_code"] == 200
    assert root.attributes["bastion.profile"] == "fast-agentic"
    assert root.attributes["bastion.speculation.draft_tokens"] == 12
    for name in GATEWAY_STEPS:
        assert spans[name].parent_id == root.span_id, name
    replica = spans["engine.replica.complete"]
    assert replica.parent_id == spans["engine.call"].span_id  # crossed the seam as a child of the engine call
    assert replica.service == "engine-test"
    assert replica.attributes["bastion.profile"] == "fast-agentic"
    # the private key never reaches vLLM, and no span carries prompt text
    replica_bodies = client.replicas["engine-m1--fast-agentic"].bodies
    assert replica_bodies and TRACE_KEY not in replica_bodies[-1]
    assert "secret prompt" not in str([s.attributes for s in receiver.trace(CLIENT_TRACE)])
    tracing.shutdown()


async def test_streamed_request_without_client_context_gets_its_own_trace(
    tmp_path: Path, database_url: str, receiver: Receiver
) -> None:
    tracing = ReplicaTracing.create(receiver.url, "engine-test")
    client = _client(tracing)
    rid = f"stream-{uuid.uuid4().hex}"
    async with _stack(tmp_path, database_url, receiver.url, client) as stack:
        token = await _token(stack)
        body = {"model": "m1@fast-agentic", "messages": [{"role": "user", "content": "hi"}], "stream": True}
        async with stack.client.stream(
            "POST", "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {token}", "x-request-id": rid}
        ) as response:
            assert response.status_code == 200
            assert "[DONE]" in "".join([c async for c in response.aiter_text()])
        for _ in range(50):  # the stream's end is recorded after the last chunk
            if not stack.gateway.open_traces:
                break
            await asyncio.sleep(0.02)
        _flush(stack, tracing)

    deadline = time.monotonic() + 10
    roots: list[ReceivedSpan] = []
    while not roots and time.monotonic() < deadline:
        with receiver.lock:
            roots = [s for s in receiver.spans if s.attributes.get("bastion.request_id") == rid]
        time.sleep(0.05)
    (root,) = roots
    assert root.parent_id == "" and root.trace_id != CLIENT_TRACE
    spans = receiver.wait_for(root.trace_id, {"engine.replica.stream", "engine.call", "audit.hand_off"})
    assert spans["engine.call"].parent_id == root.span_id
    assert spans["engine.replica.stream"].parent_id == spans["engine.call"].span_id
    assert root.attributes["bastion.stream"] is True
    assert root.attributes["bastion.completion_tokens"] == 5
    tracing.shutdown()


async def test_refused_request_is_traced_with_its_status(tmp_path: Path, database_url: str, receiver: Receiver) -> None:
    trace_id = uuid.uuid4().hex
    async with _stack(tmp_path, database_url, receiver.url, _client(None)) as stack:
        response = await stack.client.post(
            "/v1/chat/completions",
            json={"model": "m1", "messages": [{"role": "user", "content": "hi"}]},
            headers={"authorization": "Bearer bst_nope_nope", "traceparent": f"00-{trace_id}-{CLIENT_SPAN}-01"},
        )
        assert response.status_code == 401
        _flush(stack, None)
    spans = receiver.wait_for(trace_id, {"gateway.request", "authenticate"})
    assert spans["gateway.request"].attributes["http.response.status_code"] == 401
    assert spans["authenticate"].parent_id == spans["gateway.request"].span_id
    assert "engine.call" not in spans


async def test_tracing_off_by_default_sends_nothing_and_no_trace_key(
    tmp_path: Path, database_url: str, receiver: Receiver
) -> None:
    client = _client(None)
    async with _stack(tmp_path, database_url, None, client) as stack:
        assert stack.app.state.tracing is None and stack.gateway.tracing is None
        token = await _token(stack)
        trace_id = uuid.uuid4().hex
        response = await stack.client.post(
            "/v1/chat/completions",
            json={"model": "m1", "messages": [{"role": "user", "content": "hi"}]},
            headers={"authorization": f"Bearer {token}", "traceparent": f"00-{trace_id}-{CLIENT_SPAN}-01"},
        )
        assert response.status_code == 200
        assert not stack.gateway.open_traces
    bodies = [b for r in client.replicas.values() for b in r.bodies]
    assert bodies and all(TRACE_KEY not in b for b in bodies)
    time.sleep(0.2)
    assert receiver.trace(trace_id) == []
