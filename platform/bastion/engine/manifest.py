"""A model folder's sha256 manifest: written once when a folder is prepared, checked before a replica loads it,
so a replica refuses to start on a file that changed. Its own module so that what writes folders (the model
store, the MTP graft and head tooling) can share it without importing each other.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from bastion.errors import ModelStoreError

MANIFEST = "bastion-manifest.json"
_CHUNK = 1 << 20

Progress = Callable[[str, int, int], None]  # (step, done, total)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _model_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(folder: Path, progress: Progress | None = None) -> dict:
    files = _model_files(folder)
    entries = {}
    for i, path in enumerate(files):
        entries[path.relative_to(folder).as_posix()] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
        if progress:
            progress("hashing", i + 1, len(files))
    manifest = {"format": 1, "created_at": datetime.now(UTC).isoformat(), "files": entries}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return manifest


def verify_manifest(folder: Path, name: str = "") -> None:
    """Check every file against the manifest; raise naming the first file that is missing, extra or changed."""
    label = name or str(folder)
    manifest_path = folder / MANIFEST
    if not folder.is_dir():
        raise ModelStoreError(f"model {label}: folder {folder} does not exist (run `bastion models prepare`)")
    if not manifest_path.is_file():
        raise ModelStoreError(f"model {label}: no {MANIFEST} in {folder} (run `bastion models manifest {folder}`)")
    try:
        expected = json.loads(manifest_path.read_text())["files"]
    except (ValueError, KeyError):
        raise ModelStoreError(f"model {label}: {MANIFEST} is not a valid manifest") from None
    present = {p.relative_to(folder).as_posix() for p in _model_files(folder)}
    for rel, entry in sorted(expected.items()):
        path = folder / rel
        if rel not in present:
            raise ModelStoreError(f"model {label}: file {rel} listed in the manifest is missing")
        if path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
            raise ModelStoreError(f"model {label}: file {rel} does not match its sha256 in the manifest (corrupted)")
    extra = sorted(present - set(expected))
    if extra:
        raise ModelStoreError(f"model {label}: file {extra[0]} is not in the manifest")
