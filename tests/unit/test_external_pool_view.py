"""The console's pool page lists external replicas with their state, probed when the page is built."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from external_fake import FakeUpstream

from bastion.config.schema import PlatformConfig
from bastion.control.pool_view import pool_status
from bastion.pool.live_stats import no_live_stats

pytestmark = pytest.mark.unit


def config(tmp_path: Path, alive_port: int, dead_port: int) -> PlatformConfig:
    def ext(name: str, port: int, **more: Any) -> dict[str, Any]:
        return {
            "name": name,
            "base_url": f"http://127.0.0.1:{port}/v1",
            "model": "m1",
            "profile": "fast-agentic",
            "max_context": 8192,
            "health": {"path": "/health"},
            **more,
        }

    return PlatformConfig.model_validate(
        {
            "data_dir": str(tmp_path),
            "database": {"url": "sqlite+aiosqlite:///x.db"},
            "models": [{"name": "m1", "source": "/nonexistent", "max_model_len": 4096}],
            "profiles": {"deep-context": {}, "fast-agentic": {}},
            "deployments": [{"model": "m1", "profile": "deep-context"}],
            "external_replicas": [
                ext("gpu-box", alive_port, kind="llama_cpp", api_key_env="POOL_VIEW_TEST_KEY"),
                ext("old-box", dead_port, kind="ollama"),
            ],
        }
    )


def test_pool_status_and_page_show_external_replicas_with_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bastion.control.console import templates

    monkeypatch.setenv("POOL_VIEW_TEST_KEY", "sk-pool-view-secret-0001")
    fake = FakeUpstream(18217).start()
    try:
        status = asyncio.run(pool_status(config(tmp_path, 18217, 18218), no_live_stats))
    finally:
        fake.stop()
    states = {e["name"]: e for e in status["external"]}
    assert states["gpu-box"]["state"] == "healthy" and states["gpu-box"]["kind"] == "llama_cpp"
    assert states["old-box"]["state"] == "ejected" and states["old-box"]["reason"] == "ConnectError"
    assert "sk-pool-view" not in str(status)

    page = templates.env.get_template("pool.html").render(
        pool=status, chart={}, capacity=[], reference=[], live_chart=None, request=None
    )
    table = page[page.index('<table id="external">') :].split("</table>")[0]
    assert "gpu-box" in table and "healthy" in table
    assert "old-box" in table and "ejected (ConnectError)" in table
