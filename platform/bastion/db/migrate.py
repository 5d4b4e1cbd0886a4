"""Alembic commands behind `bastion db ...`: one migration history for SQLite and PostgreSQL."""

from __future__ import annotations

import io
import os
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.util.exc import CommandError
from sqlalchemy.exc import DBAPIError

from bastion.errors import BastionError

_SOURCE_ROOT = Path(__file__).resolve().parents[3]


def migrations_dir() -> Path:
    """The migrations folder: beside the source tree, or where BASTION_MIGRATIONS points (images)."""
    path = Path(os.environ.get("BASTION_MIGRATIONS", _SOURCE_ROOT / "migrations"))
    if not (path / "env.py").is_file():
        raise BastionError(f"migrations not found at {path} (set BASTION_MIGRATIONS)")
    return path


def alembic_config(database_url: str, stdout: io.StringIO | None = None) -> Config:
    cfg = Config(stdout=stdout or io.StringIO())
    cfg.set_main_option("script_location", str(migrations_dir()))
    cfg.attributes["database_url"] = database_url
    return cfg


def _run(fn, database_url: str, *args: object) -> str:
    out = io.StringIO()
    try:
        fn(alembic_config(database_url, out), *args)
    except CommandError as exc:
        raise BastionError(f"migration failed: {exc}") from None
    except OSError as exc:
        raise BastionError(f"database unreachable: {exc.strerror or exc}") from None
    except DBAPIError as exc:
        raise BastionError(f"database error: {exc.orig.__class__.__name__}: {str(exc.orig).splitlines()[0]}") from None
    return out.getvalue().strip()


def upgrade(database_url: str, revision: str = "head") -> None:
    _run(command.upgrade, database_url, revision)


def downgrade(database_url: str, revision: str = "-1") -> None:
    _run(command.downgrade, database_url, revision)


def current(database_url: str) -> str:
    return _run(command.current, database_url) or "(empty database)"


def check(database_url: str) -> None:
    """Raise when the models and the latest migration disagree."""
    _run(command.check, database_url)
