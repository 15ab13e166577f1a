"""The feature-extraction job: manifests -> per-modality embeddings -> fusion -> Parquet.

This file only wires library parts; run it with any Beam runner, e.g.
``python -m pipelines.extract_features --input manifest.jsonl --output out/``
(Dataflow: add ``--runner=DataflowRunner --setup_file=./setup.py`` and the usual GCP options).
"""

from __future__ import annotations

import logging
import sys

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from mmfeatures import schema
from mmfeatures.counts import RunCounts
from mmfeatures.errors import ERRORS_TAG, ConfigurationError
from mmfeatures.job import Job
from mmfeatures.lease import Lease, output_for_run
from mmfeatures.modalities import MODALITIES
from mmfeatures.options import parse_options
from mmfeatures.transforms import (
    AWAITING_TAG,
    COLUMN_TYPES_TAG,
    COUNTS_TAG,
    KEPT_TAG,
    PREVIOUS_TAG,
    REPLACED_TAG,
    SHARED_TAG,
    CommitRun,
    EmbedRecords,
    FeatureSchema,
    FuseRecords,
    JoinShared,
    PreviousLocations,
    PreviousRows,
    ReadRecords,
    StageParquetTable,
    sum_counts,
)


def build(pipeline: beam.Pipeline, job: Job, lease: Lease) -> None:
    """Add the whole job to ``pipeline``; its commit confirms the run still holds ``lease``."""
    read = pipeline | "ReadRecords" >> ReadRecords(
        job.inputs, job.read_options, job.spread_records, job.location_policy, job.previous
    )
    embedded = read["records"] | "Embed" >> EmbedRecords(
        MODALITIES, job.preprocessors, job.settings, job.location_policy
    )
    fused = embedded["records"] | "Fuse" >> FuseRecords(job.fusion, job.started)
    errors = (read[ERRORS_TAG], embedded[ERRORS_TAG]) | "AllErrors" >> beam.Flatten()
    waiting = {
        "awaiting": fused[AWAITING_TAG],
        "shared": embedded[SHARED_TAG],
        "errors": errors,
        "kept": read[KEPT_TAG],
        "replaced": read[REPLACED_TAG],
    }
    column_types = [read[COLUMN_TYPES_TAG]]
    if job.previous is not None:
        waiting["previous"] = pipeline | "PreviousLocations" >> PreviousLocations(job.previous, job.spread_records)
        if job.previous.usable:  # its rows may be carried over, with their columns
            column_types.append(
                pipeline | "PreviousColumns" >> beam.Create([((len(job.inputs), 0), job.previous.carried_types())])
            )
    joined = waiting | "JoinShared" >> JoinShared(job.fusion, job.started, job.drop_missing)
    feature_schema = (
        column_types | "AllColumnTypes" >> beam.Flatten() | "FeatureSchema" >> FeatureSchema(job.features_schema)
    )
    features: tuple[beam.PCollection, ...] = (fused["features"], joined["features"])
    if job.previous is not None:
        features += (joined[PREVIOUS_TAG] | "PreviousRows" >> PreviousRows(job.previous, feature_schema),)

    pipeline | "CommitRun" >> CommitRun(
        lease,
        job.commit,
        job.summary,
        job.started.timestamp(),
        features=features
        | "StageFeatures"
        >> StageParquetTable(job.staging("features"), feature_schema, job.rows_per_file, partition_by=job.partition_by),
        errors=errors
        | "StageErrors"
        >> StageParquetTable(
            job.staging("errors"),
            pipeline | "ErrorSchema" >> beam.Create([schema.errors_schema()]),
            job.rows_per_file,
        ),
        counts=[
            read[COUNTS_TAG],
            embedded[COUNTS_TAG],
            fused[COUNTS_TAG],
            joined[COUNTS_TAG],
            errors | "TallyErrors" >> beam.Map(RunCounts.of_error),
        ]
        | "AllCounts" >> beam.Flatten()
        | "SumCounts" >> beam.CombineGlobally(sum_counts),
    )


def run(argv: list[str] | None = None) -> Job:
    return run_job(parse_options(argv))


def run_job(options: PipelineOptions) -> Job:
    """Resolve the job from ``options`` (a ``ConfigurationError`` before any work), then run it
    holding its output (``output_for_run``: the lease, and clean-up after killed or failed runs)."""
    job = Job.from_options(options)
    with output_for_run(job.output, job.run, job.lease_seconds) as lease:
        with beam.Pipeline(options=options) as pipeline:
            build(pipeline, job, lease)
    return job


def main(argv: list[str]) -> int:
    """Run the job; a configuration it cannot run is one line on stderr and exit status 2."""
    logging.getLogger().setLevel(logging.INFO)
    try:
        run(argv)
    except ConfigurationError as exc:
        print(f"extract_features: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
