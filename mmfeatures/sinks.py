"""Sinks: the feature table, the error table and the run summary, committed together.

Tables are written the way Beam's file sinks are: each batch of rows becomes one Parquet file in
the run's staging folder, and a single commit step, which runs once every row of both tables is
written, moves the files into place and writes ``_run.json``, which lists them (see
``outputs``). A retried bundle leaves only orphans in staging, never duplicate rows in a table.
A table partitioned by a column is staged, and committed, in one Hive-style folder per value
(``features/split=train/``), each part holding the rows of one partition.
"""

from __future__ import annotations

import json
import os
import posixpath
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

import apache_beam as beam
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec import AbstractFileSystem
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from mmfeatures import outputs, storage
from mmfeatures.column_types import conform_table, merge_column_types, rows_to_table
from mmfeatures.lease import Lease
from mmfeatures.outputs import PART_PREFIX
from mmfeatures.schema import (
    embedding_dimension,
    partition_column,
    partition_part,
    partition_values,
    read_part,
    stored_schema,
)


def _filesystem(path: str) -> tuple[AbstractFileSystem, str]:
    return url_to_fs(path)


def _open_for_write(fs: AbstractFileSystem, fs_path: str) -> BinaryIO:
    fs.makedirs(posixpath.dirname(fs_path), exist_ok=True)
    return fs.open(fs_path, "wb")


def dictionary_columns(table_schema: pa.Schema) -> list[str]:
    """The Parquet columns worth dictionary encoding: all but the embeddings, whose float values
    hardly ever repeat, so a dictionary of them only adds its own size and the time to build it.
    List columns are named by their leaf, as the Parquet schema does."""
    return [
        f"{field.name}.list.element" if pa.types.is_list(field.type) else field.name
        for field in table_schema
        if embedding_dimension(field) is None
    ]


def write_staged_part(staging: str, table: pa.Table, partition_by: str | None = None) -> str:
    """Write ``table`` as one Parquet file under a new name in ``staging``; returns its path. A
    table partitioned by the column ``partition_by`` holds one partition's rows (null's, where it
    has none), and goes to that partition's folder (``staging/split=train/``), whose name is what
    ``publish`` gives the committed part's folder."""
    if partition_by is not None:
        values = partition_values(table, partition_by).unique().to_pylist() or [None]
        if len(values) > 1:
            raise ValueError(f"one part cannot hold rows of {len(values)} partitions by {partition_by}")
        staging = storage.join(staging, outputs.partition_folder(partition_by, values[0]))
        table = partition_part(table, partition_by)
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


def _by_partition(
    rows: Sequence[Mapping[str, Any]], schema: pa.Schema, partition_by: str
) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """Each of a batch of rows keyed by its partition's folder, so that each part holds the rows
    of one partition; the folders' values are computed for the batch at once."""
    _, source = partition_column(schema, partition_by)
    values = partition_values(rows_to_table(rows, pa.schema([schema.field(source)])), partition_by)
    for row, value in zip(rows, values.to_pylist(), strict=True):
        yield outputs.partition_folder(partition_by, value), row


def _stage_rows(
    rows: Sequence[Mapping[str, Any]], staging: str, schema: pa.Schema, partition_by: str | None = None
) -> Iterable[tuple[str, int]]:
    """One batch of rows (of one partition, where the table is partitioned) staged as a part: its
    path and row count (nothing for an empty batch)."""
    if rows:
        yield write_staged_part(staging, rows_to_table(rows, schema), partition_by), len(rows)


@dataclass(frozen=True)
class WrittenPart:
    """A Parquet file whose rows the table holds as they are: a part of an earlier run's table
    that a run keeps whole. ``path`` is in the file system of the table's staging folder."""

    path: str
    rows: int


# The element type of a PCollection of rows as columns: Arrow tables and parts already written.
COLUMNAR_ROWS = beam.typehints.Union[pa.Table, WrittenPart]


