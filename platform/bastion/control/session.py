"""Console sessions in an encrypted, authenticated cookie (AES-GCM), so any control-plane replica can read them.

The cookie holds the signed-in identity (username, roles, tenant), an expiry and the session's CSRF token; no
access or refresh token is kept. The key comes from the OIDC client secret (HKDF), which every replica has, or
for the embedded default from a file created once in the data directory.
"""

from __future__ import annotations

import base64
import hmac
import json
import os
import secrets
import time
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

SESSION_COOKIE = "bastion_session"
LOGIN_COOKIE = "bastion_login"  # state, nonce and PKCE verifier between /login and /auth/callback
KEY_FILE = "console_session_key"


def key_from_secret(secret: str) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=b"bastion-console", info=b"session v1").derive(
        secret.encode()
    )


def key_from_file(data_dir: Path) -> bytes:
    path = Path(data_dir) / KEY_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return bytes.fromhex(path.read_text().strip())
    with os.fdopen(fd, "w") as handle:
        handle.write(secrets.token_hex(32))
    return bytes.fromhex(path.read_text().strip())


class CookieCodec:
    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)

    def seal(self, name: str, data: dict[str, Any], ttl_s: int) -> str:
        body = json.dumps({**data, "exp": int(time.time()) + ttl_s}, separators=(",", ":")).encode()
        nonce = os.urandom(12)
        return base64.urlsafe_b64encode(nonce + self._aead.encrypt(nonce, body, name.encode())).decode().rstrip("=")

    def open(self, name: str, value: str | None) -> dict[str, Any] | None:
        """The cookie's data, or None when absent, tampered with, from another key, or expired."""
        if not value or len(value) > 8192:
            return None
        try:
            raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
            data = json.loads(self._aead.decrypt(raw[:12], raw[12:], name.encode()))
        except (ValueError, InvalidTag):
            return None
        if not isinstance(data, dict) or not isinstance(data.get("exp"), int) or data["exp"] < time.time():
            return None
        return data


def csrf_ok(session: dict[str, Any] | None, presented: str | None) -> bool:
    expected = (session or {}).get("csrf")
    return bool(expected and presented) and hmac.compare_digest(str(expected), str(presented))
