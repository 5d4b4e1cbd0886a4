"""What every command module shares: the `--config` option, the console, a progress bar.

`cli.py` composes the command groups; each domain keeps its own (`audit/command.py`, `tenancy/commands.py`,
`engine/mtp/command.py`, `bench/command.py`, ...), so `bastion --help` imports none of the heavy packages.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import Progress

out = Console()

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="platform file (default: $BASTION_CONFIG or deploy/local/bastion.yaml)"),
]


def progress_bar(transient: bool = False) -> tuple[Progress, Callable[[str, int, int], None]]:
    """A bar and its `update(step, done, total)` callback, the shape long-running steps report progress in;
    a transient bar disappears when done (a line that says so follows it)."""
    from rich.progress import BarColumn, TextColumn, TimeElapsedColumn

    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=out, transient=transient
    )
    task = progress.add_task("preparing", total=1)

    def update(step: str, done: int, total: int) -> None:
        progress.update(task, description=step, completed=done, total=max(total, 1))

    return progress, update
