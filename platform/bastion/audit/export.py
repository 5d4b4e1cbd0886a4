"""Signed exports: rows streamed a page at a time (keyset on id), a manifest, and its Ed25519 signature.

An export directory holds `events.<fmt>`, `checkpoints.jsonl` (the signed checkpoints inside the exported
chain segments), `manifest.json` (canonical JSON: counts, time range, first/last hashes, each chain's segment,
each file's SHA-256) and `manifest.sig` (base64 Ed25519 signature of manifest.json's bytes).
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from bastion.audit.errors import AuditError
from bastion.audit.events import canonical_json, format_time, utcnow
from bastion.audit.formats import FORMATS, events_file, open_sink, to_flat
from bastion.audit.signing import Signer
from bastion.audit.store import CHECKPOINTS, EVENTS

MANIFEST, SIGNATURE, CHECKPOINT_FILE = "manifest.json", "manifest.sig", "checkpoints.jsonl"
MANIFEST_VERSION = 1


@dataclass
class ExportResult:
    out_dir: Path
    rows: int
    manifest: dict[str, Any]
    manifest_sha256: str


def _filters(tenant: str | None, start: datetime | None, end: datetime | None) -> list[Any]:
    where = []
    if tenant is not None:
        where.append(EVENTS.c.tenant_id == tenant)
    if start is not None:
        where.append(EVENTS.c.occurred_at >= start)
    if end is not None:
        where.append(EVENTS.c.occurred_at < end)
    return where


async def count_rows(engine: AsyncEngine, tenant: str | None, start: datetime | None, end: datetime | None) -> int:
    async with engine.connect() as conn:
        query = select(func.count()).select_from(EVENTS).where(*_filters(tenant, start, end))
        return int((await conn.execute(query)).scalar_one())


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


async def export_events(
    engine: AsyncEngine,
    out_dir: Path,
    fmt: str,
    signer: Signer,
    *,
    tenant: str | None = None,
    start: datetime | None = None,
    end: datetime | None = None,
    page: int = 5000,
    on_progress: Callable[[int], None] | None = None,
    verification: dict[str, Any] | None = None,
) -> ExportResult:
    """Write an export; memory is one page of rows plus one small entry per chain, whatever the row count."""
    if fmt not in FORMATS:
        raise AuditError(f"unknown export format {fmt!r} (use {', '.join(FORMATS)})")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise AuditError(f"{out_dir}: export directory is not empty")
    out_dir.mkdir(parents=True, exist_ok=True)
    chains: dict[str, dict[str, Any]] = {}
    rows = 0
    first: dict[str, Any] | None = None
    last: dict[str, Any] | None = None
    sink = open_sink(fmt, out_dir / events_file(fmt))
    try:
        # One snapshot for the whole export (REPEATABLE READ on PostgreSQL; a read transaction on SQLite), so
        # a row committed late with a lower id cannot slip between two pages.
        options = {"isolation_level": "REPEATABLE READ"} if engine.dialect.name == "postgresql" else {}
        async with engine.connect() as conn:
            conn = await conn.execution_options(**options)
            async with conn.begin():
                last_id = 0
                while True:
                    query = select(EVENTS).where(*_filters(tenant, start, end), EVENTS.c.id > last_id)
                    result = await conn.execute(query.order_by(EVENTS.c.id).limit(page))
                    batch = [dict(r) for r in result.mappings()]
                    if not batch:
                        break
                    sink.write([to_flat(r) for r in batch])
                    for r in batch:
                        seg = chains.setdefault(
                            r["chain_id"],
                            {"first_sequence": r["sequence"], "first_prev_hash": r["prev_hash"], "rows": 0},
                        )
                        seg.update(last_sequence=r["sequence"], last_hash=r["hash"], rows=seg["rows"] + 1)
                    first = first or batch[0]
                    last = batch[-1]
                    rows += len(batch)
                    last_id = batch[-1]["id"]
                    if on_progress:
                        on_progress(len(batch))
    finally:
        sink.close()
    checkpoints = await _write_checkpoints(engine, out_dir / CHECKPOINT_FILE, chains)
    files = {
        name: {"sha256": sha256_file(out_dir / name), "bytes": (out_dir / name).stat().st_size}
        for name in (events_file(fmt), CHECKPOINT_FILE)
    }
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "format": fmt,
        "tenant": tenant,
        "from": format_time(start) if start else None,
        "to": format_time(end) if end else None,
        "rows": rows,
        "checkpoints": checkpoints,
        "time_range": {
            "first": format_time(first["occurred_at"]) if first else None,
            "last": format_time(last["occurred_at"]) if last else None,
        },
        "first_hash": first["hash"] if first else None,
        "last_hash": last["hash"] if last else None,
        "chains": chains,
        "files": files,
        "created_at": format_time(utcnow()),
        "key_id": signer.key_id,
    }
    if verification is not None:  # whether the database verified before export (`--allow-unverified` says no)
        manifest["verification"] = verification
    data = canonical_json(manifest)
    (out_dir / MANIFEST).write_bytes(data)
    (out_dir / SIGNATURE).write_bytes(base64.b64encode(signer.sign(data)) + b"\n")
    return ExportResult(out_dir, rows, manifest, hashlib.sha256(data).hexdigest())


async def _write_checkpoints(engine: AsyncEngine, path: Path, chains: dict[str, dict[str, Any]]) -> int:
    """The signed checkpoints that fall inside each exported chain segment (few: one per chain per interval)."""
    written = 0
    with open(path, "w", encoding="utf-8") as handle:
        for chain_id, seg in sorted(chains.items()):
            query = (
                select(CHECKPOINTS)
                .where(
                    CHECKPOINTS.c.chain_id == chain_id,
                    CHECKPOINTS.c.sequence >= seg["first_sequence"] - 1,  # the genesis (0) of a whole chain
                    CHECKPOINTS.c.sequence <= seg["last_sequence"],
                )
                .order_by(CHECKPOINTS.c.sequence)
            )
            async with engine.connect() as conn:
                for cp in (await conn.execute(query)).mappings():
                    line = {
                        "chain_id": cp["chain_id"],
                        "sequence": cp["sequence"],
                        "hash": cp["hash"],
                        "kind": cp["kind"],
                        "signed_at": format_time(cp["signed_at"]),
                        "key_id": cp["key_id"],
                        "signature": base64.b64encode(bytes(cp["signature"])).decode(),
                    }
                    handle.write(json.dumps(line, sort_keys=True, separators=(",", ":")) + "\n")
                    written += 1
    return written
