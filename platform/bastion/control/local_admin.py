"""The embedded default's console login: one local `admin` whose password is generated at first start.

Only an scrypt hash is stored (`data_dir/console_admin.json`, mode 0600); the password is shown once, by the
process that created it. `create_app` refuses this mode with BASTION_ENV=production.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from pathlib import Path

FILE_NAME = "console_admin.json"
USERNAME = "admin"
_N, _R, _P = 2**14, 8, 1


def _hash(password: str, salt: bytes) -> bytes:
    return hashlib.scrypt(password.encode(), salt=salt, n=_N, r=_R, p=_P, dklen=32)


def ensure_local_admin(data_dir: Path) -> str | None:
    """Create the admin with a random password if none exists; return that password (only this once)."""
    path = Path(data_dir) / FILE_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return None
    password = secrets.token_urlsafe(18)
    salt = os.urandom(16)
    record = {"username": USERNAME, "salt": salt.hex(), "hash": _hash(password, salt).hex(), "n": _N, "r": _R, "p": _P}
    with os.fdopen(fd, "w") as handle:
        json.dump(record, handle)
    return password


def check_local_admin(data_dir: Path, username: str, password: str) -> bool:
    try:
        record = json.loads((Path(data_dir) / FILE_NAME).read_text())
    except (OSError, ValueError):
        return False
    if not hmac.compare_digest(username.encode(), str(record.get("username", "")).encode()):
        return False
    digest = hashlib.scrypt(
        password.encode(), salt=bytes.fromhex(record["salt"]), n=record["n"], r=record["r"], p=record["p"], dklen=32
    )
    return hmac.compare_digest(digest, bytes.fromhex(record["hash"]))
