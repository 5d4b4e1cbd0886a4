"""The gateway under uvicorn on 127.0.0.1: SSE arrives chunk by chunk over real HTTP, and a client that hangs
up mid-stream gives its concurrency slot and in-flight count back."""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import uvicorn

from bastion.bench.doubles import ScriptedEngine, Stack, gateway_stack, platform_config, upstreams_for
from bastion.config.schema import LimitsConfig
from bastion.db import migrate

pytestmark = pytest.mark.integration


@pytest.fixture
def database_url(sqlite_url: str) -> str:
    migrate.upgrade(sqlite_url)
    return sqlite_url


@pytest.fixture
def engine() -> ScriptedEngine:
    return ScriptedEngine(upstreams_for(["m1"]), delay_s=0.1, words=[f"w{i}" for i in range(10)])


@pytest.fixture
async def served(tmp_path: Path, database_url: str, engine: ScriptedEngine) -> AsyncIterator[tuple[Stack, str]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = platform_config(str(tmp_path), database_url, ["m1"])
    async with gateway_stack(config, engine) as stack:
        server = uvicorn.Server(uvicorn.Config(stack.app, host="127.0.0.1", port=port, log_level="warning"))
        task = asyncio.create_task(server.serve())
        while not server.started:
            await asyncio.sleep(0.02)
        try:
            yield stack, f"http://127.0.0.1:{port}"
        finally:
            server.should_exit = True
            await task


async def test_sse_is_relayed_incrementally_and_hangups_release(served: tuple[Stack, str]) -> None:
    stack, url = served
    name = f"t-{uuid.uuid4().hex[:8]}"
    await stack.tenants().create(name, limits=LimitsConfig(concurrent_requests=1))
    token = (await stack.keys().create(name)).token
    body = {"model": "m1", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    headers = {"authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=10) as client:
        arrivals = []
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    arrivals.append(time.monotonic())
        assert len(arrivals) == 11  # ten chunks and [DONE]; the usage chunk was stripped
        assert arrivals[9] - arrivals[0] > 0.5  # spread over time, not buffered to the end

        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    break  # hang up after the first chunk
        deadline = time.monotonic() + 5
        while stack.gateway.in_flight.get("engine-m1--fast-agentic") and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert stack.gateway.in_flight["engine-m1--fast-agentic"] == 0
        body["stream"] = False
        again = await client.post("/v1/chat/completions", json=body)  # the one concurrency slot is free again
        assert again.status_code == 200, again.text
