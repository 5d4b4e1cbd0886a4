"""The Ray Serve deployment around EngineReplica: Serve owns placement, health and restarts; the replica owns vLLM."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from bastion.engine.engine_args import EngineSpec
from bastion.engine.replica import EngineReplica
from bastion.engine.tracing import ReplicaTracing
from bastion.gateway.engine_client import replica_notice
from bastion.serve.options import GRACEFUL_SHUTDOWN_S


@serve.deployment
class EngineDeployment:
    """Ready only once the model is loaded: Serve routes to a replica after `__init__` returns."""

    async def __init__(self, spec: EngineSpec, telemetry: dict[str, Any] | None = None) -> None:
        self.replica = await EngineReplica.create(spec)
        # telemetry: the platform file's section (serve/app.py passes it); else OTEL_EXPORTER_OTLP_ENDPOINT, if set.
        telemetry = telemetry or {}
        self.replica.tracing = ReplicaTracing.create(
            telemetry.get("otlp_endpoint"), f"{telemetry.get('service_name', 'bastion')}-engine"
        )
        # Serve's id of this replica (the suffix of its actor name): each answer names it, so the gateway records
        # which replica served a request, whichever the router and its retries picked.
        self.replica_id = serve.get_replica_context().replica_id.unique_id

    async def complete(self, endpoint: str, body: dict[str, Any]) -> tuple[int, dict[str, Any], str]:
        status, data = await self.replica.complete(endpoint, body)  # type: ignore[arg-type]
        return status, data, self.replica_id

    async def stream(self, endpoint: str, body: dict[str, Any]) -> AsyncIterator[str]:
        yield replica_notice(self.replica_id)
        async for chunk in self.replica.stream(endpoint, body):  # type: ignore[arg-type]
            yield chunk

    async def count_prompt_tokens(self, endpoint: str, body: dict[str, Any]) -> int:
        return await self.replica.count_prompt_tokens(endpoint, body)  # type: ignore[arg-type]

    def stats(self) -> dict[str, Any]:
        return self.replica.stats()

    def record_routing_stats(self) -> dict[str, Any]:
        """Serve's controller calls this every `request_routing_stats_period_s` and hands the result to every
        router of this deployment (`RunningReplica.routing_stats`): the gateway's live view of each replica."""
        return self.replica.stats()

    def metrics(self) -> str:
        """Prometheus text of this replica: vLLM's registry in this process plus the replica's load."""
        return self.replica.metrics()

    async def guard_check(self) -> dict[str, Any]:
        """A speculation guard round now on this replica; its verdict (a failure takes the replica out)."""
        return await self.replica.guard_check("manual")

    async def check_health(self) -> None:
        await self.replica.check_health()

    async def __del__(self) -> None:
        # Serve stops sending new requests first; in-flight streams get the grace period to finish.
        await self.replica.drain(GRACEFUL_SHUTDOWN_S - 5)
        if self.replica.tracing is not None:
            self.replica.tracing.shutdown()
