"""`/v1/messages` refusals through the official `anthropic` SDK: `x-api-key` and bearer keys both authenticate,
and every gateway refusal (bad key, API not allowed, unknown model, bad body) comes back in Anthropic's error
shape, which the SDK maps onto its exception classes. Real SQLite; a scripted engine (nothing here reaches it;
answers from vLLM's Anthropic layer are tested on the real stack in tests/e2e/test_anthropic_sdk.py)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import anthropic
import httpx2
import pytest
from sqlite_gateway import migrated, sqlite_gateway

from bastion.bench.doubles import Stack

pytestmark = pytest.mark.integration
HELLO = [{"role": "user", "content": "Hello"}]


@pytest.fixture
def database_url(sqlite_url: str) -> str:
    return migrated(sqlite_url)


@pytest.fixture
async def stack(tmp_path: Path, database_url: str) -> AsyncIterator[Stack]:
    async with sqlite_gateway(tmp_path, database_url, ["m1"]) as s:
        yield s


async def _token(stack: Stack, **tenant: object) -> str:
    name = f"t-{uuid.uuid4().hex[:8]}"
    await stack.tenants().create(name, **tenant)
    return (await stack.keys().create(name)).token


def _sdk(stack: Stack, api_key: str | None = None, bearer: str | None = None) -> anthropic.AsyncAnthropic:
    http = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=stack.app))
    return anthropic.AsyncAnthropic(
        api_key=api_key, auth_token=bearer, base_url="http://gateway.test", http_client=http, max_retries=0
    )


def _shape(err: anthropic.APIStatusError, kind: str) -> str:
    body = err.response.json()
    assert body["type"] == "error" and body["error"]["type"] == kind, body
    return body["error"]["message"]


async def test_a_bad_key_is_an_anthropic_401_either_way(stack: Stack) -> None:
    for client in (_sdk(stack, api_key="bst_nope_nope"), _sdk(stack, bearer="bst_nope_nope")):
        with pytest.raises(anthropic.AuthenticationError) as err:
            await client.messages.create(model="m1", max_tokens=8, messages=HELLO)
        _shape(err.value, "authentication_error")


async def test_refusals_keep_anthropics_shape(stack: Stack) -> None:
    chat_only = _sdk(stack, api_key=await _token(stack, allowed_apis=["chat"]))
    with pytest.raises(anthropic.PermissionDeniedError) as denied:
        await chat_only.messages.create(model="m1", max_tokens=8, messages=HELLO)
    assert "messages" in _shape(denied.value, "permission_error")
    client = _sdk(stack, bearer=await _token(stack))
    with pytest.raises(anthropic.NotFoundError) as missing:
        await client.messages.create(model="no-such-model", max_tokens=8, messages=HELLO)
    _shape(missing.value, "not_found_error")
    with pytest.raises(anthropic.BadRequestError) as bad:
        await client.messages.create(model="m1", max_tokens=0, messages=HELLO)
    assert "max_tokens" in _shape(bad.value, "invalid_request_error")
    with pytest.raises(anthropic.BadRequestError) as no_messages:
        await client.messages.create(model="m1", max_tokens=8, messages=[])
    _shape(no_messages.value, "invalid_request_error")
