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
from pathlib import Path

import pytest

PG_ADMIN_DSN = os.environ.get("BASTION_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("BASTION_TEST_REDIS", "redis://127.0.0.1:6379")
REDIS_TEST_DB = 13


def _pg_exec(sql: str) -> None:
    import psycopg2

    conn = psycopg2.connect(PG_ADMIN_DSN)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
    finally:
        conn.close()


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session, dropped at the end."""
    name = f"bastion_test_{uuid.uuid4().hex[:10]}"
    _pg_exec(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_DSN.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}".replace("postgresql://", "postgresql+asyncpg://", 1)
    finally:
        _pg_exec(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


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

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("BASTION_TEST_DATA_DIR", ROOT / ".bastion-data"))


@pytest.fixture(scope="session")
def bundled_model() -> Path:
    """The bundled SmolLM2-135M as an HF folder with its manifest (built once, cached in .bastion-data)."""
    from bastion.engine.model_store import prepare_bundled

    return prepare_bundled("smollm2-135m", DATA_DIR)


def engine_test_config(tmp_dir: Path, dtype: str = "float32") -> Path:
    """A platform file for the tests: float32 (so greedy output with and without speculation match)."""
    import yaml

    text = (ROOT / "deploy/local/bastion.yaml").read_text()
    data = yaml.safe_load(text)
    data["data_dir"] = str(DATA_DIR)
    data["database"]["url"] = f"sqlite+aiosqlite:///{tmp_dir / 'bastion.db'}"
    data["models"][0]["dtype"] = dtype
    path = tmp_dir / "platform.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    """One local Ray (loopback only) and Serve for the whole session."""
    import ray
    from ray import serve

    ray.init(num_cpus=6, include_dashboard=False, namespace="bastion-tests", log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": 18123})
    try:
        yield
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="session")
def engine_config(bundled_model: Path, tmp_path_factory: pytest.TempPathFactory):
    from bastion.config import Settings, load_config

    return load_config(engine_test_config(tmp_path_factory.mktemp("engines")), Settings())


@pytest.fixture(scope="session")
def engine_handles(ray_cluster: None, engine_config) -> dict:
    """Both engine deployments of the embedded default (fast-agentic: ngram; deep-context: none), by profile."""
    from ray.serve.api import RunTarget, run_many

    from bastion.serve.app import engine_apps

    apps = engine_apps(engine_config)
    handles = run_many([RunTarget(a.app, name=a.name, route_prefix=None) for a in apps])
    return {a.profile: h for a, h in zip(apps, handles, strict=True)}
