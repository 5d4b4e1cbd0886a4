"""`bastion run`'s terminal: the option wiring of --verbose, the log routing pieces, the progress lines' texts.

The real start (Ray, two vLLM replicas, the terminal a person sees) is tests/integration/test_run_terminal.py.
"""

from __future__ import annotations

import json
import logging
import logging.config
import os
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from rich.console import Console
from typer.testing import CliRunner

from bastion import cli
from bastion.config import load_config
from bastion.serve import run_output, runner

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def platform_file(tmp_path: Path) -> Path:
    data = yaml.safe_load((ROOT / "deploy/local/bastion.yaml").read_text())
    data["data_dir"] = str(tmp_path / "data")
    path = tmp_path / "bastion.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def fake_start(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Every heavy step of `bastion run` replaced by a recorder; the deploy reports both engines healthy."""
    seen: dict[str, Any] = {"redirected": []}
    monkeypatch.setattr(runner, "prepare_models", lambda config, progress=None: [])
    monkeypatch.setattr("bastion.db.migrate.upgrade", lambda url, revision="head": None)

    async def bootstrap(config: Any) -> str:
        return "bst_test_secret"

    monkeypatch.setattr(runner, "bootstrap_tenant", bootstrap)
    monkeypatch.setattr(runner, "start_ray", lambda config, logs=None: seen.__setitem__("logs", logs))
    monkeypatch.setattr(run_output, "link_ray_logs", lambda logs: None)
    monkeypatch.setattr(
        runner, "replica_stats", lambda name: {"guard": {"state": "ok", "greedy_match": 1.0}} if "fast" in name else {}
    )

    def deploy(path: Path, *, on_placed: Any = None, on_healthy: Any = None, **_: Any) -> None:
        on_placed(SimpleNamespace(assignment={"a": ["n1"], "b": ["n1"]}))
        for name in ("gateway", "engine-smollm2-135m--deep-context", "engine-smollm2-135m--fast-agentic"):
            on_healthy(name)

    monkeypatch.setattr(runner, "deploy", deploy)
    monkeypatch.setattr(runner, "wait_forever", lambda ready=None: ready() if ready else None)

    class Redirect:
        def __init__(self, console: Any, path: Path) -> None:
            seen["redirected"].append(path)

        def __enter__(self) -> None:
            return None

        def __exit__(self, *exc: object) -> None:
            return None

    monkeypatch.setattr(run_output, "terminal_only_for", Redirect)
    return seen


def test_run_sends_the_logs_to_files_and_prints_a_short_summary(
    platform_file: Path, fake_start: dict[str, Any]
) -> None:
    result = CliRunner().invoke(cli.app, ["run", "--config", str(platform_file)])
    assert result.exit_code == 0, result.output
    logs = platform_file.parent / "data" / "logs"
    assert fake_start["logs"] == logs  # Ray keeps workers' output in files; replicas log vLLM there
    assert fake_start["redirected"] == [logs / "bastion.log"]
    lines = result.output.strip().splitlines()
    assert len(lines) < 20
    text = result.output
    assert "placement: 2 replicas on 1 node" in text
    assert "smollm2-135m@deep-context  ready × 1  speculation off" in text
    assert "guard: n/a" in text
    assert "smollm2-135m@fast-agentic  ready × 1  speculation mtp k=1" in text
    assert "guard: ok (greedy 100%)" in text
    assert "http://127.0.0.1:8000/v1" in text and text.count("bst_test_secret") == 1
    assert "Profiles: deep-context, fast-agentic" in text and "Console: bastion control serve" in text


def test_verbose_streams_everything_to_the_terminal(platform_file: Path, fake_start: dict[str, Any]) -> None:
    result = CliRunner().invoke(cli.app, ["run", "--config", str(platform_file), "--verbose"])
    assert result.exit_code == 0, result.output
    assert fake_start["logs"] is None  # log_to_driver stays on, vLLM keeps its own handler
    assert fake_start["redirected"] == []
    assert "streamed here (--verbose)" in result.output


