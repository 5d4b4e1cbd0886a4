"""The OpenAI-compatible API through the official `openai` SDK and raw HTTP: answers, streaming, tools, and
every error status mapped onto the SDK's exception classes. Real SQLite and PostgreSQL; a scripted engine."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import httpx
import openai
import pytest
from openai import AsyncOpenAI

from bastion.bench.doubles import ScriptedEngine, Stack, gateway_stack, platform_config, upstreams_for
from bastion.db import migrate
from bastion.db.models import utcnow

pytestmark = pytest.mark.integration
SPEC = {"num_draft_tokens": 12, "num_accepted_draft_tokens": 9, "draft_acceptance_rate": 0.75, "num_spec_steps": 4}


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest) -> str:
    url = request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")
    migrate.upgrade(url)
    return url


@pytest.fixture
def engine() -> ScriptedEngine:
    return ScriptedEngine(upstreams_for(["m1", "m2"]), speculation=SPEC)


@pytest.fixture
async def stack(tmp_path: Path, database_url: str, engine: ScriptedEngine) -> AsyncIterator[Stack]:
    config = platform_config(str(tmp_path), database_url, ["m1", "m2"], max_body_bytes=4096)
    async with gateway_stack(config, engine) as s:
        yield s


def sdk(stack: Stack, token: str) -> AsyncOpenAI:
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=stack.app))
    return AsyncOpenAI(api_key=token, base_url="http://gateway.test/v1", http_client=http, max_retries=0)


async def new_tenant(stack: Stack, **kwargs) -> str:
    name = f"t-{uuid.uuid4().hex[:8]}"
    await stack.tenants().create(name, **kwargs)
    return name


async def new_key(stack: Stack, tenant: str, **kwargs) -> str:
    return (await stack.keys().create(tenant, **kwargs)).token


async def test_chat_non_streaming_and_usage_passthrough(stack: Stack, engine: ScriptedEngine) -> None:
    token = await new_key(stack, await new_tenant(stack))
    client = sdk(stack, token)
    reply = await client.chat.completions.create(
        model="m1", messages=[{"role": "user", "content": "say hello"}], max_tokens=3
    )
    assert reply.choices[0].message.content == "Hello from the"
    assert reply.usage is not None and reply.usage.completion_tokens == 3
    assert engine.seen[-1][2]["model"] == "m1"

    raw = await client.chat.completions.with_raw_response.create(
        model="m1", messages=[{"role": "user", "content": "hi"}], extra_headers={"x-request-id": "my-req-1"}
    )
    assert raw.headers["x-request-id"] == "my-req-1"
    assert raw.headers["x-ratelimit-limit-requests"] == "600"
    assert int(raw.headers["x-ratelimit-remaining-requests"]) <= 598
    assert raw.headers["x-bastion-profile"] == "fast-agentic"


async def test_streaming_relay_strips_usage_unless_asked(stack: Stack, engine: ScriptedEngine) -> None:
    token = await new_key(stack, await new_tenant(stack))
    client = sdk(stack, token)
    stream = await client.chat.completions.create(model="m1", messages=[{"role": "user", "content": "hi"}], stream=True)
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello from the scripted engine."
    assert all(c.usage is None for c in chunks)
    assert engine.seen[-1][2]["stream_options"] == {"include_usage": True}  # the gateway always asks upstream

    stream = await client.chat.completions.create(
        model="m1",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5
    assert chunks[-1].model_extra["metrics"]["speculative_decoding"]["num_draft_tokens"] == 12

    completion = await client.completions.create(model="m1", prompt="one two three", max_tokens=2)
    assert completion.choices[0].text == "Hello from"
    text_stream = await client.completions.create(model="m1", prompt="one two", stream=True)
    assert "".join([c.choices[0].text async for c in text_stream if c.choices]).startswith("Hello")


async def test_tools_round_trip(stack: Stack, engine: ScriptedEngine) -> None:
    token = await new_key(stack, await new_tenant(stack))
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    reply = await sdk(stack, token).chat.completions.create(
        model="m1",
        messages=[{"role": "user", "content": "find x"}],
        tools=tools,
        tool_choice="auto",
        response_format={"type": "text"},
    )
    assert reply.choices[0].message.tool_calls[0].function.name == "lookup"
    sent = engine.seen[-1][2]
    assert sent["tools"] == tools and sent["tool_choice"] == "auto" and sent["response_format"] == {"type": "text"}
    assert reply.choices[0].finish_reason == "tool_calls"


async def test_auth_errors_map_to_sdk_classes(stack: Stack) -> None:
    tenant = await new_tenant(stack, allowed_models=["m1"])
    messages = [{"role": "user", "content": "hi"}]
    for bad in ("", "sk-not-ours", "bst_0123456789ab_" + "x" * 43):
        with pytest.raises(openai.AuthenticationError) as err:
            await sdk(stack, bad or "x").chat.completions.create(model="m1", messages=messages)
        assert err.value.status_code == 401 and err.value.code == "invalid_api_key"

    expired = await new_key(stack, tenant, expires_at=utcnow() - timedelta(seconds=1))
    with pytest.raises(openai.AuthenticationError, match="expired"):
        await sdk(stack, expired).chat.completions.create(model="m1", messages=messages)

    usage_only = await new_key(stack, tenant, scopes=["usage:read"])
    with pytest.raises(openai.PermissionDeniedError, match="inference"):
        await sdk(stack, usage_only).chat.completions.create(model="m1", messages=messages)

    token = await new_key(stack, tenant)
    with pytest.raises(openai.PermissionDeniedError) as denied:
        await sdk(stack, token).chat.completions.create(model="m2", messages=messages)
    assert denied.value.code == "model_not_allowed"
    with pytest.raises(openai.NotFoundError) as missing:
        await sdk(stack, token).chat.completions.create(model="nope", messages=messages)
    assert missing.value.code == "model_not_found" and missing.value.body["param"] == "model"
    with pytest.raises(openai.PermissionDeniedError, match="usage:read"):
        await sdk(stack, token).get("/usage", cast_to=object)

    await stack.tenants().suspend(tenant)
    stack.gateway.auth.invalidate()
    with pytest.raises(openai.PermissionDeniedError, match="suspended"):
        await sdk(stack, token).chat.completions.create(model="m1", messages=messages)


async def test_bad_requests_are_400_in_openai_format(stack: Stack) -> None:
    token = await new_key(stack, await new_tenant(stack))
    client = sdk(stack, token)
    with pytest.raises(openai.BadRequestError) as err:
        await client.chat.completions.create(model="m1", messages=[], max_tokens=5)
    assert err.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError):
        await client.chat.completions.create(model="m1", messages=[{"role": "user", "content": "x"}], max_tokens=0)
    with pytest.raises(openai.BadRequestError) as ctx_err:  # fast 2048, deep 8192: 9000 fits neither
        await client.chat.completions.create(model="m1", messages=[{"role": "user", "content": "x"}], max_tokens=9000)
    assert ctx_err.value.code == "context_length_exceeded" and "8192" in ctx_err.value.message

    headers = {"authorization": f"Bearer {token}", "content-type": "application/json"}
    for body in (b"{not json", b"\xff\xfe{}", b"[1, 2]", json.dumps({"model": "m1"}).encode()):
        response = await stack.client.post("/v1/chat/completions", content=body, headers=headers)
        assert response.status_code == 400, body
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
        assert response.headers["x-request-id"]


async def test_body_limit_413_by_header_and_by_stream(stack: Stack) -> None:
    token = await new_key(stack, await new_tenant(stack))
    big = "word " * 2000
    with pytest.raises(openai.APIStatusError) as err:
        await sdk(stack, token).chat.completions.create(model="m1", messages=[{"role": "user", "content": big}])
    assert err.value.status_code == 413

    async def chunks():  # no Content-Length: the streamed size decides
        yield b'{"model": "m1", "messages": [{"role": "user", "content": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}]}'

    response = await stack.client.post(
        "/v1/chat/completions", content=chunks(), headers={"authorization": f"Bearer {token}"}
    )
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"


async def test_no_upstream_is_503(stack: Stack, engine: ScriptedEngine) -> None:
    token = await new_key(stack, await new_tenant(stack))
    engine.unavailable = {u.name for u in engine.upstream_list}
    with pytest.raises(openai.APIStatusError) as err:
        await sdk(stack, token).chat.completions.create(model="m1", messages=[{"role": "user", "content": "x"}])
    assert err.value.status_code == 503 and err.value.body["type"] == "service_unavailable"
    engine.unavailable = {"engine-m1--fast-agentic"}  # counting falls back to deep; the chosen fast one is down
    with pytest.raises(openai.APIStatusError) as err:
        await sdk(stack, token).chat.completions.create(
            model="m1@fast-agentic", messages=[{"role": "user", "content": "x"}], stream=True
        )
    assert err.value.status_code == 503


async def test_models_lists_only_what_the_tenant_may_use(stack: Stack) -> None:
    token = await new_key(stack, await new_tenant(stack, allowed_models=["m2"], allowed_profiles=["deep-context"]))
    ids = [m.id async for m in sdk(stack, token).models.list()]
    assert ids == ["m2", "m2@deep-context"]
    response = await stack.client.get("/v1/models")
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"


async def test_unknown_route_and_healthz(stack: Stack) -> None:
    response = await stack.client.get("/v1/nothing", headers={"x-request-id": "bad id with spaces"})
    assert response.status_code == 404 and "error" in response.json()
    assert response.headers["x-request-id"] != "bad id with spaces"
    assert (await stack.client.get("/healthz")).json() == {"status": "ok"}


async def test_usage_is_recorded_and_scoped_to_the_tenant(stack: Stack) -> None:
    tenant = await new_tenant(stack)
    token = await new_key(stack, tenant, scopes=["inference", "usage:read"])
    client = sdk(stack, token)
    await client.chat.completions.create(model="m1", messages=[{"role": "user", "content": "a b c"}], max_tokens=2)
    stream = await client.chat.completions.create(model="m1", messages=[{"role": "user", "content": "a"}], stream=True)
    _ = [c async for c in stream]
    usage = await client.get("/usage", cast_to=httpx.Response)
    rows = usage.json()["data"]
    month = [r for r in rows if len(r["period"]) == 7]
    assert len(month) == 1 and month[0]["requests"] == 2
    assert month[0]["prompt_tokens"] == 6 + 4 and month[0]["completion_tokens"] == 2 + 5
    assert month[0]["draft_tokens"] == 24 and month[0]["accepted_tokens"] == 18
    assert usage.json()["tenant"] == tenant


async def test_engine_errors_keep_their_status(stack: Stack, engine: ScriptedEngine) -> None:
    token = await new_key(stack, await new_tenant(stack, allowed_models=["m1"]))
    client = sdk(stack, token)
    engine.error = {"message": "bad grammar", "type": "BadRequestError", "param": "response_format", "code": 400}
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as err:
            await client.chat.completions.create(model="m1", messages=[{"role": "user", "content": "x"}], stream=stream)
        assert err.value.body["message"] == "bad grammar" and err.value.body["param"] == "response_format"
    engine.error_after = 2  # after two chunks: the error travels inside the stream
    response = await stack.client.post(
        "/v1/chat/completions",
        json={"model": "m1", "messages": [{"role": "user", "content": "x"}], "stream": True},
        headers={"authorization": f"Bearer {token}"},
    )
    assert response.status_code == 200 and response.text.count("data: ") == 3 and "bad grammar" in response.text
