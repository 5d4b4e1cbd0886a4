"""The off-box witness: every signed head is also written outside the database, append-only.

Sinks: a directory meant for write-once storage (a WORM mount, or `chattr +a`; one JSON-lines file per writer,
appended and fsync'd, never rewritten) and syslog (a local socket such as `/dev/log`, which journald reads, or
`udp://host:port` for a remote collector). `bastion audit verify --witness SOURCE` reads a witness directory or
a file of lines (a syslog file, `journalctl -t bastion-audit-witness -o cat` output) and checks the database
against it: a witnessed head the database lacks (checkpoint deleted), a witnessed sequence the chain no longer
reaches (tail cut) and a row whose hash differs from a witnessed head (rewritten) are all reported, whoever
owns the tables.
"""

from __future__ import annotations

import base64
import json
import logging
import logging.handlers
import os
import secrets
import socket
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Protocol

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from bastion.audit.errors import AuditError
from bastion.audit.events import format_time, parse_time

TAG = "bastion-audit-witness"
_VERSION = 1


def witness_line(head: dict[str, Any]) -> str:
    """One signed head as a JSON line (the same text in every sink)."""
    return json.dumps(
        {
            "w": _VERSION,
            "kind": head["kind"],
            "chain_id": head["chain_id"],
            "sequence": int(head["sequence"]),
            "hash": head["hash"],
            "signed_at": format_time(head["signed_at"]),
            "key_id": head["key_id"],
            "signature": base64.b64encode(bytes(head["signature"])).decode(),
        },
        sort_keys=True,
        separators=(",", ":"),
    )


class Sink(Protocol):
    def append(self, lines: Sequence[str]) -> None: ...


class DirectorySink:
    """Appends to `<dir>/<host>-<pid>-<random>.jsonl` (O_APPEND, fsync): never reads, truncates or renames."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        host = "".join(c for c in socket.gethostname() if c.isalnum() or c in "-.")[:24] or "host"
        self.path = self.directory / f"{host}-{os.getpid()}-{secrets.token_hex(4)}.jsonl"

    def append(self, lines: Sequence[str]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            data = "".join(line + "\n" for line in lines).encode()
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)


class SyslogSink:
    """RFC 3164 messages tagged `bastion-audit-witness` to a local socket (journald) or a UDP collector."""

    def __init__(self, address: str) -> None:
        if address.startswith("udp://"):
            host, _, port = address[len("udp://") :].rpartition(":")
            target: str | tuple[str, int] = (host, int(port))
        else:
            target = address
        self._handler = logging.handlers.SysLogHandler(target, facility=logging.handlers.SysLogHandler.LOG_AUTHPRIV)
        self._handler.ident = f"{TAG}: "

    def append(self, lines: Sequence[str]) -> None:
        for line in lines:
            record = logging.LogRecord(TAG, logging.INFO, __file__, 0, line, None, None)
            self._handler.emit(record)
            if record.exc_info:  # pragma: no cover - emit() swallows errors through handleError
                raise AuditError("syslog witness write failed")

    def close(self) -> None:
        self._handler.close()


class Witness:
    """All configured sinks; a failing sink raises after the others were written."""

    def __init__(self, sinks: Iterable[Sink]) -> None:
        self.sinks = list(sinks)

    def append(self, heads: Sequence[dict[str, Any]]) -> None:
        lines = [witness_line(h) for h in heads]
        failed: list[Exception] = []
        for sink in self.sinks:
            try:
                sink.append(lines)
            except Exception as exc:
                failed.append(exc)
        if failed:
            raise AuditError(f"witness: {len(failed)} sink(s) failed ({type(failed[0]).__name__})")


def read_witness(source: Path) -> list[SimpleNamespace]:
    """Signed heads from a witness directory (*.jsonl) or a file of lines with the JSON at the end of each."""
    source = Path(source)
    if source.is_dir():
        files = sorted(source.glob("*.jsonl"))
    elif source.is_file():
        files = [source]
    else:
        raise AuditError(f"{source}: witness not found")
    heads: dict[tuple[str, int, str, str], SimpleNamespace] = {}
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                start = line.find('{"')
                if start < 0:
                    continue
                try:
                    data = json.loads(line[start:])
                    head = SimpleNamespace(
                        kind=data["kind"],
                        chain_id=data["chain_id"],
                        sequence=int(data["sequence"]),
                        hash=data["hash"],
                        signed_at=parse_time(data["signed_at"]),
                        key_id=data["key_id"],
                        signature=base64.b64decode(data["signature"]),
                    )
                except (ValueError, KeyError, TypeError):
                    continue  # not a witness line (other syslog traffic)
                heads[(head.chain_id, head.sequence, head.kind, head.hash)] = head
    return list(heads.values())


async def db_hashes(engine: AsyncEngine, chain_id: str, sequences: list[int]) -> dict[int, str]:
    from bastion.audit.store import EVENTS

    async with engine.connect() as conn:
        query = select(EVENTS.c.sequence, EVENTS.c.hash).where(
            EVENTS.c.chain_id == chain_id, EVENTS.c.sequence.in_(sequences)
        )
        return {int(r.sequence): r.hash for r in (await conn.execute(query)).all()}
