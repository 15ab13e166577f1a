"""Fusion: each embedded record to its feature row. ``FuseRecords`` fuses records as they come
out of ``EmbedRecords``; ``JoinShared`` joins by id the few records that wait for something
from elsewhere - a vector embedded by the record whose content they share, or, in an
incremental run, the previous table's row they keep - and the previous rows' locations, and
tells which previous rows are kept or carried over (``incremental.PreviousRows`` reads them)."""

from __future__ import annotations

import collections
import datetime
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.utils.windowed_value import WindowedValue

from mmfeatures.counts import COUNTS_TAG, RunCounts
from mmfeatures.fusion import Fusion
from mmfeatures.progress import Progress
from mmfeatures.records import MODALITY_COLUMNS, Record, content_hash

AWAITING_TAG = "awaiting"  # (id, record) of a record that takes a vector from another record
# (part, (position, record or None)) of a previous row kept (by the record) or carried over (None)
PREVIOUS_TAG = "previous"


class _CountingFuse(beam.DoFn):
    """Fuses records into feature rows. Counts are summed per bundle and window, and leave once at
    the bundle's end, rather than one value per record pickled across the stage boundary."""

    def __init__(self, fusion: Fusion, created: datetime.datetime):
        self.fusion = fusion
        self.created = created
        self._progress = Progress("records fused", every=1000)

    def start_bundle(self) -> None:
        self._counts: dict[Any, RunCounts] = collections.defaultdict(RunCounts)

    def finish_bundle(self) -> Iterator[Any]:
        for window, counts in self._counts.items():
            yield beam.pvalue.TaggedOutput(COUNTS_TAG, WindowedValue(counts, window.max_timestamp(), (window,)))

    def _fused(self, record: Record, failed: Iterable[str], window: Any) -> Iterator[dict[str, Any]]:
        """``record``'s row, from its vectors (none when every modality failed: its error rows
        alone account for it), and its counts; ``failed``: modalities that failed besides its own."""
        self._progress.add()
        rejected = {row.modality for row in record.rejected if row.modality is not None}
        failed = sorted(record.failed | rejected | set(failed))
        self._counts[window].add(RunCounts.of_record(record, record.vectors, failed, replacing=record.replaces))
        if not record.vectors:
            return
        vectors = {modality: vector for modality, (vector, _) in record.vectors.items()}
        digests = {modality: digest for modality, (_, digest) in record.vectors.items() if digest is not None}
        complete = not failed and len(digests) == len(vectors)
        yield _row(
            record,
            vectors,
            self.fusion.fuse(vectors),
            failed,
            event_timestamp=record.event_time or self.created,
            created_timestamp=self.created,
            content_hash=content_hash(digests) if complete else None,
        )


class _FuseRecord(_CountingFuse):
    def process(self, record: Record, window: Any = beam.DoFn.WindowParam) -> Iterator[Any]:
        if record.embedded_elsewhere:
            yield beam.pvalue.TaggedOutput(AWAITING_TAG, (record.id, record.without_content()))
            return
        yield from self._fused(record, (), window)


class _FuseJoined(_CountingFuse):
    """One id's join: a record with the vectors and failures it takes from the records it shares
    content with, a record with the previous row it keeps, or a previous row alone, which is
    carried over, dropped (``drop_missing``), or left out where this run replaced it. A previous
    row is its location, ``(part, position)``: the rows kept and carried over go to
    ``PREVIOUS_TAG`` as ``(part, (position, record or None))``, to be read from their parts."""

    def __init__(self, fusion: Fusion, created: datetime.datetime, drop_missing: bool):
        super().__init__(fusion, created)
        self.drop_missing = drop_missing

    def process(
        self, joined: tuple[str, Mapping[str, Iterable[Any]]], window: Any = beam.DoFn.WindowParam
    ) -> Iterator[Any]:
        _, groups = joined
        counts = self._counts[window]
        previous: tuple[int, int] | None = next(iter(groups["previous"]), None)
        kept: Record | None = next(iter(groups["kept"]), None)
        if kept is not None:
            assert previous is not None  # a record is kept only for a previous row
            self._progress.add()
            counts.add(RunCounts.of_kept(kept))
            part, position = previous
            yield beam.pvalue.TaggedOutput(PREVIOUS_TAG, (part, (position, kept)))
            return
        records = list(groups["record"])
        if records:
            (record,) = records
            for modality, vector, digest in groups["shared"]:
                record = record.with_vector(modality, vector, digest)
            yield from self._fused(record, groups["failed"], window)
            return
        # No record: a vector or failure shared with a record whose input changed before its
        # second read (that input's error row accounts for the record), a failure of a record
        # fused as it came, or a previous row.
        if previous is None or any(True for _ in groups["replaced"]):
            return
        if self.drop_missing:  # an id the previous table alone holds
            counts.add(RunCounts(rows_dropped=1))
        else:
            counts.add(RunCounts(rows_kept_absent=1))
            part, position = previous
            yield beam.pvalue.TaggedOutput(PREVIOUS_TAG, (part, (position, None)))


