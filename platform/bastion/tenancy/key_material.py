"""API key material: format, generation, parsing and the peppered HMAC that is all the database ever sees.

A key reads `bst_<prefix>_<secret>`: the prefix (12 hex characters) is public and indexes the row, the secret is
256 random bits. Only HMAC-SHA256(pepper, secret) is stored, so a leaked database cannot be replayed without the
pepper, which lives in a file outside it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from bastion.errors import ConfigError

KEY_MARK = "bst"
PREFIX_HEX = 12
SCOPES = ("inference", "usage:read")
PEPPER_FILE_NAME = "api_key_pepper"
MIN_PEPPER_BYTES = 32


@dataclass(frozen=True)
class NewKeyMaterial:
    prefix: str
    secret: str

    @property
    def token(self) -> str:
        return f"{KEY_MARK}_{self.prefix}_{self.secret}"


def generate() -> NewKeyMaterial:
    return NewKeyMaterial(prefix=secrets.token_hex(PREFIX_HEX // 2), secret=secrets.token_urlsafe(32))


def parse(token: str) -> tuple[str, str] | None:
    """Split a presented key into (prefix, secret); None when it cannot be a Bastion key."""
    mark, sep, rest = token.partition("_")
    if mark != KEY_MARK or not sep:
        return None
    prefix, sep, secret = rest.partition("_")
    if not sep or len(prefix) != PREFIX_HEX or not secret or len(secret) > 128:
        return None
    if prefix.strip("0123456789abcdef"):  # empty exactly when every character is a hex digit
        return None
    return prefix, secret


def hash_secret(pepper: bytes, secret: str) -> bytes:
    return hmac.new(pepper, secret.encode(), hashlib.sha256).digest()


def verify(pepper: bytes, secret: str, stored: bytes) -> bool:
    return hmac.compare_digest(hash_secret(pepper, secret), stored)


def load_pepper(pepper_file: Path | None, data_dir: Path) -> bytes:
    """The configured pepper file, or `data_dir/api_key_pepper` created once with mode 0600 (embedded default)."""
    if pepper_file is not None:
        try:
            pepper = Path(pepper_file).read_bytes().strip()
        except OSError as exc:
            raise ConfigError(f"auth.api_key_pepper_file: cannot read {pepper_file} ({exc.strerror})") from None
        if len(pepper) < MIN_PEPPER_BYTES:
            raise ConfigError(f"auth.api_key_pepper_file: {pepper_file} holds fewer than {MIN_PEPPER_BYTES} bytes")
        return pepper
    path = Path(data_dir) / PEPPER_FILE_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_bytes().strip()
    with os.fdopen(fd, "wb") as handle:
        handle.write(secrets.token_hex(32).encode())
    return path.read_bytes().strip()
