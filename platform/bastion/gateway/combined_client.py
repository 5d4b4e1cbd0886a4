"""One EngineClient over several: the Ray deployments and the external replicas side by side, told apart by
upstream name. Routing sees one list, so an external replica of a profile is load-balanced, overflowed to and
failed over like a Ray replica of it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

from bastion.gateway.engine_client import Endpoint, EngineClient, UpstreamInfo, UpstreamResponse, UpstreamUnavailable


class CombinedEngineClient:
    """Ray upstreams first (token counting prefers the in-process tokenizer when a model is served in both)."""

    def __init__(self, clients: Sequence[EngineClient]) -> None:
        self.clients = list(clients)
        self._owner: dict[str, EngineClient] = {}

    def upstreams(self) -> list[UpstreamInfo]:
        out: list[UpstreamInfo] = []
        for client in self.clients:
            for info in client.upstreams():
                self._owner.setdefault(info.name, client)
                out.append(info)
        return out

    def _client(self, upstream: str) -> EngineClient:
        client = self._owner.get(upstream)
        if client is None:
            self.upstreams()
            client = self._owner.get(upstream)
        if client is None:
            raise UpstreamUnavailable(upstream)
        return client

    async def count_prompt_tokens(self, upstream: str, endpoint: Endpoint, body: dict[str, Any]) -> int:
        return await self._client(upstream).count_prompt_tokens(upstream, endpoint, body)

    async def complete(
        self, upstream: str, endpoint: Endpoint, body: dict[str, Any], *, session_id: str | None = None
    ) -> UpstreamResponse:
        return await self._client(upstream).complete(upstream, endpoint, body, session_id=session_id)

    async def stream(
        self, upstream: str, endpoint: Endpoint, body: dict[str, Any], *, session_id: str | None = None
    ) -> AsyncIterator[str]:
        events = self._client(upstream).stream(upstream, endpoint, body, session_id=session_id)
        try:
            async for event in events:
                yield event
        finally:  # a client that went away frees the upstream's connection now, not at garbage collection
            close = getattr(events, "aclose", None)
            if close is not None:
                await close()

    async def engine_metrics(self) -> list[tuple[UpstreamInfo, str]]:
        out: list[tuple[UpstreamInfo, str]] = []
        for client in self.clients:
            out.extend(await client.engine_metrics())
        return out

    async def aclose(self) -> None:
        for client in self.clients:
            await client.aclose()


def with_external(client: EngineClient, external: Any) -> EngineClient:
    """`client` alone when there are no external replicas, else both behind one CombinedEngineClient."""
    return client if external is None else CombinedEngineClient([client, external])
