"""Shared fixtures: real PostgreSQL, Redis and SQLite; Ray is kept on loopback before anything imports it."""

from __future__ import annotations

import os

# Before any import of ray (ENVIRONMENT.md): bind every Ray process to 127.0.0.1, and do not renice workers.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_worker_niceness", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from testbed import (
    DATA_DIR,
    PG_ADMIN_DSN,
    REDIS_TEST_DB,
    REDIS_URL,
    SERVE_PORT,
    bootstrap_key,
    engine_test_config,
    guard_golden,
    pg_exec,
    wait_for_route,
)


@pytest.fixture(scope="session", autouse=True)
def _secret_scan_logs(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Every log record of the session to one file, and generated secrets registered (tests/secret_scan.py)."""
    import secret_scan

    base = tmp_path_factory.getbasetemp()
    secret_scan.install(base / "session-logs")
    secret_scan.register_log_dir(base)


def _time_limit(item: pytest.Item) -> float:
    marker = item.get_closest_marker("timeout")
    if marker is not None and (marker.args or "timeout" in marker.kwargs):
        return float(marker.args[0] if marker.args else marker.kwargs["timeout"])
    return float(item.config.getini("timeout") or 0)


@contextmanager
def _watched(item: pytest.Item, phase: str):
    """pytest-timeout limits setup, call and teardown each; the watchdog dumps every thread's and asyncio task's
    stack just before that limit, and ends the run if the limit cannot interrupt the phase (hang_watchdog.py)."""
    import hang_watchdog

    limit = _time_limit(item)
    if limit <= 0:
        yield
        return
    with hang_watchdog.watching(f"{item.nodeid} ({phase})", limit):
        yield


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item):
    with _watched(item, "setup"):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item):
    with _watched(item, "call"):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None):
    with _watched(item, "teardown"):
        return (yield)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The secret scan reads the logs of everything else, so it runs last."""
    last = [i for i in items if "test_secret_scan.py::test_no_secret_in_any_log" in i.nodeid]
    items[:] = [i for i in items if i not in last] + last


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session, dropped at the end."""
    name = f"bastion_test_{uuid.uuid4().hex[:10]}"
    pg_exec(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_DSN.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}".replace("postgresql://", "postgresql+asyncpg://", 1)
    finally:
        pg_exec(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A temporary SQLite file."""
    return f"sqlite+aiosqlite:///{tmp_path / 'bastion.db'}"


@pytest.fixture
def redis_url() -> Iterator[str]:
    """A Redis logical database, flushed before and after each test."""
    import redis

    url = f"{REDIS_URL}/{REDIS_TEST_DB}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    try:
        yield url
    finally:
        client.flushdb()
        client.close()


# --- Ray and the real vLLM engines: started once per test session --------------------------------------


@pytest.fixture(scope="session")
def bundled_model() -> Path:
    """The bundled SmolLM2-135M as an HF folder with its manifest (built once, cached in .bastion-data)."""
    from bastion.engine.model_store import prepare_bundled

    return prepare_bundled("smollm2-135m", DATA_DIR)


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    """One local Ray (loopback only) and Serve for the whole session."""
    import ray
    from ray import serve

    from bastion.serve.loopback import start_local_ray

    start_local_ray(SERVE_PORT, namespace="bastion-tests", num_cpus=6, log_to_driver=False)
    try:  # Ray's session logs (every worker and replica) are scanned for secrets at the end
        import secret_scan

        secret_scan.register_log_dir(Path(ray._private.worker._global_node.get_logs_dir_path()))
    except AttributeError:
        pass
    try:
        yield
    finally:
        serve.shutdown()
        ray.shutdown()


@dataclass
class PlatformStack:
    """The whole platform deployed once: gateway ingress + both engine replicas, behind Serve's HTTP proxy."""

    config: object
    config_path: Path
    base_url: str
    token: str
    apps: list


@pytest.fixture(scope="session")
def otlp_receiver():
    """An OTLP/HTTP receiver for the whole session: the platform's gateway and replicas export their spans here."""
    from otlp_receiver import running_receiver

    with running_receiver() as receiver:
        yield receiver


@pytest.fixture(scope="session")
def platform_stack(
    ray_cluster: None, bundled_model: Path, otlp_receiver, tmp_path_factory: pytest.TempPathFactory
) -> PlatformStack:
    import asyncio

    from ray import serve

    from bastion.config import Settings, load_config
    from bastion.db import migrate
    from bastion.serve.app import build_app, engine_apps

    path = engine_test_config(tmp_path_factory.mktemp("platform"), otlp_endpoint=otlp_receiver.url)
    config = load_config(path, Settings())
    guard_golden(config)
    migrate.upgrade(config.database.url)
    token = asyncio.run(bootstrap_key(config))
    serve.run(build_app({"config": str(path)}), name="bastion", route_prefix="/")
    wait_for_route(f"http://127.0.0.1:{SERVE_PORT}/healthz")
    return PlatformStack(config, path, f"http://127.0.0.1:{SERVE_PORT}/v1", token, engine_apps(config))


@pytest.fixture(scope="session")
def engine_config(platform_stack: PlatformStack):
    return platform_stack.config


@pytest.fixture(scope="session")
def engine_handles(platform_stack: PlatformStack) -> dict:
    """Handles to both engine deployments of the platform app (fast-agentic: MTP k=1; deep-context: none)."""
    from ray import serve

    return {a.profile: serve.get_deployment_handle(a.name, app_name="bastion") for a in platform_stack.apps}
