"""Hash chains: hash = SHA-256(prev_hash ‖ canonical JSON of the row), one chain per (writer, tenant).

A row here is a dict with the audit_events columns. The canonical document covers every column except the
database id, prev_hash (which is the hash's prefix) and hash itself; the content ciphertext is covered by its
SHA-256, so a swapped or altered ciphertext breaks the chain like any other change.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from bastion.audit.events import canonical_json, format_time

GENESIS = "0" * 64
RAW_PAYLOAD = "_payload_text"  # a row read for verification: the payload column's stored text, not yet parsed
SEALED_PAYLOAD = "_payload_sealed"  # a sealed row: the canonical payload text it was hashed with (for the insert)
SYSTEM_TENANT = "-"  # chain suffix for events without a tenant (admin actions, unknown-key failures)


def new_writer_id() -> str:
    """host-pid-random, at most 29 characters so `writer:tenant` fits the 64-character chain id."""
    host = "".join(c for c in socket.gethostname() if c.isalnum() or c in "-.")[:12] or "host"
    return f"{host}-{os.getpid()}-{secrets.token_hex(4)}"


def chain_id_for(writer_id: str, tenant_id: str | None) -> str:
    """Chains are per writer *and* tenant, so per-tenant retention deletes a chain prefix, never holes."""
    return f"{writer_id}:{tenant_id or SYSTEM_TENANT}"


_STRING = json.encoder.encode_basestring  # what canonical_json's encoder writes for a str (ensure_ascii=False)
_ENCODE_PAYLOAD = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode


def _text(value: Any) -> str:
    return "null" if value is None else _STRING(value)


def canonical_row(row: Mapping[str, Any]) -> bytes:
    """canonical_json of the row's document, written key by key (the keys are fixed and already sorted): the
    same bytes, several times faster, because sealing and verification run it for every event."""
    try:
        occurred, content = row["occurred_at"], row.get("content")
        if type(occurred) is datetime and occurred.tzinfo is UTC:
            stamp = occurred.isoformat(timespec="microseconds")[:-6] + "Z"  # format_time, without its checks
        else:
            stamp = format_time(occurred) if isinstance(occurred, datetime) else occurred
        payload = row.get(RAW_PAYLOAD)
        if payload is None:
            payload = _ENCODE_PAYLOAD(row.get("payload") or {})
        digest = f'"{hashlib.sha256(content).hexdigest()}"' if content else "null"
        return (
            f'{{"actor":{_text(row.get("actor"))},"chain_id":{_STRING(row["chain_id"])},"content_sha256":{digest},'
            f'"kind":{_STRING(row["kind"])},"occurred_at":{_STRING(stamp)},"payload":{payload},'
            f'"request_id":{_text(row.get("request_id"))},"sequence":{int(row["sequence"])},'
            f'"tenant_id":{_text(row.get("tenant_id"))},"v":1}}'
        ).encode()
    except TypeError:  # a column that is not text (or a payload json cannot encode): the general form decides
        return _canonical_row_slow(row)


def _canonical_row_slow(row: Mapping[str, Any]) -> bytes:
    if row.get(RAW_PAYLOAD) is not None:
        row = {**row, "payload": json.loads(row[RAW_PAYLOAD])}
    occurred = row["occurred_at"]
    content = row.get("content")
    doc = {
        "v": 1,
        "chain_id": row["chain_id"],
        "sequence": int(row["sequence"]),
        "occurred_at": format_time(occurred) if isinstance(occurred, datetime) else occurred,
        "kind": row["kind"],
        "tenant_id": row.get("tenant_id"),
        "actor": row.get("actor"),
        "request_id": row.get("request_id"),
        "payload": row.get("payload") or {},
        "content_sha256": hashlib.sha256(content).hexdigest() if content else None,
    }
    return canonical_json(doc)


def row_hash(prev_hash: str, row: Mapping[str, Any]) -> str:
    return hashlib.sha256(prev_hash.encode("ascii") + canonical_row(row)).hexdigest()


def hashes_to_stored(row: dict[str, Any]) -> bool:
    """Whether the row's columns hash to its stored hash. A row read with its payload's stored text (RAW_PAYLOAD)
    is first hashed with that text as is: a match proves the text is the canonical form (SHA-256), so only a
    mismatch pays for parsing the payload and hashing its canonical form."""
    if row_hash(row["prev_hash"], row) == row["hash"]:
        return True
    raw = row.pop(RAW_PAYLOAD, None)
    if raw is None:
        return False
    row["payload"] = json.loads(raw)
    return row_hash(row["prev_hash"], row) == row["hash"]


@dataclass
class ChainHead:
    """The writer's view of one chain: the last sequence and hash it sealed."""

    chain_id: str
    sequence: int = 0
    hash: str = GENESIS
    checkpointed: int = 0  # last sequence covered by a checkpoint

    def seal(self, row: dict[str, Any]) -> dict[str, Any]:
        """Give `row` the next sequence, link it to the head, and hash it (in place, returned for chaining)."""
        row["chain_id"] = self.chain_id
        row["sequence"] = self.sequence + 1
        row["prev_hash"] = self.hash
        row.pop(RAW_PAYLOAD, None)
        if isinstance(row.get("payload"), dict):  # encoded once: hashed here, and inserted as is when ASCII
            row[RAW_PAYLOAD] = _ENCODE_PAYLOAD(row["payload"])  # may raise: the head is untouched then
        row["hash"] = row_hash(self.hash, row)
        if RAW_PAYLOAD in row:  # not left where a later change of the payload would be hashed with stale text
            row[SEALED_PAYLOAD] = row.pop(RAW_PAYLOAD)
        self.sequence, self.hash = row["sequence"], row["hash"]
        return row
