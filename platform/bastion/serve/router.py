"""Ray Serve request router for engine deployments: session affinity, then power of two choices.

A thin adapter: the choice itself is `bastion.routing.replicas.ReplicaChooser` (pure, unit-tested); this class
hands it Serve's live replicas with their cached queue lengths and records where each request went. It runs in
every process that holds a handle to the deployment (the gateway ingress replicas), so each keeps its own
session table — affinity is per gateway replica, which is what keeps a conversation on one engine when one
gateway replica serves it.

The session key is the handle's `session_id` (`handle.options(session_id=...)`, the gateway passes
`X-Session-Id`), else a hash of the conversation's prefix found in the request's body argument.
Selected through the deployment option `request_router_config.request_router_class` as an import path string,
so the Serve config export and the Helm chart carry it as plain text.
"""

from __future__ import annotations

import logging
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, ReplicaResult, RequestRouter, RunningReplica

from bastion.routing.replicas import ReplicaChooser, ReplicaLoad, session_key
from bastion.serve import replica_registry

log = logging.getLogger(__name__)


def request_session_key(pending_request: PendingRequest | None) -> str | None:
    """The affinity key of a pending request: metadata.session_id, else the body's conversation prefix."""
    if pending_request is None:
        return None
    session_id = getattr(pending_request.metadata, "session_id", "") or pending_request.kwargs.get("session_id")
    body = pending_request.kwargs.get("body")
    if body is None:
        body = next((a for a in pending_request.args if isinstance(a, dict)), None)
    return session_key(session_id if isinstance(session_id, str) else None, body if isinstance(body, dict) else None)


def routable(replicas: list[RunningReplica]) -> list[RunningReplica]:
    """Leave out replicas whose last routing stats say they left routing (a failed speculation guard, a drain);
    when none is left, keep them all: the request then reaches a replica that refuses it at once, and the
    gateway fails over to another profile instead of waiting here."""
    keep = [r for r in replicas if (getattr(r, "routing_stats", None) or {}).get("routable", True) is not False]
    return keep or replicas


class SessionAffinityRouter(RequestRouter):
    """Sticky sessions while the replica is alive and has room; least outstanding requests otherwise."""

    def initialize_state(self, **kwargs: Any) -> None:
        # request_router_kwargs from the deployment's RequestRouterConfig (JSON values only).
        self.chooser = ReplicaChooser(**kwargs)
        self.last_reason: str | None = None

    def _ensure_chooser(self) -> ReplicaChooser:
        if not hasattr(self, "chooser"):  # Serve calls initialize_state; be safe if a version does not
            self.initialize_state()
        return self.chooser

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        chooser = self._ensure_chooser()
        candidate_replicas = routable(candidate_replicas)
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        loads = [
            ReplicaLoad(uid, self.replica_queue_len_cache.get(r.replica_id), r.max_ongoing_requests)
            for uid, r in by_id.items()
        ]
        choice = chooser.choose(loads, request_session_key(pending_request))
        self.last_reason = choice.reason
        if pending_request is not None:
            # Every rank has been offered once we return: let Serve back off before asking again, else it spins.
            pending_request.routing_context.should_backoff = True
        return [[by_id[uid] for uid in rank if uid in by_id] for rank in choice.ranks]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: ReplicaResult) -> None:
        self._ensure_chooser().bind(request_session_key(pending_request), replica_id.unique_id)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._ensure_chooser().forget_replica(replica_id.unique_id)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        # Serve calls this when the replica set or a replica's routing stats change; the registry (a module Serve
        # does not pickle by value) keeps this router for the gateway's live pool view.
        super().update_replicas(replicas)
        self._ensure_chooser().retain({r.replica_id.unique_id for r in replicas})
        deployment = getattr(self, "_deployment_id", None)
        if deployment is not None:
            replica_registry.register(deployment.name, self)
