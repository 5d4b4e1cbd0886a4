"""Per-tenant API controls (`allowed_apis`): a tenant limited to some APIs gets OpenAI's 403 (`permission_error`,
`api_not_allowed`; the SDK's PermissionDeniedError) on the others, before anything reaches an engine, and
the refusal is recorded like any other 403. Real SQLite, migrated; a scripted engine."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import openai
import pytest
from openai import AsyncOpenAI
from sqlite_gateway import migrated, sqlite_gateway

from bastion.bench.doubles import Stack
from bastion.tenancy.tenants import TenancyError

pytestmark = pytest.mark.integration
CHAT = {"model": "m1", "messages": [{"role": "user", "content": "a b"}], "max_tokens": 2}


@pytest.fixture
def database_url(sqlite_url: str) -> str:
    return migrated(sqlite_url)


@pytest.fixture
async def stack(tmp_path: Path, database_url: str) -> AsyncIterator[Stack]:
    async with sqlite_gateway(tmp_path, database_url, ["m1"]) as s:
        yield s


async def _client(stack: Stack, **tenant: object) -> tuple[str, AsyncOpenAI]:
    name = f"t-{uuid.uuid4().hex[:8]}"
    await stack.tenants().create(name, **tenant)
    token = (await stack.keys().create(name, scopes=["inference", "usage:read"])).token
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=stack.app))
    return name, AsyncOpenAI(api_key=token, base_url="http://gateway.test/v1", http_client=http, max_retries=0)


async def test_an_api_outside_the_tenants_list_is_a_403(stack: Stack) -> None:
    _, client = await _client(stack, allowed_apis=["completions"])
    for stream in (False, True):
        with pytest.raises(openai.PermissionDeniedError) as err:
            await client.chat.completions.create(**CHAT, stream=stream)
        body = err.value.response.json()["error"]
        assert body["code"] == "api_not_allowed" and body["type"] == "permission_error" and "chat" in body["message"]
    assert (await client.completions.create(model="m1", prompt="a b", max_tokens=2)).choices
    assert [m.id async for m in client.models.list()]  # listing models is never refused
    text = await stack.scrape()  # the refusals went through the request record like any other 403
    assert 'bastion_requests_total{endpoint="chat",model="",profile="",status="403"} 2.0' in text


async def test_an_empty_list_allows_every_api_and_a_change_applies(stack: Stack) -> None:
    name, client = await _client(stack)
    assert (await client.chat.completions.create(**CHAT)).choices
    info = await stack.tenants().update(name, allowed_apis=["completions"])
    assert info.allowed_apis == ("completions",)
    stack.gateway.auth.invalidate()  # what the key-change announcement over Redis does on every replica
    with pytest.raises(openai.PermissionDeniedError):
        await client.chat.completions.create(**CHAT)
    assert (await client.completions.create(model="m1", prompt="a", max_tokens=2)).choices


async def test_unknown_api_names_are_refused(stack: Stack) -> None:
    with pytest.raises(TenancyError, match="unknown API 'graphql'"):
        await stack.tenants().create(f"t-{uuid.uuid4().hex[:8]}", allowed_apis=["chat", "graphql"])
