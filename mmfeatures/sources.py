"""Manifest readers: JSONL, CSV and Parquet files become plain rows, each tagged with where it
came from; a row that cannot be parsed becomes an error row instead of stopping the read."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from mmfeatures.errors import ErrorRow, ManifestError

@dataclass(frozen=True)
class ManifestRow:
    data: dict[str, Any]
    source: str  # "path:line" (1-based; Parquet counts rows)


def manifest_format(path: str) -> str:
    lowered = path.lower()
    for suffix, kind in ((".jsonl", "jsonl"), (".json", "jsonl"), (".ndjson", "jsonl"),
                         (".csv", "csv"), (".parquet", "parquet"), (".pq", "parquet")):
        if lowered.endswith(suffix):
            return kind
    raise ValueError(f"cannot tell the manifest format of {path!r}: use .jsonl, .csv or .parquet")


def declared_column_types(path: str) -> dict[str, pa.DataType] | None:
    """A Parquet manifest's own column types; None for formats whose values carry no schema."""
    if manifest_format(path) != "parquet":
        return None
    fs, fs_path = url_to_fs(path)
    with fs.open(fs_path, "rb") as handle:
        return {field.name: field.type for field in pq.read_schema(handle)}


def read_manifest(path: str) -> Iterator[ManifestRow | ErrorRow]:
    """Stream the rows of one manifest file."""
    readers = {"jsonl": _read_jsonl, "csv": _read_csv, "parquet": _read_parquet}
    yield from readers[manifest_format(path)](path)


def _row_error(exc: ManifestError, source: str) -> ErrorRow:
    return ErrorRow.from_exception(exc, record_id=None, modality=None, source=source)


def _read_jsonl(path: str) -> Iterator[ManifestRow | ErrorRow]:
    fs, fs_path = url_to_fs(path)
    with fs.open(fs_path, "rb") as raw:
        for number, raw_line in enumerate(raw, 1):
            source = f"{path}:{number}"
            try:
                line = raw_line.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                yield _row_error(ManifestError(f"the line is not valid UTF-8: {exc}", error_type="invalid_utf8"), source)
                continue
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError as exc:
                yield _row_error(ManifestError(f"malformed JSON: {exc}", error_type="malformed_json"), source)
                continue
            if not isinstance(data, dict):
                yield _row_error(ManifestError("a JSONL line must hold an object", error_type="malformed_json"), source)
                continue
            yield ManifestRow(data, source)


def _read_csv(path: str) -> Iterator[ManifestRow | ErrorRow]:
    fs, fs_path = url_to_fs(path)
    with fs.open(fs_path, "rb") as raw:
        reader = csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8-sig", errors="replace", newline=""))
        for row in reader:
            source = f"{path}:{reader.line_num}"
            if None in row or any(value is None for value in row.values()):
                yield _row_error(
                    ManifestError("the row's field count does not match the header", error_type="malformed_csv"),
                    source,
                )
                continue
            # CSV has no nulls: an empty cell means the value is absent.
            yield ManifestRow({key: (value if value != "" else None) for key, value in row.items()}, source)


def _read_parquet(path: str) -> Iterator[ManifestRow | ErrorRow]:
    fs, fs_path = url_to_fs(path)
    with fs.open(fs_path, "rb") as handle:
        number = 0
        for batch in pq.ParquetFile(handle).iter_batches(batch_size=4096):
            for data in batch.to_pylist():
                number += 1
                yield ManifestRow(data, f"{path}:{number}")
