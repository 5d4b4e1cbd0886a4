"""SIGTERM to the serving process (`bastion run`, or a process manager stopping it): streams in flight finish
whole within the grace period, no new request is taken once shutdown began, and no Ray process outlives it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]
SCENARIO = Path(__file__).with_name("sigterm_scenario.py")
PORT = 18310


def _ready(proc: subprocess.Popen[str], timeout_s: float = 180) -> str:
    deadline = time.monotonic() + timeout_s
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith("READY "):
            return line.split()[1]
        if not line and proc.poll() is not None:
            break
    raise AssertionError(f"the scenario did not start (rc {proc.poll()})")


def _stream(token: str, out: dict[str, object]) -> None:
    body = {"model": "m1", "messages": [{"role": "user", "content": "go"}], "stream": True}
    try:
        with httpx.stream(
            "POST",
            f"http://127.0.0.1:{PORT}/v1/chat/completions",
            json=body,
            headers={"authorization": f"Bearer {token}"},
            timeout=60,
        ) as response:
            out["status"] = response.status_code
            out["text"] = "".join(response.iter_text())
    except httpx.HTTPError as exc:
        out["error"] = type(exc).__name__


def test_sigterm_lets_streams_finish_and_leaves_no_process(tmp_path: Path) -> None:
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [sys.executable, str(SCENARIO), str(PORT)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
        start_new_session=True,  # Ctrl-C in the test's terminal must not reach it
    )
    try:
        token = _ready(proc)
        family = psutil.Process(proc.pid).children(recursive=True)  # Ray's GCS, raylet, workers, replicas
        assert any("raylet" in _name(p) for p in family) and sum("ServeReplica" in _name(p) for p in family) >= 3
        streams = [{} for _ in range(3)]
        threads = [threading.Thread(target=_stream, args=(token, s)) for s in streams]
        for t in threads:
            t.start()
        time.sleep(1.5)  # every stream has its first tokens
        sent_at = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        try:
            late = httpx.post(
                f"http://127.0.0.1:{PORT}/v1/chat/completions",
                json={"model": "m1", "messages": [{"role": "user", "content": "late"}]},
                headers={"authorization": f"Bearer {token}"},
                timeout=10,
            ).status_code
        except httpx.HTTPError:
            late = None  # the listener is gone: refused, as it should be
        for t in threads:
            t.join(60)
        rc = proc.wait(60)
        stopped_after = time.monotonic() - sent_at
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    for s in streams:
        assert s.get("status") == 200, s
        text = str(s["text"])
        assert text.count('"content"') >= 30 and text.rstrip().endswith("data: [DONE]"), text[-300:]
        assert '"error"' not in text
    # Nothing new is served once shutdown began: the route is gone (Serve's proxy answers 404) or the port is.
    assert late is None or late in (404, 503)
    assert rc == 0 and stopped_after < 40
    time.sleep(2)
    left = [_name(p) for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not left, left


def _name(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())[:120] or p.name()
    except psutil.Error:
        return ""
