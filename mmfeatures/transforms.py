"""The Beam composites of the job, in the order data flows through them; each lives in the module
of its stage:

``ReadRecords`` (reading) -> ``EmbedRecords`` (inference.embed: each modality in turn, the
record carrying its vectors on) -> ``FuseRecords`` (join: rows as records come) and
``JoinShared`` (join: the few records that take a vector from another record or keep a previous
row, with ``PreviousLocations`` from incremental; ``PreviousRows`` (incremental) then reads the
previous rows kept and carried over) -> ``StageParquetTable`` per table and
``CommitRun`` (sinks), with ``FeatureSchema`` (sinks) giving the feature table its schema from the carried
columns' types. Every stage returns its main output and an ``errors`` PCollection of error rows,
or ``counts``, or both.
"""

from __future__ import annotations

from mmfeatures.counts import COUNTS_TAG, sum_counts
from mmfeatures.incremental import PreviousLocations, PreviousRows
from mmfeatures.inference.embed import SHARED_TAG, EmbedRecords
from mmfeatures.join import AWAITING_TAG, PREVIOUS_TAG, FuseRecords, JoinShared
from mmfeatures.reading import COLUMN_TYPES_TAG, KEPT_TAG, REPLACED_TAG, ReadRecords
from mmfeatures.sinks import CommitRun, FeatureSchema, StageParquetTable

__all__ = [
    "AWAITING_TAG",
    "COLUMN_TYPES_TAG",
    "COUNTS_TAG",
    "CommitRun",
    "EmbedRecords",
    "FeatureSchema",
    "FuseRecords",
    "JoinShared",
    "KEPT_TAG",
    "PREVIOUS_TAG",
    "PreviousLocations",
    "PreviousRows",
    "REPLACED_TAG",
    "ReadRecords",
    "SHARED_TAG",
    "StageParquetTable",
    "sum_counts",
]
