"""The fair queue's order: deficit round robin across tenants, weighted, with the bounds on length and wait."""

from __future__ import annotations

import asyncio

import pytest

from bastion.gateway.fair_queue import FairQueues, QueueFull


async def _order(weights: dict[str, float], arrivals: list[str]) -> list[str]:
    queues = FairQueues({"p": (100, 5.0)}, weights)
    queue = queues.get("m", "p")
    assert queue is not None
    served: list[str] = []

    async def one(tenant: str) -> None:
        await queue.wait(tenant, queues.weight(tenant))
        served.append(tenant)

    tasks = [asyncio.create_task(one(t)) for t in arrivals]
    await asyncio.sleep(0)  # all queued
    for _ in arrivals:
        assert queue.hand_over("u")
        await asyncio.sleep(0)
    await asyncio.gather(*tasks)
    assert not queue.hand_over("u") and queue.length == 0
    return served


async def test_a_flood_does_not_starve_a_later_tenant() -> None:
    served = await _order({}, ["a"] * 8 + ["b"] * 2)
    assert served[:4].count("b") == 2  # b's two requests start within the first two rounds, not after a's eight


async def test_weights_share_in_proportion() -> None:
    served = await _order({"a": 3}, ["a"] * 9 + ["b"] * 3)
    assert served[:8].count("a") == 6 and served[:8].count("b") == 2


async def test_bounds_on_length_and_wait() -> None:
    queues = FairQueues({"p": (1, 0.05), "off": (0, 1.0)})
    assert queues.get("m", "off") is None  # max_length 0: no queue, refused at once as before
    queue = queues.get("m", "p")
    assert queue is not None
    waiting = asyncio.create_task(queue.wait("a", 1.0))
    await asyncio.sleep(0)
    with pytest.raises(QueueFull, match="full"):
        await queue.wait("b", 1.0)
    with pytest.raises(QueueFull, match="within") as err:
        await waiting
    assert err.value.retry_after == 1 and queue.length == 0 and queues.depth() == {}


def test_the_tenant_records_weight_wins_over_the_platform_file() -> None:
    queues = FairQueues({"p": (10, 1.0)}, {"a": 3.0})
    assert queues.weight("a") == 3.0 and queues.weight("b") == 1.0  # the file's, else 1
    assert queues.weight("a", 0.5) == 0.5 and queues.weight("b", 7.0) == 7.0  # the record's, set in the console


async def test_the_snapshot_counts_waiting_and_recent_waits_per_tenant_and_profile() -> None:
    waited: list[tuple[str, str, float]] = []
    queues = FairQueues({"p": (10, 5.0)}, on_wait=lambda t, p, s: waited.append((t, p, s)))
    queue = queues.get("m", "p")
    assert queue is not None and queues.snapshot() == []
    first = asyncio.create_task(queue.wait("a", 2.0))
    second = asyncio.create_task(queue.wait("a", 2.0))
    await asyncio.sleep(0.05)
    (row,) = queues.snapshot()
    assert (row["tenant_id"], row["profile"], row["waiting"], row["weight"], row["waited"]) == ("a", "p", 2, 2.0, 0)
    assert row["mean_wait_s"] is None
    assert queue.hand_over("u1") and queue.hand_over("u2")
    assert await first == "u1" and await second == "u2"
    (row,) = queues.snapshot()
    assert (row["waiting"], row["waited"]) == (0, 2) and 0.04 <= row["mean_wait_s"] <= row["max_wait_s"] < 1
    assert [(t, p) for t, p, _ in waited] == [("a", "p"), ("a", "p")]  # the metric still sees every wait
