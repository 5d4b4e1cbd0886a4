"""`bastion tenants ...` and `bastion keys ...` as installed, on SQLite: the secret is printed once and works,
listings never show hashes, errors are one line."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bastion.config import load_config
from bastion.db.session import create_engine, session_factory
from bastion.tenancy import key_material
from bastion.tenancy.authenticator import Authenticator, AuthFailure

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
BASTION = str(Path(sys.executable).parent / "bastion")


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [BASTION, *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        check=False,
        env={**os.environ, "COLUMNS": "250"},
    )


async def authenticate(config_path: Path, token: str):
    config = load_config(config_path)
    engine = create_engine(config.database.url)
    try:
        pepper = key_material.load_pepper(None, config.data_dir)
        auth = Authenticator(session_factory(engine), pepper, config.tenant_defaults)
        return await auth.authenticate(token)
    finally:
        await engine.dispose()


def migrated_config(tmp_path: Path) -> Path:
    """The local platform file with its data in tmp_path, the database upgraded."""
    config = tmp_path / "platform.yaml"
    text = (ROOT / "deploy/local/bastion.yaml").read_text().replace("data_dir: .bastion-data", f"data_dir: {tmp_path}")
    config.write_text(text)
    assert run("db", "upgrade", "--config", str(config)).returncode == 0
    return config


def test_tenant_and_key_commands(tmp_path: Path) -> None:
    config = migrated_config(tmp_path)
    c = ("--config", str(config))

    made = run("tenants", "create", "acme", "--model", "smollm2-135m", "--rpm", "5", *c)
    assert made.returncode == 0, made.stderr
    assert "acme" in run("tenants", "list", *c).stdout
    dup = run("tenants", "create", "acme", *c)
    assert dup.returncode == 1 and dup.stderr.strip() == "error: tenant 'acme' exists"

    created = run("keys", "create", "acme", "--name", "ci", "--scope", "inference", "--scope", "usage:read", *c)
    assert created.returncode == 0, created.stderr
    token = re.search(r"bst_[0-9a-f]{12}_\S+", created.stdout).group(0)
    prefix = token.split("_")[1]
    principal = asyncio.run(authenticate(config, token))
    assert principal.tenant_name == "acme" and principal.tenant_limits.requests_per_minute == 5
    assert principal.tenant_limits.concurrent_requests == 16  # the rest from tenant_defaults
    assert (tmp_path / key_material.PEPPER_FILE_NAME).stat().st_mode & 0o777 == 0o600

    listed = run("keys", "list", "--tenant", "acme", *c).stdout
    assert prefix in listed and "active" in listed and token.split("_", 2)[2] not in listed

    rotated = run("keys", "rotate", prefix, "--grace-hours", "1", *c)
    assert rotated.returncode == 0
    new_token = re.search(r"bst_[0-9a-f]{12}_\S+", rotated.stdout).group(0)
    assert new_token != token and asyncio.run(authenticate(config, new_token)).tenant_name == "acme"
    asyncio.run(authenticate(config, token))  # still valid during the grace period

    assert run("keys", "revoke", prefix, *c).returncode == 0
    with pytest.raises(AuthFailure, match="revoked"):
        asyncio.run(authenticate(config, token))
    assert "revoked" in run("keys", "list", *c).stdout

    assert "suspended" in run("tenants", "suspend", "acme", *c).stdout
    assert not asyncio.run(authenticate(config, new_token)).tenant_active
    assert "active" in run("tenants", "suspend", "acme", "--resume", *c).stdout
    missing = run("keys", "revoke", "nope", *c)
    assert missing.returncode == 1 and "no API key 'nope'" in missing.stderr and "Traceback" not in missing.stderr


def test_tenant_weight_command_is_validated_and_audited(tmp_path: Path) -> None:
    from sqlalchemy import select

    from bastion.db.models import AuditEvent

    config = migrated_config(tmp_path)
    c = ("--config", str(config))
    assert run("tenants", "create", "acme", "--weight", "2", *c).returncode == 0
    assert run("tenants", "create", "zero", "--weight", "0", *c).returncode == 1  # out of bounds: refused
    assert run("tenants", "weight", "acme", *c).stdout.strip() == "tenant acme: weight 2 (set on the tenant)"
    refused = run("tenants", "weight", "acme", "1000", *c)
    assert refused.returncode == 2 and "0.1" in refused.stderr
    assert run("tenants", "weight", "acme", "3.5", *c).returncode == 0
    assert re.search(r"acme .* 3\.5 ", run("tenants", "list", *c).stdout)
    cleared = run("tenants", "weight", "acme", "--clear", *c)
    assert cleared.returncode == 0 and "not set on the tenant" in cleared.stdout, cleared.stderr

    async def audited() -> list[tuple[str, dict]]:
        engine = create_engine(load_config(config).database.url)
        try:
            async with session_factory(engine)() as session:
                rows = (await session.scalars(select(AuditEvent).where(AuditEvent.kind == "admin"))).all()
                return [(r.actor, r.payload) for r in rows]
        finally:
            await engine.dispose()

    events = asyncio.run(audited())
    updates = [p for _, p in events if p["action"] == "tenant.update"]
    assert [(u["before"]["fair_share_weight"], u["after"]["fair_share_weight"]) for u in updates] == [
        (2.0, 3.5),
        (3.5, None),
    ]
    assert all(actor.startswith("cli:") for actor, p in events if p["action"] == "tenant.update")
