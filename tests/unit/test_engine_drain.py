"""Graceful drain: new requests are refused at once, in-flight ones get the grace period, then the engine stops."""

from __future__ import annotations

import asyncio

import pytest

from bastion.engine.engine_args import EngineSpec
from bastion.engine.replica import EngineReplica, ReplicaDraining

pytestmark = pytest.mark.unit


class _Engine:
    """Stands in for vLLM's AsyncLLM: only `shutdown` is used by drain."""

    def __init__(self) -> None:
        self.stopped_at: float | None = None

    def shutdown(self) -> None:
        self.stopped_at = asyncio.get_running_loop().time()


def _replica() -> tuple[EngineReplica, _Engine]:
    replica = EngineReplica(EngineSpec("m", "deep-context", "/nowhere", "m", 128))
    engine = _Engine()
    replica.engine = engine
    return replica, engine


async def test_drain_waits_for_in_flight_then_stops() -> None:
    replica, engine = _replica()
    loop = asyncio.get_running_loop()

    async def in_flight() -> float:
        with replica._tracked():
            await asyncio.sleep(0.3)
            return loop.time()

    request = asyncio.create_task(in_flight())
    await asyncio.sleep(0.05)
    drained = asyncio.create_task(replica.drain(grace_s=5))
    await asyncio.sleep(0.05)
    # refused while draining, so the gateway tries another replica
    with pytest.raises(ReplicaDraining), replica._tracked():
        pass
    finished_at = await request
    await drained
    assert engine.stopped_at is not None and engine.stopped_at >= finished_at
    assert replica.engine is None


async def test_drain_gives_up_after_the_grace_period() -> None:
    replica, engine = _replica()
    stuck = asyncio.Event()

    async def hung() -> None:
        with replica._tracked():
            await stuck.wait()

    task = asyncio.create_task(hung())
    await asyncio.sleep(0.01)
    started = asyncio.get_running_loop().time()
    await replica.drain(grace_s=0.2)
    assert 0.15 <= engine.stopped_at - started < 2
    stuck.set()
    await task
