"""Incremental runs (``--incremental``): which records keep the row that the table at ``--output``
already holds, and that table's rows for the join.

A record keeps its row when its id, its content hash (``records.content_hash``: its text and
media bytes) and the run's settings fingerprint (every setting that changes a vector) match the
row's, and the row has no failed modality (a failure is tried again). Deciding it needs only
small keys: each record's place and content hash (``content``), grouped by id with the previous
table's ``(id, content hash)``, so no record crosses a shuffle for it (``reading.ReadRecords`` reads the
inputs again and sends the kept records on past the models). Where each previous row lies
(``PreviousLocations``) meets the kept records, and the ids this run replaces, in
``join.JoinShared``, which tells the rows kept and carried over; ``PreviousRows`` then reads them
from their parts, one part at a time, as Arrow columns, so that no row's vectors cross a shuffle
or become Python values. The run commits a whole new table, so a plain Parquet reader of the
folder sees the current rows and nothing else.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import apache_beam as beam
import pyarrow as pa
from fsspec.core import url_to_fs

from mmfeatures import outputs, schema
from mmfeatures.column_types import conform_table, rows_to_table
from mmfeatures.records import MODALITY_COLUMNS, Record
from mmfeatures.sinks import COLUMNAR_ROWS, WrittenPart


def settings_fingerprint(
    models: Mapping[str, Any], fusion: Mapping[str, Any], precision: str, device: str, runtimes: Mapping[str, str]
) -> str:
    """The sha256 of every setting that changes a vector: each model's weights (sha256),
    dimension and preprocessing, the fusion, the precision, the device class and each modality's
    runtime (one word where all run on torch, so that torch runs keep the fingerprint their
    tables already carry). A model's folder or URL is left out: the same weights read from
    elsewhere give the same vectors."""
    described = {
        "models": {name: {k: v for k, v in model.items() if k != "model_id"} for name, model in models.items()},
        "fusion": fusion,
        "precision": precision,
        "device": device,
        "runtime": "torch" if set(runtimes.values()) == {"torch"} else dict(runtimes),
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()


@dataclass(frozen=True)
class PreviousTable:
    """The feature table committed at ``--output`` when an incremental run starts: its parts (in
    ``fs``'s terms) and their rows, its rows and commit, and whether its rows may be kept
    (``usable``: written with this run's settings fingerprint)."""

    fs: Any  # an fsspec file system
    parts: tuple[str, ...]
    part_rows: tuple[int, ...]
    commit: str
    fingerprint: str | None
    usable: bool
    carried: pa.Schema  # its carried columns, which rows it carries over hold

    @classmethod
    def at(cls, output: str, fingerprint: str) -> PreviousTable | None:
        """The table committed at ``output``, or None where no run has committed one."""
        fs, root = url_to_fs(output)
        root = root.rstrip("/")
        manifest = outputs.run_manifest(fs, root)
        table = outputs.tables_of(manifest, fs, root).get("features")
        if manifest is None or table is None:
            return None
        previous = manifest.get("fingerprint")
        fields = list(schema.part_schema(fs, table.parts[0])) if table.parts else []
        # A partition column is the records' own, but event_date, derived from event_timestamp.
        folder = outputs.partition_of(table.parts[0]) if table.parts else None
        derived = folder is not None and outputs.partition_value(folder)[0] == schema.EVENT_DATE
        declared = {*schema.field_names("features"), *([schema.EVENT_DATE] if derived else [])}
        carried = pa.schema([field for field in fields if field.name not in declared])
        return cls(
            fs,
            tuple(table.parts),
            tuple(table.part_rows),
            manifest["commit"],
            previous,
            previous == fingerprint,
            carried,
        )

    @property
    def rows(self) -> int:
        return sum(self.part_rows)

    def carried_types(self) -> dict[str, pa.DataType]:
        return {field.name: field.type for field in self.carried}


def _read_batches(fs: Any, part: str, columns: list[str] | None) -> Iterator[pa.RecordBatch]:
    """One part's rows (a partition column back in its place) in batches, so a part is never held
    whole as Python values; a part holds at most ``--rows-per-file`` rows, so Arrow may hold it."""
    yield from schema.read_part(fs, part, columns).to_batches(max_chunksize=1024)


def _keys(part: tuple[int, str], previous: PreviousTable) -> Iterator[tuple[str, str | None]]:
    """``(id, content hash)`` of each row of the part; the hash is None where no record may keep
    the row: one without a content hash or with a failed modality, or any row of a table written
    with other settings."""
    _, path = part
    if not previous.usable:
        for batch in _read_batches(previous.fs, path, ["id"]):
            yield from ((record_id, None) for record_id in batch.column("id").to_pylist())
        return
    for batch in _read_batches(previous.fs, path, ["id", "content_hash", "failed_modalities"]):
        ids, hashes, failed = (batch.column(name).to_pylist() for name in ("id", "content_hash", "failed_modalities"))
        yield from ((i, None if f else h) for i, h, f in zip(ids, hashes, failed, strict=True))


def _locations(part: tuple[int, str], previous: PreviousTable) -> Iterator[tuple[str, tuple[int, int]]]:
    """``(id, (part index, row index))`` of each row of the part: where the row is, so that the
    join decides each row's fate by id without carrying the row (``PreviousRows`` reads it then)."""
    index, path = part
    position = 0
    for batch in _read_batches(previous.fs, path, ["id"]):
        for record_id in batch.column("id").to_pylist():
            yield record_id, (index, position)
            position += 1


# The columns a kept row takes from the previous row: what its content and the run's settings
# gave, which matched. Its other columns are the keeping record's own (``Record.own_columns``).
_KEPT_FROM_PREVIOUS = frozenset(
    {"fused", "failed_modalities", "event_timestamp", "created_timestamp", "content_hash"}
    | {f"{modality}_embedding" for modality in MODALITY_COLUMNS}
    | {f"has_{modality}" for modality in MODALITY_COLUMNS}
)


def _rows_of_part(
    located: tuple[int, Iterable[tuple[int, Record | None]]], previous: PreviousTable, table_schema: pa.Schema
) -> Iterator[pa.Table | WrittenPart]:
    """One part's rows that the run carries over (as they are) and keeps (with the keeping
    records' own columns), read from the part at once, as tables of ``table_schema``: column by
    column, so that no vector becomes a Python value. A part whose every row stays as it is
    goes to the sink as the part (``WrittenPart``), unread but for its records' own columns."""
    part, wanted = located
    records = dict(wanted)
    path = previous.parts[part]
    positions = sorted(records)
    kept = {index: record for index, position in enumerate(positions) if (record := records[position]) is not None}
    own_schema = pa.schema([field for field in table_schema if field.name not in _KEPT_FROM_PREVIOUS])
    own = rows_to_table([record.own_columns() for record in kept.values()], own_schema)
    indices = pa.array(list(kept), pa.int64())
    # Every row of the part stays where there are as many as it holds: then the indices of the
    # kept rows among ``positions`` are their row indices in the part.
    if len(positions) == previous.part_rows[part]:
        held = schema.read_part(previous.fs, path, own_schema.names)
        if conform_table(held.take(indices), own_schema).equals(own):
            yield WrittenPart(path, held.num_rows)
            return
    rows = schema.read_part(previous.fs, path, None).take(pa.array(positions, pa.int64()))
    carried = [index for index, position in enumerate(positions) if records[position] is None]
    if carried:
        yield conform_table(rows.take(carried), table_schema)
    if kept:
        yield _kept_rows(rows.take(indices), own, table_schema)


def _kept_rows(previous: pa.Table, own: pa.Table, table_schema: pa.Schema) -> pa.Table:
    """Rows with the vectors, times and content hash of ``previous``'s rows, and the other
    columns of ``own``'s rows (the keeping records' own columns), row by row."""
    taken = conform_table(previous, pa.schema([field for field in table_schema if field.name in _KEPT_FROM_PREVIOUS]))
    columns = [(taken if field.name in _KEPT_FROM_PREVIOUS else own).column(field.name) for field in table_schema]
    return pa.Table.from_arrays(columns, schema=table_schema)


class _EachPart(beam.PTransform):
    """What ``read`` gives of each part of the previous table (``(part index, path)``), the parts
    spread over the workers where ``spread`` (not on an in-process runner: one worker reads them
    all there)."""

    def __init__(
        self, previous: PreviousTable, read: Callable[[tuple[int, str], PreviousTable], Iterator[Any]], spread: bool
    ):
        super().__init__()
        self.previous = previous
        self.read = read
        self.spread = spread

    def expand(self, pbegin: beam.pvalue.PBegin) -> beam.PCollection:
        parts = pbegin | "Parts" >> beam.Create(list(enumerate(self.previous.parts)))
        parts = (parts | "Spread" >> beam.Reshuffle()) if self.spread else parts
        return parts | "Read" >> beam.FlatMap(self.read, self.previous)


class PreviousKeys(_EachPart):
    """The previous table's ``(id, content hash)`` of every row, the hash None where no record may
    keep the row: what tells a record that keeps its row from one that replaces it."""

    def __init__(self, previous: PreviousTable, spread: bool = True):
        super().__init__(previous, _keys, spread)


class PreviousLocations(_EachPart):
    """The previous table's ``(id, (part index, row index))`` of every row, for the join to keep,
    carry over or drop each row by id; the rows themselves stay in their parts until then."""

    def __init__(self, previous: PreviousTable, spread: bool = True):
        super().__init__(previous, _locations, spread)


class PreviousRows(beam.PTransform):
    """The previous table's rows that a run keeps or carries over, from where ``join.JoinShared``
    says they lie (``(part, (position, record or None))``: kept by the record, or carried over
    with None), as tables of the feature table's schema (``table_schema``, a singleton), each
    part read once, or as the part itself where it keeps every row as it is: a rerun over
    unchanged input copies the table's parts rather than write them again. The rows go to the
    sink as columns, apart from the rows fused this run: flattened with them, they would be
    staged between stages as Python values, vectors and all."""

    def __init__(self, previous: PreviousTable, table_schema: beam.PCollection):
        super().__init__()
        self.previous = previous
        self.table_schema = table_schema

    def expand(self, located: beam.PCollection) -> beam.PCollection:
        return (
            located
            | "ByPart" >> beam.GroupByKey()
            | "Read"
            >> beam.FlatMap(_rows_of_part, self.previous, beam.pvalue.AsSingleton(self.table_schema)).with_output_types(
                COLUMNAR_ROWS
            )
        )
