"""HTTP pieces of `bastion bench gateway`. The scripted engine served as an OpenAI-compatible server on
loopback, an EngineClient that reaches it over HTTP (so Bastion's engine hop is a real network hop, as the
LiteLLM proxy's is), and the LiteLLM proxy started in front of the same server when it is installed.
Benchmarks only: nothing here is served in production.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from bastion.bench.doubles import ScriptedEngine, count_words, upstreams_for
from bastion.gateway.engine_client import Endpoint, UpstreamInfo, UpstreamResponse

LITELLM_KEY = "sk-bench-litellm-master"  # a throwaway master key for the bench's own LiteLLM process
_PATHS: dict[Endpoint, str] = {"chat": "/v1/chat/completions", "completion": "/v1/completions"}


def engine_app(model: str, delay_s: float = 0.0, words: int = 0) -> FastAPI:
    """The scripted engine behind vLLM's URL layout: chat, completions, and /tokenize for prompt counting.
    `words`: answer length in tokens (0: the scripted engine's five-word sentence)."""
    engine = ScriptedEngine(upstreams_for([model], ongoing=10_000), record_bodies=False, delay_s=delay_s)
    if words:
        engine.words = [f"w{i}" for i in range(words)]  # as the Serve deployment (bench/scripted.py) answers
    upstream = engine.upstreams()[0].name
    app = FastAPI()

    async def answer(request: Request, endpoint: Endpoint) -> Response:
        body = await request.json()
        if body.get("stream"):
            return StreamingResponse(engine.stream(upstream, endpoint, body), media_type="text/event-stream")
        out = await engine.complete(upstream, endpoint, body)
        return JSONResponse(out.body, status_code=out.status)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await answer(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await answer(request, "completion")

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        return {"count": count_words(await request.json())}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model, "object": "model", "owned_by": "bench"}]}

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


class HttpEngine:
    """An EngineClient over HTTP to `engine_app` (aiohttp: a cheaper client per request than httpx, so the hop
    measures the network, not the client library). Prompt tokens are counted here with the scripted engine's
    own rule: the real seam's tokenizer call is a Ray handle call, which this bench does not model."""

    def __init__(self, base_url: str, model: str) -> None:
        self._upstreams = upstreams_for([model], ongoing=10_000)
        self._base = base_url
        self._session: Any = None  # made in the server's event loop, at the first request

    def _client(self) -> Any:
        import aiohttp

        if self._session is None:
            connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60)
            self._session = aiohttp.ClientSession(self._base, connector=connector)
        return self._session

    def upstreams(self) -> list[UpstreamInfo]:
        return list(self._upstreams)

    async def engine_metrics(self) -> list[tuple[UpstreamInfo, str]]:
        return []

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def count_prompt_tokens(self, upstream: str, endpoint: Endpoint, body: dict[str, Any]) -> int:
        return count_words(body)

    async def complete(
        self, upstream: str, endpoint: Endpoint, body: dict[str, Any], *, session_id: str | None = None
    ) -> UpstreamResponse:
        async with self._client().post(_PATHS[endpoint], json=body) as response:
            return UpstreamResponse(response.status, await response.json())

    def stream(
        self, upstream: str, endpoint: Endpoint, body: dict[str, Any], *, session_id: str | None = None
    ) -> AsyncIterator[str]:
        return self._stream(endpoint, body)

    async def _stream(self, endpoint: Endpoint, body: dict[str, Any]) -> AsyncIterator[str]:
        async with self._client().post(_PATHS[endpoint], json=body) as response:
            async for raw in response.content:
                line = raw.decode().strip()
                if line:
                    yield line + "\n\n"


def find_litellm(explicit: str | None = None) -> str | None:
    """The LiteLLM proxy command: given, else .tools/litellm (scripts/install-tools.sh), else on PATH."""
    if explicit:
        return explicit if Path(explicit).is_file() else None
    repo_tool = Path(__file__).resolve().parents[3] / ".tools" / "litellm" / "bin" / "litellm"
    if repo_tool.is_file():
        return str(repo_tool)
    return shutil.which("litellm")


def start_litellm(binary: str, engine_url: str, model: str, port: int, work_dir: str) -> subprocess.Popen[bytes]:
    """LiteLLM proxy on 127.0.0.1 with one model whose api_base is the scripted engine; no database mode."""
    config = Path(work_dir) / "litellm.yaml"
    config.write_text(
        "model_list:\n"
        f"  - model_name: {model}\n"
        "    litellm_params:\n"
        f"      model: openai/{model}\n"
        f"      api_base: {engine_url}/v1\n"
        "      api_key: unused\n"
        "litellm_settings:\n"
        "  drop_params: true\n"
        "  telemetry: false\n"
        "general_settings:\n"
        f"  master_key: {LITELLM_KEY}\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env.update(LITELLM_LOCAL_MODEL_COST_MAP="True", LITELLM_LOG="ERROR", PYTHONUNBUFFERED="1")
    args = [binary, "--config", str(config), "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"]
    log = open(Path(work_dir) / "litellm.log", "wb")  # noqa: SIM115 (the process owns it until it ends)
    return subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=work_dir)
