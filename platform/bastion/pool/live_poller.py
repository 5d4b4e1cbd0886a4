"""Live replica statistics for the pool view: polled from the gateway's internal endpoint (bastion.pool.live_stats).

The control plane runs outside Ray, so it reads what the gateway's Serve routers know of each engine replica:
cumulative vLLM counters stamped with the replica's clock. Rates (tok/s, acceptance over the last interval) are
differences of two samples of the same replica. A short history per profile stays in memory (per control-plane
replica, lost on restart) for the console's "acceptance over time" chart; daily history comes from the usage
counters in the database (control/pool_view.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import httpx

from bastion.background import stop_task
from bastion.pool.live_stats import ReplicaStats

log = logging.getLogger(__name__)


@dataclass
class _Replica:
    """The last distinct sample of one replica and the rates derived from the one before it."""

    sample: dict[str, Any]
    tok_s: float | None = None
    draft_delta: int = 0
    accepted_delta: int = 0


def _speculation(stats: dict[str, Any]) -> tuple[int, int]:
    spec = stats.get("speculation") or {}
    return int(spec.get("draft_tokens") or 0), int(spec.get("accepted_tokens") or 0)


class PoolStatsPoller:
    """A ReplicaStatsProvider over HTTP; `run()` polls every `interval_s` to keep the history going."""

    def __init__(
        self,
        url: str,
        token: str,
        *,
        interval_s: float = 5.0,
        history: int = 720,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self.url = url
        self.interval_s = interval_s
        self._headers = {"Authorization": f"Bearer {token}"}
        self._client = client or httpx.AsyncClient(timeout=httpx.Timeout(5.0))
        self._replicas: dict[tuple[str, str], _Replica] = {}
        self._latest: list[ReplicaStats] = []
        self._status: dict[str, dict[str, Any]] = {}
        self._queues: list[dict[str, Any]] = []
        self._polled_at = 0.0
        self._lock = asyncio.Lock()
        self.samples: deque[dict[str, Any]] = deque(maxlen=history)
        self.last_error: str | None = None
        self._task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:  # the token must not reach a log line
        return f"PoolStatsPoller(url={self.url!r})"

    async def __call__(self) -> list[ReplicaStats]:
        """The latest stats, polled now when older than the interval (a page view between two polls)."""
        async with self._lock:
            if time.monotonic() - self._polled_at >= self.interval_s:
                await self._poll()
        if self.last_error is not None:  # the background poll just failed: say so rather than show stale rows
            raise ConnectionError(f"pool stats unavailable: {self.last_error}")
        return list(self._latest)

    def queues(self) -> list[dict[str, Any]]:
        """The polled gateway replica's fair queues per tenant and profile (waiting, weight, recent waits)."""
        return list(self._queues)

    def deployment_status(self) -> dict[str, dict[str, Any]]:
        """Serve's status per deployment (`model@profile`): status and replicas per state."""
        return dict(self._status)

    def history(self) -> dict[str, Any]:
        """Per profile: tok/s and acceptance over the last interval, one point per poll (oldest first)."""
        samples = list(self.samples)
        profiles = sorted({p for s in samples for p in s["profiles"]})
        return {
            "interval_s": self.interval_s,
            "at": [s["at"] for s in samples],
            "profiles": {
                p: {
                    "tok_s": [s["profiles"].get(p, {}).get("tok_s") for s in samples],
                    "acceptance_rate": [s["profiles"].get(p, {}).get("acceptance_rate") for s in samples],
                }
                for p in profiles
            },
        }

    async def poll_once(self) -> list[ReplicaStats]:
        async with self._lock:
            await self._poll()
        return list(self._latest)

    async def _poll(self) -> None:
        self._polled_at = time.monotonic()
        try:
            response = await self._client.get(self.url, headers=self._headers)
            response.raise_for_status()
            body = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            self.last_error = type(exc).__name__
            self._latest, self._status, self._queues = [], {}, []  # nothing stale while the gateway is away
            raise
        self.last_error = None
        self._absorb(body)

    def _absorb(self, body: dict[str, Any]) -> None:
        seen: set[tuple[str, str]] = set()
        latest: list[ReplicaStats] = []
        status: dict[str, dict[str, Any]] = {}
        per_profile: dict[str, dict[str, float]] = {}
        for serve_name, dep in (body.get("deployments") or {}).items():
            for entry in dep.get("replicas") or []:
                key = (serve_name, str(entry.get("replica")))
                seen.add(key)
                stats = entry.get("stats") or {}
                replica = self._update(key, stats)
                row = _row(serve_name, entry, stats, replica)
                latest.append(row)
                status.setdefault(row.deployment, {k: v for k, v in dep.items() if k != "replicas"})
                agg = per_profile.setdefault(row.profile or "-", {"tok_s": 0.0, "draft": 0, "accepted": 0})
                agg["tok_s"] += replica.tok_s or 0.0
                agg["draft"] += replica.draft_delta
                agg["accepted"] += replica.accepted_delta
        for key in set(self._replicas) - seen:  # replicas Serve no longer routes to
            del self._replicas[key]
        self._latest, self._status = latest, status
        self._queues = [q for q in body.get("queues") or [] if isinstance(q, dict)]
        profiles = {
            p: {"tok_s": a["tok_s"], "acceptance_rate": a["accepted"] / a["draft"] if a["draft"] else None}
            for p, a in per_profile.items()
        }
        self.samples.append({"at": float(body.get("collected_at") or time.time()), "profiles": profiles})

    def _update(self, key: tuple[str, str], stats: dict[str, Any]) -> _Replica:
        known = self._replicas.get(key)
        if known is None or not stats:
            known = self._replicas[key] = _Replica(stats)
            return known
        before, now = known.sample, stats
        tokens = int(now.get("generation_tokens") or 0) - int(before.get("generation_tokens") or 0)
        (d0, a0), (d1, a1) = _speculation(before), _speculation(now)
        if tokens < 0 or d1 < d0:  # the replica restarted under the same id: start over
            self._replicas[key] = _Replica(stats)
            return self._replicas[key]
        elapsed = float(now.get("time") or 0) - float(before.get("time") or 0)
        if elapsed <= 0:  # Serve has not collected a newer sample: keep the last rates
            return known
        known.sample, known.tok_s = now, tokens / elapsed
        known.draft_delta, known.accepted_delta = d1 - d0, a1 - a0
        return known

    # --- background polling -----------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name="pool-stats-poller")

    async def run(self) -> None:
        reported: str | None = None
        while True:
            try:
                await self.poll_once()
                if reported is not None:
                    log.info("pool stats from %s available again", self.url)
                reported = None
            except Exception as exc:  # the gateway restarting or not yet up: try again next interval
                if type(exc).__name__ != reported:  # once per kind of failure, not every interval
                    reported = type(exc).__name__
                    log.warning("pool stats from %s unavailable: %s", self.url, reported)
            await asyncio.sleep(self.interval_s)

    async def aclose(self) -> None:
        task, self._task = self._task, None
        await stop_task(task)
        await self._client.aclose()


def _row(serve_name: str, entry: dict[str, Any], stats: dict[str, Any], replica: _Replica) -> ReplicaStats:
    model, profile = stats.get("model"), stats.get("profile")
    draft, accepted = _speculation(stats)
    waiting = stats.get("requests_waiting")
    return ReplicaStats(
        deployment=f"{model}@{profile}" if model and profile else serve_name,
        replica=str(entry.get("replica")),
        healthy=not stats.get("draining", False),  # Serve routes only to replicas that pass health checks
        queue_depth=int(waiting) if waiting is not None else entry.get("queue_len"),
        tok_s=replica.tok_s,
        acceptance_rate=accepted / draft if draft else None,
        profile=profile,
        serve_deployment=serve_name,
        in_flight=stats.get("in_flight"),
        requests_finished=stats.get("requests_finished"),
        generation_tokens=stats.get("generation_tokens"),
        draft_tokens=draft if stats else None,
        accepted_tokens=accepted if stats else None,
    )
