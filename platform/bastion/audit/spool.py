"""The local spool: sealed rows the database could not take, as fsync'd JSON lines, replayed in order.

One file per writer (`<writer id>.jsonl`), held with an exclusive lock while its writer lives, so a new
writer can adopt the spools of writers that died (their lock is gone) without racing a live one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from bastion.audit.errors import AuditError
from bastion.audit.store import row_from_json, row_to_json

log = logging.getLogger(__name__)


class Spool:
    """An append-only file with a replay offset; truncated once everything in it reached the database."""

    def __init__(self, path: Path, *, create: bool = True) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | (os.O_CREAT if create else 0), 0o600)
        except OSError as exc:
            raise AuditError(f"audit spool {self.path}: cannot open ({exc.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise AuditError(f"audit spool {self.path}: held by a live writer") from None
        self._fd = fd
        self.offset = 0  # bytes already replayed into the database
        self.ok = True  # False after a failed write: nothing can be made durable here right now
        self._repair()

    def _repair(self) -> None:
        """Cut a torn last line (a crash mid-write): it was never fsync'd whole, so never counted as durable."""
        size = self.size
        if size == 0:
            return
        with open(self.path, "rb") as handle:
            handle.seek(max(size - 65536, 0))
            tail = handle.read()
        if tail.endswith(b"\n"):
            return
        cut = tail.rfind(b"\n")
        keep = size - len(tail) + cut + 1 if cut >= 0 else (0 if size <= 65536 else size)
        log.warning("audit spool %s: dropping a torn last line (%d bytes)", self.path.name, size - keep)
        os.ftruncate(self._fd, keep)
        os.fsync(self._fd)

    @property
    def size(self) -> int:
        return os.fstat(self._fd).st_size

    @property
    def pending(self) -> bool:
        return self.size > self.offset

    def append(self, rows: Sequence[dict[str, Any]]) -> None:
        """Write and fsync; only then is the batch durable."""
        data = b"".join(json.dumps(row_to_json(r), separators=(",", ":")).encode() + b"\n" for r in rows)
        before = self.size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]
            os.fsync(self._fd)
        except OSError as exc:
            self.ok = False
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, before)  # no half batch left behind to corrupt the next append
            raise AuditError(f"audit spool {self.path}: write failed ({exc.strerror})") from None
        self.ok = True

    def read(self, max_rows: int) -> tuple[list[dict[str, Any]], int]:
        """Up to max_rows from the replay offset, and the offset after them; a torn last line is left out."""
        rows: list[dict[str, Any]] = []
        end = self.offset
        with open(self.path, "rb") as handle:
            handle.seek(self.offset)
            for line in handle:
                if not line.endswith(b"\n"):
                    break  # torn write from a crash: it was never durable, so it was never acknowledged
                end += len(line)
                try:
                    rows.append(row_from_json(json.loads(line)))
                except (ValueError, KeyError, TypeError):
                    # Unreadable line: skipping it leaves a gap that verification reports as a deleted event.
                    log.error("audit spool %s: unreadable line at byte %d skipped", self.path.name, end - len(line))
                if len(rows) >= max_rows:
                    break
        return rows, end

    def advance(self, offset: int) -> None:
        """Mark bytes up to offset replayed; when all are, empty the file so it never grows without bound."""
        self.offset = offset
        if self.offset >= self.size:
            os.ftruncate(self._fd, 0)
            os.fsync(self._fd)
            self.offset = 0

    def close(self, *, remove_if_empty: bool = True) -> None:
        if self._fd < 0:
            return
        empty = self.size == 0
        if remove_if_empty and empty:
            self.path.unlink(missing_ok=True)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = -1


def adopt_orphans(directory: Path, own: Path) -> Iterator[Spool]:
    """Spools left by writers that are gone (their lock is free): replay them before anything new."""
    if not directory.is_dir():
        return
    for path in sorted(directory.glob("*.jsonl")):
        if path == own:
            continue
        try:
            spool = Spool(path, create=False)
        except AuditError:
            continue  # a live writer holds it
        log.info("audit: adopting spool %s (%d bytes)", path.name, spool.size)
        yield spool
