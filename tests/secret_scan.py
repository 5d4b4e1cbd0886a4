"""The end-of-run secret scan: every secret the tests create is registered here, every log line of the session is
written to one file, and `tests/test_secret_scan.py` (moved to the very end of the run by conftest) looks for
each secret in that file, in Ray's session logs and in every log-like file under the session's temp folders.

Registration is automatic for API keys (`bastion.tenancy.key_material.generate` is wrapped) and for the console's
local admin password (`ensure_local_admin` is wrapped); tests register anything else with `register_secret()`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

MIN_LENGTH = 12  # shorter strings would match by chance
LOG_SUFFIXES = (".log", ".out", ".err", ".txt", ".jsonl")
SESSION_LOG = "bastion-test-session.log"

_secrets: set[str] = set()
_log_dirs: list[Path] = []
_installed: dict[str, object] = {}


def register_secret(secret: str) -> str:
    """Remember `secret` for the scan; returns it, so `token = register_secret(make())` reads naturally."""
    if secret and len(secret) >= MIN_LENGTH:
        _secrets.add(secret)
    return secret


def register_log_dir(path: Path) -> None:
    """A folder whose log-like files (recursively) are scanned at the end: Ray's session logs, test folders."""
    _log_dirs.append(Path(path))


def secrets() -> frozenset[str]:
    return frozenset(_secrets)


def log_dirs() -> list[Path]:
    return list(_log_dirs)


def install(log_dir: Path) -> Path:
    """At session start: one DEBUG handler on the root logger writing every record to `log_dir/SESSION_LOG`, and
    the wrappers that register generated secrets. Idempotent; returns the session log's path."""
    if "handler" in _installed:
        return Path(_installed["path"])  # type: ignore[arg-type]
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / SESSION_LOG
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    _installed.update(handler=handler, path=str(path))
    register_log_dir(log_dir)
    _wrap_generators()
    return path


def _wrap_generators() -> None:
    from bastion.control import app as control_app
    from bastion.control import local_admin
    from bastion.tenancy import key_material

    original_generate = key_material.generate

    def generate() -> key_material.NewKeyMaterial:
        material = original_generate()
        register_secret(material.secret)
        register_secret(material.token)
        return material

    key_material.generate = generate  # type: ignore[assignment]
    original_admin = local_admin.ensure_local_admin

    def ensure_local_admin(data_dir: Path) -> str | None:
        return register_secret(original_admin(data_dir) or "") or None

    local_admin.ensure_local_admin = ensure_local_admin  # type: ignore[assignment]
    control_app.ensure_local_admin = ensure_local_admin  # type: ignore[attr-defined]


def flush() -> None:
    handler = _installed.get("handler")
    if isinstance(handler, logging.Handler):
        handler.flush()


def log_files(dirs: Iterable[Path]) -> list[Path]:
    found: list[Path] = []
    for folder in dirs:
        if folder.is_file():
            found.append(folder)
            continue
        if not folder.is_dir():
            continue
        for path in folder.rglob("*"):
            if path.is_file() and (path.suffix in LOG_SUFFIXES or ".log." in path.name):
                found.append(path)
    return sorted(set(found))


def scan(files: Iterable[Path], wanted: Iterable[str]) -> list[tuple[Path, str]]:
    """(file, secret shown redacted) for every registered secret found in a file; bytes.find is fast enough
    for the few hundred secrets and tens of megabytes of a full run."""
    needles = sorted({s.encode() for s in wanted})
    hits: list[tuple[Path, str]] = []
    for path in files:
        try:
            data = path.read_bytes()
        except OSError:
            continue
        for needle in needles:
            if needle in data:
                hits.append((path, f"{needle[:6].decode(errors='replace')}…({len(needle)} chars)"))
    return hits
