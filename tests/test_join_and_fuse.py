"""FuseRecords and JoinShared on their own: feature rows for the records with an embedding, and
the run's counts."""

from __future__ import annotations

import datetime
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.testing.util import assert_that, equal_to

from mmfeatures.counts import COUNTS_TAG, ModalityCounts, RunCounts, sum_counts
from mmfeatures.errors import ErrorRow, Stage
from mmfeatures.fusion import Fusion
from mmfeatures.join import AWAITING_TAG, FuseRecords, JoinShared
from mmfeatures.records import Record, parse_record

DIMS = {"text": 3, "image": 2, "audio": 4}
CREATED = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
FUSION = Fusion(method="concat", dims=DIMS, weights={}, projection_dim=8, seed=0)


def _record(i: int) -> Record:
    return parse_record(
        {"id": f"r{i}", "text": f"text {i}", "image": f"{i}.png"}, source=f"m:{i}", manifest_dir="/data"
    )


def _summary(row: dict[str, Any]) -> tuple[str, bool, list[str], int]:
    return row["id"], row["has_image"], row["failed_modalities"], len(row["fused"])


def test_each_record_is_fused_as_it_comes_and_counted_once_per_bundle_not_per_record() -> None:
    records = []
    for i in range(20):
        record = _record(i).with_vector("text", np.full(3, i + 1, np.float32), None)
        records.append(
            record.with_vector("image", np.ones(2, np.float32), None) if i % 2 == 0 else record.with_failure("image")
        )
    with beam.Pipeline(runner="FnApiRunner") as pipeline:
        fused = pipeline | beam.Create(records) | FuseRecords(FUSION, CREATED)
        rows = fused["features"] | "Summary" >> beam.Map(_summary)
        assert_that(
            rows,
            equal_to([(f"r{i}", i % 2 == 0, [] if i % 2 == 0 else ["image"], sum(DIMS.values())) for i in range(20)]),
            label="Rows",
        )
        assert_that(fused[AWAITING_TAG], equal_to([]), label="NoneAwaits")
        counts = fused[COUNTS_TAG] | "Gather" >> beam.combiners.ToList()
        assert_that(
            counts | "Total" >> beam.Map(sum_counts),
            equal_to(
                [
                    RunCounts(
                        records_accepted=20,
                        records_with_features=20,
                        modalities={
                            "text": ModalityCounts(present=20, embedded=20, failed=0),
                            "image": ModalityCounts(present=20, embedded=10, failed=10),
                            "audio": ModalityCounts(present=0, embedded=0, failed=0),
                        },
                        rows_added=20,
                    )
                ]
            ),
            label="Counts",
        )
        assert_that(counts | "Parts" >> beam.Map(len), equal_to([1]), label="OnePartPerBundle")


def test_a_record_that_takes_a_vector_from_another_waits_for_it_in_the_join() -> None:
    """r1's image is r0's (embedded by r0), r2's is r0's too but failed there: each gets its own row
    with what it took; an error row for a record fused as it came changes nothing."""
    copies = [
        Record("r1", "m:1", "/data", {"text": "one", "image": "0.png"}, embedded_elsewhere=frozenset({"image"})),
        Record("r2", "m:2", "/data", {"text": "two", "image": "0.png"}, embedded_elsewhere=frozenset({"image"})),
    ]
    awaiting = [record.with_vector("text", np.full(3, 2.0, np.float32), "t") for record in copies]
    shared = [("r1", ("image", np.ones(2, np.float32), "i"))]
    errors = [
        ErrorRow("r2", "image", Stage.DECODE, "corrupt_image", "bad", "0.png").to_dict(),
        ErrorRow("r9", "audio", Stage.DECODE, "corrupt_audio", "bad", "9.wav").to_dict(),
    ]
    with beam.Pipeline(runner="FnApiRunner") as pipeline:
        fused = pipeline | "Records" >> beam.Create(awaiting) | FuseRecords(FUSION, CREATED)
        joined = {
            "awaiting": fused[AWAITING_TAG],
            "shared": pipeline | "Shared" >> beam.Create(shared),
            "errors": pipeline | "Errors" >> beam.Create(errors),
        } | JoinShared(FUSION, CREATED)
        assert_that(fused["features"], equal_to([]), label="NoneFusedAlone")
        assert_that(
            joined["features"] | beam.Map(lambda row: (*_summary(row), row["content_hash"] is not None)),
            equal_to([("r1", True, [], 9, True), ("r2", False, ["image"], 9, False)]),
        )
