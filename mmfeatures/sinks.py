"""Sinks: the feature table, the error table and the run summary.

Tables are written the way Beam's file sinks are: each batch of rows becomes one Parquet file in a
staging folder, and a single commit step, which runs once all rows are written, moves the files
into place and lists them in the table's manifest, ``_<table>_manifest.json`` beside the table's
folder. A retried bundle leaves only orphans in staging, never duplicate rows in the table.
"""

from __future__ import annotations

import json
import os
import posixpath
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, BinaryIO

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec import AbstractFileSystem
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from mmfeatures import storage
from mmfeatures.column_types import conform_value, merge_column_types
from mmfeatures.schema import PART_PREFIX, embedding_dimension, manifest_path

STAGING_DIR = "_staging"


def _filesystem(path: str) -> tuple[AbstractFileSystem, str]:
    return url_to_fs(path)


def _open_for_write(fs: AbstractFileSystem, fs_path: str) -> BinaryIO:
    fs.makedirs(posixpath.dirname(fs_path), exist_ok=True)
    return fs.open(fs_path, "wb")


def embedding_array(vectors: Sequence[np.ndarray | Sequence[float] | None], dim: int) -> pa.ListArray:
    """Vectors (or None) as a float32 list column, checking each holds exactly ``dim`` values."""
    present = [v for v in vectors if v is not None]
    if any(len(v) != dim for v in present):
        raise ValueError(f"an embedding does not have the column's dimension {dim}")
    lengths = np.array([0 if v is None else dim for v in vectors], dtype=np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    values = np.concatenate(present).astype(np.float32) if present else np.zeros(0, np.float32)
    mask = pa.array([v is None for v in vectors], type=pa.bool_())
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values), mask=mask)


def rows_to_table(rows: Sequence[Mapping[str, Any]], schema: pa.Schema) -> pa.Table:
    columns = []
    for f in schema:
        values = [row.get(f.name) for row in rows]
        dim = embedding_dimension(f)
        if dim is not None:
            columns.append(embedding_array(values, dim))
        else:
            columns.append(pa.array([conform_value(v, f.type) for v in values], type=f.type))
    return pa.Table.from_arrays(columns, schema=schema)


def dictionary_columns(table_schema: pa.Schema) -> list[str]:
    """The Parquet columns worth dictionary encoding: all but the embeddings, whose float values
    hardly ever repeat, so a dictionary of them only adds its own size and the time to build it.
    List columns are named by their leaf, as the Parquet schema does."""
    return [
        f"{field.name}.list.element" if pa.types.is_list(field.type) else field.name
        for field in table_schema
        if embedding_dimension(field) is None
    ]


def staging_directory(table: str) -> str:
    """Where a table's files are staged: ``OUTPUT/_staging/<table>``, beside the tables, since
    readers (pyarrow, Spark) skip folders whose names start with an underscore."""
    table = table.rstrip("/")
    return storage.join(storage.parent(table), STAGING_DIR, posixpath.basename(table))


def _write_staged(staging: str, table: pa.Table) -> str:
    """Write ``table`` as one Parquet file under a new name in ``staging``; returns its path."""
    data = parquet_bytes(table)
    fs, fs_path = _filesystem(storage.join(staging, f"{uuid.uuid4().hex}.parquet"))
    with _open_for_write(fs, fs_path) as handle:
        handle.write(memoryview(data))
    return fs_path


def parquet_bytes(table: pa.Table) -> pa.Buffer:
    """``table`` as the bytes of a Parquet file, once they are known to read back: Arrow writes
    some values it cannot read (nesting too deep), and a part that cannot be read must fail the
    run here, before its commit replaces a table that can."""
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer, compression="zstd", use_dictionary=dictionary_columns(table.schema))
    data = buffer.getvalue()
    try:
        rows = pq.read_table(pa.BufferReader(data)).num_rows
    except (pa.ArrowException, OSError) as exc:
        raise OSError(f"a Parquet part of {table.num_rows} rows does not read back: {exc}") from None
    if rows != table.num_rows:
        raise OSError(f"a Parquet part of {table.num_rows} rows reads back as {rows}")
    return data


class _WriteStagedFile(beam.DoFn):
    def __init__(self, staging: str) -> None:
        self.staging = staging

    def process(self, rows: Sequence[Mapping[str, Any]], schema: pa.Schema) -> Iterable[tuple[str, int]]:
        if not rows:
            return
        yield self.write(rows_to_table(rows, schema)), len(rows)

    def write(self, table: pa.Table) -> str:
        return _write_staged(self.staging, table)


