"""JoinAndFuse on its own: feature rows for the records with an embedding, and the run's counts."""

from __future__ import annotations

import datetime

import apache_beam as beam
import numpy as np
from apache_beam.testing.util import assert_that, equal_to

from mmfeatures.counts import COUNTS_TAG, ModalityCounts, RunCounts, sum_counts
from mmfeatures.errors import ErrorRow, Stage
from mmfeatures.fusion import Fusion
from mmfeatures.join import JoinAndFuse
from mmfeatures.records import parse_record

DIMS = {"text": 3, "image": 2, "audio": 4}


def test_each_record_is_fused_once_and_counted_once_per_bundle_not_per_record() -> None:
    records = [
        parse_record({"id": f"r{i}", "text": f"text {i}", "image": f"{i}.png"}, source=f"m:{i}", manifest_dir="/data")
        for i in range(20)
    ]
    embeddings = [(f"r{i}", ("text", np.full(3, i + 1, np.float32), None)) for i in range(20)]
    embeddings += [(f"r{i}", ("image", np.ones(2, np.float32), None)) for i in range(0, 20, 2)]
    errors = [
        ErrorRow(f"r{i}", "image", Stage.DECODE, "corrupt_image", "bad", f"{i}.png").to_dict() for i in range(1, 20, 2)
    ]
    fusion = Fusion(method="concat", dims=DIMS, weights={}, projection_dim=8, seed=0)
    with beam.Pipeline(runner="FnApiRunner") as pipeline:
        fused = {
            "records": pipeline | "Records" >> beam.Create(records),
            "embeddings": pipeline | "Embeddings" >> beam.Create(embeddings),
            "errors": pipeline | "Errors" >> beam.Create(errors),
        } | JoinAndFuse(fusion, datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc))
        rows = fused["features"] | "Summary" >> beam.Map(
            lambda row: (row["id"], row["has_image"], row["failed_modalities"], len(row["fused"]))
        )
        assert_that(
            rows,
            equal_to([(f"r{i}", i % 2 == 0, [] if i % 2 == 0 else ["image"], sum(DIMS.values())) for i in range(20)]),
            label="Rows",
        )
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
