"""Background tasks stop when told, whatever moment the stop arrives (the hang of issue 17: the key-change
listener swallowed its cancellation inside redis-py's connect, on Python 3.11, and `aclose` waited for ever)."""

from __future__ import annotations

import asyncio
import random

import pytest

from bastion.tenancy.invalidation import InvalidationListener

pytestmark = pytest.mark.integration


async def test_the_key_change_listener_stops_at_any_moment(redis_url: str) -> None:
    """Stops at 150 random points of its life (connecting, subscribing, listening) on a real Redis. Before the
    fix this hung within a few dozen tries."""
    rng = random.Random(7)
    loop = asyncio.get_running_loop()
    slowest = 0.0
    for _ in range(150):
        listener = InvalidationListener(redis_url, lambda _prefix: None)
        listener.start()
        task = listener._task
        await asyncio.sleep(rng.choice([0, 0, 0.0005, 0.001, 0.002, 0.005, rng.uniform(0, 0.02)]))
        started = loop.time()
        await asyncio.wait_for(listener.stop(), 15)
        slowest = max(slowest, loop.time() - started)
        assert task is not None and task.done()
    assert slowest < 5.0
