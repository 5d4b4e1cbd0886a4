"""Health of an upstream Bastion does not run (an external replica): in rotation, or ejected until its health
check passes again. Pure state; the gateway's external client feeds it probe results and request failures, and
the console probes once per page with `probe`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from bastion.config.external import ExternalReplicaConfig

IN_ROTATION, EJECTED, UNKNOWN = "healthy", "ejected", "unknown"


@dataclass
class HealthState:
    """`failures_to_eject` failed probes in a row take the upstream out; `successes_to_restore` passing probes
    in a row put it back. A request that cannot even connect ejects it at once (`eject`)."""

    failures_to_eject: int = 2
    successes_to_restore: int = 1
    healthy: bool | None = None  # None: not probed yet (kept in rotation: the first probe runs at start)
    failures: int = 0
    successes: int = 0
    reason: str | None = None  # why it was ejected: an exception type or an HTTP status, never a URL or a key
    changed_at: float = 0.0
    clock: Callable[[], float] = time.monotonic

    @property
    def in_rotation(self) -> bool:
        return self.healthy is not False

    @property
    def state(self) -> str:
        return UNKNOWN if self.healthy is None else IN_ROTATION if self.healthy else EJECTED

    def observe(self, ok: bool, reason: str | None = None) -> bool:
        """Account for one probe; True when the upstream entered or left rotation."""
        if ok:
            self.failures, self.successes = 0, self.successes + 1
            if self.healthy is not True and (self.healthy is None or self.successes >= self.successes_to_restore):
                return self._set(True, None)
            return False
        self.successes, self.failures = 0, self.failures + 1
        if self.healthy is not False and self.failures >= self.failures_to_eject:
            return self._set(False, reason)
        if self.healthy is None:
            return self._set(False, reason)  # never seen alive: out until a probe passes
        return False

    def eject(self, reason: str) -> bool:
        self.successes = 0
        self.failures = max(self.failures, self.failures_to_eject)
        return self._set(False, reason) if self.healthy is not False else False

    def _set(self, healthy: bool, reason: str | None) -> bool:
        self.healthy, self.reason, self.changed_at = healthy, reason, self.clock()
        return True


async def probe(
    client: httpx.AsyncClient, url: str, timeout_s: float, headers: Mapping[str, str] | None = None
) -> tuple[bool, str | None]:
    """One health check: (passed, reason). The reason names the failure's kind only (safe to show and log)."""
    try:
        response = await asyncio.wait_for(client.get(url, headers=headers, timeout=timeout_s), timeout_s + 0.1)
    except (httpx.HTTPError, TimeoutError, OSError) as exc:
        return False, type(exc).__name__
    if 200 <= response.status_code < 300:
        return True, None
    return False, f"HTTP {response.status_code}"


async def probe_all(replicas: Sequence[ExternalReplicaConfig]) -> list[dict[str, Any]]:
    """One health check of each external replica, concurrently (the console's pool page): name, model, profile,
    kind, state and reason; never the URL's credentials or the key."""
    if not replicas:
        return []

    async def one(client: httpx.AsyncClient, cfg: ExternalReplicaConfig) -> dict[str, Any]:
        try:
            key = cfg.read_api_key()
        except ValueError:
            ok, reason = False, "api key unavailable"
        else:
            headers = {"authorization": f"Bearer {key}"} if key else None
            ok, reason = await probe(client, cfg.health_url, cfg.health.timeout_s, headers)
        return {
            "name": cfg.name,
            "model": cfg.model,
            "profile": cfg.profile,
            "kind": cfg.kind,
            "endpoint": cfg.root_url,
            "max_context": cfg.max_context,
            "max_ongoing_requests": cfg.max_ongoing_requests,
            "state": IN_ROTATION if ok else EJECTED,
            "reason": reason,
        }

    async with httpx.AsyncClient(trust_env=False) as client:
        return list(await asyncio.gather(*(one(client, cfg) for cfg in replicas)))
