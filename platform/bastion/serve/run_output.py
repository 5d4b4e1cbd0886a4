"""What `bastion run` shows a person, and where everything else it starts writes.

Ray, Serve and vLLM each log at INFO to the terminal by default: a first start printed hundreds of lines, and the
API key (shown once) scrolled away. So, unless `--verbose`: the driver's standard error (file descriptor 2, which
Ray's own processes and every library's handlers inherit) goes to `<data_dir>/logs/bastion.log`, workers'
output is not streamed back (`log_to_driver=False`; it stays in Ray's session logs, linked as `logs/ray`), and
vLLM in every replica logs to `logs/vllm.log` through a logging config file named by VLLM_LOGGING_CONFIG_PATH.
The terminal keeps a few lines of progress and the summary.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bastion.config.schema import DeploymentConfig, PlatformConfig

LOGS = "logs"
DRIVER_LOG = "bastion.log"
VLLM_LOG = "vllm.log"
VLLM_LOGGING_CONFIG = "vllm-logging.json"
RAY_LINK = "ray"


def log_dir(config: PlatformConfig) -> Path:
    path = Path(config.data_dir) / LOGS
    path.mkdir(parents=True, exist_ok=True)
    return path


def vllm_logging_config(log_file: Path) -> dict[str, Any]:
    """A logging.dictConfig for vLLM's `vllm` logger: INFO and up appended to `log_file`, nothing to a stream.
    Every replica and its engine-core process append to the one file; the pid tells them apart."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"plain": {"format": "%(asctime)s pid=%(process)d %(levelname)s %(name)s: %(message)s"}},
        "handlers": {
            "file": {"class": "logging.FileHandler", "filename": str(log_file), "formatter": "plain", "delay": True}
        },
        "loggers": {"vllm": {"handlers": ["file"], "level": "INFO", "propagate": False}},
    }


def replica_log_env(logs: Path) -> dict[str, str]:
    """Write the vLLM logging config into `logs` and return the environment that makes replicas use it."""
    path = logs / VLLM_LOGGING_CONFIG
    path.write_text(json.dumps(vllm_logging_config(logs / VLLM_LOG), indent=2))
    return {"VLLM_CONFIGURE_LOGGING": "1", "VLLM_LOGGING_CONFIG_PATH": str(path)}


@contextmanager
def terminal_only_for(console: Any, log_file: Path) -> Iterator[None]:
    """Until the block ends, file descriptors 1 and 2 append to `log_file` and only `console` (a rich Console)
    still writes to the terminal. At the descriptors, not `sys.stdout`/`sys.stderr`: handlers Ray and Serve
    attach at import, Ray's relay of raylet errors (printed to stdout), warnings, and the processes Ray starts
    all write there."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    terminal = os.fdopen(os.dup(saved[1]), "w", buffering=1, encoding="utf-8")
    target = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for fd in (1, 2):
            os.dup2(target, fd)
    finally:
        os.close(target)
    previous = getattr(console, "_file", None)  # None: the console follows sys.stdout, as before
    console.file = terminal
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        console.file = previous
        terminal.close()
        for fd, dup in saved.items():
            os.dup2(dup, fd)
            os.close(dup)


def link_ray_logs(logs: Path) -> Path | None:
    """`logs/ray` → this Ray session's log folder (workers' stdout and stderr, Serve's replica logs); None when
    the session folder is unknown (a remote cluster keeps its logs on its nodes)."""
    try:
        import ray

        session_logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    except (AttributeError, ImportError):
        return None
    link = logs / RAY_LINK
    if link.is_symlink() or link.is_file():
        link.unlink()
    elif link.exists():
        return None  # a real folder someone made: leave it
    link.symlink_to(session_logs, target_is_directory=True)
    return link


def speculation_text(config: PlatformConfig, dep: DeploymentConfig) -> str:
    """The speculation a deployment's profile runs, as `off`, `ngram k=3`, `mtp k=1`."""
    spec = config.profiles[dep.profile].speculative
    k = getattr(spec, "num_speculative_tokens", None)
    return spec.method if k is None else f"{spec.method} k={k}"


def guard_text(stats: Mapping[str, Any] | None) -> str:
    """The speculation guard's verdict from a replica's stats (`guard`: None, or the guard's summary with a
    `state`); `n/a` when the replica reports none (no guard, or a replica that predates it)."""
    guard = (stats or {}).get("guard")
    if not guard:
        return "n/a"
    if isinstance(guard, Mapping):
        state = str(guard.get("state") or "n/a")
        match = guard.get("greedy_match")
        if state == "failed" and guard.get("reason"):
            return f"failed ({guard['reason']})"
        return f"{state} (greedy {match:.0%})" if isinstance(match, int | float) else state
    return str(guard)


def placement_text(assignment: Mapping[str, list[str]]) -> str:
    replicas = sum(len(nodes) for nodes in assignment.values())
    nodes = len({n for ids in assignment.values() for n in ids})
    return f"{replicas} replica{'s' if replicas != 1 else ''} on {nodes} node{'s' if nodes != 1 else ''}"
