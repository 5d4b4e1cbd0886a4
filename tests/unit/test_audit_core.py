"""Audit building blocks without a database: canonical JSON, chain hashing, keys, content encryption, spool."""

from __future__ import annotations

import json
import stat
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from bastion.audit import AdminEvent, AuditKeyError, EventContent, InferenceEvent
from bastion.audit.chain import GENESIS, ChainHead, chain_id_for, new_writer_id, row_hash
from bastion.audit.crypto import ContentCipher, decrypt_content
from bastion.audit.errors import AuditError
from bastion.audit.events import EVENT_ADAPTER, canonical_json, format_time
from bastion.audit.signing import Signer, Verifier, checkpoint_message, keygen
from bastion.audit.spool import Spool

pytestmark = pytest.mark.unit
SECRET_PROMPT = "the merger closes on friday"


def _event(**extra: object) -> InferenceEvent:
    base = {"tenant_id": "acme", "model": "m", "profile": "fast-agentic", "status": 200, "request_id": "r1"}
    return InferenceEvent(**{**base, **extra})


def test_canonical_json_is_sorted_compact_utf8() -> None:
    assert (
        canonical_json({"b": 1, "a": "é", "c": [1, {"z": 0, "y": None}]})
        == '{"a":"é","b":1,"c":[1,{"y":null,"z":0}]}'.encode()
    )
    with pytest.raises(ValueError):
        canonical_json({"x": float("nan")})


def test_timestamps_have_one_utc_form() -> None:
    local = datetime(2026, 11, 29, 16, 0, 0, 5, tzinfo=timezone(timedelta(hours=2)))
    assert format_time(local) == "2026-11-29T14:00:00.000005Z"
    assert _event(occurred_at=local).occurred_at.tzinfo == UTC
    with pytest.raises(ValueError):
        _event(occurred_at=datetime(2026, 1, 1))  # naive


def test_chain_links_and_any_change_breaks_the_hash() -> None:
    head = ChainHead("w:acme")
    first = head.seal(_event().record() | {"content": None})
    second = head.seal(_event(request_id="r2").record() | {"content": None})
    assert (first["sequence"], first["prev_hash"]) == (1, GENESIS)
    assert (second["sequence"], second["prev_hash"]) == (2, first["hash"])
    assert row_hash(first["prev_hash"], first) == first["hash"]
    for column, value in [("payload", {"status": 500}), ("sequence", 3), ("tenant_id", "other"), ("content", b"x")]:
        assert row_hash(first["prev_hash"], {**first, column: value}) != first["hash"], column


def test_writer_ids_fit_the_chain_column() -> None:
    assert len(chain_id_for(new_writer_id(), "f" * 32)) <= 64
    assert chain_id_for("w", None) == "w:-"


def test_content_is_never_in_the_payload_or_repr() -> None:
    event = _event(content=EventContent(prompt=SECRET_PROMPT, completion="ok"))
    record = event.record()
    assert SECRET_PROMPT not in json.dumps(record, default=str)
    assert SECRET_PROMPT not in repr(event) and SECRET_PROMPT not in str(event.content)
    assert event.event_content is not None and event.event_content.prompt == SECRET_PROMPT


def test_admin_snapshots_are_redacted_and_events_parse_back() -> None:
    event = AdminEvent(actor="alice", action="key.rotate", target_type="api_key", after={"secret": "s3", "scopes": []})
    assert event.after == {"secret": "[redacted]", "scopes": []}
    parsed = EVENT_ADAPTER.validate_python({"kind": "admin", "actor": "bob", "action": "a", "target_type": "t"})
    assert isinstance(parsed, AdminEvent)
    with pytest.raises(ValueError, match="NUL"):  # a row PostgreSQL would refuse never reaches the writer
        AdminEvent(actor="eve\x00", action="a", target_type="t")


