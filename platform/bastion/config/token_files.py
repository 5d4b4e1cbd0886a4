"""Bearer tokens of internal endpoints, kept in files: the live pool statistics the control plane reads and the
metrics Prometheus scrapes. A configured file (a cluster mounts a Secret there), else one created once in the
data directory with mode 0600, so the single-machine default needs no setup; the API keys of tenants never open
these endpoints."""

from __future__ import annotations

import hmac
import os
import secrets
from pathlib import Path

from bastion.errors import ConfigError

MIN_TOKEN_CHARS = 32


def read_token(path: Path, setting: str) -> str:
    """The token in a configured file: at least MIN_TOKEN_CHARS; errors name `setting`."""
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"{setting}: cannot read {path} ({exc.strerror})") from None
    if len(token) < MIN_TOKEN_CHARS:
        raise ConfigError(f"{setting}: {path} holds fewer than {MIN_TOKEN_CHARS} chars")
    return token


def read_or_create(configured: Path | None, setting: str, default: Path) -> str:
    """The token in `configured` (`read_token`), else in `default`, made once with mode 0600."""
    if configured is not None:
        return read_token(configured, setting)
    default.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(default, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return default.read_text(encoding="utf-8").strip()
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(secrets.token_urlsafe(48))
    return default.read_text(encoding="utf-8").strip()


def bearer_matches(token: str, header: str | None) -> bool:
    """`Authorization: Bearer <token>`, compared in constant time."""
    scheme, _, given = (header or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())