def _row(
    record: Record,
    vectors: Mapping[str, np.ndarray],
    fused: np.ndarray,
    failed: list[str],
    **times_and_hash: Any,
) -> dict[str, Any]:
    row = record.own_columns()
    row.update(fused=fused, failed_modalities=failed)
    row.update(times_and_hash)
    for modality in MODALITY_COLUMNS:
        row[f"{modality}_embedding"] = vectors.get(modality)
        row[f"has_{modality}"] = modality in vectors
    return row


class FuseRecords(beam.PTransform):
    """Embedded records (``EmbedRecords``) to feature rows, one by one as they come, with their
    counts (``RunCounts``, summed per bundle); a record that takes a vector from another goes to
    ``AWAITING_TAG`` instead, for ``JoinShared``. Rows carry ``created`` as their creation time,
    and as their event time unless the record has its own."""

    def __init__(self, fusion: Fusion, created: datetime.datetime):
        super().__init__()
        self.fusion = fusion
        self.created = created

    def expand(self, records: beam.PCollection) -> dict[str, beam.PCollection]:
        fused = records | "Fuse" >> beam.ParDo(_FuseRecord(self.fusion, self.created)).with_outputs(
            COUNTS_TAG, AWAITING_TAG, main="features"
        )
        return {"features": fused.features, COUNTS_TAG: fused[COUNTS_TAG], AWAITING_TAG: fused[AWAITING_TAG]}


class JoinShared(beam.PTransform):
    """Join by id what ``FuseRecords`` cannot fuse alone: the ``awaiting`` records with the
    ``shared`` vectors (``(id, (modality, vector, digest))``) and the ``errors`` of the content
    they take, and, in an incremental run, the records that keep their rows (``kept``) with where
    the ``previous`` table's rows lie (``incremental.PreviousLocations``), whose ids this run
    ``replaced`` (``(id, None)``) or holds no more (carried over, or dropped with
    ``drop_missing``). Emits feature rows, their counts, and the locations of the previous rows
    kept and carried over (``PREVIOUS_TAG``, for ``incremental.PreviousRows``). Only these cross a
    shuffle: records that share content, kept records, and the previous rows' ids and locations,
    never their vectors."""

    def __init__(self, fusion: Fusion, created: datetime.datetime, drop_missing: bool = False):
        super().__init__()
        self.fusion = fusion
        self.created = created
        self.drop_missing = drop_missing

    def expand(self, inputs: Mapping[str, beam.PCollection]) -> dict[str, beam.PCollection]:
        pipeline = inputs["awaiting"].pipeline
        failed = (
            inputs["errors"]
            | "ModalityFailures" >> beam.Filter(lambda row: row["modality"] is not None and row["id"] is not None)
            | "KeyFailures" >> beam.Map(lambda row: (row["id"], row["modality"]))
        )

        def given(name: str) -> beam.PCollection:
            return inputs.get(name) or pipeline | f"No{name.title()}" >> beam.Create([])

        joined = {
            "record": inputs["awaiting"],
            "shared": inputs["shared"],
            "failed": failed,
            "kept": given("kept") | "KeyKept" >> beam.Map(lambda record: (record.id, record)),
            "previous": given("previous"),
            "replaced": given("replaced"),
        }
        fused = (
            joined
            | "Join" >> beam.CoGroupByKey()
            | "Fuse"
            >> beam.ParDo(_FuseJoined(self.fusion, self.created, self.drop_missing)).with_outputs(
                COUNTS_TAG, PREVIOUS_TAG, main="features"
            )
        )
        return {"features": fused.features, PREVIOUS_TAG: fused[PREVIOUS_TAG], COUNTS_TAG: fused[COUNTS_TAG]}
