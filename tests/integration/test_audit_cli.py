"""`bastion audit ...` as an operator runs it (SQLite): keygen, verify, export, offline verification, retention."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from bastion.audit import AuditWriter, EventContent, InferenceEvent
from bastion.audit.crypto import ContentCipher
from bastion.db import migrate

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
BASTION = str(Path(sys.executable).parent / "bastion")


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([BASTION, *args], capture_output=True, text=True, cwd=ROOT, timeout=120, check=False)


def test_audit_commands_end_to_end(tmp_path: Path) -> None:
    helped = _run("audit", "verify", "--help").stdout
    assert all(option in helped for option in ("--json", "--witness", "--public-key", "--max-unsigned-s"))
    keys = tmp_path / "keys"
    assert _run("audit", "keygen", "--out", str(keys)).returncode == 0
    private, public = keys / "audit-signing.pem", keys / "audit-signing.pub.pem"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600

    config = tmp_path / "platform.yaml"
    text = (ROOT / "deploy/local/bastion.yaml").read_text().replace("data_dir: .bastion-data", f"data_dir: {tmp_path}")
    text += f"\naudit:\n  signing_key_file: {private}\n  content_key_file: {keys / 'audit-content.key'}\n"
    config.write_text(text)
    migrate.upgrade(f"sqlite:///{tmp_path / 'bastion.db'}")
    result = _run("audit", "verify", "--config", str(config))  # the platform file's own key is not trusted
    assert result.returncode == 1 and "no trusted audit key" in result.stderr, result.stderr
    fingerprint = _run("audit", "fingerprint", str(public)).stdout.strip()
    config.write_text(text + f"  trusted_key_fingerprints: [{fingerprint}]\n")
    result = _run("audit", "verify", "--config", str(config))
    assert result.returncode == 0 and "ok: 0 chains, 0 events" in result.stdout, result.stderr
    assert f"trusted key: {fingerprint}" in result.stdout

    out = tmp_path / "export"
    result = _run(
        "audit", "export", "--config", str(config), "--format", "csv", "--from", "2020-01-01", "--out", str(out)
    )
    assert result.returncode == 0, result.stderr
    assert "1 events exported" in result.stdout
    result = _run("audit", "verify", "--export", str(out), "--public-key", str(public))
    assert result.returncode == 0 and "ok: 1 events" in result.stdout, result.stderr

    events = out / "events.csv"
    data = bytearray(events.read_bytes())
    data[-5] ^= 0x01
    events.write_bytes(bytes(data))
    result = _run("audit", "verify", "--export", str(out), "--public-key", str(public))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: export does not verify: events.csv: SHA-256 differs from the signed manifest (file changed)"
    ]

    with sqlite3.connect(tmp_path / "bastion.db") as db:  # SQLite has no trigger: tamper directly
        db.execute("UPDATE audit_events SET actor = 'mallory' WHERE id = 1")
    result = _run("audit", "verify", "--config", str(config))
    assert result.returncode == 1 and "sequence 1: modified" in result.stderr

    result = _run("audit", "retention", "--config", str(config))
    assert result.returncode == 0 and "retention: 0 events deleted" in result.stdout

    chain = asyncio.run(_write_with_content(f"sqlite:///{tmp_path / 'bastion.db'}", keys / "audit-content.key"))
    result = _run("audit", "content", "--config", str(config), "--chain", chain, "--sequence", "1")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"prompt": "board minutes", "completion": "summary"}
    with sqlite3.connect(tmp_path / "bastion.db") as db:  # the reading was audited, naming the event read
        (target,) = db.execute("SELECT payload FROM audit_events WHERE kind = 'admin'").fetchone()
    assert json.loads(target)["target_id"] == f"{chain}#1"


async def _write_with_content(url: str, content_key: Path) -> str:
    writer = AuditWriter(url, cipher=ContentCipher.from_file(content_key))
    await writer.start()
    content = EventContent(prompt="board minutes", completion="summary")
    writer.enqueue(InferenceEvent(tenant_id="acme", model="m", profile="p", status=200, content=content))
    await writer.close()
    return f"{writer.writer_id}:acme"
