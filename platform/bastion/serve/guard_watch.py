"""The gateway's watch over the speculation guard verdicts of the engine replicas: each replica that fails its
guard becomes one audit event (`engine_guard`) and a count in the gateway's metrics.

The verdict is the replica's (engine/guard.py), which reports it in its routing stats; the audit log is the
gateway's (the engine knows no database), so the gateway, which sees every replica through Serve's routers
(serve/replica_registry.py), writes it. A deployment whose router this process has not made yet is asked for its
stats once through its handle, which makes the router.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from bastion.audit.events import EngineGuardEvent
from bastion.background import stop_task
from bastion.serve.replica_registry import live_replicas

log = logging.getLogger(__name__)
POLL_S = 5.0


class GuardWatch:
    def __init__(
        self,
        enqueue: Callable[[Any], None],
        upstreams: dict[str, tuple[dict[str, Any], Any]],
        live: Callable[[], dict[str, list[dict[str, Any]]]] = live_replicas,
    ) -> None:
        self.enqueue = enqueue
        self.upstreams = upstreams  # deployment name -> (upstream info, handle)
        self.live = live
        self.recorded: set[tuple[str, str]] = set()  # (deployment, replica) already audited
        self.failures: dict[str, int] = {}  # per deployment, for the gateway's metrics
        self._task: asyncio.Task | None = None

    def observe(self, deployment: str, replica: str, stats: dict[str, Any]) -> EngineGuardEvent | None:
        """One replica's latest stats; the audit event when its guard has failed and was not yet recorded."""
        guard = stats.get("guard") or {}
        if guard.get("state") != "failed" or (deployment, replica) in self.recorded:
            return None
        info = self.upstreams.get(deployment, ({}, None))[0]
        event = EngineGuardEvent(
            deployment=deployment,
            model=str(stats.get("model") or info.get("model") or ""),
            profile=str(stats.get("profile") or info.get("profile") or ""),
            replica=replica,
            trigger=guard.get("trigger"),
            reason=str(guard.get("reason") or "failed"),
            greedy_match=guard.get("greedy_match"),
            sampled_mean=dict(guard.get("sampled_mean") or {}),
            baseline_mean=dict(guard.get("baseline_mean") or {}),
            checked_at=guard.get("checked_at"),
        )
        self.recorded.add((deployment, replica))
        self.failures[deployment] = self.failures.get(deployment, 0) + 1
        try:
            self.enqueue(event)
        except Exception as exc:
            log.error("audit hand-off of a guard failure failed: %s", type(exc).__name__)
        log.error("speculation guard: replica %s of %s failed and left routing: %s", replica, deployment, event.reason)
        return event

    async def poll(self) -> None:
        live = self.live()
        for name, (_, handle) in self.upstreams.items():
            replicas = live.get(name)
            if not replicas:
                with contextlib.suppress(Exception):  # makes this process's router for the deployment
                    await asyncio.wait_for(handle.stats.remote(), POLL_S)
                continue
            for replica in replicas:
                self.observe(name, str(replica.get("replica")), replica.get("stats") or {})

    async def run(self) -> None:
        while True:
            try:
                await self.poll()
            except Exception as exc:
                log.warning("guard watch poll failed: %s", type(exc).__name__)
            await asyncio.sleep(POLL_S)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.run())

    async def stop(self) -> None:
        task, self._task = self._task, None
        await stop_task(task)
