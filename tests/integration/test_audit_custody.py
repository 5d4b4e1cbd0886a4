"""Key custody and auditors' reports, through the CLI on PostgreSQL: pinned keys only, rotation by hand-over,
a separate export key; every problem listed with its location (`--json`); exports refuse a log that does not
verify unless told, and their verification names the changed row."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from audit_support import (
    as_owner,
    cli,
    engine,
    event,
    keys,
    owner,
    platform_file,
    rewrite_from,
    signer,
    verify_json,
    write,
)
from sqlalchemy.ext.asyncio import AsyncEngine

from bastion.audit import AuditWriter
from bastion.audit.signing import Signer, Verifier, checkpoint_row, keygen
from bastion.audit.store import CHECKPOINTS

pytestmark = [pytest.mark.integration, pytest.mark.slow]
__all__ = ["engine", "keys", "owner", "signer"]  # fixtures


def _keys(tmp_path: Path, name: str) -> tuple[Path, Path, str]:
    made = keygen(tmp_path / name)
    return made["private"], made["public"], Verifier.from_file(made["public"]).fingerprint


def _found(report: dict) -> list[tuple[str, int, str]]:
    assert "problems" in report, report
    return [(p["chain_id"], p["sequence"], p["what"]) for p in report["problems"]]


@pytest.mark.timeout(300)
async def test_pinned_keys_rotation_and_export_key(
    engine: AsyncEngine, owner: AsyncEngine, pg_url: str, tmp_path: Path
) -> None:
    a_key, a_pub, a_fp = _keys(tmp_path, "a")
    b_key, b_pub, b_fp = _keys(tmp_path, "b")
    _, c_pub, c_fp = _keys(tmp_path, "c")
    e_key, e_pub, _ = _keys(tmp_path, "export")
    first = await write(engine, Signer.from_file(a_key), 4)

    pinned = platform_file(tmp_path, pg_url, {"signing_key_file": a_key, "trusted_key_fingerprints": [a_fp]})
    code, report, err = verify_json("--config", str(pinned))
    assert code == 0 and report["ok"] and report["trusted_keys"] == [a_fp], (err, report)
    plain = cli("audit", "verify", "--config", str(pinned))
    assert plain.returncode == 0 and f"trusted key: {a_fp}" in plain.stdout

    wrong_pin = platform_file(
        tmp_path, pg_url, {"signing_key_file": a_key, "trusted_key_fingerprints": [c_fp]}, "wrong-pin"
    )
    refused = cli("audit", "verify", "--config", str(wrong_pin))
    assert refused.returncode == 1 and "refusing to verify: no configured key is pinned" in refused.stderr
    unpinned = platform_file(tmp_path, pg_url, {"signing_key_file": a_key}, "unpinned")
    refused = cli("audit", "verify", "--config", str(unpinned))
    assert refused.returncode == 1 and "no trusted audit key" in refused.stderr

    # The table owner re-signs the chain's heads with a key of their own: not a key the auditor trusts.
    mallory = Signer.from_file(keygen(tmp_path / "mallory")["private"])
    forged = [checkpoint_row(mallory, first, 0, "0" * 64, "genesis"), checkpoint_row(mallory, first, 4, "f" * 64)]
    await as_owner(owner, "DELETE FROM audit_checkpoints WHERE chain_id = :c", params={"c": first})
    async with owner.begin() as conn:
        await conn.execute(CHECKPOINTS.insert(), forged)
    code, report, _ = verify_json("--config", str(pinned))
    assert code == 1 and _found(report) == [
        (first, 0, "bad signature"),
        (first, 0, "no genesis"),
        (first, 4, "bad signature"),
    ]
    await as_owner(owner, "DELETE FROM audit_checkpoints WHERE chain_id = :c", params={"c": first})
    await as_owner(owner, "DELETE FROM audit_events WHERE chain_id = :c", params={"c": first})

    # A separate export key signs manifests; the auditor trusts it explicitly.
    second = await write(engine, Signer.from_file(a_key), 3, tenant="globex")
    exporting = platform_file(
        tmp_path,
        pg_url,
        {"signing_key_file": a_key, "trusted_key_fingerprints": [a_fp], "export_key_file": e_key},
        "exporting",
    )
    out = tmp_path / "globex-export"
    assert cli("audit", "export", "--config", str(exporting), "--tenant", "globex", "--out", str(out)).returncode == 0
    only_writer = cli("audit", "verify", "--export", str(out), "--public-key", str(a_pub))
    assert only_writer.returncode == 1 and "manifest.json: signature does not verify" in only_writer.stderr
    both = cli("audit", "verify", "--export", str(out), "--public-key", str(a_pub), "--public-key", str(e_pub))
    assert both.returncode == 0 and "ok: 3 events" in both.stdout, both.stderr

    # Rotation: a hand-over signed by both keys; chains signed by either key verify from either pinned key.
    rotated = cli("audit", "rotate-key", "--config", str(pinned), "--new-key", str(b_key))
    assert rotated.returncode == 0 and f"{a_fp} -> {b_fp}" in rotated.stdout, rotated.stderr
    third = await write(engine, Signer.from_file(b_key), 2, tenant="initech")
    for trusted, expected in ((a_pub, [a_fp, b_fp]), (b_pub, [b_fp, a_fp])):
        code, report, err = verify_json("--config", str(pinned), "--public-key", str(trusted))
        assert code == 0 and report["trusted_keys"] == expected, (err, report.get("problems"))
    code, report, _ = verify_json("--config", str(pinned), "--public-key", str(c_pub))
    assert code == 1 and {(c, s, w) for c, s, w in _found(report) if c in (second, third)} >= {
        (second, 0, "no genesis"),
        (third, 0, "no genesis"),
    }
    # Without its hand-over record, the new key is just another key.
    await as_owner(owner, "DELETE FROM audit_records WHERE kind = 'key_handover'")
    code, report, _ = verify_json("--config", str(pinned), "--public-key", str(a_pub))
    assert code == 1 and [p for p in _found(report) if p[0] == third] == [
        (third, 0, "bad signature"),
        (third, 0, "no genesis"),
        (third, 2, "bad signature"),
    ]


@pytest.mark.timeout(300)
async def test_every_problem_listed_and_exports_refuse_unverified_logs(
    engine: AsyncEngine, owner: AsyncEngine, pg_url: str, keys: dict[str, Path], signer: Signer, tmp_path: Path
) -> None:
    writer = await AuditWriter(engine, signer=signer, checkpoint_every=3, batch_size=3).start()
    for i in range(10):
        writer.enqueue(event(i, "acme"))
        writer.enqueue(event(i, "globex"))
        await writer.flush()
        await writer.checkpoint()
    await writer.close()
    acme, globex = (f"{writer.writer_id}:{t}" for t in ("acme", "globex"))
    config = platform_file(tmp_path, pg_url, {"signing_key_file": keys["private"]})
    public = str(keys["public"])

    clean = tmp_path / "clean"
    assert cli("audit", "export", "--config", str(config), "--tenant", "acme", "--out", str(clean)).returncode == 0
    events = clean / "events.jsonl"
    events.write_text(events.read_text().replace('"request_id":"r5"', '"request_id":"r9"'))
    named = cli("audit", "verify", "--export", str(clean), "--public-key", public)
    assert named.returncode == 1
    assert "events.jsonl: SHA-256 differs from the signed manifest" in named.stderr
    assert f"problem: chain {acme} sequence 6: modified" in named.stdout  # r5 is the 6th event

    await as_owner(
        owner,
        "UPDATE audit_events SET actor = 'mallory' WHERE chain_id = :acme AND sequence = 3",
        "DELETE FROM audit_events WHERE chain_id = :globex AND sequence = 2",
        params={"acme": acme, "globex": globex},
    )
    await rewrite_from(owner, globex, 8)  # re-hashed from 8 on: only the signed head at 8 disagrees
    code, report, err = verify_json("--config", str(config), "--public-key", public)
    assert code == 1 and "5 problems" in err
    assert _found(report) == [
        (acme, 3, "modified"),
        (globex, 2, "deleted"),
        *((globex, seq, "modified") for seq in (8, 9, 10)),  # every signed head past the rewrite disagrees
    ]
    rewrite = report["problems"][2]["detail"]
    assert "after sequence 7" in rewrite  # the first changed row lies in (7, 8]: located exactly here

    refused = cli("audit", "export", "--config", str(config), "--out", str(tmp_path / "refused"))
    assert refused.returncode == 1 and "export refused: the log does not verify (5 problems" in refused.stderr
    out = tmp_path / "unverified"
    allowed = cli(
        "audit", "export", "--config", str(config), "--allow-unverified", "--tenant", "acme", "--out", str(out)
    )
    assert allowed.returncode == 0 and "did not verify" in allowed.stdout, allowed.stderr
    verification = json.loads((out / "manifest.json").read_text())["verification"]
    assert verification["verified"] is False and verification["problem_count"] == 1  # the acme chain
    assert verification["problems"][0].startswith(f"chain {acme} sequence 3: modified")
    checked = cli("audit", "verify", "--export", str(out), "--public-key", public)
    assert checked.returncode == 1 and "exported with --allow-unverified" in checked.stdout
    assert f"chain {acme} sequence 3: modified" in checked.stderr  # the export's own walk names the row
