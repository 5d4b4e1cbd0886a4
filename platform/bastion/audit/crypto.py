"""Content encryption at rest: AES-256-GCM, bound to the row it belongs to.

Version 2 (written since 2026-12-03): each tenant's content is encrypted with a per-tenant, per-UTC-day *data
key* (content_keys.py), stored only wrapped by the master key (`audit.content_key_file`); destroying the wrapped
data key erases the content (crypto-shredding). Blob: 0x02 ‖ data key id (16 bytes) ‖ nonce (12) ‖
ciphertext+tag. Version 1 (older rows): 0x01 ‖ master key id (8 bytes) ‖ nonce ‖ ciphertext+tag, encrypted
with the master key itself. The associated data is the row's chain id and sequence, so a ciphertext moved to
another row no longer decrypts.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import secrets
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from bastion.audit.errors import AuditError, AuditKeyError

_VERSION = b"\x01"
_V2 = b"\x02"
_V2_HEAD = 1 + 16 + 12


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


def new_data_key() -> tuple[str, bytes]:
    """A data key and its id (32 hex digits, also written into every ciphertext it makes)."""
    return secrets.token_hex(16), AESGCM.generate_key(bit_length=256)


def _wrap_aad(key_id: str, tenant_id: str) -> bytes:
    return f"bastion-audit-datakey-v1|{key_id}|{tenant_id}".encode()


def wrap_key(master: ContentCipher, key_id: str, tenant_id: str, data_key: bytes) -> bytes:
    nonce = os.urandom(12)
    return nonce + master._aead.encrypt(nonce, data_key, _wrap_aad(key_id, tenant_id))


def unwrap_key(master: ContentCipher, key_id: str, tenant_id: str, wrapped: bytes) -> bytes:
    try:
        return master._aead.decrypt(wrapped[:12], wrapped[12:], _wrap_aad(key_id, tenant_id))
    except InvalidTag:
        raise AuditKeyError(f"data key {key_id}: does not unwrap with this master content key") from None


def encrypt_with(data_key: bytes, key_id: str, content: Any, chain_id: str, sequence: int) -> bytes:
    plaintext = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    nonce = os.urandom(12)
    sealed = AESGCM(data_key).encrypt(nonce, plaintext, _aad(chain_id, sequence))
    return _V2 + bytes.fromhex(key_id) + nonce + sealed


def data_key_id(blob: bytes) -> str | None:
    """The data key a version-2 ciphertext needs; None for a version-1 (master key) ciphertext."""
    return bytes(blob[1:17]).hex() if blob[:1] == _V2 and len(blob) > _V2_HEAD else None


def decrypt_with(data_key: bytes, blob: bytes, chain_id: str, sequence: int) -> Any:
    try:
        plaintext = AESGCM(data_key).decrypt(blob[17:29], blob[29:], _aad(chain_id, sequence))
    except InvalidTag:
        raise AuditError(f"content of {chain_id}#{sequence}: authentication failed (altered or moved)") from None
    return json.loads(plaintext)


def decrypt_content(row: Any, cipher: ContentCipher) -> Any:
    """A version-1 row (ORM object or mapping) with content → {"prompt": ..., "completion": ...}; version-2 rows
    need their tenant's data key: `content_keys.decrypt_row`."""
    get = row.get if isinstance(row, dict) else lambda name: getattr(row, name)
    blob = get("content")
    if not blob:
        return None
    return cipher.decrypt(bytes(blob), get("chain_id"), get("sequence"))
