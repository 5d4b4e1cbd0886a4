"""The gateway's EngineClient over Ray Serve handles to EngineDeployments."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from bastion.engine.replica import ReplicaDraining
from bastion.gateway.engine_client import (
    Endpoint,
    UpstreamInfo,
    UpstreamResponse,
    UpstreamUnavailable,
    notice_replica,
)
from bastion.gateway.errors import error_body

log = logging.getLogger(__name__)
# A replica that is gone, draining or overloaded: the request can go elsewhere (or get a 503 with a retry hint).
_UNAVAILABLE = (ActorDiedError, ActorUnavailableError, RayActorError, BackPressureError, DeploymentUnavailableError)
# The replica's process died (or became unreachable) while it held the request: the work is lost, not refused.
_DIED = (ActorDiedError, ActorUnavailableError, RayActorError)


def _unavailable(exc: BaseException) -> bool:
    if isinstance(exc, _UNAVAILABLE):
        return True
    return isinstance(exc, RayTaskError) and isinstance(exc.cause, ReplicaDraining)


# A local prompt counter (serve/prompt_count.py): the count, or None when the engine must count.
PromptCounter = Callable[[Endpoint, dict[str, Any]], "int | None"]


class RayEngineClient:
    def __init__(
        self,
        upstreams: list[tuple[UpstreamInfo, DeploymentHandle]],
        counters: dict[str, PromptCounter] | None = None,
    ) -> None:
        self._counters = counters or {}  # per deployment: counts in this process, saving a handle call
        self._infos = [info for info, _ in upstreams]
        self._handles = {info.name: handle for info, handle in upstreams}
        self._streaming = {name: h.options(stream=True) for name, h in self._handles.items()}

    def upstreams(self) -> list[UpstreamInfo]:
        return list(self._infos)

    def _handle(self, upstream: str, session_id: str | None = None, *, stream: bool = False) -> DeploymentHandle:
        """The deployment's handle; with a session id, one that tells Serve's router the session (affinity)."""
        handles = self._streaming if stream else self._handles
        try:
            handle = handles[upstream]
        except KeyError:
            raise UpstreamUnavailable(f"no deployment {upstream}") from None
        return handle.options(session_id=session_id) if session_id else handle

    async def count_prompt_tokens(self, upstream: str, endpoint: Endpoint, body: dict[str, Any]) -> int:
        counter = self._counters.get(upstream)
        if counter is not None and upstream in self._handles:
            try:
                counted = counter(endpoint, body)
            except Exception:  # the engine's own count says what is wrong
                counted = None
            if counted is not None:
                return counted
        try:
            return await self._handle(upstream).count_prompt_tokens.remote(endpoint, body)
        except Exception as exc:
            if _unavailable(exc):
                raise UpstreamUnavailable(upstream) from None
            raise

    async def complete(
        self, upstream: str, endpoint: Endpoint, body: dict[str, Any], *, session_id: str | None = None
    ) -> UpstreamResponse:
        try:
            status, data, replica = await self._handle(upstream, session_id).complete.remote(endpoint, body)
        except Exception as exc:
            if _unavailable(exc) and not isinstance(exc, _DIED):
                raise UpstreamUnavailable(upstream) from None
            log.error("engine %s failed: %s", upstream, type(exc).__name__)
            message = "The engine failed while serving the request; retry it"
            return UpstreamResponse(503, error_body(503, message, code="engine_error"))
        return UpstreamResponse(status, data, replica)

    async def engine_metrics(self) -> list[tuple[UpstreamInfo, str]]:
        """Each deployment's Prometheus text (one replica per deployment answers); unreachable ones are left out."""
        out = []
        for info in self._infos:
            try:
                out.append((info, await self._handles[info.name].metrics.remote()))
            except Exception as exc:
                log.warning("metrics of %s unavailable: %s", info.name, type(exc).__name__)
        return out

    async def aclose(self) -> None:
        """Nothing to release: Serve owns the handles."""

    async def stream(
        self, upstream: str, endpoint: Endpoint, body: dict[str, Any], *, session_id: str | None = None
    ) -> AsyncIterator[str]:
        handle = self._handle(upstream, session_id, stream=True)
        started = False  # a token has gone out: from then on a failure is an error event, not a retry elsewhere
        try:
            async for chunk in handle.stream.remote(endpoint, body):
                started = started or notice_replica(chunk) is None
                yield chunk
        except Exception as exc:
            if not started and _unavailable(exc):
                raise UpstreamUnavailable(upstream) from None
            log.error("engine %s failed mid-stream: %s", upstream, type(exc).__name__)
            error = error_body(503, "The engine failed mid-stream; retry the request", code="engine_error")
            yield f"data: {json.dumps(error)}\n\ndata: [DONE]\n\n"
