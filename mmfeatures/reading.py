"""``ReadRecords``: manifest files to unique, validated records, their error rows, the rows read,
and the types of their carried columns.

A worker first cuts each input into parts (``sources.Part``: byte ranges of an uncompressed JSONL
or CSV file, ranges of a Parquet file's row groups, any other input whole), which are then read
apart, spread over the workers on a cluster, so that one large manifest is read by several
workers; a row's place is its part's key ``(input index, part index)`` and its position in the
part, so places still sort in input order.
Each part is read twice, so that media bytes (tar members, binary columns) need not cross a
shuffle. The first pass sends on only each record's id, place and content digests (``content``),
with the error rows, the counts and the column types; duplicate ids are settled on those, which
records share content (embedded once, for all of them), and, in an incremental run, which
records keep the previous table's row and which replace it (``incremental``: their content
hashes, grouped by id with the table's). The second pass reads each part again and sends on its
records that won as it reads them, those that keep their rows apart. On a cluster they are then spread over the
workers (``spread``), so that one large manifest is embedded by all of them; Beam's in-process
runner holds every shuffle whole in memory (and copies of it), where a tar.gz of a few MB can
hold GBs of members, so there the records go straight on to the next stages, and a worker holds
what it is reading (a member, line or cell of at most --max-bytes, one Parquet row group) and the
records those stages are working on.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import replace
from typing import Any

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.metrics import Metrics
from fsspec.core import url_to_fs

from mmfeatures import storage
from mmfeatures.column_types import add_value_types
from mmfeatures.content import SERVED_TAG, SHARES_TAG, HashContent, PartKey, ShareContent, Sharing, pending_content
from mmfeatures.counts import COUNTS_TAG, NAMESPACE, RunCounts, error_output
from mmfeatures.errors import ERRORS_TAG, ErrorRow, ManifestError, Stage, ValidationError
from mmfeatures.incremental import PreviousKeys, PreviousTable
from mmfeatures.records import Record, content_hash, map_columns, parse_record, reported_id
from mmfeatures.schema import reserved_record_columns
from mmfeatures.sources import (
    HEADED_FORMATS,
    MEDIA_FOLDER,
    Input,
    Part,
    ReadOptions,
    cut_input,
    declared_column_types,
    read_part,
)

COLUMN_TYPES_TAG = "column_types"
KEPT_TAG = "kept"  # records that keep the previous table's row, not embedded again
REPLACED_TAG = "replaced"  # (id, None) of each previous row that a record of this run replaces
_READ_TAG = "read"  # each part that holds records: its key, the part, how many, its input's fingerprint
_CONTENT_TAG = "content"  # ((modality, digest), (place, id, source)) of each record to embed
_REPLACING_TAG = "replacing"  # the place of each record that replaces a previous row


def _outcomes(part: Part, options: ReadOptions) -> Iterator[tuple[int, Record | ErrorRow]]:
    """Each row ``part`` reads, by its position in the part: its validated record, or its error row.
    A file that lacks a column ``--columns`` maps is one error row, in place of its first row (its
    first part's), and no more."""
    source = part.source
    headed = source.format in HEADED_FORMATS and bool(options.columns)
    for position, item in enumerate(read_part(part, options)):
        if isinstance(item, ErrorRow):
            yield position, item
            continue
        if headed:  # the first row holds every column of the file: check the mapping once
            headed = False
            unmapped = sorted(set(options.columns.values()) - set(item.data))
            if unmapped:
                if part.index == 0:
                    yield position, _unmapped(source, unmapped, item.data)
                return
        data = map_columns(item.data, options.columns)
        if source.split is not None and data.get("split") is None:  # a DatasetDict's split
            data["split"] = source.split
        try:
            yield (
                position,
                parse_record(
                    data,
                    source=item.source,
                    manifest_dir=source.folder,
                    rejected=item.rejected,
                    default_id=source.derived_id(item.source),
                    timestamp_column=options.timestamp_column,
                ),
            )
        except ValidationError as exc:
            yield position, ErrorRow.from_exception(exc, record_id=reported_id(data), modality=None, source=item.source)


class _CutInput(beam.DoFn):
    """One input's parts (``sources.cut_input``), each keyed by ``(input index, part index)`` so
    that keys sort in input order, with the input's fingerprint, taken before it is cut: a change
    from then on shows when it is read again. Cut on a worker: finding where a JSONL file's lines
    or a CSV file's rows end reads it whole."""

    def __init__(self, options: ReadOptions):
        self.options = options

    def process(self, indexed_input: tuple[int, Input]) -> Iterator[tuple[PartKey, tuple[Part, str | None]]]:
        file_index, source = indexed_input
        read_as = fingerprint(source)
        for part in cut_input(source, self.options):
            yield (file_index, part.index), (part, read_as)


class _ReadManifest(beam.DoFn):
    """The first pass over one part of an input: each record's id, place and what hashing its
    content needs, the part's error rows, its counts (``rows_read``), the types of its carried
    columns (the file's own schema for Parquet and Arrow), and, when it holds records, how many
    for the second pass."""

    def __init__(self, options: ReadOptions):
        self.options = options

    def process(self, keyed_part: tuple[PartKey, tuple[Part, str | None]]) -> Iterator[Any]:
        key, (part, read_as) = keyed_part
        source = part.source
        declared = declared_column_types(source)
        inferred: dict[str, pa.DataType | None] = {}
        rows = records = 0
        for position, outcome in _outcomes(part, self.options):
            rows += 1
            if isinstance(outcome, ErrorRow):
                yield error_output(outcome)
                continue
            if declared is None:
                add_value_types(inferred, outcome.carried)
            records += 1
            yield outcome.id, ((key, position), outcome.source, pending_content(outcome))
        Metrics.counter(NAMESPACE, "parts_read").inc()
        Metrics.counter(NAMESPACE, "rows_read").inc(rows)
        yield beam.pvalue.TaggedOutput(COUNTS_TAG, RunCounts(rows_read=rows))
        if records:
            yield beam.pvalue.TaggedOutput(_READ_TAG, (key, (part, records, read_as)))
        if declared is not None:
            reserved = reserved_record_columns()
            mapped = map_columns(declared, self.options.columns)
            inferred = {name: t for name, t in mapped.items() if name not in reserved}
        yield beam.pvalue.TaggedOutput(COLUMN_TYPES_TAG, (key, inferred))


def _unmapped(source: Input, unmapped: list[str], row: dict[str, Any]) -> ErrorRow:
    """The one error row of a file that lacks a column ``--columns`` maps: reading it would give
    every row an empty field (a null label, say) that nobody would notice."""
    message = (
        f"--columns maps {', '.join(map(repr, unmapped))}, which this file has not (its columns: "
        f"{', '.join(map(repr, row))}), so no row of it is read"
    )
    error = ManifestError(message, error_type="unmapped_column")
    return ErrorRow.from_exception(error, record_id=None, modality=None, source=source.path)


def _settle(keyed: tuple[str, Mapping[str, Iterable[Any]]]) -> Iterator[Any]:
    """One id's occurrences: the first (by input order) is kept; each other is an error row, and
    its place is left out of the second pass. The first keeps the previous table's row
    (``kept``) when its content hash is that row's, or else replaces it (``replacing``, and the
    row's id to ``REPLACED_TAG``); its digests go on to find the content it shares with other
    records (``content.ShareContent``)."""
    record_id, groups = keyed
    occurrences = sorted(groups["places"])
    if not occurrences:  # an id only the previous table holds: the join keeps or drops its row
        return
    (first, first_source, digests), *duplicates = occurrences
    for place, source, _ in duplicates:
        message = f"id {record_id!r} first appears at {first_source}"
        yield error_output(ErrorRow(record_id, None, Stage.VALIDATE, "duplicate_id", message, source))
        yield place
    previous = list(groups["previous"])
    if previous and digests is not None and content_hash(dict(digests)) in previous:
        yield beam.pvalue.TaggedOutput(KEPT_TAG, first)
        return
    if previous:
        yield beam.pvalue.TaggedOutput(_REPLACING_TAG, first)
        yield beam.pvalue.TaggedOutput(REPLACED_TAG, (record_id, None))
    if digests is None:  # rejected while read, or a fetch that failed: embedded alone, to report why
        return
    for modality_digest in digests:
        yield beam.pvalue.TaggedOutput(_CONTENT_TAG, (modality_digest, (first, record_id, first_source)))


class _Positions(beam.CombineFn):
    """One part's positions as a bitmap, one bit a row: what the second pass must know of each
    row stays small however many rows are kept or dropped."""

    def create_accumulator(self) -> np.ndarray:
        return np.zeros(0, np.uint8)

    def add_input(self, bits: np.ndarray, position: int) -> np.ndarray:
        bits = _grown(bits, position // 8 + 1)
        bits[position // 8] |= 1 << (position % 8)
        return bits

    def merge_accumulators(self, accumulators: Iterable[np.ndarray]) -> np.ndarray:
        merged = np.zeros(0, np.uint8)
        for bits in accumulators:
            merged = _grown(merged, len(bits))
            merged[: len(bits)] |= bits
        return merged

    def extract_output(self, bits: np.ndarray) -> np.ndarray:
        return bits


def _grown(bits: np.ndarray, size: int) -> np.ndarray:
    """``bits`` with room for ``size`` bytes, doubling so that adding n positions costs O(n)."""
    if len(bits) >= size:
        return bits
    grown = np.zeros(max(size, 2 * len(bits)), np.uint8)
    grown[: len(bits)] = bits
    return grown


def _holds(bitmaps: Iterable[np.ndarray], position: int) -> bool:
    """Whether the bitmap among ``bitmaps`` (one or none) has ``position``."""
    return any(position // 8 < len(bits) and bits[position // 8] >> (position % 8) & 1 for bits in bitmaps)


def fingerprint(source: Input) -> str | None:
    """What the storage says identifies the input file's content (its size and modification time,
    ETag or generation), for the second pass to compare with the first's; None for a folder of
    media files (its listing is compared by count) or a store that reports nothing."""
    if source.format == MEDIA_FOLDER:
        return None
    try:
        fs, path = url_to_fs(source.path)
        return str(fs.ukey(path))
    except (OSError, NotImplementedError, ValueError):
        return None


class _ReadAgain(beam.DoFn):
    """The second pass over one part of an input: its records but the duplicates, each followed by
    the error rows of its rejected modalities (a duplicate's never count), and marked with the
    content it shares with other records (``content.Sharing``). A record that keeps the previous table's row
    goes to ``kept``, without its media, as only the join needs it."""

    def __init__(self, options: ReadOptions):
        self.options = options

    def process(self, joined: tuple[PartKey, dict[str, Iterable[Any]]]) -> Iterator[Any]:
        _, parts = joined
        ((part, records, first),) = parts[_READ_TAG]  # dropped places come only from parts with records
        source = part.source
        sharing = Sharing(parts[SHARES_TAG], parts[SERVED_TAG])
        if fingerprint(source) != first:  # its places no longer say which records are duplicates
            message = f"the file changed between its two reads: none of its {records} records is sent"
            yield error_output(ErrorRow(None, None, Stage.READ, "input_changed", message, source.path))
            yield from map(error_output, sharing.unsent(source.path))
            return
        dropped, kept, replacing = (list(parts[name]) for name in ("dropped", KEPT_TAG, _REPLACING_TAG))
        sent = skipped = 0
        for position, outcome in _outcomes(part, self.options):
            if not isinstance(outcome, Record):
                continue
            if _holds(dropped, position):
                skipped += 1
                continue
            sent += 1
            if _holds(kept, position):
                yield beam.pvalue.TaggedOutput(KEPT_TAG, outcome.without_content())
                continue
            if _holds(replacing, position):
                outcome = replace(outcome, replaces=True)
            yield sharing.mark(outcome, position)
            for rejected in outcome.rejected:
                yield error_output(rejected)
        if sent != records - skipped:
            message = f"the file changed while it was read: {records - skipped} records were to be sent, not {sent}"
            yield error_output(ErrorRow(None, None, Stage.READ, "input_changed", message, source.path))
        yield from map(error_output, sharing.unsent(source.path))


class ReadRecords(beam.PTransform):
    """Inputs (already found by ``sources.find_inputs``) to unique, validated ``Record``s, read
    with ``options`` (column mapping, CSV encoding and delimiter, size limit), and shuffled over
    the workers where ``spread`` (see above). Media are fetched, to hash them, as
    ``location_policy`` allows. With ``previous`` (the table an incremental run updates), the
    records whose content and settings are unchanged come out as ``kept``, the others that have a
    row there are marked as replacing it, and that row's id comes out as ``replaced``."""

    def __init__(
        self,
        inputs: list[Input],
        options: ReadOptions | None = None,
        spread: bool = True,
        location_policy: storage.LocationPolicy | None = None,
        previous: PreviousTable | None = None,
    ):
        super().__init__()
        self.inputs = inputs
        self.options = options or ReadOptions()
        self.spread = spread
        self.location_policy = location_policy or storage.LocationPolicy()
        self.previous = previous

    def expand(self, pbegin: beam.pvalue.PBegin) -> dict[str, beam.PCollection]:
        inputs = pbegin | "Inputs" >> beam.Create(list(enumerate(self.inputs)))
        inputs = (inputs | "Spread" >> beam.Reshuffle()) if self.spread else inputs
        parts = inputs | "Cut" >> beam.ParDo(_CutInput(self.options))
        parts = (parts | "SpreadParts" >> beam.Reshuffle()) if self.spread else parts
        read = parts | "Parse" >> beam.ParDo(_ReadManifest(self.options)).with_outputs(
            ERRORS_TAG, COUNTS_TAG, COLUMN_TYPES_TAG, _READ_TAG, main="places"
        )
        hashed = read.places | "HashContent" >> HashContent(self.location_policy, self.options.max_member_bytes)
        if self.previous is None:
            previous = pbegin | "NoPreviousTable" >> beam.Create([])
        else:
            previous = pbegin | "PreviousKeys" >> PreviousKeys(self.previous, self.spread)
        settled = (
            {"places": hashed, "previous": previous}
            | "GroupById" >> beam.CoGroupByKey()
            | "Settle"
            >> beam.FlatMap(_settle).with_outputs(
                ERRORS_TAG, KEPT_TAG, _REPLACING_TAG, REPLACED_TAG, _CONTENT_TAG, main="dropped"
            )
        )
        positions = {
            name: settled[name] | f"{name.title()}Positions" >> beam.CombinePerKey(_Positions())
            for name in ("dropped", KEPT_TAG, _REPLACING_TAG)
        }
        shared = settled[_CONTENT_TAG] | "ShareContent" >> ShareContent()
        again = (
            {_READ_TAG: read[_READ_TAG], **positions, SHARES_TAG: shared[SHARES_TAG], SERVED_TAG: shared[SERVED_TAG]}
            | "ByInput" >> beam.CoGroupByKey()
            | "ReadAgain" >> beam.ParDo(_ReadAgain(self.options)).with_outputs(ERRORS_TAG, KEPT_TAG, main="records")
        )
        errors = (read[ERRORS_TAG], settled[ERRORS_TAG], again[ERRORS_TAG]) | "Errors" >> beam.Flatten()
        records = (again.records | "SpreadRecords" >> beam.Reshuffle()) if self.spread else again.records
        return {
            "records": records,
            KEPT_TAG: again[KEPT_TAG],
            REPLACED_TAG: settled[REPLACED_TAG],
            ERRORS_TAG: errors,
            COUNTS_TAG: read[COUNTS_TAG],
            COLUMN_TYPES_TAG: read[COLUMN_TYPES_TAG],
        }