def _stage_columns(
    rows: pa.Table | WrittenPart, staging: str, schema: pa.Schema, rows_per_file: int, partition_by: str | None = None
) -> Iterator[tuple[str, int]]:
    """Rows as columns staged as parts (``_stage_table``). A written part is copied as it is
    (server-side, on object stores) where a part written now would be the same file: stored with
    the same schema (the run's settings, the same carried columns and partitioning, so the same
    partition's folder) and of at most ``rows_per_file`` rows; otherwise its rows are staged again."""
    if isinstance(rows, pa.Table):
        yield from _stage_table(rows, staging, schema, rows_per_file, partition_by)
        return
    fs, folder = _filesystem(staging)
    with fs.open(rows.path, "rb") as handle:
        stored = pq.read_schema(handle)
    if rows.rows > rows_per_file or not _same_schema(stored, stored_schema(schema, partition_by)):
        table = conform_table(read_part(fs, rows.path), schema)
        yield from _stage_table(table, staging, schema, rows_per_file, partition_by)
        return
    partition = outputs.partition_of(rows.path)
    target = posixpath.join(folder, *([partition] if partition else []), f"{uuid.uuid4().hex}.parquet")
    _copy_in(fs, rows.path, target)
    yield target, rows.rows


def _copy_in(fs: AbstractFileSystem, source: str, target: str) -> None:
    """Copy a committed part to a staged name: a hard link on a local disk (parts are never
    written to once committed, so the two names may share the file), a server-side copy on object
    stores."""
    fs.makedirs(posixpath.dirname(target), exist_ok=True)
    if isinstance(fs, LocalFileSystem):
        try:
            os.link(source, target)
            return
        except OSError:  # a file system without hard links
            pass
    fs.copy(source, target)


def _same_schema(stored: pa.Schema, expected: pa.Schema) -> bool:
    """Whether a part stored with ``stored`` has the schema ``expected``, metadata and all. Types
    compare as Arrow reads them back (Parquet names a list's items ``element``, Arrow ``item``)."""
    return (
        stored.equals(expected)
        and stored.metadata == expected.metadata
        and [field.metadata for field in stored] == [field.metadata for field in expected]
    )


def _stage_table(
    table: pa.Table, staging: str, schema: pa.Schema, rows_per_file: int, partition_by: str | None = None
) -> Iterator[tuple[str, int]]:
    """A table of rows of ``schema`` staged as parts of at most ``rows_per_file`` rows (each of one
    partition, where the table is partitioned): each part's path and row count."""
    if not table.schema.equals(schema):
        raise ValueError(f"rows to stage as a table of {table.schema.names} do not have its schema {schema.names}")
    for rows in _partitions(table, partition_by):
        for start in range(0, rows.num_rows, rows_per_file):
            part = rows.slice(start, rows_per_file)
            yield write_staged_part(staging, part, partition_by), part.num_rows


def _partitions(table: pa.Table, partition_by: str | None) -> Iterator[pa.Table]:
    """``table``'s rows of each partition by ``partition_by`` (all of them where it is None)."""
    if partition_by is None:
        yield table
        return
    values = partition_values(table, partition_by)
    for value in values.unique().to_pylist():
        yield table.filter(pc.is_null(values) if value is None else pc.equal(values, value))


def _at_least_one_part(
    staged: list[tuple[str, int]], staging: str, schema: pa.Schema, partition_by: str | None = None
) -> list[tuple[str, int]]:
    """The staged parts in a fixed order (by partition, then name); one empty part where there
    are none, so that even a table of no rows reads with its schema."""
    return sorted(staged) or [(write_staged_part(staging, schema.empty_table(), partition_by), 0)]


def _move_in(fs: AbstractFileSystem, source: str, target: str) -> None:
    """Move a staged part to its place in the table: a rename on a local disk, a server-side copy
    on object stores (the staged copy goes with the staging folder). A commit retried after its
    parts moved finds them in place."""
    if isinstance(fs, LocalFileSystem):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if os.path.exists(source) or not os.path.exists(target):
            os.rename(source, target)
    else:
        fs.copy(source, target)


