"""A scripted EngineClient: deterministic answers, token counts and timing, for gateway tests and the gateway
benchmark. It speaks the same shapes vLLM's OpenAI layer does (bodies, SSE chunks, the usage chunk and
`metrics.speculative_decoding`), so the gateway cannot tell it from the real seam.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bastion.gateway.engine_client import Endpoint, UpstreamInfo, UpstreamResponse, UpstreamUnavailable, replica_notice


def count_words(body: dict[str, Any]) -> int:
    """One token per whitespace-separated word, plus 3 per chat message (a stand-in chat template)."""
    if "messages" in body:
        total = 0
        for m in body["messages"]:
            content = m.get("content")
            if isinstance(content, list):
                content = " ".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
            total += 3 + len(str(content or "").split())
        return total
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return len(prompt.split())
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
        return len(prompt)
    return sum(len(p.split()) if isinstance(p, str) else len(p) for p in prompt or [])


@dataclass
class ScriptedEngine:
    upstream_list: list[UpstreamInfo]
    words: list[str] = field(default_factory=lambda: ["Hello", "from", "the", "scripted", "engine."])
    delay_s: float = 0.0  # before the answer (non-streaming) or before each chunk
    speculation: dict[str, Any] | None = None  # metrics.speculative_decoding to report, speculative profiles only
    unavailable: set[str] = field(default_factory=set)
    gate: asyncio.Event | None = None  # when set, requests wait for it (to hold them in flight)
    seen: list[tuple[str, Endpoint, dict[str, Any]]] = field(default_factory=list)
    record_bodies: bool = True
    error: dict[str, Any] | None = None  # an OpenAI error object the engine answers with
    error_after: int = 0  # streams: content chunks sent before the error event
    replica_id: str | None = None  # when set, answers name this replica (as Serve engine replicas do)
    sessions: list[str | None] = field(default_factory=list)  # the session id each request was sent with

    def upstreams(self) -> list[UpstreamInfo]:
        return list(self.upstream_list)

    async def engine_metrics(self) -> list[tuple[UpstreamInfo, str]]:
        return []  # a scripted engine keeps no counters

    async def aclose(self) -> None:
        """Nothing to release."""

    def _check(self, upstream: str) -> UpstreamInfo:
        info = next((u for u in self.upstream_list if u.name == upstream), None)
        if info is None or upstream in self.unavailable:
            raise UpstreamUnavailable(upstream)
        return info

    async def count_prompt_tokens(self, upstream: str, endpoint: Endpoint, body: dict[str, Any]) -> int:
        info = self._check(upstream)
        if body.get("model") != info.model:  # as vLLM: it serves one name and refuses others
            raise ValueError(f"The model `{body.get('model')}` does not exist.")
        return count_words(body)

    async def _wait(self) -> None:
        if self.gate is not None:
            await self.gate.wait()
        if self.delay_s:
            await asyncio.sleep(self.delay_s)

    def _metrics(self, info: UpstreamInfo) -> dict[str, Any] | None:
        if self.speculation is None or info.profile != "fast-agentic":
            return None
        return {"speculative_decoding": self.speculation}

    def _answer_words(self, body: dict[str, Any]) -> list[str]:
        limit = body.get("max_completion_tokens") or body.get("max_tokens") or len(self.words)
        return self.words[: max(1, min(limit, len(self.words)))]

    async def complete(
        self, upstream: str, endpoint: Endpoint, body: dict[str, Any], *, session_id: str | None = None
    ) -> UpstreamResponse:
        info = self._check(upstream)
        if self.record_bodies:
            self.sessions.append(session_id)
        if body.get("model") != info.model:
            return UpstreamResponse(404, {"error": {"message": "no such model", "type": "NotFoundError", "code": 404}})
        if self.record_bodies:
            self.seen.append((upstream, endpoint, body))
        await self._wait()
        if self.error is not None:
            code = self.error.get("code")
            return UpstreamResponse(code if isinstance(code, int) else 500, {"error": self.error}, self.replica_id)
        words = self._answer_words(body)
        text = " ".join(words)
        prompt = count_words(body)
        usage = {"prompt_tokens": prompt, "completion_tokens": len(words), "total_tokens": prompt + len(words)}
        created = int(time.time())
        if endpoint == "chat":
            message: dict[str, Any] = {"role": "assistant", "content": text}
            finish = "stop"
            if body.get("tools") and body.get("tool_choice") != "none":
                fn = body["tools"][0]["function"]["name"]
                message = {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {"id": "call_1", "type": "function", "function": {"name": fn, "arguments": '{"x": 1}'}}
                    ],
                }
                finish = "tool_calls"
            choice = {"index": 0, "message": message, "finish_reason": finish, "logprobs": None}
            out: dict[str, Any] = {"id": "chatcmpl-scripted", "object": "chat.completion", "choices": [choice]}
        else:
            choice = {"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}
            out = {"id": "cmpl-scripted", "object": "text_completion", "choices": [choice]}
        out.update(created=created, model=body["model"], usage=usage)
        metrics = self._metrics(info)
        if metrics:
            out["metrics"] = metrics
        return UpstreamResponse(200, out, self.replica_id)

    def stream(
        self, upstream: str, endpoint: Endpoint, body: dict[str, Any], *, session_id: str | None = None
    ) -> AsyncIterator[str]:
        if self.record_bodies:
            self.sessions.append(session_id)
        return self._stream(upstream, endpoint, body)

    async def _stream(self, upstream: str, endpoint: Endpoint, body: dict[str, Any]) -> AsyncIterator[str]:
        info = self._check(upstream)
        if self.record_bodies:
            self.seen.append((upstream, endpoint, body))
        if self.replica_id is not None:
            yield replica_notice(self.replica_id)
        words = self._answer_words(body)
        created = int(time.time())
        chat = endpoint == "chat"
        base = {
            "id": "chatcmpl-scripted" if chat else "cmpl-scripted",
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created,
            "model": body["model"],
        }
        for i, word in enumerate(words):
            if self.error is not None and i == self.error_after:
                yield f"data: {json.dumps({'error': self.error})}\n\n"
                return
            await self._wait()
            text = word if i == 0 else " " + word
            if chat:
                delta: dict[str, Any] = {"content": text}
                if i == 0:
                    delta["role"] = "assistant"
                choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": None, "logprobs": None}
            else:
                choice = {"index": 0, "text": text, "finish_reason": None, "logprobs": None}
            if i == len(words) - 1:
                choice["finish_reason"] = "stop"
            yield f"data: {json.dumps({**base, 'choices': [choice]})}\n\n"
        if (body.get("stream_options") or {}).get("include_usage"):
            prompt = count_words(body)
            usage = {"prompt_tokens": prompt, "completion_tokens": len(words), "total_tokens": prompt + len(words)}
            final: dict[str, Any] = {**base, "choices": [], "usage": usage}
            metrics = self._metrics(info)
            if metrics:
                final["metrics"] = metrics
            yield f"data: {json.dumps(final)}\n\n"
        yield "data: [DONE]\n\n"


def upstreams_for(models: list[str], *, fast_context: int = 2048, deep_context: int = 8192, ongoing: int = 8):
    """Two upstreams per model, one per profile, named the way serve/ names engine deployments."""
    out = []
    for model in models:
        out.append(UpstreamInfo(f"engine-{model}--deep-context", model, "deep-context", deep_context, ongoing))
        out.append(UpstreamInfo(f"engine-{model}--fast-agentic", model, "fast-agentic", fast_context, ongoing))
    return out


def platform_config(
    data_dir: str,
    database_url: str,
    models: list[str],
    *,
    redis_url: str | None = None,
    max_body_bytes: int = 65_536,
    tenant_defaults: dict[str, Any] | None = None,
    queue: dict[str, Any] | None = None,
    gateway: dict[str, Any] | None = None,
):
    """A minimal valid platform file for gateway tests (the engines themselves come from ScriptedEngine)."""
    from bastion.config.schema import PlatformConfig

    data: dict[str, Any] = {
        "data_dir": data_dir,
        "database": {"url": database_url},
        "redis": {"url": redis_url},
        "models": [{"name": m, "source": "/nonexistent", "max_model_len": 8192} for m in models],
        "profiles": {"deep-context": {}, "fast-agentic": {"max_context": 2048}},
        "deployments": [{"model": m, "profile": p} for m in models for p in ("deep-context", "fast-agentic")],
        "gateway": {"max_body_bytes": max_body_bytes, **(gateway or {})},
    }
    if tenant_defaults is not None:
        data["tenant_defaults"] = tenant_defaults
    if queue is not None:  # each profile's fair queue (`profiles.<name>.queue`)
        for profile in data["profiles"].values():
            profile["queue"] = queue
    return PlatformConfig.model_validate(data)


TEST_PEPPER = b"bastion-test-pepper-0123456789abcdef"


@dataclass
class Stack:
    """One gateway app instance with its services and an HTTP client bound to it in-process."""

    app: FastAPI
    sessions: async_sessionmaker[AsyncSession]
    client: httpx.AsyncClient
    redis_url: str | None = None

    @property
    def gateway(self):
        return self.app.state.gateway

    async def scrape(self, path: str = "/metrics") -> str:
        """The Prometheus text at `path`, read with the metrics token as Prometheus would."""
        headers = {"authorization": f"Bearer {self.app.state.metrics_token}"}
        response = await self.client.get(path, headers=headers)
        assert response.status_code == 200, response.text[:200]
        return response.text

    def tenants(self):
        from bastion.tenancy.tenants import TenantService

        return TenantService(self.sessions)

    def keys(self, *, notify: bool = True):
        """Key administration; with Redis, changes are also announced to every replica (as the CLI does)."""
        from bastion.tenancy.invalidation import publisher
        from bastion.tenancy.key_service import KeyService

        announce = publisher(self.redis_url) if notify and self.redis_url else None
        return KeyService(self.sessions, TEST_PEPPER, announce)


@asynccontextmanager
async def gateway_stack(config, engine: ScriptedEngine, **app_kwargs: Any) -> AsyncIterator[Stack]:
    """Build an app over the config's database (already migrated) and close everything afterwards."""
    from bastion.db.session import create_engine, session_factory
    from bastion.serve.gateway_app import create_gateway_app

    db = create_engine(config.database.url)
    sessions = session_factory(db)
    app_kwargs.setdefault("pepper", TEST_PEPPER)
    app = create_gateway_app(config, engine, sessions=sessions, **app_kwargs)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway.test")
    try:
        yield Stack(app, sessions, client, app_kwargs.get("redis_url") or config.redis.url)
    finally:
        await client.aclose()
        await app.state.gateway.aclose()
        await db.dispose()


async def until(predicate: Any, timeout_s: float = 20.0, step_s: float = 0.02) -> None:
    """Wait until `predicate()` is true: tests hold requests in flight without guessing how long a loaded
    machine takes to get them there."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        await asyncio.sleep(step_s)
