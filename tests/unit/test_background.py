"""stop_task: a task that ignores a cancellation is cancelled again; the caller's own cancellation is kept."""

from __future__ import annotations

import asyncio

import pytest

from bastion.background import stop_task

pytestmark = pytest.mark.unit


async def test_a_task_that_swallows_one_cancellation_is_stopped() -> None:
    swallowed = 0

    async def stubborn() -> None:  # what asyncio.wait_for does on Python 3.11 when its inner call just finished
        nonlocal swallowed
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            swallowed += 1
        await asyncio.sleep(60)  # listening for ever, as the key-change listener did

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    await asyncio.wait_for(stop_task(task, patience_s=0.05), 5)
    assert task.cancelled() and swallowed == 1


async def test_the_callers_cancellation_is_not_swallowed() -> None:
    async def slow_to_stop() -> None:
        try:
            await asyncio.sleep(60)
        finally:
            await asyncio.shield(asyncio.sleep(0.3))

    task = asyncio.create_task(slow_to_stop())
    await asyncio.sleep(0)
    stopper = asyncio.create_task(stop_task(task))
    await asyncio.sleep(0.05)
    stopper.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stopper
    await asyncio.wait({task}, timeout=2)


async def test_gives_up_after_its_bound() -> None:
    async def immortal() -> None:
        while True:
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                continue

    task = asyncio.create_task(immortal())
    await asyncio.sleep(0)
    await asyncio.wait_for(stop_task(task, patience_s=0.02, give_up_s=0.2), 2)
    assert not task.done()
    task.get_coro().close()
