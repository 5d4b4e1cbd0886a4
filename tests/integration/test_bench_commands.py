"""The benchmark commands run end to end with small budgets (the figures themselves go to docs/benchmarks.md)."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from bastion.bench.gateway_http import find_litellm
from bastion.cli import app

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_bench_audit_writes_and_reports(pg_url: str) -> None:
    result = CliRunner().invoke(
        app, ["bench", "audit", "--database-url", pg_url, "--events", "500", "--batch-size", "100"]
    )
    assert result.exit_code == 0, result.output
    figures = json.loads(result.output)
    assert figures["events"] == 500 and figures["database"] == "postgresql+asyncpg"
    assert figures["events_per_second"] > 0
    assert 0 < figures["enqueue_p50_us"] <= figures["enqueue_p99_us"]


def _gateway_bench(*extra: str) -> dict:
    args = ["bench", "gateway", "--requests", "40", "--seconds", "2", "--concurrency", "1,16", *extra]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert re.search(r"^\| 16 \|", result.output, re.MULTILINE)
    figures = json.loads(result.output.strip().splitlines()[-1])
    assert [level["concurrency"] for level in figures["levels"]] == [1, 16]
    for level in figures["levels"]:
        for mode in ("policy", "bare"):
            assert level[mode]["requests"] > 0 and level[mode]["errors"] == 0, (mode, level)
            assert 0 < level[mode]["p50_ms"] <= level[mode]["p99_ms"]
            assert level[mode]["server_cpu_ms_per_request"] >= 0  # 10 ms ticks: 40 requests may read 0
    return figures


def test_server_cpu_is_read_from_the_process_and_its_children() -> None:
    """A shell (no CPU of its own) whose child burns 0.3 s: the shell's figure includes the child's."""
    import os
    import shlex
    import signal
    import subprocess
    import sys
    import time

    from bastion.bench.gateway import _cpu_seconds

    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\ntime.sleep(30)"
    command = f"{shlex.quote(sys.executable)} -c {shlex.quote(burn)}"
    shell = subprocess.Popen(["sh", "-c", command], start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while _cpu_seconds(shell.pid) < 0.3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _cpu_seconds(shell.pid) >= 0.3
        assert _cpu_seconds(None) == 0.0
    finally:
        os.killpg(shell.pid, signal.SIGKILL)  # the shell and its child
        shell.wait()


def test_bench_gateway_compares_policy_with_bare_relay_in_process() -> None:
    figures = _gateway_bench("--engine", "inprocess", "--engine-delay-ms", "5")
    assert figures["engine"] == "scripted, in process" and figures["engine_delay_ms"] == 5
    for level in figures["levels"]:  # every answer waited for the scripted engine's 5 ms
        assert level["policy"]["p50_ms"] >= 5 and level["bare"]["p50_ms"] >= 5
    assert "litellm" not in figures["levels"][0] and figures["litellm"].startswith("not run")


def test_bench_gateway_over_http_with_litellm_when_installed() -> None:
    """The engine is its own HTTP server; the LiteLLM proxy joins in front of it when .tools has it."""
    figures = _gateway_bench()
    assert figures["engine"] == "scripted over HTTP on 127.0.0.1"
    if find_litellm() is None:
        assert figures["litellm"].startswith("not installed") and "litellm" not in figures["levels"][0]
        pytest.skip("LiteLLM is not installed (scripts/install-tools.sh): measured without it")
    for level in figures["levels"]:
        peer = level["litellm"]
        assert peer["requests"] > 0 and peer["errors"] == 0, level
        assert level["throughput_ratio_vs_litellm"] > 0
