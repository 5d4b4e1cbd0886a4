"""Export file formats (CSV, JSON lines, Parquet): page-at-a-time writers and streaming readers.

Every format carries the same columns with the same text forms (fixed UTC timestamps, payload as canonical
JSON, content as base64), so a row read back hashes exactly as it did in the database. CSV writes NULL as `\\N`
(as PostgreSQL's COPY does) so it stays distinct from an empty string.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.parquet as pq

from bastion.audit.events import canonical_json
from bastion.audit.store import ROW_COLUMNS, row_from_json, row_to_json

FORMATS = ("csv", "jsonl", "parquet")
COLUMNS = ("id", *ROW_COLUMNS)
_NULL = "\\N"
_INT = {"id", "sequence"}
_SCHEMA = pa.schema([(c, pa.int64() if c in _INT else pa.string()) for c in COLUMNS])


def events_file(fmt: str) -> str:
    return f"events.{fmt}"


def to_flat(row: dict[str, Any]) -> dict[str, Any]:
    """A database row in export form: text everywhere except id and sequence."""
    out = row_to_json(row)
    out["payload"] = canonical_json(out["payload"] or {}).decode()
    return {"id": int(row["id"]), **out}


def from_flat(flat: dict[str, Any]) -> dict[str, Any]:
    """Back to the row form `chain.row_hash` takes."""
    data = dict(flat)
    data["payload"] = json.loads(data["payload"]) if isinstance(data["payload"], str) else data["payload"]
    row = row_from_json(data)
    row["id"] = int(flat["id"])
    return row


class Sink(Protocol):
    def write(self, rows: list[dict[str, Any]]) -> None: ...
    def close(self) -> None: ...


class CsvSink:
    def __init__(self, path: Path) -> None:
        self._handle = open(path, "w", newline="", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._csv = csv.writer(self._handle)
        self._csv.writerow(COLUMNS)

    def write(self, rows: list[dict[str, Any]]) -> None:
        self._csv.writerows([[_NULL if r[c] is None else r[c] for c in COLUMNS] for r in rows])

    def close(self) -> None:
        self._handle.close()


class JsonlSink:
    def __init__(self, path: Path) -> None:
        self._handle = open(path, "w", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def write(self, rows: list[dict[str, Any]]) -> None:
        for r in rows:
            line = {**r, "payload": json.loads(r["payload"])}
            self._handle.write(canonical_json(line).decode() + "\n")

    def close(self) -> None:
        self._handle.close()


class ParquetSink:
    """One row group per page: memory stays at one page however many rows there are."""

    def __init__(self, path: Path) -> None:
        self._writer = pq.ParquetWriter(str(path), _SCHEMA)

    def write(self, rows: list[dict[str, Any]]) -> None:
        if rows:
            self._writer.write_table(pa.Table.from_pylist(rows, schema=_SCHEMA))

    def close(self) -> None:
        self._writer.close()


def open_sink(fmt: str, path: Path) -> Sink:
    return {"csv": CsvSink, "jsonl": JsonlSink, "parquet": ParquetSink}[fmt](path)


def read_rows(fmt: str, path: Path) -> Iterator[dict[str, Any]]:
    """Stream rows back in file order, in the row form (constant memory)."""
    if fmt == "csv":
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.reader(handle)
            header = next(reader)
            for values in reader:
                flat = {c: None if v == _NULL else v for c, v in zip(header, values, strict=True)}
                yield from_flat(flat)
    elif fmt == "jsonl":
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                if line.strip():
                    yield from_flat(json.loads(line))
    else:
        for batch in pq.ParquetFile(str(path)).iter_batches(batch_size=5000):
            for flat in batch.to_pylist():
                yield from_flat(flat)
