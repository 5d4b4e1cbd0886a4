"""The console's audit page: search (`audit/search.py`) and signed exports packed as a zip for download.

Exports go through `bastion.audit.service.export`, which signs the manifest and records an `export` event with
the actor. The zip and a small metadata file (who, which tenant) wait in `data_dir/console-exports/`; a
tenant-admin may download only their own tenant's exports.
"""

from __future__ import annotations

import json
import secrets
import shutil
import tempfile
import time
import zipfile
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from bastion.audit import search as audit_search
from bastion.audit import service as audit_service
from bastion.audit.errors import AuditError, AuditKeyError
from bastion.audit.search import AuditQuery, AuditQueryError
from bastion.config import PlatformConfig
from bastion.control.errors import ControlError, bad_request

EXPORT_DIR = "console-exports"
KEEP_EXPORTS_S = 86_400.0


async def search(engine: AsyncEngine, q: AuditQuery) -> list[dict[str, Any]]:
    """`audit.search.search`, its filter errors as the admin API's 422."""
    try:
        return await audit_search.search(engine, q)
    except AuditQueryError as exc:
        raise bad_request(str(exc)) from None


def _exports(config: PlatformConfig) -> Path:
    path = config.data_dir / EXPORT_DIR
    path.mkdir(parents=True, exist_ok=True)
    return path


def prune_exports(config: PlatformConfig, max_age_s: float = KEEP_EXPORTS_S) -> None:
    """Drop downloads older than a day: the audit log itself is the record, an export is a copy."""
    cutoff = time.time() - max_age_s
    for item in _exports(config).iterdir():
        if item.suffix in (".zip", ".json") and item.stat().st_mtime < cutoff:
            item.unlink(missing_ok=True)


async def run_export(
    config: PlatformConfig,
    fmt: str,
    *,
    actor: str,
    tenant_id: str | None,
    start: datetime | None,
    end: datetime | None,
) -> dict[str, Any]:
    """Export, sign, zip; return the export's metadata (its id is what the download URL takes)."""
    prune_exports(config)
    export_id = secrets.token_hex(12)
    with tempfile.TemporaryDirectory(prefix="bastion-export-") as tmp:
        out = Path(tmp) / "export"
        try:
            result = await audit_service.export(config, fmt, out, tenant=tenant_id, start=start, end=end, actor=actor)
        except AuditKeyError:
            raise ControlError(409, "audit_not_configured", "audit exports need audit.signing_key_file") from None
        except AuditError as exc:
            raise bad_request(str(exc)) from None
        target = _exports(config) / f"{export_id}.zip"
        with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for item in sorted(out.iterdir()):
                archive.write(item, f"audit-export-{export_id}/{item.name}")
        shutil.rmtree(out, ignore_errors=True)
    meta = {
        "id": export_id,
        "format": fmt,
        "tenant_id": tenant_id,
        "actor": actor,
        "rows": result.rows,
        "manifest_sha256": result.manifest_sha256,
        "bytes": target.stat().st_size,
    }
    (_exports(config) / f"{export_id}.json").write_text(json.dumps(meta))
    return meta


def find_export(config: PlatformConfig, export_id: str) -> tuple[dict[str, Any], Path] | None:
    if not export_id.isalnum() or len(export_id) > 64:
        return None
    base = _exports(config)
    meta_path, zip_path = base / f"{export_id}.json", base / f"{export_id}.zip"
    if not meta_path.is_file() or not zip_path.is_file():
        return None
    return json.loads(meta_path.read_text()), zip_path
