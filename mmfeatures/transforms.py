"""The Beam composites of the job, in the order data flows through them; each lives in the module
of its stage:

``ReadRecords`` (reading) -> ``EmbedModality`` per modality (inference.embed) -> ``JoinAndFuse``
(join) -> ``WriteParquetTable`` and ``WriteRunSummary`` (sinks), with ``FeatureSchema`` (sinks) giving
the feature table its schema from the carried columns' types. Every stage returns its main output and
an ``errors`` PCollection of error rows; ReadRecords and JoinAndFuse also return ``counts``.
"""

from __future__ import annotations

from mmfeatures.counts import COUNTS_TAG, sum_counts
from mmfeatures.inference.embed import EmbedModality
from mmfeatures.join import JoinAndFuse
from mmfeatures.reading import COLUMN_TYPES_TAG, ReadRecords
from mmfeatures.sinks import FeatureSchema, WriteParquetTable, WriteRunSummary

__all__ = [
    "COLUMN_TYPES_TAG",
    "COUNTS_TAG",
    "EmbedModality",
    "FeatureSchema",
    "JoinAndFuse",
    "ReadRecords",
    "WriteParquetTable",
    "WriteRunSummary",
    "sum_counts",
]
