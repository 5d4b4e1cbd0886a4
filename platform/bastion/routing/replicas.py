"""Replica choice within a profile: session affinity while the replica is healthy, else least outstanding
requests by power of two choices.

Why affinity: a conversation's next turn shares its prefix with the last one, and vLLM's prefix cache holds that
prefix only on the replica that served it; sending the turn elsewhere recomputes the whole context. Why power
of two choices: comparing two random replicas gets close to "least loaded" without probing every replica, and
avoids every router herding onto the same one.

Pure logic, no Ray: the Serve adapter (`bastion.serve.router`) feeds it the live replicas and the queue
lengths Serve has cached, and tells it which replica a request went to.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

SESSION_HEADER = "x-session-id"


@dataclass(frozen=True)
class ReplicaLoad:
    """A live replica: its id, the requests it is working on (None: not known yet) and its limit."""

    replica_id: str
    queue_len: int | None
    max_ongoing_requests: int

    @property
    def saturated(self) -> bool:
        return self.queue_len is not None and self.queue_len >= self.max_ongoing_requests

    @property
    def load(self) -> float:
        return (self.queue_len or 0) / max(self.max_ongoing_requests, 1)


@dataclass(frozen=True)
class ReplicaChoice:
    """Replicas to try, best first, one list per rank (Serve tries a rank, then the next); `reason` says why."""

    ranks: tuple[tuple[str, ...], ...]
    reason: str  # "affinity" | "affinity:saturated" | "failover" | "least_loaded"

    @property
    def first(self) -> str | None:
        return self.ranks[0][0] if self.ranks and self.ranks[0] else None


def session_key(session_id: str | None = None, body: Mapping[str, Any] | None = None) -> str | None:
    """The affinity key of a request: the client's session id, else a hash of the conversation's prefix
    (a chat's messages up to its first user turn, which every later turn repeats; or the start of a completion
    prompt); None when neither is there."""
    if session_id:
        return "s:" + session_id
    if not body:
        return None
    messages = body.get("messages")
    if isinstance(messages, list) and messages:
        first_user = next(
            (i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "user"), len(messages) - 1
        )
        prefix: Any = messages[: first_user + 1]
    elif isinstance(body.get("prompt"), str) and body["prompt"]:
        prefix = body["prompt"][:2048]
    else:
        return None
    data = json.dumps([body.get("model"), prefix], sort_keys=True, default=str).encode()
    return "p:" + hashlib.sha256(data).hexdigest()[:32]


class ReplicaChooser:
    """Remembers which replica serves each session (bounded, least recently used first out; entries expire)."""

    def __init__(
        self,
        *,
        max_sessions: int = 100_000,
        session_ttl_s: float = 3600.0,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._sessions: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self.max_sessions = max_sessions
        self.session_ttl_s = session_ttl_s
        self._rng = rng or random.Random()
        self._clock = clock

    def replica_for(self, session: str | None) -> str | None:
        if session is None:
            return None
        entry = self._sessions.get(session)
        if entry is None:
            return None
        replica, at = entry
        if self._clock() - at > self.session_ttl_s:
            del self._sessions[session]
            return None
        return replica

    def choose(self, replicas: Sequence[ReplicaLoad], session: str | None = None) -> ReplicaChoice:
        """Rank the live replicas for one request.

        A session bound to a live replica goes there first (its other ranks let Serve fall back when the replica
        turns the request away because it is full); a session whose replica is gone fails over to the least
        loaded of two random replicas; everything after the first rank is the rest, least loaded first."""
        if not replicas:
            return ReplicaChoice((), "no_replicas")
        by_id = {r.replica_id: r for r in replicas}
        bound = self.replica_for(session)
        if bound is not None and bound in by_id:
            rest = self._least_loaded([r for r in replicas if r.replica_id != bound])
            sticky = by_id[bound]
            if not sticky.saturated:
                return ReplicaChoice(self._nonempty((bound,), rest), "affinity")
            # Full: do not queue behind it; it stays bound and is tried last.
            pair = self._two_choices([r for r in replicas if r.replica_id != bound])
            others = tuple(i for i in rest if i not in pair)
            return ReplicaChoice(self._nonempty(pair, others, (bound,)), "affinity:saturated")
        reason = "failover" if bound is not None else "least_loaded"
        if bound is not None:
            self.forget_session(session)  # type: ignore[arg-type]
        pair = self._two_choices(list(replicas))
        rest = tuple(i for i in self._least_loaded(list(replicas)) if i not in pair)
        return ReplicaChoice(self._nonempty(pair, rest), reason)

    def bind(self, session: str | None, replica_id: str) -> None:
        """Record where a session's request went, so its next request follows it."""
        if session is None:
            return
        self._sessions[session] = (replica_id, self._clock())
        self._sessions.move_to_end(session)
        while len(self._sessions) > self.max_sessions:
            self._sessions.popitem(last=False)

    def forget_session(self, session: str) -> None:
        self._sessions.pop(session, None)

    def forget_replica(self, replica_id: str) -> None:
        """A replica died: its sessions fail over on their next request (dropped now to free memory)."""
        for session in [s for s, (r, _) in self._sessions.items() if r == replica_id]:
            del self._sessions[session]

    def retain(self, live: set[str]) -> None:
        for session in [s for s, (r, _) in self._sessions.items() if r not in live]:
            del self._sessions[session]

    def __len__(self) -> int:
        return len(self._sessions)

    # --- power of two choices ----------------------------------------------------------------------------

    def _two_choices(self, replicas: list[ReplicaLoad]) -> tuple[str, ...]:
        """Two random replicas, the less loaded first (ties broken by the draw): the classic d = 2 choice."""
        if len(replicas) <= 1:
            return tuple(r.replica_id for r in replicas)
        a, b = self._rng.sample(replicas, 2)
        if (b.saturated, b.load) < (a.saturated, a.load):
            a, b = b, a
        return (a.replica_id, b.replica_id)

    @staticmethod
    def _least_loaded(replicas: list[ReplicaLoad]) -> tuple[str, ...]:
        return tuple(r.replica_id for r in sorted(replicas, key=lambda r: (r.saturated, r.load, r.replica_id)))

    @staticmethod
    def _nonempty(*ranks: tuple[str, ...]) -> tuple[tuple[str, ...], ...]:
        return tuple(rank for rank in ranks if rank)
