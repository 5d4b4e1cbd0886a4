"""Content encryption at rest: AES-256-GCM, key from a file, bound to the row it belongs to.

Blob layout: version (1 byte) ‖ key id (8 bytes) ‖ nonce (12 bytes) ‖ ciphertext+tag. The associated data is
the row's chain id and sequence, so a ciphertext moved to another row no longer decrypts.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from bastion.audit.errors import AuditError, AuditKeyError

_VERSION = b"\x01"


def generate_content_key() -> bytes:
    return AESGCM.generate_key(bit_length=256)


def _aad(chain_id: str, sequence: int) -> bytes:
    return f"bastion-audit-content-v1|{chain_id}|{int(sequence)}".encode()


class ContentCipher:
    """Encrypts in the writer task (never on the request path); decrypts only for auditors."""

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise AuditKeyError("content key must be 32 bytes (AES-256)")
        self._aead = AESGCM(key)
        self.key_id = hashlib.sha256(b"bastion-content-key" + key).digest()[:8]

    def __repr__(self) -> str:
        return f"ContentCipher(key_id={self.key_id.hex()})"

    @classmethod
    def from_file(cls, path: Path) -> ContentCipher:
        try:
            text = Path(path).read_bytes().strip()
        except FileNotFoundError:
            raise AuditKeyError(f"{path}: content key file not found") from None
        except OSError as exc:
            raise AuditKeyError(f"{path}: cannot read content key ({exc.strerror})") from None
        try:
            key = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise AuditKeyError(f"{path}: content key is not base64") from None
        return cls(key)

    def encrypt(self, content: Any, chain_id: str, sequence: int) -> bytes:
        plaintext = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        nonce = os.urandom(12)
        return _VERSION + self.key_id + nonce + self._aead.encrypt(nonce, plaintext, _aad(chain_id, sequence))

    def decrypt(self, blob: bytes, chain_id: str, sequence: int) -> Any:
        if len(blob) < 21 + 16 or blob[:1] != _VERSION:
            raise AuditError(f"content of {chain_id}#{sequence}: not a Bastion ciphertext")
        if blob[1:9] != self.key_id:
            raise AuditError(f"content of {chain_id}#{sequence}: encrypted with another key")
        try:
            plaintext = self._aead.decrypt(blob[9:21], blob[21:], _aad(chain_id, sequence))
        except InvalidTag:
            raise AuditError(f"content of {chain_id}#{sequence}: authentication failed (altered or moved)") from None
        return json.loads(plaintext)


def decrypt_content(row: Any, cipher: ContentCipher) -> Any:
    """The auditor's helper: a row (ORM object or mapping) with content → {"prompt": ..., "completion": ...}."""
    get = row.get if isinstance(row, dict) else lambda name: getattr(row, name)
    blob = get("content")
    if not blob:
        return None
    return cipher.decrypt(bytes(blob), get("chain_id"), get("sequence"))