def test_keygen_permissions_and_signatures(tmp_path: Path) -> None:
    paths = keygen(tmp_path / "keys")
    assert stat.S_IMODE(paths["private"].stat().st_mode) == 0o600
    assert stat.S_IMODE(paths["content"].stat().st_mode) == 0o600
    signer = Signer.from_file(paths["private"])
    verifier = Verifier.from_file(paths["public"])
    assert verifier.key_id == signer.key_id
    signature = signer.sign_checkpoint("w:acme", 7, "a" * 64)
    assert verifier.verify_checkpoint(signer.key_id, "w:acme", 7, "a" * 64, signature)
    assert not verifier.verify_checkpoint(signer.key_id, "w:acme", 8, "a" * 64, signature)
    assert not verifier.verify(signature, checkpoint_message("w:acme", 7, "b" * 64))
    with pytest.raises(AuditKeyError, match="refusing to overwrite"):
        keygen(tmp_path / "keys")


def test_bad_key_files_are_clear_and_do_not_echo_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("not-a-key-SECRETVALUE")
    with pytest.raises(AuditKeyError) as info:
        Signer.from_file(bad)
    assert "SECRETVALUE" not in str(info.value)
    with pytest.raises(AuditKeyError, match="not found"):
        ContentCipher.from_file(tmp_path / "missing.key")


def test_content_encryption_round_trip_is_bound_to_its_row(tmp_path: Path) -> None:
    cipher = ContentCipher.from_file(keygen(tmp_path)["content"])
    blob = cipher.encrypt({"prompt": SECRET_PROMPT, "completion": "done"}, "w:acme", 3)
    assert SECRET_PROMPT.encode() not in blob
    row = {"content": blob, "chain_id": "w:acme", "sequence": 3}
    assert decrypt_content(row, cipher) == {"prompt": SECRET_PROMPT, "completion": "done"}
    with pytest.raises(AuditError, match="authentication failed"):
        cipher.decrypt(blob, "w:acme", 4)  # moved to another row
    with pytest.raises(AuditError, match="another key"):
        ContentCipher(b"k" * 32).decrypt(blob, "w:acme", 3)


def test_spool_appends_replays_and_repairs_a_torn_line(tmp_path: Path) -> None:
    head = ChainHead("w:acme")
    rows = [head.seal(_event(request_id=f"r{i}").record() | {"content": b"\x00\x01"}) for i in range(5)]
    spool = Spool(tmp_path / "w.jsonl")
    spool.append(rows[:3])
    with pytest.raises(AuditError, match="live writer"):
        Spool(tmp_path / "w.jsonl")  # locked while its writer lives
    with open(spool.path, "ab") as handle:
        handle.write(b'{"torn":')  # a crash in the middle of a write
    spool.close(remove_if_empty=False)

    spool = Spool(tmp_path / "w.jsonl", create=False)  # adopted by the next writer: the torn tail is cut
    read, end = spool.read(10)
    assert [r["hash"] for r in read] == [r["hash"] for r in rows[:3]]
    assert read[0]["content"] == b"\x00\x01" and read[0]["occurred_at"] == rows[0]["occurred_at"]
    spool.advance(end)
    assert not spool.pending and spool.size == 0
    spool.append(rows[3:])
    assert [r["sequence"] for r in spool.read(10)[0]] == [4, 5]
    spool.close()


def test_fast_canonical_row_is_byte_identical_to_canonical_json() -> None:
    """Sealing and verification use a key-by-key writer; it must give canonical_json's exact bytes."""
    from datetime import UTC, datetime

    from bastion.audit.chain import _canonical_row_slow, canonical_row

    base = {
        "chain_id": "w-1-ab:acme",
        "sequence": 7,
        "occurred_at": datetime(2026, 12, 3, 13, 0, 0, 123456, tzinfo=UTC),
        "kind": "inference",
        "payload": {"z": 1, "a": [1.5, None, 'é\n"\\\u2028'], "nested": {"b": True, "a": "\x00"}},
        "content": b"ciphertext",
    }
    variants = [
        {**base, "tenant_id": "acme", "actor": "ops@example.com", "request_id": "r-1"},
        {**base, "tenant_id": None, "actor": None, "request_id": None, "content": None, "payload": {}},
        {**base, "tenant_id": "ünï\u00e9\U0001f600", "actor": 'a"b\\c\td', "request_id": "\u007f", "payload": None},
        {**base, "occurred_at": "2026-12-03T13:00:00.000001Z", "tenant_id": "t", "actor": None, "request_id": "x"},
        {**base, "tenant_id": "t", "actor": 5, "request_id": None},  # not text: the general form
    ]
    for row in variants:
        assert canonical_row(row) == _canonical_row_slow(row), row
