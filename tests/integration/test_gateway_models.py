"""`GET /v1/models/{id}` through the official `openai` SDK: a permitted name answers its model object; an unknown
name and a name the tenant may not use both answer OpenAI's 404 (the SDK's NotFoundError). Real SQLite; a scripted
engine (the route reads only the engine's upstream list)."""

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

pytestmark = pytest.mark.integration


@pytest.fixture
def database_url(sqlite_url: str) -> str:
    return migrated(sqlite_url)


@pytest.fixture
async def stack(tmp_path: Path, database_url: str) -> AsyncIterator[Stack]:
    async with sqlite_gateway(tmp_path, database_url, ["m1", "m2"]) as s:
        yield s


async def _client(stack: Stack, **tenant: object) -> AsyncOpenAI:
    name = f"t-{uuid.uuid4().hex[:8]}"
    await stack.tenants().create(name, **tenant)
    token = (await stack.keys().create(name)).token
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=stack.app))
    return AsyncOpenAI(api_key=token, base_url="http://gateway.test/v1", http_client=http, max_retries=0)


async def test_retrieve_a_permitted_model_and_its_profile_alias(stack: Stack) -> None:
    client = await _client(stack, allowed_models=["m2"], allowed_profiles=["deep-context"])
    model = await client.models.retrieve("m2")
    assert (model.id, model.object, model.owned_by) == ("m2", "model", "bastion")
    assert (await client.models.retrieve("m2@deep-context")).id == "m2@deep-context"


@pytest.mark.parametrize("name", ["no-such-model", "m1", "m2@fast-agentic"])
async def test_unknown_or_not_permitted_is_openai_404(stack: Stack, name: str) -> None:
    client = await _client(stack, allowed_models=["m2"], allowed_profiles=["deep-context"])
    with pytest.raises(openai.NotFoundError) as err:
        await client.models.retrieve(name)
    body = err.value.response.json()["error"]
    assert body["code"] == "model_not_found" and body["type"] == "invalid_request_error" and name in body["message"]


async def test_retrieve_needs_a_key(stack: Stack) -> None:
    response = await stack.client.get("/v1/models/m1")
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
