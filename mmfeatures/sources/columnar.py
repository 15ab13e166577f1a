"""Parquet and Arrow files, Hugging Face ``datasets``' own among them: the files ``to_parquet``
writes, and the Arrow IPC stream files of ``save_to_disk``.

A dataset's features are JSON in the schema's ``huggingface`` metadata. ``Image()`` and
``Audio()`` columns are ``struct<bytes, path>`` (``records`` reads them as the bytes when present,
else the path); ``ClassLabel`` columns hold integers, which are read as their class names.

Rows are made Python values a chunk of at most ``--max-bytes`` of Arrow data at a time, and
Parquet row groups are read in batches of about that size (as their metadata sizes their rows), so
that a file of large cells is never held whole; a cell over the limit is its row's error row.
Arrow IPC batches are read as they were written, and a cell is decoded before it can be measured.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from mmfeatures.errors import ErrorRow, ManifestError
from mmfeatures.records import reported_id
from mmfeatures.sources.base import ManifestRow, ReadOptions, row_error, unreadable

# What pyarrow raises for a corrupt or truncated file: ArrowInvalid and the other Arrow errors,
# OSError, UnicodeDecodeError (a ValueError) for a column name that is not UTF-8, and MemoryError
# when a damaged length asks the Python file object for more bytes than can be allocated.
_UNREADABLE = (pa.ArrowException, OSError, ValueError, MemoryError)

# What turning a value into Python raises: ValueError and OverflowError for a string that is not
# UTF-8 or a date out of range, and KeyError (pytz's and zoneinfo's "unknown time zone").
_UNREPRESENTABLE = (ValueError, OverflowError, KeyError)

# Most rows turned into Python values at a time, and in one Parquet batch.
_ROWS_PER_CHUNK = 256
# What a Parquet column is read through: buffered reads, not whole column chunks fetched ahead (a
# row group of a media dataset may hold hundreds of MB).
_PARQUET_BUFFER = 2**20

_ARROW_FILE_MAGIC = b"ARROW1"  # the Arrow IPC file format (Feather v2); streams start otherwise
_END_OF_STREAM = b"\xff\xff\xff\xff\x00\x00\x00\x00"  # what closing an IPC stream writer writes last
_HUGGING_FACE_METADATA = b"huggingface"
_NO_LABEL = -1  # what ``datasets`` stores for an example without a label (an unlabelled test split)


def class_names(schema: pa.Schema) -> dict[str, list[str]]:
    """Each ``ClassLabel`` column of a ``datasets`` file and its class names; empty for any other
    file (no ``huggingface`` metadata, or metadata this reader cannot parse).

    Only integer columns the file holds count: pyarrow keeps a schema's metadata when columns are
    dropped or replaced, so the metadata may name a column that is gone or now holds strings."""
    raw = (schema.metadata or {}).get(_HUGGING_FACE_METADATA)
    try:
        features = json.loads(raw)["info"]["features"] if raw else {}
    except (ValueError, KeyError, TypeError):
        return {}
    if not isinstance(features, dict):
        return {}
    integers = {field.name for field in schema if pa.types.is_integer(field.type)}
    return {
        column: [str(name) for name in feature["names"]]
        for column, feature in features.items()
        if column in integers
        and isinstance(feature, dict)
        and feature.get("_type") == "ClassLabel"
        and isinstance(feature.get("names"), list)
    }


def column_types(schema: pa.Schema) -> dict[str, pa.DataType]:
    """The file's column types as its rows are read: ``ClassLabel`` columns become strings."""
    names = class_names(schema)
    return {field.name: pa.string() if field.name in names else field.type for field in schema}


def _open_arrow(handle: BinaryIO) -> pa.ipc.RecordBatchStreamReader | pa.ipc.RecordBatchFileReader:
    magic = handle.read(len(_ARROW_FILE_MAGIC))
    handle.seek(0)
    return pa.ipc.open_file(handle) if magic == _ARROW_FILE_MAGIC else pa.ipc.open_stream(handle)


def read_schema(path: str) -> pa.Schema | None:
    """A Parquet or Arrow file's schema, or None when it cannot be read (the reader reports that)."""
    fs, fs_path = url_to_fs(path)
    with fs.open(fs_path, "rb") as handle:
        try:
            return pq.read_schema(handle) if _is_parquet(path) else _open_arrow(handle).schema
        except _UNREADABLE:
            return None


