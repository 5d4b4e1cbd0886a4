"""Live pool statistics, without Ray: the poller's rates and history from successive gateway answers (an httpx
mock transport stands in for the gateway), the shared token, the control settings' overrides and vLLM's load
counters. The real path (Ray, vLLM, gateway, control plane) is tests/integration/test_control_live_pool.py."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from bastion.config.schema import PlatformConfig
from bastion.control.pool_view import pool_status
from bastion.control.settings import ControlSettings
from bastion.engine.speculation import load_totals
from bastion.errors import ConfigError
from bastion.pool.live_poller import PoolStatsPoller
from bastion.pool.live_stats import POOL_STATS_PATH, authorized, default_url, load_token

pytestmark = pytest.mark.unit
TOKEN = "t" * 40


def _config(tmp_path: Path, **extra: Any) -> PlatformConfig:
    return PlatformConfig.model_validate(
        {
            "data_dir": str(tmp_path / "data"),
            "database": {"url": "sqlite+aiosqlite:///x.db"},
            "models": [{"name": "m1", "source": "/nonexistent", "max_model_len": 4096}],
            "profiles": {
                "deep-context": {},
                "fast-agentic": {"speculative": {"method": "ngram", "num_speculative_tokens": 3}},
            },
            "deployments": [{"model": "m1", "profile": "fast-agentic"}, {"model": "m1", "profile": "deep-context"}],
            **extra,
        }
    )


def _answer(at: float, tokens: int, drafted: int, accepted: int, finished: int) -> dict[str, Any]:
    stats = {
        "model": "m1",
        "profile": "fast-agentic",
        "time": at,
        "in_flight": 1,
        "draining": False,
        "generation_tokens": tokens,
        "requests_finished": finished,
        "requests_waiting": 0,
        "speculation": {"draft_tokens": drafted, "accepted_tokens": accepted},
    }
    replica = {"replica": "r1", "queue_len": 1, "stats": stats}
    dep = {"status": "HEALTHY", "replica_states": {"RUNNING": 1}, "replicas": [replica]}
    return {"object": "pool.replicas", "collected_at": at, "deployments": {"engine-m1--fast-agentic": dep}}


class Gateway:
    """Answers the poller with the next prepared body; records the Authorization headers it got."""

    def __init__(self, answers: list[dict[str, Any]]) -> None:
        self.answers, self.auth = answers, []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.auth.append(request.headers.get("authorization"))
        return httpx.Response(200, json=self.answers.pop(0))


def _poller(gateway: Gateway) -> PoolStatsPoller:
    client = httpx.AsyncClient(transport=httpx.MockTransport(gateway))
    return PoolStatsPoller("http://gw" + POOL_STATS_PATH, TOKEN, interval_s=1, history=10, client=client)


def test_rates_and_history_from_two_samples_of_a_replica(tmp_path: Path) -> None:
    gateway = Gateway(
        [
            _answer(100.0, 1000, 300, 200, 10),
            _answer(100.0, 1000, 300, 200, 10),  # Serve has not refreshed the routing stats yet
            _answer(105.0, 1250, 400, 280, 14),
            _answer(90.0, 50, 10, 5, 1),  # the replica restarted under the same id: no negative rate
        ]
    )
    poller = _poller(gateway)

    async def scenario() -> list[Any]:
        rows = [await poller.poll_once() for _ in range(4)]
        await poller.aclose()
        return rows

    first, same, later, restarted = asyncio.run(scenario())
    assert gateway.auth == [f"Bearer {TOKEN}"] * 4
    assert first[0].deployment == "m1@fast-agentic" and first[0].tok_s is None  # one sample: no rate yet
    assert first[0].acceptance_rate == pytest.approx(200 / 300) and first[0].healthy is True
    assert same[0].tok_s is None
    row = later[0]
    assert row.tok_s == pytest.approx(250 / 5) and row.requests_finished == 14 and row.queue_depth == 0
    assert row.serve_deployment == "engine-m1--fast-agentic" and row.profile == "fast-agentic"
    assert restarted[0].tok_s is None and restarted[0].generation_tokens == 50
    history = poller.history()
    assert history["at"] == [100.0, 100.0, 105.0, 90.0]
    assert history["profiles"]["fast-agentic"]["acceptance_rate"][2] == pytest.approx(80 / 100)
    assert history["profiles"]["fast-agentic"]["tok_s"][2] == pytest.approx(50.0)
    assert poller.deployment_status()["m1@fast-agentic"] == {"status": "HEALTHY", "replica_states": {"RUNNING": 1}}
    assert TOKEN not in repr(poller)


def test_pool_status_shows_live_replicas_and_serve_status(tmp_path: Path) -> None:
    config = _config(tmp_path)
    poller = _poller(Gateway([_answer(100.0, 10, 4, 3, 1)]))

    async def scenario() -> dict[str, Any]:
        status = await pool_status(config, poller)
        await poller.aclose()
        return status

    status = asyncio.run(scenario())
    fast = next(d for d in status["deployments"] if d["name"] == "m1@fast-agentic")
    assert status["live"] is True and status["error"] is None
    assert fast["status"] == "HEALTHY" and fast["live"][0]["acceptance_rate"] == pytest.approx(0.75)
    assert next(d for d in status["deployments"] if d["name"] == "m1@deep-context")["live"] == []


def test_pool_status_renders_when_the_gateway_is_down(tmp_path: Path) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    client = httpx.AsyncClient(transport=httpx.MockTransport(refuse))
    poller = PoolStatsPoller("http://gw" + POOL_STATS_PATH, TOKEN, client=client)
    status = asyncio.run(pool_status(_config(tmp_path), poller))
    assert status["live"] is False and "unavailable" in status["error"] and poller.last_error == "ConnectError"


def test_a_failed_background_poll_shows_no_stale_rows(tmp_path: Path) -> None:
    answers = [_answer(100.0, 10, 4, 3, 1)]

    def flaky(request: httpx.Request) -> httpx.Response:
        if answers:
            return httpx.Response(200, json=answers.pop(0))
        return httpx.Response(503, json={"error": {"message": "gateway restarting"}})

    poller = PoolStatsPoller(
        "http://gw" + POOL_STATS_PATH,
        TOKEN,
        interval_s=300,
        client=httpx.AsyncClient(transport=httpx.MockTransport(flaky)),
    )

    async def scenario() -> tuple[dict[str, Any], dict[str, Any]]:
        before = await pool_status(_config(tmp_path), poller)
        with pytest.raises(httpx.HTTPStatusError):
            await poller.poll_once()  # what the background task does every interval
        return before, await pool_status(_config(tmp_path), poller)  # within the interval: no new poll

    before, after = asyncio.run(scenario())
    assert before["live"] is True and after["live"] is False and "unavailable" in after["error"]
    assert all(d["status"] is None and d["live"] == [] for d in after["deployments"])


def test_token_is_created_once_private_and_checked_in_constant_time(tmp_path: Path) -> None:
    config = _config(tmp_path)
    token = load_token(config)
    assert len(token) >= 32 and load_token(config) == token
    assert (config.data_dir / "pool_stats_token").stat().st_mode & 0o077 == 0
    assert authorized(token, f"Bearer {token}") and authorized(token, f"bearer {token}")
    assert not authorized(token, None) and not authorized(token, f"Bearer {token}x") and not authorized(token, token)
    short = tmp_path / "short"
    short.write_text("abc")
    with pytest.raises(ConfigError, match=r"control\.pool_stats_token_file"):
        load_token(_config(tmp_path, control={"pool_stats_token_file": str(short)}))
    with pytest.raises(ConfigError, match="cannot read"):
        load_token(_config(tmp_path, control={"pool_stats_token_file": str(tmp_path / "missing")}))


def test_settings_urls_and_oidc_overrides(tmp_path: Path) -> None:
    config = _config(tmp_path, gateway={"host": "0.0.0.0", "port": 8123})  # noqa: S104 - never bound
    assert default_url(config) == f"http://127.0.0.1:8123{POOL_STATS_PATH}"
    assert ControlSettings.from_config(config, {}).pool_stats_url == default_url(config)
    configured = _config(tmp_path, control={"pool_stats_url": "http://gw:1/x"})
    assert ControlSettings.from_config(configured, {}).pool_stats_url == "http://gw:1/x"
    env = {"BASTION_POOL_STATS_URL": "http://env:2/y", "BASTION_OIDC_CLIENT_ID": "c2", "BASTION_OIDC_AUDIENCE": "a2"}
    oidc = _config(tmp_path, auth={"oidc_issuer": "https://kc/realms/b", "client_id": "c1"})
    settings = ControlSettings.from_config(oidc, env)
    assert (settings.pool_stats_url, settings.client_id, settings.audience) == ("http://env:2/y", "c2", "a2")
    assert ControlSettings.from_config(oidc, {"BASTION_OIDC_CLIENT_ID": "c3"}).audience == "c3"
    assert ControlSettings.from_config(oidc, {}).audience == "c1"
    with pytest.raises(ValueError, match="pool_stats_interval_s"):
        _config(tmp_path, control={"pool_stats_interval_s": 0})


def test_load_totals_sums_label_sets_and_ignores_other_metrics() -> None:
    snapshot = [
        SimpleNamespace(name="vllm:generation_tokens", value=120),
        SimpleNamespace(name="vllm:request_success", value=3),  # finished_reason="stop"
        SimpleNamespace(name="vllm:request_success", value=2),  # finished_reason="length"
        SimpleNamespace(name="vllm:num_requests_waiting", value=1.0),
        SimpleNamespace(name="vllm:spec_decode_num_drafts", value=9),
        SimpleNamespace(name="vllm:spec_decode_num_accepted_tokens_per_pos", values=[1, 2]),
    ]
    totals = load_totals(snapshot)
    assert totals == {
        "generation_tokens": 120,
        "prompt_tokens": 0,
        "requests_finished": 5,
        "requests_running": 0,
        "requests_waiting": 1,
    }
