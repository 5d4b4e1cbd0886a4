"""The load bench's memory sample: a child that exited but is not yet reaped (a zombie, rss 0) is left out."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil

from bastion.bench.load import rss_mb


def test_a_zombie_child_is_not_sampled() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])  # exits at once; no wait() yet, so it stays a zombie
    try:
        deadline = time.monotonic() + 10
        while psutil.Process(child.pid).status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, "the child never exited"
            time.sleep(0.05)
        sample = rss_mb()
        assert child.pid not in sample
        assert all(mb > 0 for _, mb in sample.values())
    finally:
        child.wait()
