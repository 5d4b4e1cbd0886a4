"""Live replica statistics: the contract of the internal endpoint the gateway serves and the control plane polls
(path, token, the `ReplicaStats` record). The live pool view is: this file; `serve/live_stats_endpoint.py`, the
endpoint (inside Ray: only the gateway ingress sees Serve's routers); `pool/live_poller.py`, the control plane's
reader; `control/pool_view.py`, the dashboard that shows it.

The engine replicas live inside Ray and only the gateway (a Serve replica holding handles to them) sees each one;
the control plane runs in its own process or pod. So the gateway answers `POOL_STATS_PATH` with what Serve's
routers know of every replica, and the control plane reads it over HTTP with a shared bearer token — tenants'
API keys never open it. The token: `control.pool_stats_token_file`, else `data_dir/pool_stats_token`, created
once (the single-machine default, where gateway and control plane share `data_dir`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from bastion.config import PlatformConfig
from bastion.config.token_files import bearer_matches, read_or_create

POOL_STATS_PATH = "/internal/pool/replicas"
TOKEN_FILE_NAME = "pool_stats_token"  # noqa: S105 - a file name, not a secret


def load_token(config: PlatformConfig) -> str:
    """The shared token: the configured file (at least MIN_TOKEN_CHARS), else one created once in data_dir."""
    default = Path(config.data_dir) / TOKEN_FILE_NAME
    return read_or_create(config.control.pool_stats_token_file, "control.pool_stats_token_file", default)


authorized = bearer_matches  # `Authorization: Bearer <token>`, compared in constant time


def default_url(config: PlatformConfig) -> str:
    """The gateway on this machine (the single-machine default); a cluster sets control.pool_stats_url."""
    host = config.gateway.host
    if host in ("0.0.0.0", "::", ""):  # noqa: S104 - a comparison, nothing binds here
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{config.gateway.port}{POOL_STATS_PATH}"


@dataclass(frozen=True)
class ReplicaStats:
    deployment: str  # `model@profile`, as DeploymentConfig.name
    replica: str
    healthy: bool | None = None
    queue_depth: int | None = None  # requests waiting in the engine's queue
    tok_s: float | None = None  # generated tokens per second over the last sampling interval
    acceptance_rate: float | None = None  # accepted ÷ drafted tokens since the replica started
    profile: str | None = None
    serve_deployment: str | None = None  # Ray Serve's name for the deployment
    in_flight: int | None = None
    requests_finished: int | None = None
    generation_tokens: int | None = None
    draft_tokens: int | None = None
    accepted_tokens: int | None = None


ReplicaStatsProvider = Callable[[], Awaitable[list[ReplicaStats]]]


async def no_live_stats() -> list[ReplicaStats]:
    """The default provider: the control plane alone knows only what the platform file declares."""
    return []