def publish(lease: Lease, commit: str, staged: Mapping[str, list[tuple[str, int]]], summary: dict) -> dict:
    """Commit the run that holds ``lease``: move each table's ``staged`` parts in under names of
    their own (``features/part-<commit>-00000-of-00003.parquet``, in the partition folder a part
    was staged in, ``features/split=train/part-...``), then write ``_run.json``, the
    summary with the parts of every table, as the one commit point, then delete what it replaced.

    Before any part moves, the commit writes its intent (the parts it adds and the files it will
    delete) to the run's staging folder, so ``outputs.recover`` can finish or undo it whatever
    point it is cut at; until ``_run.json`` is replaced, the previous run's outputs stay whole. The
    lease is confirmed once more just before, so a run taken over meanwhile publishes nothing.
    Names come from ``commit``, fixed for the run, so a retried commit redoes the same steps, and
    keeps what the first attempt was to delete.
    """
    fs, root = _filesystem(lease.output)
    root = root.rstrip("/")
    run_folder = f"{root}/{outputs.STAGING}/{lease.run}"
    tables: dict[str, dict[str, Any]] = {}
    moves: dict[str, str] = {}  # part name under root -> its staged file
    for table, parts in staged.items():
        names = [
            posixpath.join(
                table, outputs.partition_of(path) or "", f"{PART_PREFIX}{commit}-{i:05d}-of-{len(parts):05d}.parquet"
            )
            for i, (path, _) in enumerate(parts)
        ]
        files = [{"path": name, "rows": rows} for name, (_, rows) in zip(names, parts, strict=True)]
        tables[table] = {"files": files, "rows": sum(rows for _, rows in parts)}
        moves.update((name, path) for name, (path, _) in zip(names, parts, strict=True))
    cut = len(root) + 1
    replaced = {path[cut:] for path in outputs.written_files(fs, root)} - set(moves)
    earlier = outputs.read_intent(fs, run_folder)
    if earlier is not None and earlier["commit"] == commit:  # a retry: the first attempt's list holds
        replaced |= set(earlier["old"])
    intent = {"commit": commit, "new": sorted(moves), "old": sorted(replaced)}
    outputs.write_atomically(fs, f"{run_folder}/{outputs.INTENT}", json.dumps(intent).encode(), run_folder)
    for name, source in moves.items():
        _move_in(fs, source, f"{root}/{name}")
    manifest = {**summary, "commit": commit, "tables": tables}
    text = json.dumps(manifest, indent=2, sort_keys=True, default=str).encode()
    lease.confirm()
    outputs.write_atomically(fs, f"{root}/{outputs.RUN_MANIFEST}", text, run_folder)
    outputs.recover(lease.output, lease.run)  # deletes what ``replaced`` names, and the run's staging
    return manifest


class FeatureSchema(beam.PTransform):
    """Per-part column types to the feature table's schema (a singleton): the declared
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


class StageParquetTable(beam.PTransform):
    """Write rows as Parquet files of at most ``rows_per_file`` rows in the folder ``staging``;
    outputs the list of staged ``(path, rows)`` once every row is written (a singleton, for
    ``CommitRun``). The rows may come as one PCollection or a tuple of them, each written as it
    comes rather than gathered into one first: dict rows, or, in a PCollection whose element type
    is ``COLUMNAR_ROWS`` (or either of its types), Arrow tables of the table's schema and parts
    of an earlier run kept whole (``WrittenPart``). ``schema`` is a singleton
    PCollection, so it may depend on the data. With ``partition_by`` (a column of ``schema`` of
    text, integers, booleans or dates, or ``event_date``), each part holds one partition's rows,
    in the partition's folder."""

    def __init__(
        self,
        staging: str,
        schema: beam.pvalue.PCollection,
        rows_per_file: int = 2000,
        partition_by: str | None = None,
    ) -> None:
        super().__init__()
        self.staging = staging
        self.schema = schema
        self.rows_per_file = rows_per_file
        self.partition_by = partition_by

    def expand(self, rows: beam.PCollection | tuple[beam.PCollection, ...]) -> beam.PCollection:
        schema = beam.pvalue.AsSingleton(self.schema)
        streams = rows if isinstance(rows, tuple) else (rows,)
        staged = [stream | f"Write[{index}]" >> self._writer(stream, schema) for index, stream in enumerate(streams)]
        return (
            staged
            | "Staged" >> beam.Flatten(pipeline=streams[0].pipeline)
            | "Gather" >> beam.combiners.ToList()
            | "AtLeastOnePart" >> beam.Map(_at_least_one_part, self.staging, schema, self.partition_by)
        )

    def _writer(self, stream: beam.PCollection, schema: Any) -> beam.PTransform:
        if stream.element_type in (pa.Table, WrittenPart, COLUMNAR_ROWS):
            return beam.FlatMap(_stage_columns, self.staging, schema, self.rows_per_file, self.partition_by)
        return _WriteParts(self.staging, schema, self.rows_per_file, self.partition_by)


