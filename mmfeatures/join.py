"""``JoinAndFuse``: each record joined with its embeddings and failures, fused into its feature row."""

from __future__ import annotations

import collections
import datetime
from collections.abc import Iterator, Mapping
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.utils.windowed_value import WindowedValue

from mmfeatures.counts import COUNTS_TAG, RunCounts
from mmfeatures.fusion import Fusion
from mmfeatures.progress import Progress
from mmfeatures.records import MODALITY_COLUMNS


class _Fuse(beam.DoFn):
    """A record joined with its embeddings and failures to its feature row. Its counts are summed
    per bundle and window, and leave once at the bundle's end, rather than one value per record
    pickled across the stage boundary."""

    def __init__(self, fusion: Fusion, event_timestamp: datetime.datetime):
        self.fusion = fusion
        self.event_timestamp = event_timestamp
        self._progress = Progress("records fused", every=1000)

    def start_bundle(self) -> None:
        self._counts: dict[Any, RunCounts] = collections.defaultdict(RunCounts)

    def finish_bundle(self) -> Iterator[Any]:
        for window, counts in self._counts.items():
            yield beam.pvalue.TaggedOutput(COUNTS_TAG, WindowedValue(counts, window.max_timestamp(), (window,)))

    def process(
        self, joined: tuple[str, Mapping[str, list[Any]]], window: Any = beam.DoFn.WindowParam
    ) -> Iterator[Any]:
        record_id, groups = joined
        self._progress.add()
        (record,) = groups["record"]
        embeddings: dict[str, np.ndarray] = dict(groups["embeddings"])
        failed = sorted(set(groups["failed"]))
        self._counts[window].add(RunCounts.of_record(record, embeddings, failed))
        if not embeddings:  # every modality failed: the error rows alone account for the record
            return
        row: dict[str, Any] = dict(record.carried)
        row.update(
            id=record.id,
            label=record.label,
            split=record.split,
            fused=self.fusion.fuse(embeddings),
            failed_modalities=failed,
            event_timestamp=self.event_timestamp,
        )
        for modality in MODALITY_COLUMNS:
            row[f"{modality}_embedding"] = embeddings.get(modality)
            row[f"has_{modality}"] = modality in embeddings
        yield row


class JoinAndFuse(beam.PTransform):
    """Join each record with its embeddings and failures by id; emit feature rows and the records'
    counts (``RunCounts``), summed per bundle."""

    def __init__(self, fusion: Fusion, event_timestamp: datetime.datetime):
        super().__init__()
        self.fusion = fusion
        self.event_timestamp = event_timestamp

    def expand(self, inputs: Mapping[str, beam.PCollection]) -> dict[str, beam.PCollection]:
        keyed_records = inputs["records"] | "KeyRecords" >> beam.Map(
            lambda record: (record.id, record.without_content())
        )
        failed = (
            inputs["errors"]
            | "ModalityFailures" >> beam.Filter(lambda row: row["modality"] is not None and row["id"] is not None)
            | "KeyFailures" >> beam.Map(lambda row: (row["id"], row["modality"]))
        )
        fused = (
            {"record": keyed_records, "embeddings": inputs["embeddings"], "failed": failed}
            | "Join" >> beam.CoGroupByKey()
            | "Fuse" >> beam.ParDo(_Fuse(self.fusion, self.event_timestamp)).with_outputs(COUNTS_TAG, main="features")
        )
        return {"features": fused.features, COUNTS_TAG: fused[COUNTS_TAG]}
