"""``ReadRecords``: manifest files to unique, validated records, their error rows, the rows read,
and the types of their carried columns."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import apache_beam as beam
import pyarrow as pa
from apache_beam.metrics import Metrics

from mmfeatures.column_types import add_value_types
from mmfeatures.counts import COUNTS_TAG, NAMESPACE, RunCounts, error_output
from mmfeatures.errors import ERRORS_TAG, ErrorRow, ManifestError, Stage, ValidationError
from mmfeatures.records import Record, map_columns, parse_record, reported_id
from mmfeatures.schema import reserved_record_columns
from mmfeatures.sources import HEADED_FORMATS, Input, ReadOptions, declared_column_types, read_input

COLUMN_TYPES_TAG = "column_types"


class _ReadManifest(beam.DoFn):
    """One input to validated records (keyed by id, with their position for dedup), its counts
    (``rows_read``), and the types of its carried columns (its own schema for Parquet and Arrow)."""

    def __init__(self, options: ReadOptions):
        self.options = options

    def process(self, indexed_input: tuple[int, Input]) -> Iterator[Any]:
        file_index, source = indexed_input
        declared = declared_column_types(source)
        inferred: dict[str, pa.DataType | None] = {}
        rows = 0
        headed = source.format in HEADED_FORMATS and bool(self.options.columns)
        for row_number, item in enumerate(read_input(source, self.options)):
            rows += 1
            if isinstance(item, ErrorRow):
                yield error_output(item)
                continue
            if headed:  # the first row holds every column of the file: check the mapping once
                headed = False
                unmapped = sorted(set(self.options.columns.values()) - set(item.data))
                if unmapped:
                    yield error_output(_unmapped(source, unmapped, item.data))
                    break
            data = map_columns(item.data, self.options.columns)
            if source.split is not None and data.get("split") is None:  # a DatasetDict's split
                data["split"] = source.split
            try:
                record = parse_record(
                    data,
                    source=item.source,
                    manifest_dir=source.folder,
                    rejected=item.rejected,
                    default_id=source.derived_id(item.source),
                )
            except ValidationError as exc:
                yield error_output(
                    ErrorRow.from_exception(
                        exc,
                        record_id=reported_id(data),
                        modality=None,
                        source=item.source,
                    )
                )
                continue
            if declared is None:
                add_value_types(inferred, record.carried)
            yield record.id, ((file_index, row_number), record)
        Metrics.counter(NAMESPACE, "rows_read").inc(rows)
        yield beam.pvalue.TaggedOutput(COUNTS_TAG, RunCounts(rows_read=rows))
        if declared is not None:
            reserved = reserved_record_columns()
            mapped = map_columns(declared, self.options.columns)
            inferred = {name: t for name, t in mapped.items() if name not in reserved}
        yield beam.pvalue.TaggedOutput(COLUMN_TYPES_TAG, (file_index, inferred))


def _unmapped(source: Input, unmapped: list[str], row: dict[str, Any]) -> ErrorRow:
    """The one error row of a file that lacks a column ``--columns`` maps: reading it would give
    every row an empty field (a null label, say) that nobody would notice."""
    message = (
        f"--columns maps {', '.join(map(repr, unmapped))}, which this file has not (its columns: "
        f"{', '.join(map(repr, row))}), so no row of it is read"
    )
    error = ManifestError(message, error_type="unmapped_column")
    return ErrorRow.from_exception(error, record_id=None, modality=None, source=source.path)


def _first_wins(keyed: tuple[str, Iterable[tuple[tuple[int, int], Record]]]) -> Iterator[Any]:
    """Duplicate ids: the first occurrence (by input order) is kept, the others are error rows. The
    kept record's rejected modalities become error rows here, so a duplicate's never count."""
    _, occurrences = keyed
    ordered = sorted(occurrences, key=lambda item: item[0])
    kept = ordered[0][1]
    yield kept
    for rejected in kept.rejected:
        yield error_output(rejected)
    for _, duplicate in ordered[1:]:
        yield error_output(
            ErrorRow(
                duplicate.id,
                None,
                Stage.VALIDATE,
                "duplicate_id",
                f"id {duplicate.id!r} first appears at {ordered[0][1].source}",
                duplicate.source,
            )
        )


class ReadRecords(beam.PTransform):
    """Inputs (already found by ``sources.find_inputs``) to unique, validated ``Record``s, read
    with ``options`` (column mapping, CSV encoding and delimiter, member size limit)."""

    def __init__(self, inputs: list[Input], options: ReadOptions | None = None):
        super().__init__()
        self.inputs = inputs
        self.options = options or ReadOptions()

    def expand(self, pbegin: beam.pvalue.PBegin) -> dict[str, beam.PCollection]:
        read = (
            pbegin
            | "Inputs" >> beam.Create(list(enumerate(self.inputs)))
            | "Spread" >> beam.Reshuffle()
            | "Parse"
            >> beam.ParDo(_ReadManifest(self.options)).with_outputs(
                ERRORS_TAG, COUNTS_TAG, COLUMN_TYPES_TAG, main="records"
            )
        )
        deduplicated = (
            read.records
            | "GroupById" >> beam.GroupByKey()
            | "FirstWins" >> beam.FlatMap(_first_wins).with_outputs(ERRORS_TAG, main="records")
        )
        errors = (read[ERRORS_TAG], deduplicated[ERRORS_TAG]) | "Errors" >> beam.Flatten()
        return {
            "records": deduplicated.records,
            ERRORS_TAG: errors,
            COUNTS_TAG: read[COUNTS_TAG],
            COLUMN_TYPES_TAG: read[COLUMN_TYPES_TAG],
        }
