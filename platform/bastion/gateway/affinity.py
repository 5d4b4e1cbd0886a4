"""Session affinity between upstreams of one profile (e.g. a Ray deployment and an external llama-server both
serving `fast-agentic`): a conversation keeps going to the upstream that holds its prefix cache while that
upstream is in rotation and has room. Inside a Ray deployment, serve/router.py does the same between replicas.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from bastion.gateway.engine_client import UpstreamInfo
from bastion.routing.replicas import ReplicaChooser, session_key


class UpstreamAffinity:
    def __init__(self, max_sessions: int = 100_000, session_ttl_s: float = 3600.0) -> None:
        self._chooser = ReplicaChooser(max_sessions=max_sessions, session_ttl_s=session_ttl_s)

    def narrow(
        self,
        upstreams: Sequence[UpstreamInfo],
        in_flight: Mapping[str, int],
        session_id: str | None,
        body: Mapping[str, Any],
    ) -> tuple[list[UpstreamInfo], str | None]:
        """The upstreams routing should consider, and the session key to `bind` afterwards.

        Only when a profile has several upstreams: the session's bound upstream, if listed and not full, is the
        only candidate of its profile (other profiles stay, so overflow still works)."""
        groups = {(u.model, u.profile) for u in upstreams}
        if len(groups) == len(upstreams):
            return list(upstreams), None
        key = session_key(session_id, body)
        bound = self._chooser.replica_for(key)
        sticky = next((u for u in upstreams if u.name == bound), None)
        if sticky is None or in_flight.get(sticky.name, 0) >= sticky.max_ongoing_requests:
            return list(upstreams), key
        same = (sticky.model, sticky.profile)
        return [u for u in upstreams if u is sticky or (u.model, u.profile) != same], key

    def bind(self, key: str | None, upstream: str) -> None:
        self._chooser.bind(key, upstream)

    def __len__(self) -> int:
        return len(self._chooser)
