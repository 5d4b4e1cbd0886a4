"""A scripted engine as a Ray Serve deployment, and a gateway application over it, for `bench load` and the
reliability tests: the real ingress, router, handles and audit writer, with engines that cost no CPU.

`ScriptedEngineDeployment` has EngineDeployment's methods (complete, stream, count_prompt_tokens, stats,
metrics) and its conventions (each answer names the replica; streams open with a replica notice). Its answers
also carry the replica id in their `id` field, so a client can see which replica served it. On shutdown it
waits for its in-flight requests, as EngineDeployment's drain does.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from bastion.bench.doubles import ScriptedEngine, count_words
from bastion.engine.replica import coalesce
from bastion.gateway.engine_client import UpstreamInfo, replica_notice
from bastion.serve.options import GRACEFUL_SHUTDOWN_S, HEALTH_CHECK_PERIOD_S, deployment_name, request_router_config

MODEL = "m1"
PROFILE = "deep-context"
MAX_CONTEXT = 8192
_UPSTREAM = "scripted"


@serve.deployment
class ScriptedEngineDeployment:
    def __init__(self, words: int = 16, token_delay_s: float = 0.0, model: str = MODEL) -> None:
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        info = UpstreamInfo(_UPSTREAM, model, PROFILE, MAX_CONTEXT, 1000)
        vocabulary = [f"w{i}" for i in range(words)]
        self.engine = ScriptedEngine([info], words=vocabulary, delay_s=token_delay_s, record_bodies=False)
        self.token_delay_s = token_delay_s
        self.in_flight = 0
        self.served = 0

    def _tag(self, data: dict[str, Any]) -> dict[str, Any]:
        data["id"] = f"{data.get('id', 'scripted')}-{self.replica_id}"
        return data

    async def complete(self, endpoint: str, body: dict[str, Any]) -> tuple[int, dict[str, Any], str]:
        self.in_flight += 1
        try:
            # As an engine does: the answer takes a token's time per word it holds.
            await asyncio.sleep(self.token_delay_s * len(self.engine._answer_words(body)))
            answer = await self.engine.complete(_UPSTREAM, endpoint, body)  # type: ignore[arg-type]
        finally:
            self.in_flight -= 1
            self.served += 1
        return answer.status, self._tag(answer.body) if answer.status == 200 else answer.body, self.replica_id

    async def stream(self, endpoint: str, body: dict[str, Any]) -> AsyncIterator[str]:
        self.in_flight += 1
        try:
            yield replica_notice(self.replica_id)
            async for batch in coalesce(self._tagged(endpoint, body)):  # as EngineReplica streams
                yield batch
        finally:
            self.in_flight -= 1
            self.served += 1

    async def _tagged(self, endpoint: str, body: dict[str, Any]) -> AsyncIterator[str]:
        async for chunk in self.engine.stream(_UPSTREAM, endpoint, body):  # type: ignore[arg-type]
            if chunk.startswith("data: {"):
                chunk = f"data: {json.dumps(self._tag(json.loads(chunk[6:])))}\n\n"
            yield chunk

    async def count_prompt_tokens(self, endpoint: str, body: dict[str, Any]) -> int:
        return count_words(body)

    def stats(self) -> dict[str, Any]:
        return {"replica": self.replica_id, "pid": os.getpid(), "in_flight": self.in_flight, "served": self.served}

    def metrics(self) -> str:
        return f'bastion_engine_in_flight{{replica="{self.replica_id}"}} {self.in_flight}\n'

    async def __del__(self) -> None:
        # Serve waits for ongoing requests before this; wait here too, as EngineDeployment's drain does.
        deadline = time.monotonic() + GRACEFUL_SHUTDOWN_S - 5
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)


def scripted_prompt_count(endpoint: str, body: dict[str, Any]) -> int:
    """The scripted engine's count as a gateway-side prompt counter (serve/prompt_count.py's signature)."""
    return count_words(body)


def scripted_engine_options(replicas: int, max_ongoing_requests: int) -> dict[str, Any]:
    """The product's deployment options (router, grace period, health checks) for the scripted engine."""
    options: dict[str, Any] = {
        "name": deployment_name(MODEL, PROFILE),
        "num_replicas": replicas,
        "max_ongoing_requests": max_ongoing_requests,
        "ray_actor_options": {"num_cpus": 0},
        "graceful_shutdown_timeout_s": GRACEFUL_SHUTDOWN_S,
        "health_check_period_s": HEALTH_CHECK_PERIOD_S,
        "request_router_config": request_router_config(),
    }
    return options


def scripted_gateway_app(
    config_path: str,
    *,
    replicas: int = 2,
    words: int = 16,
    token_delay_s: float = 0.0,
    max_ongoing_requests: int = 128,
):
    """The product's GatewayIngress (config from `config_path`) over one scripted engine deployment of
    `replicas` replicas (deploying it again rolls every replica: Serve versions imperative deploys itself)."""
    from bastion.serve.ingress import GatewayIngress

    options = scripted_engine_options(replicas, max_ongoing_requests)
    engine = ScriptedEngineDeployment.options(**options).bind(words, token_delay_s)
    info = {
        "name": options["name"],
        "model": MODEL,
        "profile": PROFILE,
        "max_context": MAX_CONTEXT,
        "max_ongoing_requests": max_ongoing_requests,
        "prompt_counter": scripted_prompt_count,  # the gateway counts as this engine does, without a handle call
    }
    gateway = GatewayIngress.options(ray_actor_options={"num_cpus": 0})
    return gateway.bind(config_path, [(info, engine)])


def scripted_platform_file(data_dir: str, database_url: str) -> dict[str, Any]:
    """A platform file for the scripted application: one model, served by the deep-context profile only."""
    return {
        "data_dir": data_dir,
        "database": {"url": database_url},
        "models": [{"name": MODEL, "source": "/nonexistent", "max_model_len": MAX_CONTEXT}],
        "profiles": {PROFILE: {}},
        "deployments": [{"model": MODEL, "profile": PROFILE}],
        "tenant_defaults": {
            "limits": {"requests_per_minute": 1_000_000, "tokens_per_minute": 100_000_000, "concurrent_requests": 1000},
            "allowed_profiles": [PROFILE],
            "default_profile": PROFILE,
        },
    }