def test_start_ray_quiet_and_verbose(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, platform_file: Path) -> None:
    calls: list[dict[str, Any]] = []
    fake_ray = SimpleNamespace(init=lambda **kw: calls.append(kw))
    fake_serve = SimpleNamespace(start=lambda **kw: None)
    monkeypatch.setitem(sys.modules, "ray", fake_ray)
    monkeypatch.setitem(sys.modules, "ray.serve", fake_serve)
    fake_ray.serve = fake_serve
    for key in ("VLLM_CONFIGURE_LOGGING", "VLLM_LOGGING_CONFIG_PATH"):
        monkeypatch.setenv(key, "")  # recorded, so the test's own setting is undone afterwards
        monkeypatch.delenv(key)
    config = load_config(platform_file)
    runner.start_ray(config)
    assert calls[-1]["log_to_driver"] is True and "VLLM_LOGGING_CONFIG_PATH" not in os.environ
    runner.start_ray(config, logs=tmp_path)
    assert calls[-1]["log_to_driver"] is False
    assert os.environ["VLLM_LOGGING_CONFIG_PATH"] == str(tmp_path / "vllm-logging.json")


def test_vllm_logging_config_writes_the_vllm_logger_to_a_file(tmp_path: Path) -> None:
    env = run_output.replica_log_env(tmp_path)
    config = json.loads(Path(env["VLLM_LOGGING_CONFIG_PATH"]).read_text())
    logging.config.dictConfig(config)
    try:
        logging.getLogger("vllm.v1.engine.core").info("Initializing a V1 LLM engine (v0) with config: x")
        logging.getLogger("vllm").debug("below INFO: not written")
    finally:
        for handler in logging.getLogger("vllm").handlers:
            handler.close()
        logging.getLogger("vllm").handlers.clear()
    text = (tmp_path / "vllm.log").read_text()
    assert "INFO vllm.v1.engine.core: Initializing a V1 LLM engine" in text
    assert "below INFO" not in text


def test_only_the_console_keeps_the_terminal(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "driver.log"
    console = Console(width=100)
    before = [os.fstat(fd) for fd in (1, 2)]
    with run_output.terminal_only_for(console, target):
        os.write(1, b"a raylet error relayed to stdout\n")
        os.write(2, b"a library's log line\n")
        console.print("progress line")
    assert target.read_text() == "a raylet error relayed to stdout\na library's log line\n"
    assert capfd.readouterr().out == "progress line\n"
    after = [os.fstat(fd) for fd in (1, 2)]
    assert [(a.st_dev, a.st_ino) for a in after] == [(b.st_dev, b.st_ino) for b in before]
    assert console.file is sys.stdout  # back to following sys.stdout


@pytest.mark.parametrize(
    ("stats", "text"),
    [
        (None, "n/a"),
        ({}, "n/a"),
        ({"guard": None}, "n/a"),
        ({"guard": {"state": "unchecked", "greedy_match": None}}, "unchecked"),
        ({"guard": {"state": "ok", "greedy_match": 0.95}}, "ok (greedy 95%)"),
        ({"guard": {"state": "failed", "reason": "greedy match 40% < 80%"}}, "failed (greedy match 40% < 80%)"),
    ],
)
def test_guard_text(stats: dict[str, Any] | None, text: str) -> None:
    assert run_output.guard_text(stats) == text


def test_speculation_and_placement_texts(platform_file: Path) -> None:
    config = load_config(platform_file)
    deep, fast = config.deployments
    assert run_output.speculation_text(config, deep) == "off"
    assert run_output.speculation_text(config, fast) == "mtp k=1"
    assert run_output.placement_text({"a": ["n1"]}) == "1 replica on 1 node"
    assert run_output.placement_text({"a": ["n1", "n2"], "b": ["n2"]}) == "3 replicas on 2 nodes"


def test_watchdog_reports_each_deployment_once_when_healthy() -> None:
    def status(app: str, **deps: str) -> SimpleNamespace:
        d = {
            n: SimpleNamespace(status=SimpleNamespace(value=s), message="", replica_states={}) for n, s in deps.items()
        }
        return SimpleNamespace(
            applications={"bastion": SimpleNamespace(status=SimpleNamespace(value=app), message="", deployments=d)}
        )

    seq = iter(
        [
            status("DEPLOYING", a="HEALTHY", b="UPDATING"),
            status("DEPLOYING", a="HEALTHY", b="UPDATING"),
            status("RUNNING", a="HEALTHY", b="HEALTHY"),
        ]
    )
    heard: list[str] = []
    runner.wait_until_running(
        "bastion", [], status=lambda: next(seq), nodes=list, sleep=lambda s: None, on_healthy=heard.append
    )
    assert heard == ["a", "b"]
