"""Key custody: the keys an auditor trusts, and key rotation by hand-over records.

Verification trusts only keys it was told to trust (`--public-key`, or fingerprints pinned in the platform
file), never whatever key the platform file happens to name. A rotation writes a `key_handover` record that
names the old and the new key and is signed by both: from a trusted old key the new one becomes trusted, and
from a trusted new key the old one does, so signatures made before the rotation keep verifying.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from bastion.audit.errors import AuditKeyError
from bastion.audit.events import format_time
from bastion.audit.signing import Signer, Verifier, public_raw, record_message

HANDOVER = "key_handover"


@dataclass
class Keyring:
    """Trusted verifiers by key id; `introduced` says how each became trusted (pinned, or which hand-over)."""

    keys: dict[str, Verifier] = field(default_factory=dict)
    introduced: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, *verifiers: Verifier) -> Keyring:
        ring = cls()
        for verifier in verifiers:
            ring.trust(verifier, "pinned")
        return ring

    def trust(self, verifier: Verifier, how: str) -> None:
        if verifier.key_id not in self.keys:
            self.keys[verifier.key_id] = verifier
            self.introduced[verifier.key_id] = how

    @property
    def fingerprints(self) -> list[str]:
        return [v.fingerprint for v in self.keys.values()]

    def verify_head(self, row: Any) -> bool:
        verifier = self.keys.get(row.key_id)
        return verifier is not None and verifier.verify_head(row)

    def verify_record(self, row: Any) -> bool:
        verifier = self.keys.get(row.key_id)
        return verifier is not None and verifier.verify(bytes(row.signature), record_message(row.kind, row.body))

    def verify_any(self, signature: bytes, message: bytes) -> Verifier | None:
        """The trusted key that made this signature (export manifests), or None."""
        return next((v for v in self.keys.values() if v.verify(signature, message)), None)

    def follow_handovers(self, records: list[Any]) -> list[str]:
        """Trust keys introduced by hand-overs signed by both sides, one of them trusted; returns problems."""
        pending = list(records)
        changed = True
        while changed:
            changed = False
            for record in list(pending):
                old_id, new_id = record.body["old_key_id"], record.body["new_key_id"]
                if old_id not in self.keys and new_id not in self.keys:
                    continue
                pending.remove(record)
                if not _handover_ok(record):
                    return [f"key hand-over {old_id} -> {new_id} (record {record.id}): bad signature"]
                for key_id in (old_id, new_id):
                    if key_id not in self.keys:
                        raw = base64.b64decode(record.body["old_public_key" if key_id == old_id else "new_public_key"])
                        self.trust(Verifier(Ed25519PublicKey.from_public_bytes(raw)), f"hand-over record {record.id}")
                        changed = True
        return []


def _handover_ok(record: Any) -> bool:
    """Both signatures over the record, each by the key the body names (the new key proves possession)."""
    body = record.body
    message = record_message(HANDOVER, body)
    try:
        old = Verifier(Ed25519PublicKey.from_public_bytes(base64.b64decode(body["old_public_key"])))
        new = Verifier(Ed25519PublicKey.from_public_bytes(base64.b64decode(body["new_public_key"])))
    except (ValueError, KeyError):
        return False
    return (
        (old.key_id, new.key_id) == (body["old_key_id"], body["new_key_id"])
        and record.key_id == old.key_id
        and old.verify(bytes(record.signature), message)
        and record.co_signature is not None
        and new.verify(bytes(record.co_signature), message)
    )


def handover_record(old: Signer, new: Signer, actor: str) -> dict[str, Any]:
    """An audit_records row introducing `new` as the successor of `old`, signed by both."""
    now = datetime.now(UTC)
    body = {
        "old_key_id": old.key_id,
        "old_public_key": base64.b64encode(public_raw(old.verifier.public_key)).decode(),
        "new_key_id": new.key_id,
        "new_public_key": base64.b64encode(public_raw(new.verifier.public_key)).decode(),
        "new_fingerprint": new.verifier.fingerprint,
        "at": format_time(now),
        "actor": actor,
    }
    if old.key_id == new.key_id:
        raise AuditKeyError("the new signing key is the current one")
    message = record_message(HANDOVER, body)
    return {
        "kind": HANDOVER,
        "chain_id": None,
        "key_id": old.key_id,
        "body": body,
        "signed_at": now,
        "signature": old.sign(message),
        "co_signature": new.sign(message),
    }