def _is_parquet(path: str) -> bool:
    return path.lower().endswith((".parquet", ".pq"))


def _batches(
    handle: BinaryIO, path: str, limit: int | None, groups: range | None
) -> tuple[pa.Schema, Iterator[pa.RecordBatch]]:
    if _is_parquet(path):
        parquet = pq.ParquetFile(handle, pre_buffer=False, buffer_size=_PARQUET_BUFFER)
        return parquet.schema_arrow, _parquet_batches(parquet, limit, groups)
    reader = _open_arrow(handle)
    if isinstance(reader, pa.ipc.RecordBatchFileReader):
        batches: Iterator[pa.RecordBatch] = (reader.get_batch(i) for i in range(reader.num_record_batches))
    else:
        batches = _whole_stream(reader, handle)
    return reader.schema, map(_validated, batches)


def _parquet_batches(parquet: pq.ParquetFile, limit: int | None, groups: range | None) -> Iterator[pa.RecordBatch]:
    """Each row group (of ``groups``, None: all) in batches of about ``limit`` bytes, as its size in
    the file's metadata says its rows are on average (at least one row, at most ``_ROWS_PER_CHUNK``)."""
    for index in range(parquet.num_row_groups) if groups is None else groups:
        group = parquet.metadata.row_group(index)
        rows = _ROWS_PER_CHUNK
        if limit is not None:
            rows = max(1, min(rows, limit * group.num_rows // max(group.total_byte_size, 1)))
        yield from parquet.iter_batches(batch_size=rows, row_groups=[index])


def _whole_stream(reader: pa.ipc.RecordBatchStreamReader, handle: BinaryIO) -> Iterator[pa.RecordBatch]:
    """The stream's batches, then ``ArrowInvalid`` if it lacks its end marker: pyarrow reads a
    stream cut between two batches (a killed ``save_to_disk``, a copy cut short) as whole."""
    yield from reader
    handle.seek(-len(_END_OF_STREAM), os.SEEK_END)
    if handle.read(len(_END_OF_STREAM)) != _END_OF_STREAM:
        raise pa.ArrowInvalid("the stream ends without its end-of-stream marker: it was cut off after a batch")


def _validated(batch: pa.RecordBatch) -> pa.RecordBatch:
    """``batch`` once its offsets and UTF-8 are checked (``ArrowInvalid`` otherwise): an Arrow
    reader takes a damaged file's buffers as they are, and ``to_pylist`` on bad offsets crashes
    the process (a segmentation fault) instead of raising."""
    batch.validate(full=True)
    return batch


def parquet_parts(path: str, part_bytes: int) -> list[tuple[int, int, int]]:
    """The parts ``(first row group, row group after the last, first row)`` of a Parquet file:
    row groups taken in turn until they hold ``part_bytes``, as the file's metadata sizes them.
    Empty for a file whose metadata cannot be read (its read reports why)."""
    fs, fs_path = url_to_fs(path)
    with fs.open(fs_path, "rb") as handle:
        try:
            metadata = pq.ParquetFile(handle).metadata
        except _UNREADABLE:
            return []
    parts: list[tuple[int, int, int]] = []
    start = size = 0
    first = row = 1
    for index in range(metadata.num_row_groups):
        group = metadata.row_group(index)
        size += group.total_byte_size
        row += group.num_rows
        if size >= part_bytes or index == metadata.num_row_groups - 1:
            parts.append((start, index + 1, first))
            start, size, first = index + 1, 0, row
    return parts


def read_columnar(
    path: str, options: ReadOptions, groups: range | None = None, first: int = 1
) -> Iterator[ManifestRow | ErrorRow]:
    """The rows of a Parquet or Arrow file, or of the Parquet row groups ``groups``, whose first row
    is row ``first`` of the file (see ``parquet_parts``)."""
    fs, fs_path = url_to_fs(path)
    kind = "Parquet file" if _is_parquet(path) else "Arrow file"
    limit = options.max_member_bytes
    id_column = options.columns.get("id", "id")
    with fs.open(fs_path, "rb") as handle:
        number = first - 1
        try:
            schema, batches = _batches(handle, path, limit, groups)
            names = class_names(schema)
            for batch in batches:
                for chunk, index, data in _rows(batch, limit):
                    number += 1
                    source = f"{path}:{number}"
                    if not isinstance(data, ManifestError) and names:
                        data = _with_class_names(data, names)
                    if isinstance(data, ManifestError):
                        yield row_error(data, source, _row_id(chunk.slice(index, 1), id_column, limit))
                    else:
                        yield ManifestRow(data, source)
        except _UNREADABLE as exc:
            # A corrupt or truncated file cannot be read row by row: the rest of it is one error row.
            yield unreadable(f"{path}:{number + 1}", kind, exc)


def _rows(
    batch: pa.RecordBatch, limit: int | None
) -> Iterator[tuple[pa.RecordBatch, int, dict[str, Any] | ManifestError]]:
    """Each row of ``batch``, with the chunk it was made from and its place there: made Python
    values a chunk at a time, of at most ``_ROWS_PER_CHUNK`` rows and ``limit`` bytes of Arrow
    data (halved until it fits, down to one row). A row alone over ``limit`` is made when none of
    its cells is over it; otherwise it is that row's error."""
    pending = [batch]
    while pending:
        chunk = pending.pop()
        over = limit is not None and chunk.nbytes > limit
        if chunk.num_rows > 1 and (over or chunk.num_rows > _ROWS_PER_CHUNK):
            half = chunk.num_rows // 2
            pending += [chunk.slice(half), chunk.slice(0, half)]
            continue
        error = _cell_over(chunk, limit) if limit is not None and over else None
        for index, data in enumerate(_chunk_rows(chunk) if error is None else [error]):
            yield chunk, index, data


def _cell_over(row: pa.RecordBatch, limit: int) -> ManifestError | None:
    """The error of a one-row batch with a cell over ``limit`` bytes; None when it has none."""
    for name, column in zip(row.schema.names, row.columns, strict=True):
        if column.nbytes > limit:
            message = f"column {name!r} holds {column.nbytes} bytes, over the {limit}-byte limit"
            return ManifestError(message, error_type="cell_too_large")
    return None


def _chunk_rows(chunk: pa.RecordBatch) -> list[dict[str, Any] | ManifestError]:
    """A chunk's rows; a row holding a value Python cannot represent (a timestamp past year 9999
    or in a time zone no database knows, a string that is not UTF-8) is that row's error instead."""
    try:
        return chunk.to_pylist()
    except _UNREPRESENTABLE:
        pass
    rows: list[dict[str, Any] | ManifestError] = []
    for index in range(chunk.num_rows):
        try:
            rows.append(chunk.slice(index, 1).to_pylist()[0])
        except _UNREPRESENTABLE as exc:
            rows.append(ManifestError(f"a value cannot be read: {exc}"))
    return rows


def _row_id(row: pa.RecordBatch, column: str, limit: int | None) -> str | None:
    """The id of a one-row batch whose row cannot be read, as text: the value as Python writes it,
    or else as Arrow does (a timestamp past year 9999); None when it has none, or it is too large."""
    if column not in row.schema.names:
        return None
    cell = row.column(column)
    if cell.null_count or (limit is not None and cell.nbytes > limit):
        return None
    try:
        return reported_id({"id": cell[0].as_py()})
    except _UNREPRESENTABLE:
        pass
    try:
        return reported_id({"id": pc.cast(cell, pa.string())[0].as_py()})
    except (pa.ArrowException, *_UNREPRESENTABLE):
        return None


def _with_class_names(row: dict[str, Any], names: Mapping[str, list[str]]) -> dict[str, Any] | ManifestError:
    """``row`` with each ``ClassLabel`` integer replaced by its class name (None for no label)."""
    for column, classes in names.items():
        value = row.get(column)
        if value is None or value == _NO_LABEL:
            row[column] = None
        elif isinstance(value, int) and 0 <= value < len(classes):
            row[column] = classes[value]
        else:
            return ManifestError(
                f"column {column!r} holds {value!r}, which is not one of its {len(classes)} ClassLabel classes",
                error_type="invalid_label",
            )
    return row
