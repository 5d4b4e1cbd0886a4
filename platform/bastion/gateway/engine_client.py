"""What the gateway needs from the engines: the one seam between the data plane and the replicas.

`serve/` implements it with Ray Serve handles to EngineReplica deployments; tests use in-process engines or a
scripted one. The gateway never imports `engine` or Ray.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal, Protocol

Endpoint = Literal["chat", "completion", "messages"]


@dataclass(frozen=True)
class UpstreamInfo:
    """One engine deployment as the gateway sees it: a model served under a profile."""

    name: str  # the deployment name, e.g. "engine-smollm2-135m--fast-agentic"
    model: str  # the served model name, e.g. "smollm2-135m"
    profile: str  # e.g. "fast-agentic"
    max_context: int  # prompt + completion tokens one request may use
    max_ongoing_requests: int


@dataclass(frozen=True)
class UpstreamResponse:
    """A non-streaming answer: the OpenAI JSON body, or an OpenAI error body with its HTTP status."""

    status: int
    body: dict[str, Any]
    replica: str | None = None  # the replica that answered, when the upstream says


# A stream may open with this SSE comment naming the replica that took it (SSE clients ignore comments; the
# gateway reads and drops it). One convention for every upstream kind, so streams need no side channel.
REPLICA_NOTICE = ": bastion-replica "


def replica_notice(replica_id: str) -> str:
    return f"{REPLICA_NOTICE}{replica_id}\n\n"


def notice_replica(event: str) -> str | None:
    """The replica id if `event` is a replica notice, else None."""
    return event[len(REPLICA_NOTICE) :].strip() if event.startswith(REPLICA_NOTICE) else None


class UpstreamUnavailable(Exception):
    """No replica of the deployment could take the request (dead, draining, or not deployed)."""


class EngineClient(Protocol):
    def upstreams(self) -> list[UpstreamInfo]: ...

    async def count_prompt_tokens(self, upstream: str, endpoint: Endpoint, body: dict[str, Any]) -> int:
        """Prompt tokens as the model's tokenizer and chat template count them (charged at admission)."""
        ...

    async def complete(
        self, upstream: str, endpoint: Endpoint, body: dict[str, Any], *, session_id: str | None = None
    ) -> UpstreamResponse:
        """`session_id` (the client's X-Session-Id) keeps a conversation on one replica while it is healthy."""
        ...

    def stream(
        self, upstream: str, endpoint: Endpoint, body: dict[str, Any], *, session_id: str | None = None
    ) -> AsyncIterator[str]:
        """Server-sent event lines as vLLM writes them (`data: {...}\\n\\n`, ending with `data: [DONE]\\n\\n`),
        optionally opened by a replica notice (`replica_notice`).

        With `stream_options.include_usage` the last JSON chunk carries `usage` and, for speculative
        profiles, `metrics.speculative_decoding`. Errors mid-stream arrive as a `data: {"error": ...}` event.
        """
        ...

    async def engine_metrics(self) -> list[tuple[UpstreamInfo, str]]:
        """Each upstream's own Prometheus text (vLLM's counters), for the gateway's `/metrics/engines`; an
        unreachable upstream is left out, and a client whose engines keep no metrics returns []."""
        ...

    async def aclose(self) -> None:
        """Release what the client holds (connections, health checks); a client that holds nothing does nothing."""
        ...
