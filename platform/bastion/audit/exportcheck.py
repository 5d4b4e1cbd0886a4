"""Offline verification of an export, with only the public key: signature, file digests, then every row.

Order matters for the message: a changed byte anywhere is first caught by the manifest signature (manifest)
or by a file's SHA-256; the row walk then says which event is wrong, which matters when someone re-signs.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from bastion.audit.chain import row_hash
from bastion.audit.events import format_time, parse_time
from bastion.audit.export import CHECKPOINT_FILE, MANIFEST, SIGNATURE, sha256_file
from bastion.audit.formats import FORMATS, events_file, read_rows
from bastion.audit.keyring import Keyring
from bastion.audit.signing import LEGACY_KIND, Verifier


@dataclass
class ExportReport:
    rows: int = 0
    checkpoints: int = 0
    problems: list[str] = field(default_factory=list)
    unverified_source: bool = False  # exported with --allow-unverified: the database did not verify then

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def first_problem(self) -> str | None:
        return self.problems[0] if self.problems else None


def verify_export(directory: Path, verifier: Verifier | Keyring) -> ExportReport:
    """Every problem found, in order; after a changed file the rows are still walked to name the changed row."""
    keyring = verifier if isinstance(verifier, Keyring) else Keyring.of(verifier)
    report = ExportReport()
    directory = Path(directory)
    manifest = _manifest(directory, keyring, report)
    if manifest is None:
        return report
    for name, entry in sorted(manifest["files"].items()):
        path = directory / name
        if not path.is_file():
            report.problems.append(f"{name}: missing")
        elif sha256_file(path) != entry["sha256"]:
            report.problems.append(f"{name}: SHA-256 differs from the signed manifest (file changed)")
    verification = manifest.get("verification")
    if verification is not None and not verification.get("verified", False):
        report.unverified_source = True
    try:
        signed = _checkpoints(directory / CHECKPOINT_FILE, keyring, report)
        _rows(directory, manifest, signed, report)
    except (ValueError, KeyError, TypeError, OSError) as exc:  # a file that parses badly
        report.problems.append(f"unreadable export: {type(exc).__name__}")
    return report


def _manifest(directory: Path, keyring: Keyring, report: ExportReport) -> dict[str, Any] | None:
    try:
        data = (directory / MANIFEST).read_bytes()
        signature = base64.b64decode((directory / SIGNATURE).read_bytes().strip(), validate=True)
    except FileNotFoundError as exc:
        report.problems.append(f"{Path(exc.filename).name}: missing")
        return None
    except (binascii.Error, ValueError):
        report.problems.append(f"{SIGNATURE}: not base64")
        return None
    if keyring.verify_any(signature, data) is None:
        keys = ", ".join(keyring.keys)
        report.problems.append(f"{MANIFEST}: signature does not verify with a trusted key ({keys})")
        return None
    manifest = json.loads(data)
    if manifest.get("format") not in FORMATS:
        report.problems.append(f"{MANIFEST}: unknown format {manifest.get('format')!r}")
        return None
    return manifest


def _checkpoints(path: Path, keyring: Keyring, report: ExportReport) -> dict[tuple[str, int], str]:
    signed: dict[tuple[str, int], str] = {}
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            cp = json.loads(line)
            head = SimpleNamespace(
                **{**cp, "kind": cp.get("kind", LEGACY_KIND), "signed_at": parse_time(cp["signed_at"])},
            )
            head.signature = base64.b64decode(cp["signature"])
            if not keyring.verify_head(head):
                report.problems.append(f"chain {cp['chain_id']} sequence {cp['sequence']}: bad signature")
            signed[(cp["chain_id"], int(cp["sequence"]))] = cp["hash"]
            report.checkpoints += 1
    return signed


def _rows(directory: Path, manifest: dict[str, Any], signed: dict[tuple[str, int], str], report: ExportReport) -> None:
    fmt = manifest["format"]
    heads: dict[str, tuple[int, str]] = {}  # chain -> (last sequence, last hash) seen so far
    first = last = None
    for row in read_rows(fmt, directory / events_file(fmt)):
        chain, seq = row["chain_id"], row["sequence"]
        where = f"chain {chain} sequence {seq}"
        segment = manifest["chains"].get(chain)
        if segment is None:
            report.problems.append(f"{where}: inserted (chain not in the manifest)")
            return
        expected_seq, expected_prev = heads.get(chain, (segment["first_sequence"] - 1, segment["first_prev_hash"]))
        if seq != expected_seq + 1:
            what = "deleted (gap)" if seq > expected_seq + 1 else "reordered"
            report.problems.append(f"chain {chain} sequence {expected_seq + 1}: {what}")
            return
        if row["prev_hash"] != expected_prev:
            report.problems.append(f"{where}: bad prev hash")
            return
        if row_hash(row["prev_hash"], row) != row["hash"]:
            report.problems.append(f"{where}: modified")
            return
        if signed.get((chain, seq), row["hash"]) != row["hash"]:
            report.problems.append(f"{where}: modified (differs from the signed checkpoint)")
            return
        heads[chain] = (seq, row["hash"])
        first = first or row
        last = row
        report.rows += 1
    expected = {
        "rows": report.rows,
        "first_hash": first["hash"] if first else None,
        "last_hash": last["hash"] if last else None,
        "time_range": {
            "first": format_time(first["occurred_at"]) if first else None,
            "last": format_time(last["occurred_at"]) if last else None,
        },
    }
    for key, value in expected.items():
        if manifest.get(key) != value:
            report.problems.append(f"{MANIFEST}: {key} does not match the events file")
    for chain, segment in manifest["chains"].items():
        if heads.get(chain, (None, None)) != (segment["last_sequence"], segment["last_hash"]):
            report.problems.append(f"chain {chain}: ends before sequence {segment['last_sequence']} (deleted)")
