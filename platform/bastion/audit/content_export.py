"""Content in exports, for one authorised auditor only: the data keys an export's rows need, sealed to that
auditor's X25519 public key (`bastion audit auditor-keygen`), signed with the audit signing key.

An export always carries each row's content as stored: ciphertext under the tenant's data key, unreadable
without it. With `--content-for AUDITOR.pub`, `content-keys.json` holds those data keys encrypted to the
auditor (ephemeral X25519, HKDF-SHA256, AES-256-GCM), and `content-keys.sig` its Ed25519 signature; erased keys
are listed by id and stay erased. The auditor reads a row offline with `bastion audit content --export DIR
--auditor-key FILE --chain C --sequence N`. Nobody else (the exporting host keeps no copy) can.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from bastion.audit.content_keys import KEYS, ContentErased
from bastion.audit.crypto import ContentCipher, data_key_id, decrypt_with, unwrap_key
from bastion.audit.errors import AuditError, AuditKeyError
from bastion.audit.formats import events_file, read_rows
from bastion.audit.signing import Signer, Verifier, _read, _write_private

KEYS_FILE, KEYS_SIGNATURE = "content-keys.json", "content-keys.sig"
_INFO = b"bastion-audit-content-keys-v1"


def auditor_keygen(private_path: Path) -> tuple[Path, str]:
    """An auditor's X25519 pair: FILE (PKCS#8, 0600) and FILE.pub; returns the public file and fingerprint."""
    public_path = private_path.with_name(private_path.name + ".pub")
    for path in (private_path, public_path):
        if path.exists():
            raise AuditKeyError(f"refusing to overwrite existing key file: {path}")
    key = X25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    _write_private(private_path, private_pem)
    public_path.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return public_path, fingerprint(key.public_key())


def fingerprint(public: X25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def _load(path: Path, private: bool) -> Any:
    data = _read(path, "auditor key")
    try:
        key = serialization.load_pem_private_key(data, None) if private else serialization.load_pem_public_key(data)
    except (ValueError, TypeError):
        key = None
    wanted = X25519PrivateKey if private else X25519PublicKey
    if not isinstance(key, wanted):
        raise AuditKeyError(f"{path}: not an X25519 {'private' if private else 'public'} key (auditor-keygen)")
    return key


def _aead(shared: bytes) -> AESGCM:
    return AESGCM(HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_INFO).derive(shared))


async def write_content_keys(
    engine: AsyncEngine, out_dir: Path, fmt: str, master: ContentCipher, recipient: Path, signer: Signer
) -> dict[str, Any]:
    """Seal the data keys the export's rows need to the auditor; returns what the audit event records."""
    to = _load(recipient, private=False)
    needed = {key_id for row in read_rows(fmt, out_dir / events_file(fmt)) if (key_id := _key_id(row))}
    keys: dict[str, Any] = {}
    erased: list[str] = []
    async with engine.connect() as conn:
        for key_id in sorted(needed):
            row = (await conn.execute(select(KEYS).where(KEYS.c.id == key_id))).first()
            if row is None or row.wrapped is None:
                erased.append(key_id)
                continue
            data_key = unwrap_key(master, row.id, row.tenant_id, bytes(row.wrapped))
            keys[key_id] = {"tenant_id": row.tenant_id, "day": row.day, "key": base64.b64encode(data_key).decode()}
    ephemeral = X25519PrivateKey.generate()
    nonce = os.urandom(12)
    plaintext = json.dumps({"keys": keys, "erased": erased}, sort_keys=True).encode()
    sealed = {
        "recipient": fingerprint(to),
        "ephemeral_public": base64.b64encode(
            ephemeral.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        ).decode(),
        "nonce": base64.b64encode(nonce).decode(),
        "ciphertext": base64.b64encode(_aead(ephemeral.exchange(to)).encrypt(nonce, plaintext, None)).decode(),
    }
    data = json.dumps(sealed, sort_keys=True, separators=(",", ":")).encode()
    (out_dir / KEYS_FILE).write_bytes(data)
    (out_dir / KEYS_SIGNATURE).write_bytes(base64.b64encode(signer.sign(data)) + b"\n")
    return {"recipient": sealed["recipient"], "data_keys": len(keys), "erased_keys": len(erased)}


def _key_id(row: dict[str, Any]) -> str | None:
    blob = row.get("content")
    return data_key_id(bytes(blob)) if blob else None


def read_exported_content(
    out_dir: Path, auditor_key: Path, chain_id: str, sequence: int, public_key: Path | None = None
) -> Any:
    """The auditor's offline decryption of one exported row's content."""
    out_dir = Path(out_dir)
    data = (out_dir / KEYS_FILE).read_bytes() if (out_dir / KEYS_FILE).exists() else None
    if data is None:
        raise AuditError(f"{out_dir}: this export carries no content keys (export with --content-for)")
    if public_key is not None:
        signature = base64.b64decode((out_dir / KEYS_SIGNATURE).read_bytes())
        if not Verifier.from_file(public_key).verify(signature, data):
            raise AuditError(f"{KEYS_FILE}: signature does not verify")
    sealed = json.loads(data)
    me = _load(auditor_key, private=True)
    if sealed["recipient"] != fingerprint(me.public_key()):
        raise AuditKeyError(f"{KEYS_FILE} is sealed for auditor key {sealed['recipient']}, not this one")
    shared = me.exchange(X25519PublicKey.from_public_bytes(base64.b64decode(sealed["ephemeral_public"])))
    bundle = json.loads(
        _aead(shared).decrypt(base64.b64decode(sealed["nonce"]), base64.b64decode(sealed["ciphertext"]), None)
    )
    manifest = json.loads((out_dir / "manifest.json").read_bytes())
    row = next(
        (
            r
            for r in read_rows(manifest["format"], out_dir / events_file(manifest["format"]))
            if r["chain_id"] == chain_id and int(r["sequence"]) == sequence
        ),
        None,
    )
    if row is None:
        raise AuditError(f"no event {chain_id}#{sequence} in this export")
    if not row.get("content"):
        return None
    key_id = _key_id(row)
    if key_id is None:
        raise AuditError(
            f"content of {chain_id}#{sequence}: encrypted with the master key (an older row); read it "
            "from the database with `bastion audit content --chain C --sequence N`"
        )
    if key_id in bundle["erased"]:
        raise ContentErased(f"content of {chain_id}#{sequence}: erased before this export")
    return decrypt_with(base64.b64decode(bundle["keys"][key_id]["key"]), bytes(row["content"]), chain_id, sequence)