class _WriteParts(beam.PTransform):
    """Rows to staged parts, ``(path, rows)`` each (see ``StageParquetTable``)."""

    def __init__(self, staging: str, schema: Any, rows_per_file: int, partition_by: str | None) -> None:
        super().__init__()
        self.staging = staging
        self.schema = schema
        self.rows_per_file = rows_per_file
        self.partition_by = partition_by

    def expand(self, rows: beam.PCollection) -> beam.PCollection:
        if self.partition_by is None:
            batches = rows | "Batch" >> beam.BatchElements(
                min_batch_size=self.rows_per_file, max_batch_size=self.rows_per_file
            )
        else:
            batches = (
                rows
                | "BatchToKey" >> beam.BatchElements(max_batch_size=self.rows_per_file)
                | "KeyByPartition"
                >> beam.FlatMap(_by_partition, self.schema, self.partition_by).with_output_types(
                    tuple[str, dict[str, Any]]
                )
                | "Batch" >> beam.GroupIntoBatches(self.rows_per_file)
                | "Rows" >> beam.Values()
            )
        return batches | "WriteStaged" >> beam.FlatMap(_stage_rows, self.staging, self.schema, self.partition_by)


class CommitRun(beam.PTransform):
    """Commit the run once both tables are staged (``publish``): ``_run.json`` holds the summary
    that ``build(counts=, features=, errors=)`` makes from the run's counts and the tables'
    ``{"files", "rows"}``, and lists each table's parts.

    ``features`` and ``errors`` are the tables' staged parts (``StageParquetTable`` outputs),
    ``counts`` a singleton. The commit first confirms the run still holds ``lease``, so a run
    whose output was taken over never overwrites it.
    """

    def __init__(
        self,
        lease: Lease,
        commit: str,
        build: Callable[..., dict[str, Any]],
        started: float,
        *,
        features: beam.PCollection,
        errors: beam.PCollection,
        counts: beam.PCollection,
    ) -> None:
        super().__init__()
        self.lease = lease
        self.commit = commit
        self.build = build
        self.started = started
        self.inputs = {"features": features, "errors": errors, "counts": counts}

    def expand(self, pbegin: beam.pvalue.PBegin) -> beam.PCollection:
        inputs = {name: beam.pvalue.AsSingleton(pcoll) for name, pcoll in self.inputs.items()}
        return (
            pbegin
            | "Once" >> beam.Create([None])
            | "Publish" >> beam.Map(_commit_run, self.lease, self.commit, self.build, self.started, **inputs)
        )


def _commit_run(
    _: None,
    lease: Lease,
    commit: str,
    build: Callable[..., dict[str, Any]],
    started: float,
    *,
    features: list[tuple[str, int]],
    errors: list[tuple[str, int]],
    counts: Any,
) -> dict[str, Any]:
    staged = {"features": features, "errors": errors}
    written = {name: {"files": len(parts), "rows": sum(rows for _, rows in parts)} for name, parts in staged.items()}
    summary = build(counts=counts, **written)
    summary["wall_seconds"] = round(time.time() - started, 3)
    return publish(lease.confirm(), commit, staged, summary)
