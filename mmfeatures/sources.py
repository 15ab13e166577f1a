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

# What pyarrow raises for a corrupt or truncated Parquet file: ArrowInvalid and the other Arrow
# errors, OSError, and UnicodeDecodeError (a ValueError) for a column name that is not UTF-8.
_UNREADABLE_PARQUET = (pa.ArrowException, OSError, ValueError)


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
    """A Parquet manifest's own column types; None for formats whose values carry no schema, and
    for a Parquet file whose schema cannot be read (``read_manifest`` reports that file)."""
    if manifest_format(path) != "parquet":
        return None
    fs, fs_path = url_to_fs(path)
    with fs.open(fs_path, "rb") as handle:
        try:
            return {field.name: field.type for field in pq.read_schema(handle)}
        except _UNREADABLE_PARQUET:
            return None


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
            except (ValueError, RecursionError) as exc:
                # ValueError: JSONDecodeError, and integers over Python's 4300-digit limit;
                # RecursionError: nesting deeper than the interpreter's stack.
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
        # csv.Error (a field over csv.field_size_limit(), 128 KiB) makes that row an error row and
        # the read goes on with the next line; a header that cannot be parsed ends the file.
        try:
            if reader.fieldnames is None:  # an empty file
                return
        except csv.Error as exc:
            error = ManifestError(f"malformed CSV header: {exc}", error_type="malformed_csv")
            yield _row_error(error, f"{path}:{reader.reader.line_num}")
            return
        while True:
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                error = ManifestError(f"malformed CSV: {exc}", error_type="malformed_csv")
                yield _row_error(error, f"{path}:{reader.reader.line_num}")  # DictReader's lags on errors
                continue
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
        try:
            for batch in pq.ParquetFile(handle).iter_batches(batch_size=4096):
                for data in _batch_rows(batch):
                    number += 1
                    source = f"{path}:{number}"
                    yield _row_error(data, source) if isinstance(data, ManifestError) else ManifestRow(data, source)
        except _UNREADABLE_PARQUET as exc:
            # A corrupt or truncated file cannot be read row by row: the rest of it is one error row.
            error = ManifestError(f"the Parquet file cannot be read: {exc}", error_type="unreadable_manifest")
            yield _row_error(error, path)


def _batch_rows(batch: pa.RecordBatch) -> list[dict[str, Any] | ManifestError]:
    """A batch's rows; a row holding a value Python cannot represent (a timestamp past year 9999,
    a string that is not UTF-8) is that row's error instead."""
    try:
        return batch.to_pylist()
    except (ValueError, OverflowError):
        pass
    rows: list[dict[str, Any] | ManifestError] = []
    for index in range(batch.num_rows):
        try:
            rows.append(batch.slice(index, 1).to_pylist()[0])
        except (ValueError, OverflowError) as exc:
            rows.append(ManifestError(f"a value cannot be read: {exc}"))
    return rows
