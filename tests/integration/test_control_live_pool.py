"""Live pool statistics end to end: real Ray Serve, both vLLM CPU replicas and the gateway (the session's
platform_stack), and the control plane in its own server polling the gateway's internal endpoint. After a few
requests the admin API and the console's pool page show the live replicas with requests, tok/s and draft
acceptance for fast-agentic (MTP speculation), and the endpoint refuses anyone without the shared token."""

from __future__ import annotations

import re
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "oidc"))
import idp_harness as h

from bastion.config.schema import ControlConfig
from bastion.control.app import create_app
from bastion.control.local_admin import ensure_local_admin
from bastion.control.settings import ControlSettings
from bastion.pool.live_stats import POOL_STATS_PATH, TOKEN_FILE_NAME

pytestmark = [pytest.mark.integration, pytest.mark.slow]
CONTROL_PORT = 18261
MODEL = "smollm2-135m"
FAST, DEEP = f"{MODEL}@fast-agentic", f"{MODEL}@deep-context"
# Repetitive text: easy to draft for (MTP or ngram), so drafts get accepted.
PROMPT = "Copy this line ten times: red green blue red green blue red green blue red green blue."


@pytest.fixture(scope="module")
def stats_url(platform_stack) -> str:
    return platform_stack.base_url.removesuffix("/v1") + POOL_STATS_PATH


@pytest.fixture(scope="module")
def control(platform_stack, stats_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    """The control plane as `bastion control serve` runs it (its own data dir, the local admin), reading the
    platform's database and the gateway's token file."""
    stack = platform_stack.config
    data_dir = tmp_path_factory.mktemp("control-live") / "data"
    live = ControlConfig(pool_stats_token_file=stack.data_dir / TOKEN_FILE_NAME, pool_stats_interval_s=1)
    config = stack.model_copy(update={"data_dir": data_dir, "control": live})
    password = ensure_local_admin(data_dir)
    settings = ControlSettings.from_config(config, {"BASTION_CONSOLE_COOKIE_SECURE": "0"}, pool_stats_url=stats_url)
    with h.ServerThread(create_app(config, settings=settings), CONTROL_PORT) as server:
        client = httpx.Client(base_url=server.url, timeout=30)
        page = client.get("/login")
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
        signed = client.post("/login", data={"username": "admin", "password": password, "csrf_token": csrf})
        assert signed.status_code == 303, signed.text
        yield client
        client.close()


class Traffic:
    """Chat requests to fast-agentic in a thread until stopped (rates need tokens between two samples)."""

    def __init__(self, base_url: str, token: str) -> None:
        self.client = httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {token}"}, timeout=120)
        self.stop, self.done, self.errors = threading.Event(), 0, []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        body = {"model": FAST, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 48, "temperature": 0}
        while not self.stop.is_set():
            response = self.client.post("/chat/completions", json=body)
            if response.status_code == 200:
                self.done += 1
            else:
                self.errors.append(response.status_code)

    def __enter__(self) -> Traffic:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=120)
        self.client.close()


def _fast_rows(pool: dict[str, Any]) -> list[dict[str, Any]]:
    return next(d for d in pool["deployments"] if d["name"] == FAST)["live"]


def test_gateway_endpoint_needs_the_shared_token(platform_stack, stats_url: str) -> None:
    token = (platform_stack.config.data_dir / TOKEN_FILE_NAME).read_text().strip()
    assert httpx.get(stats_url, timeout=30).status_code == 404
    tenant = httpx.get(stats_url, headers={"Authorization": f"Bearer {platform_stack.token}"}, timeout=30)
    assert tenant.status_code == 404 and tenant.json()["error"]["code"] == "not_found"  # a tenant's key: nothing
    body = httpx.get(stats_url, headers={"Authorization": f"Bearer {token}"}, timeout=30).json()
    names = {a.name for a in platform_stack.apps}
    assert names <= set(body["deployments"])
    for name in names:
        assert body["deployments"][name]["status"] == "HEALTHY"


def test_admin_api_and_console_show_live_replicas(platform_stack, control: httpx.Client) -> None:
    seen: dict[str, Any] = {}
    with Traffic(platform_stack.base_url, platform_stack.token) as traffic:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            rows = _fast_rows(control.get("/admin/api/pool").json())
            busy = [r for r in rows if (r["tok_s"] or 0) > 0 and (r["acceptance_rate"] or 0) > 0]
            if busy and busy[0]["requests_finished"]:
                seen = busy[0]
                break
            time.sleep(1)
        page = control.get("/console/pool").text  # rendered while the replica is still generating
        # The history's rates need drafts between two samples: read it while traffic flows (a bounded wait),
        # not after, when a short history may hold only idle samples.
        history: dict[str, Any] = {}
        while time.monotonic() < deadline + 60:
            history = control.get("/admin/api/pool/live").json()
            if any(r is not None for r in history["profiles"]["fast-agentic"]["acceptance_rate"]):
                break
            time.sleep(1)
    assert not traffic.errors and traffic.done > 0
    assert seen, f"no live tok/s and acceptance for {FAST} within 180 s"
    assert seen["healthy"] is True and seen["profile"] == "fast-agentic" and seen["generation_tokens"] > 0
    assert 0 < seen["acceptance_rate"] <= 1 and seen["draft_tokens"] >= seen["accepted_tokens"] > 0

    pool = control.get("/admin/api/pool").json()
    assert pool["live"] is True and pool["error"] is None
    fast = next(d for d in pool["deployments"] if d["name"] == FAST)
    deep = next(d for d in pool["deployments"] if d["name"] == DEEP)
    assert fast["status"] == "HEALTHY" and fast["replica_states"] == {"RUNNING": 1}
    assert len(deep["live"]) == 1 and deep["live"][0]["acceptance_rate"] is None  # no speculation there

    assert 'data-profile="fast-agentic"' in page and "No live replica statistics" not in page
    assert 'id="live-acceptance-chart"' in page
    fragment = control.get("/console/pool/live")
    assert fragment.status_code == 200 and "<html" not in fragment.text and seen["replica"] in fragment.text

    rates = [r for r in history["profiles"]["fast-agentic"]["acceptance_rate"] if r is not None]
    assert rates and all(0 <= r <= 1 for r in rates) and len(history["at"]) >= 2
    assert any(t > 0 for t in history["profiles"]["fast-agentic"]["tok_s"] if t is not None)
