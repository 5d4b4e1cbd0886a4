"""The `bastion` command: composes the packages; errors are one line and a non-zero exit unless --debug."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from bastion import __version__
from bastion.config import load_config
from bastion.errors import BastionError
from bastion.pool.command import plan as plan_command

app = typer.Typer(
    help="Bastion: on-premise LLM serving with tenants, quotas, audit and MTP speculation.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
config_app = typer.Typer(help="Check the platform file.", no_args_is_help=True)
db_app = typer.Typer(help="Database schema migrations (Alembic).", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(db_app, name="db")
app.command("plan")(plan_command)

out = Console()
_state = {"debug": False}

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="platform file (default: $BASTION_CONFIG or deploy/local/bastion.yaml)"),
]


@app.callback()
def _main(debug: Annotated[bool, typer.Option("--debug", help="show tracebacks")] = False) -> None:
    _state["debug"] = debug


@app.command()
def version() -> None:
    """Print Bastion's version."""
    out.print(__version__)


@config_app.command("check")
def config_check(file: Annotated[Path, typer.Argument(help="platform file to validate")]) -> None:
    """Validate a platform file: prints `ok` or every error with its key path."""
    load_config(file)
    out.print("ok")


@db_app.command("upgrade")
def db_upgrade(config: ConfigOption = None, revision: str = "head") -> None:
    """Migrate the database up to REVISION (default: the latest)."""
    from bastion.db import migrate

    migrate.upgrade(load_config(config).database.url, revision)
    out.print(f"database at {revision}")


@db_app.command("downgrade")
def db_downgrade(config: ConfigOption = None, revision: str = "-1") -> None:
    """Migrate the database down to REVISION (default: one step)."""
    from bastion.db import migrate

    migrate.downgrade(load_config(config).database.url, revision)
    out.print(f"database downgraded to {revision}")


@db_app.command("current")
def db_current(config: ConfigOption = None) -> None:
    """Print the database's current revision."""
    from bastion.db import migrate

    out.print(migrate.current(load_config(config).database.url))


def main() -> None:
    """Entry point: turn Bastion's errors into one line on stderr and exit 1."""
    try:
        app()
    except BastionError as exc:
        if _state["debug"]:
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
