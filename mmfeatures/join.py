"""``JoinAndFuse``: each record joined with its embeddings and failures, fused into its feature row."""

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


class _Fuse(beam.DoFn):
    """A record joined with its embeddings and failures, or with the previous table's row it
    keeps, to its feature row; a previous row alone is carried over or dropped. Its counts are
    summed per bundle and window, and leave once at the bundle's end, rather than one value per
    record pickled across the stage boundary."""

    def __init__(self, fusion: Fusion, created: datetime.datetime, drop_missing: bool):
        self.fusion = fusion
        self.created = created
        self.drop_missing = drop_missing
        self._progress = Progress("records fused", every=1000)

    def start_bundle(self) -> None:
        self._counts: dict[Any, RunCounts] = collections.defaultdict(RunCounts)

    def finish_bundle(self) -> Iterator[Any]:
        for window, counts in self._counts.items():
            yield beam.pvalue.TaggedOutput(COUNTS_TAG, WindowedValue(counts, window.max_timestamp(), (window,)))

    def process(
        self, joined: tuple[str, Mapping[str, Iterable[Any]]], window: Any = beam.DoFn.WindowParam
    ) -> Iterator[dict[str, Any]]:
        _, groups = joined
        self._progress.add()
        counts = self._counts[window]
        previous: dict[str, Any] | None = next(iter(groups["previous"]), None)
        kept: Record | None = next(iter(groups["kept"]), None)
        if kept is not None:
            assert previous is not None  # a record is kept only for a previous row
            counts.add(RunCounts.of_kept(kept))
            yield self._kept_row(kept, previous)
            return
        records = list(groups["record"])
        if not records:
            if previous is None:
                # A vector or failure shared with a record whose input changed before its second
                # read: that input's error row accounts for the record.
                return
            # an id the previous table alone holds
            if self.drop_missing:
                counts.add(RunCounts(rows_dropped=1))
            else:
                counts.add(RunCounts(rows_kept_absent=1))
                yield previous
            return
        (record,) = records
        embedded = {modality: (vector, digest) for modality, vector, digest in groups["embeddings"]}
        failed = sorted(set(groups["failed"]))
        counts.add(RunCounts.of_record(record, embedded, failed, replacing=previous is not None))
        if not embedded:  # every modality failed: the error rows alone account for the record
            return
        vectors = {modality: vector for modality, (vector, _) in embedded.items()}
        digests = {modality: digest for modality, (_, digest) in embedded.items() if digest is not None}
        complete = not failed and len(digests) == len(embedded)
        yield _row(
            record,
            vectors,
            self.fusion.fuse(vectors),
            failed,
            event_timestamp=record.event_time or self.created,
            created_timestamp=self.created,
            content_hash=content_hash(digests) if complete else None,
        )

    @staticmethod
    def _kept_row(record: Record, previous: Mapping[str, Any]) -> dict[str, Any]:
        """The record's row with the previous row's vectors and times: the record's own fields
        (label, split, carried columns) are this run's."""
        return _row(
            record,
            {m: previous[f"{m}_embedding"] for m in MODALITY_COLUMNS if previous.get(f"{m}_embedding") is not None},
            previous["fused"],
            [],
            event_timestamp=previous["event_timestamp"],
            created_timestamp=previous["created_timestamp"],
            content_hash=previous["content_hash"],
        )


def _row(
    record: Record,
    vectors: Mapping[str, np.ndarray],
    fused: np.ndarray,
    failed: list[str],
    **times_and_hash: Any,
) -> dict[str, Any]:
    row: dict[str, Any] = dict(record.carried)
    row.update(id=record.id, label=record.label, split=record.split, fused=fused, failed_modalities=failed)
    row.update(times_and_hash)
    for modality in MODALITY_COLUMNS:
        row[f"{modality}_embedding"] = vectors.get(modality)
        row[f"has_{modality}"] = modality in vectors
    return row


class JoinAndFuse(beam.PTransform):
    """Join each record with its embeddings and failures by id, and, in an incremental run, the
    records that keep their rows with the previous table's rows (``kept``, ``previous``); emit
    feature rows and the records' counts (``RunCounts``), summed per bundle. Rows computed now
    carry ``created`` as their creation time, and as their event time unless the record has its own."""

    def __init__(self, fusion: Fusion, created: datetime.datetime, drop_missing: bool = False):
        super().__init__()
        self.fusion = fusion
        self.created = created
        self.drop_missing = drop_missing

    def expand(self, inputs: Mapping[str, beam.PCollection]) -> dict[str, beam.PCollection]:
        keyed_records = inputs["records"] | "KeyRecords" >> beam.Map(
            lambda record: (record.id, record.without_content())
        )
        failed = (
            inputs["errors"]
            | "ModalityFailures" >> beam.Filter(lambda row: row["modality"] is not None and row["id"] is not None)
            | "KeyFailures" >> beam.Map(lambda row: (row["id"], row["modality"]))
        )
        pipeline = inputs["records"].pipeline
        kept = inputs.get("kept") or pipeline | "NoKeptRecords" >> beam.Create([])
        previous = inputs.get("previous") or pipeline | "NoPreviousRows" >> beam.Create([])
        joined = {
            "record": keyed_records,
            "embeddings": inputs["embeddings"],
            "failed": failed,
            "kept": kept | "KeyKept" >> beam.Map(lambda record: (record.id, record)),
            "previous": previous,
        }
        fused = (
            joined
            | "Join" >> beam.CoGroupByKey()
            | "Fuse"
            >> beam.ParDo(_Fuse(self.fusion, self.created, self.drop_missing)).with_outputs(COUNTS_TAG, main="features")
        )
        return {"features": fused.features, COUNTS_TAG: fused[COUNTS_TAG]}
