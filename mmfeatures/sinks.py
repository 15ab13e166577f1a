"""Sinks: the feature table, the error table and the run summary.

Tables are written the way Beam's file sinks are: each batch of rows becomes one Parquet file in a
staging folder, and a single commit step, which runs once all rows are written, moves the files
into place. A retried bundle leaves only orphans in staging, never duplicate rows in the table.
"""

from __future__ import annotations

import json
import posixpath
import time
import uuid
from typing import Any, Callable, Iterable, Mapping

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec import AbstractFileSystem
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from mmfeatures import storage
from mmfeatures.schema import embedding_dimension


PART_PREFIX = "part-"
STAGING_DIR = "_staging"


def _filesystem(path: str):
    return url_to_fs(path)


def _open_for_write(fs, fs_path: str):
    fs.makedirs(posixpath.dirname(fs_path), exist_ok=True)
    return fs.open(fs_path, "wb")


def conform_value(value: Any, arrow_type: pa.DataType) -> Any:
    """Make a carried value fit its column's unified type (see ``unify_types``)."""
    if value is None:
        return None
    if pa.types.is_string(arrow_type) and not isinstance(value, str):
        return json.dumps(value, default=str, sort_keys=True)
    if pa.types.is_floating(arrow_type) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def unify_types(left: pa.DataType | None, right: pa.DataType | None) -> pa.DataType | None:
    """The column type that holds values of both types: null gives way, ints widen to floats,
    and any other disagreement falls back to string (non-strings stored as JSON)."""
    if left is None or pa.types.is_null(left):
        return right
    if right is None or pa.types.is_null(right) or left == right:
        return left
    if pa.types.is_integer(left) and pa.types.is_integer(right):
        return pa.int64()
    numeric = (pa.types.is_integer, pa.types.is_floating)
    if any(f(left) for f in numeric) and any(f(right) for f in numeric):
        return pa.float64()
    if pa.types.is_list(left) and pa.types.is_list(right):  # e.g. [] beside ["x"]
        inner = unify_types(left.value_type, right.value_type)
        items = (left.value_type, right.value_type)
        if not pa.types.is_string(inner) or all(pa.types.is_string(t) or pa.types.is_null(t) for t in items):
            return pa.list_(inner)
    return pa.string()


def value_type(value: Any) -> pa.DataType | None:
    if value is None:
        return None
    try:
        return pa.scalar(value).type
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError):
        return pa.string()


def add_value_types(types: dict[str, pa.DataType | None], row: Mapping[str, Any]) -> None:
    """Widen ``types`` (column -> type) to hold ``row``'s values: manifests without a schema."""
    for name, value in row.items():
        types[name] = unify_types(types.get(name), value_type(value))


def infer_column_types(rows: Iterable[Mapping[str, Any]]) -> dict[str, pa.DataType | None]:
    types: dict[str, pa.DataType | None] = {}
    for row in rows:
        add_value_types(types, row)
    return types


def merge_column_types(per_source: Iterable[Mapping[str, pa.DataType | None]]) -> dict[str, pa.DataType]:
    """The carried columns of a run: every source's columns in first-seen order, one type each.
    A column that is null everywhere is still carried, as string."""
    merged: dict[str, pa.DataType | None] = {}
    for types in per_source:
        for name, arrow_type in types.items():
            merged[name] = unify_types(merged.get(name), arrow_type)
    return {name: arrow_type or pa.string() for name, arrow_type in merged.items()}


def embedding_array(vectors: list[np.ndarray | None], dim: int) -> pa.ListArray:
    """Vectors (or None) as a float32 list column, checking each holds exactly ``dim`` values."""
    present = [v for v in vectors if v is not None]
    if any(len(v) != dim for v in present):
        raise ValueError(f"an embedding does not have the column's dimension {dim}")
    lengths = np.array([0 if v is None else dim for v in vectors], dtype=np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    values = np.concatenate(present).astype(np.float32) if present else np.zeros(0, np.float32)
    mask = pa.array([v is None for v in vectors], type=pa.bool_())
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values), mask=mask)


def rows_to_table(rows: list[Mapping[str, Any]], schema: pa.Schema) -> pa.Table:
    columns = []
    for f in schema:
        values = [row.get(f.name) for row in rows]
        dim = embedding_dimension(f)
        if dim is not None:
            columns.append(embedding_array(values, dim))
        else:
            columns.append(pa.array([conform_value(v, f.type) for v in values], type=f.type))
    return pa.Table.from_arrays(columns, schema=schema)


