"""Constants and helpers the fixtures and some tests share: imported as `testbed`, never as `conftest`.

Why not `from conftest import ...`: tests/ and tests/helm/ each have a conftest.py, and pytest imports both under
the one module name `conftest`, so which one such an import finds depends on collection order.
"""

from __future__ import annotations

import os
from pathlib import Path

PG_ADMIN_DSN = os.environ.get("BASTION_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("BASTION_TEST_REDIS", "redis://127.0.0.1:6379")
REDIS_TEST_DB = 13


def pg_exec(sql: str) -> None:
    import psycopg2

    conn = psycopg2.connect(PG_ADMIN_DSN)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
    finally:
        conn.close()


ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("BASTION_TEST_DATA_DIR", ROOT / ".bastion-data"))
SERVE_PORT = 18123


def engine_test_config(tmp_dir: Path, dtype: str = "float32", otlp_endpoint: str | None = None) -> Path:
    """A platform file for the tests: float32 (so greedy output with and without speculation match)."""
    import yaml

    from bastion.audit.signing import Verifier, keygen

    text = (ROOT / "deploy/local/bastion.yaml").read_text()
    data = yaml.safe_load(text)
    data["data_dir"] = str(DATA_DIR)
    data["database"]["url"] = f"sqlite+aiosqlite:///{tmp_dir / 'bastion.db'}"
    data["models"][0]["dtype"] = dtype
    keys = keygen(tmp_dir / "audit-keys")
    data["audit"] = {
        "signing_key_file": str(keys["private"]),
        "content_key_file": str(keys["content"]),
        "trusted_key_fingerprints": [Verifier.from_file(keys["public"]).fingerprint],  # what `verify` trusts
    }
    if otlp_endpoint:
        data["telemetry"] = {"otlp_endpoint": otlp_endpoint}
    path = tmp_dir / "platform.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


async def bootstrap_key(config) -> str:
    from bastion.serve.runner import bootstrap_tenant

    token = await bootstrap_tenant(config)
    assert token, "the test database already had tenants"
    return token


def wait_for_route(url: str, timeout_s: float = 60) -> None:
    """Serve reports the app running before every proxy has its route: wait until the proxy answers."""
    from bastion.bench.load import wait_until_ok

    wait_until_ok(url, timeout_s)


def metrics_headers(data_dir: str | Path) -> dict[str, str]:
    """What Prometheus sends to the gateway's metrics paths: by default the internal token in the data dir."""
    token = (Path(data_dir) / "pool_stats_token").read_text(encoding="utf-8").strip()
    return {"authorization": f"Bearer {token}"}


def guard_golden(config) -> None:
    """The speculation guard's golden record for the speculating profiles, as `bastion models prepare` makes it
    (one engine start without speculation, the first time; cached in .bastion-data by model, dtype and build)."""
    from bastion.serve.runner import prepare_guard

    prepare_guard(config)
