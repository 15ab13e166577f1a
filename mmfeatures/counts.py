"""The run's counts: Beam metrics as records go, and the ``RunCounts`` that ``_run.json`` reports,
built from the data itself (rows read, records fused, error rows) and summed over the run."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import apache_beam as beam
from apache_beam.metrics import Metrics

from mmfeatures.errors import ERRORS_TAG, ErrorRow
from mmfeatures.records import MODALITY_COLUMNS, Record

NAMESPACE = "mmfeatures"  # of the job's Beam metrics
COUNTS_TAG = "counts"  # the tagged output of the stages' ``RunCounts``


def error_output(row: ErrorRow) -> beam.pvalue.TaggedOutput:
    """``row`` on a stage's errors output, counted in the stage's metrics."""
    Metrics.counter(NAMESPACE, f"errors_{row.stage}").inc()
    return beam.pvalue.TaggedOutput(ERRORS_TAG, row.to_dict())


@dataclass
class ModalityCounts:
    """Of the accepted records: how many hold the modality, and how many of those were embedded or failed."""

    present: int = 0
    embedded: int = 0
    failed: int = 0


@dataclass
class RunCounts:
    """Counts that add up over the run: each stage gives its part, one combine sums them."""

    rows_read: int = 0
    records_accepted: int = 0
    records_with_features: int = 0
    error_rows: int = 0
    rejected_rows: int = 0  # error rows of whole input rows; the others are one modality's
    modalities: dict[str, ModalityCounts] = field(default_factory=dict)
    errors_by_type: dict[str, int] = field(default_factory=dict)  # "stage/error_type" -> rows

    @classmethod
    def of_record(cls, record: Record, embedded: Iterable[str], failed: Iterable[str]) -> RunCounts:
        """One accepted record's part: it holds each modality that it has or that failed."""
        embedded, failed = set(embedded), set(failed)
        modalities = {
            name: ModalityCounts(
                present=int(record.payload(name) is not None or name in failed),
                embedded=int(name in embedded),
                failed=int(name in failed),
            )
            for name in MODALITY_COLUMNS
        }
        return cls(records_accepted=1, records_with_features=int(bool(embedded)), modalities=modalities)

    @classmethod
    def of_error(cls, row: dict[str, object]) -> RunCounts:
        """One error row's part."""
        return cls(
            error_rows=1,
            rejected_rows=int(row["modality"] is None),
            errors_by_type={f"{row['stage']}/{row['error_type']}": 1},
        )

    def add(self, other: RunCounts) -> RunCounts:
        """Add ``other`` into these counts; returns them."""
        self.rows_read += other.rows_read
        self.records_accepted += other.records_accepted
        self.records_with_features += other.records_with_features
        self.error_rows += other.error_rows
        self.rejected_rows += other.rejected_rows
        for name, counts in other.modalities.items():
            mine = self.modalities.setdefault(name, ModalityCounts())
            mine.present += counts.present
            mine.embedded += counts.embedded
            mine.failed += counts.failed
        for key, rows in other.errors_by_type.items():
            self.errors_by_type[key] = self.errors_by_type.get(key, 0) + rows
        return self

    def modality(self, name: str) -> ModalityCounts:
        return self.modalities.get(name, ModalityCounts())


def sum_counts(parts: Iterable[RunCounts]) -> RunCounts:
    """The sum of ``parts`` (Beam's combine calls it on its own partial sums too)."""
    total = RunCounts()
    for part in parts:
        total.add(part)
    return total
