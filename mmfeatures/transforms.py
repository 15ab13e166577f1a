"""The Beam composites of the job, in the order data flows through them; each lives in the module
of its stage:

``ReadRecords`` (reading) -> ``EmbedModality`` per modality (inference.embed) -> ``JoinAndFuse``
(join, with ``PreviousRows`` from incremental in an incremental run) -> ``StageParquetTable`` per
table and ``CommitRun`` (sinks), with ``FeatureSchema`` (sinks) giving the feature table its
schema from the carried columns' types. Every stage returns its main output and an ``errors``
PCollection of error rows; ReadRecords and JoinAndFuse also return ``counts``.
"""

from __future__ import annotations

from mmfeatures.counts import COUNTS_TAG, sum_counts
from mmfeatures.incremental import PreviousRows
from mmfeatures.inference.embed import EmbedModality
from mmfeatures.join import JoinAndFuse
from mmfeatures.reading import COLUMN_TYPES_TAG, KEPT_TAG, ReadRecords
from mmfeatures.sinks import CommitRun, FeatureSchema, StageParquetTable

__all__ = [
    "COLUMN_TYPES_TAG",
    "COUNTS_TAG",
    "CommitRun",
    "EmbedModality",
    "FeatureSchema",
    "JoinAndFuse",
    "KEPT_TAG",
    "PreviousRows",
    "ReadRecords",
    "StageParquetTable",
    "sum_counts",
]
