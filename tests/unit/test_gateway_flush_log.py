"""While the database is down the usage flush fails every second: logged once with its traceback, then once a
minute, and its recovery is logged; the kept buckets are what make this safe (tests/integration)."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest

from bastion.bench.doubles import TEST_PEPPER, ScriptedEngine, platform_config, upstreams_for
from bastion.gateway import service
from bastion.serve.gateway_app import create_gateway_app

pytestmark = pytest.mark.unit


async def test_a_failing_flush_is_logged_once_a_minute(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = platform_config(str(tmp_path), f"sqlite+aiosqlite:///{tmp_path / 'g.db'}", ["m"])
    gateway = create_gateway_app(config, ScriptedEngine(upstreams_for(["m"])), pepper=TEST_PEPPER).state.gateway
    down = True

    async def flush() -> int:
        if down:
            raise ConnectionRefusedError("database down")
        return 0

    monkeypatch.setattr(gateway.usage, "flush", flush)
    clock = [1000.0]
    monkeypatch.setattr(service, "time", SimpleNamespace(monotonic=lambda: clock[0]))  # this module's clock only
    caplog.set_level(logging.WARNING, logger="bastion.gateway")
    for _ in range(30):  # 30 s of one-second retries
        await gateway.flush()
        clock[0] += 1
    failures = [r for r in caplog.records if "usage counters" in r.getMessage()]
    assert len(failures) == 1 and failures[0].exc_info is not None
    clock[0] += 60
    await gateway.flush()
    assert "still failing (ConnectionRefusedError)" in caplog.records[-1].getMessage()
    down = False
    await gateway.flush()
    assert "works again" in caplog.records[-1].getMessage()
