"""Live replica statistics: the internal endpoint the gateway serves and the control plane polls.

The engine replicas live inside Ray and only the gateway (a Serve replica holding handles to them) sees each one;
the control plane runs in its own process or pod. So the gateway answers `POOL_STATS_PATH` with what Serve's
routers know of every replica, and the control plane reads it over HTTP with a shared bearer token — tenants'
API keys never open it. The token: `control.pool_stats_token_file`, else `data_dir/pool_stats_token`, created
once (the single-machine default, where gateway and control plane share `data_dir`).
"""

from __future__ import annotations

import hmac
import os
import secrets
from pathlib import Path

from bastion.config import PlatformConfig
from bastion.errors import ConfigError

POOL_STATS_PATH = "/internal/pool/replicas"
TOKEN_FILE_NAME = "pool_stats_token"  # noqa: S105 - a file name, not a secret
MIN_TOKEN_CHARS = 32


def load_token(config: PlatformConfig) -> str:
    """The shared token: the configured file (at least MIN_TOKEN_CHARS), else one created once in data_dir."""
    configured = config.control.pool_stats_token_file
    if configured is not None:
        try:
            token = Path(configured).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"control.pool_stats_token_file: cannot read {configured} ({exc.strerror})") from None
        if len(token) < MIN_TOKEN_CHARS:
            raise ConfigError(f"control.pool_stats_token_file: {configured} holds fewer than {MIN_TOKEN_CHARS} chars")
        return token
    path = Path(config.data_dir) / TOKEN_FILE_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text(encoding="utf-8").strip()
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(secrets.token_urlsafe(48))
    return path.read_text(encoding="utf-8").strip()


def authorized(token: str, header: str | None) -> bool:
    """`Authorization: Bearer <token>`, compared in constant time."""
    scheme, _, given = (header or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


def default_url(config: PlatformConfig) -> str:
    """The gateway on this machine (the single-machine default); a cluster sets control.pool_stats_url."""
    host = config.gateway.host
    if host in ("0.0.0.0", "::", ""):  # noqa: S104 - a comparison, nothing binds here
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{config.gateway.port}{POOL_STATS_PATH}"
