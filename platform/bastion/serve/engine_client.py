"""The gateway's EngineClient over Ray Serve handles to EngineDeployments."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from bastion.engine.replica import ReplicaDraining, error_body
from bastion.gateway.upstream import Endpoint, UpstreamInfo, UpstreamResponse, UpstreamUnavailable

log = logging.getLogger(__name__)
# A replica that is gone, draining or overloaded: the request can go elsewhere (or get a 503 with a retry hint).
_UNAVAILABLE = (ActorDiedError, ActorUnavailableError, RayActorError, BackPressureError, DeploymentUnavailableError)


def _unavailable(exc: BaseException) -> bool:
    if isinstance(exc, _UNAVAILABLE):
        return True
    return isinstance(exc, RayTaskError) and isinstance(exc.cause, ReplicaDraining)


class RayEngineClient:
    def __init__(self, upstreams: list[tuple[UpstreamInfo, DeploymentHandle]]) -> None:
        self._infos = [info for info, _ in upstreams]
        self._handles = {info.name: handle for info, handle in upstreams}
        self._streaming = {name: h.options(stream=True) for name, h in self._handles.items()}

    def upstreams(self) -> list[UpstreamInfo]:
        return list(self._infos)

    def _handle(self, upstream: str) -> DeploymentHandle:
        try:
            return self._handles[upstream]
        except KeyError:
            raise UpstreamUnavailable(f"no deployment {upstream}") from None

    async def count_prompt_tokens(self, upstream: str, endpoint: Endpoint, body: dict[str, Any]) -> int:
        try:
            return await self._handle(upstream).count_prompt_tokens.remote(endpoint, body)
        except Exception as exc:
            if _unavailable(exc):
                raise UpstreamUnavailable(upstream) from None
            raise

    async def complete(self, upstream: str, endpoint: Endpoint, body: dict[str, Any]) -> UpstreamResponse:
        try:
            status, data = await self._handle(upstream).complete.remote(endpoint, body)
        except Exception as exc:
            if _unavailable(exc):
                raise UpstreamUnavailable(upstream) from None
            log.error("engine %s failed: %s", upstream, type(exc).__name__)
            return UpstreamResponse(503, error_body(503, "The engine failed; retry the request", "engine_error"))
        return UpstreamResponse(status, data)

    async def engine_metrics(self) -> list[tuple[UpstreamInfo, str]]:
        """Each deployment's Prometheus text (one replica per deployment answers); unreachable ones are left out."""
        out = []
        for info in self._infos:
            try:
                out.append((info, await self._handles[info.name].metrics.remote()))
            except Exception as exc:
                log.warning("metrics of %s unavailable: %s", info.name, type(exc).__name__)
        return out

    async def stream(self, upstream: str, endpoint: Endpoint, body: dict[str, Any]) -> AsyncIterator[str]:
        if upstream not in self._streaming:
            raise UpstreamUnavailable(f"no deployment {upstream}")
        started = False
        try:
            async for chunk in self._streaming[upstream].stream.remote(endpoint, body):
                started = True
                yield chunk
        except Exception as exc:
            if not started and _unavailable(exc):
                raise UpstreamUnavailable(upstream) from None
            log.error("engine %s failed mid-stream: %s", upstream, type(exc).__name__)
            error = error_body(503, "The engine failed mid-stream; retry the request", "engine_error")
            yield f"data: {json.dumps(error)}\n\ndata: [DONE]\n\n"
