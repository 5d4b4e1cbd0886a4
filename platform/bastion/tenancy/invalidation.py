"""Key-change notices over Redis pub/sub, so every gateway replica drops a revoked key at once.

The authenticator's TTL (≤ 1 s) is what guarantees revocation; a notice only shortens the delay to the
round trip. A listener that loses its connection clears the whole cache on reconnect (it may have missed
notices) and retries with backoff; it never blocks requests.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from redis.asyncio import Redis

from bastion.background import stop_task

CHANNEL = "bastion:keys:changed"
log = logging.getLogger(__name__)


def publisher(redis_url: str) -> Callable[[str], Awaitable[None]]:
    """A `notify` for KeyService: publishes the changed key's prefix."""

    async def notify(prefix: str) -> None:
        client = Redis.from_url(redis_url)
        try:
            await client.publish(CHANNEL, prefix)
        except Exception:  # the TTL still bounds the delay; a lost notice must not fail the admin action
            log.warning("could not publish key change for %s", prefix)
        finally:
            await client.aclose()

    return notify


class InvalidationListener:
    def __init__(self, redis_url: str, on_change: Callable[[str | None], None]) -> None:
        self._url = redis_url
        self._on_change = on_change
        self._task: asyncio.Task[None] | None = None
        self.ready = asyncio.Event()

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        task, self._task = self._task, None
        await stop_task(task)

    async def _run(self) -> None:
        delay = 0.2
        while True:
            client = Redis.from_url(self._url)
            try:
                async with client.pubsub() as pubsub:
                    await pubsub.subscribe(CHANNEL)
                    self._on_change(None)  # anything missed while disconnected
                    self.ready.set()
                    delay = 0.2
                    async for message in pubsub.listen():
                        if message.get("type") == "message":
                            data = message["data"]
                            self._on_change(data.decode() if isinstance(data, bytes) else str(data))
            except asyncio.CancelledError:
                raise
            except Exception:
                self.ready.clear()
                log.warning("key-change listener lost Redis; retrying in %.1f s", delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
            finally:
                await client.aclose()
