"""When a test overruns its time limit, say where everything waits: every thread's stack and every pending
asyncio task's stack (pytest-timeout dumps threads only, and an asyncio hang shows just `epoll` there).

pytest-timeout (method `signal`) fails the test at its limit. If that signal cannot get through (a C call that
does not return, a handler that swallows it), this watchdog ends the whole run `grace_s` later with exit code 3,
so CI never waits for its own limit.
"""

from __future__ import annotations

import asyncio
import faulthandler
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager


def dump_tasks(out=None) -> None:
    """Print the stack of every unfinished asyncio task, on whatever loop it runs."""
    out = out or sys.stderr
    tasks = [t for t in list(asyncio.tasks._all_tasks) if not t.done()]  # 3.11: the tasks of every loop
    print(f"\n--- {len(tasks)} pending asyncio task(s) ---", file=out)
    for task in tasks:
        try:
            task.print_stack(limit=12, file=out)
        except Exception as exc:  # a task torn down while we read it
            print(f"{task!r}: {exc}", file=out)
    out.flush()


def dump_all(reason: str) -> None:
    print(f"\n=== {reason} ===", file=sys.stderr)
    faulthandler.dump_traceback(all_threads=True)
    dump_tasks()


@contextmanager
def watching(nodeid: str, limit_s: float, grace_s: float = 60.0) -> Iterator[None]:
    """Dump stacks just before `limit_s` (pytest-timeout then fails the test); exit the run after the grace."""
    warn = threading.Timer(max(1.0, limit_s - 2.0), dump_all, args=(f"{nodeid}: near its {limit_s:.0f} s limit",))
    kill = threading.Timer(limit_s + grace_s, _abort, args=(nodeid, limit_s + grace_s))
    for timer in (warn, kill):
        timer.daemon = True
        timer.start()
    try:
        yield
    finally:
        warn.cancel()
        kill.cancel()


def _abort(nodeid: str, after_s: float) -> None:
    dump_all(f"{nodeid}: still running {after_s:.0f} s after it started; the time limit could not interrupt it")
    sys.stderr.flush()
    os._exit(3)
