"""Who did it: audit CLI actions are recorded as the operator a pinned key proves, never as an environment
variable; an unpinned key, or none where operators are pinned, is refused before anything happens."""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from bastion.audit import AuditWriter, EventContent, InferenceEvent
from bastion.audit.crypto import ContentCipher
from bastion.audit.signing import Signer, Verifier, keygen
from bastion.db import migrate

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
BASTION = str(Path(sys.executable).parent / "bastion")


def _platform(tmp_path: Path, keys: dict[str, Path], operators: dict[str, Path]) -> Path:
    config = tmp_path / "platform.yaml"
    text = (ROOT / "deploy/local/bastion.yaml").read_text().replace("data_dir: .bastion-data", f"data_dir: {tmp_path}")
    text += f"\naudit:\n  signing_key_file: {keys['private']}\n  content_key_file: {keys['content']}\n"
    text += f"  trusted_key_fingerprints: [{Verifier.from_file(keys['public']).fingerprint}]\n"  # verify trusts it
    if operators:
        text += "  operators:\n" + "".join(f"    {name}: {path}\n" for name, path in operators.items())
    config.write_text(text)
    migrate.upgrade(f"sqlite:///{tmp_path / 'bastion.db'}")
    return config


def _bastion(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # USER and LOGNAME lie on purpose: the identity must not come from the environment.
    env = {**os.environ, "HOME": str(tmp_path / "home"), "USER": "ceo", "LOGNAME": "ceo"}
    return subprocess.run([BASTION, *args], capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)


def _actors(tmp_path: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(tmp_path / "bastion.db") as db:
        rows = db.execute("SELECT kind, actor FROM audit_events WHERE kind != 'inference' ORDER BY id").fetchall()
    return [(kind, actor) for kind, actor in rows]


def test_actions_are_recorded_as_the_proven_operator(tmp_path: Path) -> None:
    keys = keygen(tmp_path / "keys")
    made = _bastion(tmp_path, "audit", "operator-keygen", "--out", str(tmp_path / "alice.pem"))
    assert made.returncode == 0, made.stderr
    alice_id = made.stdout.split()[2].rstrip(":")
    assert _bastion(tmp_path, "audit", "operator-keygen", "--out", str(tmp_path / "mallory.pem")).returncode == 0
    config = _platform(tmp_path, keys, {"alice": tmp_path / "alice.pem.pub"})
    chain = asyncio.run(_content_event(tmp_path, keys))

    refused = _bastion(tmp_path, "audit", "verify", "--config", str(config))
    assert refused.returncode == 1 and refused.stderr.strip().splitlines() == [
        "error: this platform names its operators (audit.operators): prove who you are with --operator-key FILE"
    ]
    impostor = _bastion(tmp_path, "audit", "--operator-key", str(tmp_path / "mallory.pem"), "verify", "-c", str(config))
    assert impostor.returncode == 1 and "is not pinned in audit.operators" in impostor.stderr
    assert _actors(tmp_path) == []  # refused before anything was done or recorded

    alice = ("audit", "--operator-key", str(tmp_path / "alice.pem"))
    assert _bastion(tmp_path, *alice, "verify", "--config", str(config)).returncode == 0
    read = _bastion(tmp_path, *alice, "content", "--chain", chain, "--sequence", "1", "--config", str(config))
    assert read.returncode == 0 and json.loads(read.stdout) == {"prompt": "p", "completion": "c"}
    who = f"operator:alice#{alice_id}"
    assert _actors(tmp_path) == [("verify", who), ("admin", who)]  # reading content is audited, by name


def test_without_pinned_operators_the_os_account_is_recorded_unverified(tmp_path: Path) -> None:
    config = _platform(tmp_path, keygen(tmp_path / "keys"), {})
    assert _bastion(tmp_path, "audit", "verify", "--config", str(config)).returncode == 0
    assert _actors(tmp_path) == [("verify", f"cli-unverified:{pwd.getpwuid(os.getuid()).pw_name}")]


async def _content_event(tmp_path: Path, keys: dict[str, Path]) -> str:
    writer = AuditWriter(
        f"sqlite+aiosqlite:///{tmp_path / 'bastion.db'}",
        signer=Signer.from_file(keys["private"]),  # the chain opens with a signed genesis, as in the gateway
        cipher=ContentCipher.from_file(keys["content"]),
    )
    await writer.start()
    content = EventContent(prompt="p", completion="c")
    writer.enqueue(InferenceEvent(tenant_id="acme", model="m", profile="p", status=200, content=content))
    await writer.close()
    return f"{writer.writer_id}:acme"
