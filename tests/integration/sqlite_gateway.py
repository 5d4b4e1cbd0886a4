"""A gateway over a fresh, migrated SQLite file and a scripted engine: for tests of the gateway's own routes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from bastion.bench.doubles import ScriptedEngine, Stack, gateway_stack, platform_config, upstreams_for
from bastion.db import migrate


def migrated(sqlite_url: str) -> str:
    """Call from a sync fixture: the migration runs a loop of its own."""
    migrate.upgrade(sqlite_url)
    return sqlite_url


@asynccontextmanager
async def sqlite_gateway(tmp_path: Path, database_url: str, models: list[str]) -> AsyncIterator[Stack]:
    config = platform_config(str(tmp_path), database_url, models)
    async with gateway_stack(config, ScriptedEngine(upstreams_for(models))) as stack:
        yield stack