class _WriteStagedFile(beam.DoFn):
    def __init__(self, directory: str):
        self.directory = directory

    def process(self, rows: list[Mapping[str, Any]], schema: pa.Schema) -> Iterable[tuple[str, int]]:
        if not rows:
            return
        path = storage.join(self.directory, STAGING_DIR, f"{uuid.uuid4().hex}.parquet")
        fs, fs_path = _filesystem(path)
        with _open_for_write(fs, fs_path) as handle:
            pq.write_table(rows_to_table(rows, schema), handle, compression="zstd")
        yield path, len(rows)


def _move(fs: AbstractFileSystem, source: str, target: str) -> None:
    """Rename on local disks; copy then delete on object stores, which have no rename (as Beam's
    own GCS and S3 filesystems do)."""
    if isinstance(fs, LocalFileSystem):
        fs.mv(source, target)
    else:
        fs.copy(source, target)
        fs.rm(source)


class _CommitFiles(beam.DoFn):
    """Replace the table's files with the staged ones, in one step after all writes finished."""

    def __init__(self, directory: str):
        self.directory = directory

    def process(self, staged: list[tuple[str, int]], schema: pa.Schema) -> Iterable[dict[str, Any]]:
        fs, root = _filesystem(self.directory)
        fs.makedirs(root, exist_ok=True)
        for old in fs.glob(f"{root.rstrip('/')}/{PART_PREFIX}*.parquet"):
            fs.rm(old)
        staged = sorted(staged)
        if not staged:  # an empty table is still a readable file with the full schema
            empty = storage.join(self.directory, STAGING_DIR, f"{uuid.uuid4().hex}.parquet")
            with _open_for_write(fs, _filesystem(empty)[1]) as handle:
                pq.write_table(schema.empty_table(), handle)
            staged = [(empty, 0)]
        files = []
        for index, (path, _rows) in enumerate(staged):
            final = f"{root.rstrip('/')}/{PART_PREFIX}{index:05d}-of-{len(staged):05d}.parquet"
            _move(fs, _filesystem(path)[1], final)
            files.append(final)
        try:  # orphans of retried bundles; object stores have no folder left once it is empty
            fs.rm(f"{root.rstrip('/')}/{STAGING_DIR}", recursive=True)
        except FileNotFoundError:
            pass
        yield {"files": len(files), "rows": sum(rows for _, rows in staged)}


class WriteParquetTable(beam.PTransform):
    """Write dict rows as a Parquet table under ``directory``; outputs ``{"files", "rows"}`` once
    the table is committed. ``schema`` is a singleton PCollection, so it may depend on the data."""

    def __init__(self, directory: str, schema: beam.pvalue.PCollection, rows_per_file: int = 2000):
        super().__init__()
        self.directory = directory
        self.schema = schema
        self.rows_per_file = rows_per_file

    def expand(self, rows: beam.PCollection) -> beam.PCollection:
        schema = beam.pvalue.AsSingleton(self.schema)
        return (
            rows
            | "Batch" >> beam.BatchElements(min_batch_size=self.rows_per_file, max_batch_size=self.rows_per_file)
            | "WriteStaged" >> beam.ParDo(_WriteStagedFile(self.directory), schema)
            | "Gather" >> beam.combiners.ToList()
            | "Commit" >> beam.ParDo(_CommitFiles(self.directory), schema)
        )


class WriteRunSummary(beam.PTransform):
    """Write ``_run.json`` once the tables are committed, from counts the data itself produced."""

    def __init__(self, path: str, build: Callable[..., dict[str, Any]], started: float, **inputs: beam.PCollection):
        super().__init__()
        self.path = path
        self.build = build
        self.started = started
        self.inputs = inputs

    def expand(self, pbegin: beam.pvalue.PBegin) -> beam.PCollection:
        side_inputs = {name: beam.pvalue.AsSingleton(pcoll) for name, pcoll in self.inputs.items()}
        return (
            pbegin
            | "Once" >> beam.Create([None])
            | "Write" >> beam.Map(_write_summary, self.path, self.build, self.started, **side_inputs)
        )


def _write_summary(_: None, path: str, build: Callable[..., dict[str, Any]], started: float, **inputs: Any) -> dict:
    summary = build(**inputs)
    summary["wall_seconds"] = round(time.time() - started, 3)
    fs, fs_path = _filesystem(path)
    with fs.open(fs_path, "w") as handle:
        json.dump(summary, handle, indent=2, sort_keys=True, default=str)
    return summary