class _CommitFiles(beam.DoFn):
    """Publish the staged files as the table, once, after every row is written.

    Each commit names its parts after itself (``part-<commit>-00000-of-00003.parquet``), so it never
    overwrites a file of an earlier table, and then writes the manifest beside the folder
    (``schema.manifest_path``), which lists the parts and is the table's one source of truth
    (``read_features`` reads only those). On a local disk the parts are assembled in staging and the
    folder swapped in by renames, so even plain readers never see a mix, and the manifest then
    replaces the old one in one rename. Object stores have no rename: parts are copied in beside the
    old ones, then the manifest is written in one PUT (atomic), and only then are the parts it does
    not list deleted, so a run killed at any point leaves the old manifest or the new one, each
    naming whole files, and the next commit deletes the leftovers.
    """

    def __init__(self, staging: str, directory: str) -> None:
        self.staging = staging
        self.directory = directory

    def process(self, staged: list[tuple[str, int]], schema: pa.Schema) -> Iterable[dict[str, Any]]:
        fs, root = _filesystem(self.directory)
        _, staging_root = _filesystem(self.staging)
        staged = sorted(staged) or [(_write_staged(self.staging, schema.empty_table()), 0)]  # empty: still readable
        commit = f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:8]}"  # sorts by time
        names = [f"{PART_PREFIX}{commit}-{i:05d}-of-{len(staged):05d}.parquet" for i in range(len(staged))]
        files = [{"path": name, "rows": rows} for name, (_, rows) in zip(names, staged, strict=True)]
        manifest = {"commit": commit, "files": files}
        if isinstance(fs, LocalFileSystem):
            _swap_in_locally(staging_root, root, [path for path, _ in staged], names, manifest)
        else:
            _copy_in(fs, root, [path for path, _ in staged], names, manifest)
        try:  # with it go the orphans of retried bundles
            fs.rm(staging_root, recursive=True)
            fs.rmdir(posixpath.dirname(staging_root))  # once the other table is done too
        except (FileNotFoundError, OSError):  # object stores keep no empty folder; still in use
            pass
        yield {"files": len(names), "rows": sum(rows for _, rows in staged)}


def _swap_in_locally(
    staging_root: str, root: str, staged: list[str], names: list[str], manifest: dict[str, Any]
) -> None:
    assembled = os.path.join(staging_root, f"table-{uuid.uuid4().hex}")
    os.makedirs(assembled)
    for path, name in zip(staged, names, strict=True):
        os.rename(path, os.path.join(assembled, name))
    staged_manifest = os.path.join(staging_root, f"manifest-{uuid.uuid4().hex}.json")
    with open(staged_manifest, "w") as handle:
        json.dump(manifest, handle, indent=1)
    previous = os.path.join(staging_root, f"previous-{uuid.uuid4().hex}")
    if os.path.exists(root):
        os.rename(root, previous)
    os.makedirs(os.path.dirname(root), exist_ok=True)
    os.rename(assembled, root)
    # The manifest is beside the folder, not swapped with it: one atomic rename publishes it, once
    # the parts it names are in place.
    os.replace(staged_manifest, manifest_path(root))


def _copy_in(fs: AbstractFileSystem, root: str, staged: list[str], names: list[str], manifest: dict[str, Any]) -> None:
    final = [f"{root}/{name}" for name in names]
    for path, target in zip(staged, final, strict=True):
        fs.copy(path, target)
    fs.pipe_file(manifest_path(root), json.dumps(manifest, indent=1).encode())
    for old in set(fs.glob(f"{root}/{PART_PREFIX}*.parquet")) - set(final):
        fs.rm(old)


class FeatureSchema(beam.PTransform):
    """Per-manifest column types to the feature table's schema (a singleton): the declared
    columns, then the carried ones in input order, each with one type over the whole run."""

    def __init__(self, build: Callable[[Mapping[str, pa.DataType]], pa.Schema]):
        super().__init__()
        self.build = build

    def expand(self, column_types: beam.PCollection) -> beam.PCollection:
        return (
            column_types
            | "Gather" >> beam.combiners.ToList()
            | "Schema" >> beam.Map(lambda per_file: self.build(merge_column_types(t for _, t in sorted(per_file))))
        )


class WriteParquetTable(beam.PTransform):
    """Write dict rows as a Parquet table under ``directory``; outputs ``{"files", "rows"}`` once
    the table is committed. ``schema`` is a singleton PCollection, so it may depend on the data."""

    def __init__(self, directory: str, schema: beam.pvalue.PCollection, rows_per_file: int = 2000) -> None:
        super().__init__()
        self.directory = directory.rstrip("/")
        self.schema = schema
        self.rows_per_file = rows_per_file

    def expand(self, rows: beam.PCollection) -> beam.PCollection:
        schema = beam.pvalue.AsSingleton(self.schema)
        staging = staging_directory(self.directory)
        return (
            rows
            | "Batch" >> beam.BatchElements(min_batch_size=self.rows_per_file, max_batch_size=self.rows_per_file)
            | "WriteStaged" >> beam.ParDo(_WriteStagedFile(staging), schema)
            | "Gather" >> beam.combiners.ToList()
            | "Commit" >> beam.ParDo(_CommitFiles(staging, self.directory), schema)
        )


class WriteRunSummary(beam.PTransform):
    """Write ``_run.json`` once the tables are committed, from counts the data itself produced."""

    def __init__(
        self, path: str, build: Callable[..., dict[str, Any]], started: float, **inputs: beam.PCollection
    ) -> None:
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
