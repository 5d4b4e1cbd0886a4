"""Stopping a background task reliably.

`task.cancel()` alone is not enough on Python 3.11: `asyncio.wait_for` (which redis-py and others use inside)
swallows a cancellation that arrives just as its inner call completes (CPython gh-86296, fixed in 3.12 by the
rewrite of `wait_for` on `asyncio.timeout`). The task then carries on, for ever if it next waits on a socket, and
whoever awaited it hangs. Remove this note (not the function) once the project moves to Python 3.12.
"""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger(__name__)


async def stop_task(task: asyncio.Task | None, *, patience_s: float = 1.0, give_up_s: float = 10.0) -> None:
    """Cancel `task` and wait until it has ended, cancelling again each `patience_s` while it ignores it.

    Never swallows the caller's own cancellation (unlike `suppress(CancelledError)` around `await task`), and
    returns after `give_up_s` at the latest, logging the task that would not stop.
    """
    if task is None or task.done():
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + give_up_s
    while not task.done():
        task.cancel()
        remaining = deadline - loop.time()
        if remaining <= 0:
            log.error("background task %s did not stop within %.0f s", task.get_name(), give_up_s)
            return
        await asyncio.wait({task}, timeout=min(patience_s, remaining))
    if not task.cancelled() and task.exception() is not None:
        log.warning("background task %s ended with %r", task.get_name(), task.exception())
