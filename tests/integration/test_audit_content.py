"""Content logging end to end: a tenant with `log_content` gets its prompts and completions stored through the
gateway, encrypted with its own data key; `erase` destroys the key, the content becomes unreadable, every chain
still verifies, and the erasure is audited."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import AsyncOpenAI
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from bastion.audit import AuditWriter, EventContent, InferenceEvent
from bastion.audit.content_keys import ContentErased, decrypt_row, erase
from bastion.audit.crypto import ContentCipher
from bastion.audit.events import utcnow
from bastion.audit.recorder import AuditRecorder
from bastion.audit.signing import Signer, keygen
from bastion.audit.store import EVENTS
from bastion.audit.verify import verify_database
from bastion.bench.doubles import ScriptedEngine, Stack, gateway_stack, platform_config, upstreams_for
from bastion.db import migrate
from bastion.db.session import create_engine

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
BASTION = str(Path(sys.executable).parent / "bastion")
SECRET = "merger with globex closes on friday"


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest) -> str:
    url = request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")
    migrate.upgrade(url)
    return url


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Path]:
    return keygen(tmp_path / "keys")


@pytest.fixture
async def audited(
    tmp_path: Path, database_url: str, keys: dict[str, Path]
) -> AsyncIterator[tuple[Stack, AuditWriter, AsyncEngine]]:
    """A gateway over scripted engines whose audit recorder writes to the real database with a content key."""
    config = platform_config(str(tmp_path), database_url, ["m1"])
    db = create_engine(database_url)
    writer = await AuditWriter(
        db, signer=Signer.from_file(keys["private"]), cipher=ContentCipher.from_file(keys["content"])
    ).start()
    recorder = AuditRecorder(writer, config.profiles)
    try:
        async with gateway_stack(config, ScriptedEngine(upstreams_for(["m1"])), recorders=[recorder]) as stack:
            yield stack, writer, db
    finally:
        await writer.close()
        await db.dispose()


def sdk(stack: Stack, token: str) -> AsyncOpenAI:
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=stack.app))
    return AsyncOpenAI(api_key=token, base_url="http://gateway.test/v1", http_client=http, max_retries=0)


async def _rows(db: AsyncEngine, tenant_id: str) -> list[dict[str, Any]]:
    async with db.connect() as conn:
        query = select(EVENTS).where(EVENTS.c.tenant_id == tenant_id, EVENTS.c.kind == "inference")
        return [dict(r) for r in (await conn.execute(query.order_by(EVENTS.c.sequence))).mappings()]


async def test_content_through_the_gateway_then_erased(
    audited: tuple[Stack, AuditWriter, AsyncEngine], keys: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    stack, writer, db = audited
    logged = await stack.tenants().create(f"t-{uuid.uuid4().hex[:8]}", log_content=True)
    quiet = await stack.tenants().create(f"t-{uuid.uuid4().hex[:8]}")
    assert logged.log_content and not quiet.log_content
    messages = [{"role": "user", "content": SECRET}]
    client = sdk(stack, (await stack.keys().create(logged.name)).token)
    reply = await client.chat.completions.create(model="m1", messages=messages, max_tokens=3)
    streamed = ""
    async for chunk in await client.chat.completions.create(model="m1", messages=messages, stream=True, max_tokens=4):
        streamed += "".join(c.delta.content or "" for c in chunk.choices)
    other = sdk(stack, (await stack.keys().create(quiet.name)).token)
    await other.chat.completions.create(model="m1", messages=[{"role": "user", "content": SECRET}], max_tokens=3)
    await writer.drain(timeout=10)
    await writer.checkpoint()

    cipher = ContentCipher.from_file(keys["content"])
    rows = await _rows(db, logged.id)
    assert [await decrypt_row(db, r, cipher) for r in rows] == [
        {"prompt": messages, "completion": [{"role": "assistant", "content": reply.choices[0].message.content}]},
        {"prompt": messages, "completion": [streamed]},
    ]
    assert streamed and reply.choices[0].message.content
    (plain,) = await _rows(db, quiet.id)
    assert plain["content"] is None and "content_dropped" not in plain["payload"]
    async with db.connect() as conn:
        dump = repr((await conn.execute(text("SELECT * FROM audit_events"))).all())
    assert SECRET not in dump and SECRET not in caplog.text

    assert await erase(db, logged.id) == 1  # one data key: one tenant, one day
    for row in rows:
        with pytest.raises(ContentErased, match=rf"content of {row['chain_id']}#{row['sequence']}: erased"):
            await decrypt_row(db, row, cipher)
    assert [r["hash"] for r in await _rows(db, logged.id)] == [r["hash"] for r in rows]  # rows untouched
    chains = sorted({r["chain_id"] for r in rows} | {plain["chain_id"]})  # the session database is shared
    report = await verify_database(db, Signer.from_file(keys["private"]).verifier, chains)
    assert report.ok and report.events == 3, report.first_problem
    assert await erase(db, logged.id) == 0  # nothing left to destroy


@pytest.mark.slow
def test_erase_command_by_day_is_audited(tmp_path: Path, keys: dict[str, Path]) -> None:
    db_file = tmp_path / "bastion.db"
    migrate.upgrade(f"sqlite:///{db_file}")
    config = tmp_path / "platform.yaml"
    platform = (
        (ROOT / "deploy/local/bastion.yaml").read_text().replace("data_dir: .bastion-data", f"data_dir: {tmp_path}")
    )
    config.write_text(
        platform + f"\naudit:\n  signing_key_file: {keys['private']}\n  content_key_file: {keys['content']}\n"
    )

    def bastion(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([BASTION, *args, "--config", str(config)], capture_output=True, text=True, timeout=120)

    created = bastion("tenants", "create", "acme", "--log-content")
    assert created.returncode == 0, created.stderr
    with sqlite3.connect(db_file) as conn:
        (tenant_id,) = conn.execute("SELECT id FROM tenants WHERE name = 'acme'").fetchone()
    chain = asyncio.run(_write_days(f"sqlite+aiosqlite:///{db_file}", tenant_id, keys))
    today = utcnow().date()

    result = bastion("audit", "erase", "--tenant", "acme", "--before", today.isoformat())
    assert result.returncode == 0, result.stderr
    assert f"erased: 1 data keys of tenant acme (before {today.isoformat()})" in " ".join(result.stdout.split())
    old = bastion("audit", "content", "--chain", chain, "--sequence", "1")
    assert old.returncode == 1 and "Traceback" not in old.stderr
    assert f"content of {chain}#1: erased (tenant {tenant_id}'s data key destroyed" in " ".join(old.stderr.split())
    new = bastion("audit", "content", "--chain", chain, "--sequence", "2")
    assert new.returncode == 0 and json.loads(new.stdout) == {"prompt": "today", "completion": "kept"}
    with sqlite3.connect(db_file) as conn:
        (payload,) = conn.execute(
            "SELECT payload FROM audit_events WHERE kind = 'admin' AND payload LIKE '%audit.content.erase%'"
        ).fetchone()
    assert json.loads(payload)["after"] == {"before": today.isoformat(), "data_keys_destroyed": 1}
    verified = bastion("audit", "verify", "--public-key", str(keys["public"]))
    assert verified.returncode == 0, verified.stderr

    # An export carries content only for the auditor it is sealed to.
    made = subprocess.run(
        [BASTION, "audit", "auditor-keygen", "--out", str(tmp_path / "auditor.pem")], capture_output=True, text=True
    )
    assert made.returncode == 0, made.stderr
    export = tmp_path / "export"
    exported = bastion("audit", "export", "--out", str(export), "--content-for", str(tmp_path / "auditor.pem.pub"))
    assert exported.returncode == 0, exported.stderr
    offline = subprocess.run(
        [BASTION, "audit", "verify", "--export", str(export), "--public-key", str(keys["public"])],
        capture_output=True,
        text=True,
    )
    assert offline.returncode == 0, offline.stderr

    def exported_content(sequence: int, key: Path) -> subprocess.CompletedProcess[str]:
        args = ["--chain", chain, "--sequence", str(sequence), "--export", str(export), "--auditor-key", str(key)]
        return subprocess.run(
            [BASTION, "audit", "content", *args, "--public-key", str(keys["public"])], capture_output=True, text=True
        )

    kept = exported_content(2, tmp_path / "auditor.pem")
    assert kept.returncode == 0 and json.loads(kept.stdout) == {"prompt": "today", "completion": "kept"}, kept.stderr
    gone = exported_content(1, tmp_path / "auditor.pem")
    assert gone.returncode == 1 and f"content of {chain}#1: erased before this export" in " ".join(gone.stderr.split())
    subprocess.run([BASTION, "audit", "auditor-keygen", "--out", str(tmp_path / "other.pem")], check=True)
    other = exported_content(2, tmp_path / "other.pem")
    assert other.returncode == 1 and "content-keys.json is sealed for auditor key" in " ".join(other.stderr.split())
    with sqlite3.connect(db_file) as conn:
        (payload,) = conn.execute(
            "SELECT payload FROM audit_events WHERE payload LIKE '%audit.content.export%'"
        ).fetchone()
    assert json.loads(payload)["after"] | {"recipient": "-"} == {"recipient": "-", "data_keys": 1, "erased_keys": 1}
    missing = bastion("audit", "erase", "--tenant", "nobody")
    assert missing.returncode == 1 and missing.stderr.strip().splitlines() == ["error: no tenant 'nobody'"]


async def _write_days(url: str, tenant_id: str, keys: dict[str, Path]) -> str:
    writer = AuditWriter(url, signer=Signer.from_file(keys["private"]), cipher=ContentCipher.from_file(keys["content"]))
    await writer.start()
    for when, content in (
        (utcnow() - timedelta(days=3), EventContent(prompt="three days ago", completion="erased")),
        (utcnow(), EventContent(prompt="today", completion="kept")),
    ):
        writer.enqueue(
            InferenceEvent(tenant_id=tenant_id, model="m", profile="p", status=200, occurred_at=when, content=content)
        )
    await writer.close()
    return f"{writer.writer_id}:{tenant_id}"
