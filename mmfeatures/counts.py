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
    shared: int = 0  # of those embedded, how many took the vector of another record with the same content
    kept: int = 0  # an incremental run kept the record's row: its vector is the previous table's
    failed: int = 0
    # Of those embedded, how many on torch because the runtime asked could not take the model, and why.
    on_torch_instead: int = 0
    fallback: str | None = None


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
    # What became of the rows of the table the run replaces (see ``Job.summary``).
    rows_unchanged: int = 0
    rows_added: int = 0
    rows_replaced: int = 0
    rows_dropped: int = 0
    rows_kept_absent: int = 0

    @classmethod
    def of_record(cls, record: Record, embedded: Iterable[str], failed: Iterable[str], replacing: bool) -> RunCounts:
        """One accepted, embedded record's part: it holds each modality that it has or that
        failed. Its row is added, or, ``replacing`` a previous row, replaces it (or drops it,
        when every modality failed)."""
        embedded, failed = set(embedded), set(failed)
        modalities = {
            name: ModalityCounts(
                present=int(record.payload(name) is not None or name in failed),
                embedded=int(name in embedded),
                shared=int(name in embedded and name in record.embedded_elsewhere),
                failed=int(name in failed),
            )
            for name in MODALITY_COLUMNS
        }
        return cls(
            records_accepted=1,
            records_with_features=int(bool(embedded)),
            modalities=modalities,
            rows_added=int(bool(embedded) and not replacing),
            rows_replaced=int(bool(embedded) and replacing),
            rows_dropped=int(not embedded and replacing),
        )

    @classmethod
    def of_kept(cls, record: Record) -> RunCounts:
        """One accepted record that kept its row, each modality it holds counted as kept."""
        modalities = {name: ModalityCounts(present=1, kept=1) for name in record.modalities()}
        return cls(records_accepted=1, records_with_features=1, modalities=modalities, rows_unchanged=1)

    @classmethod
    def of_fallback(cls, modality: str, records: int, reason: str) -> RunCounts:
        """``records`` whose ``modality`` took a vector made on torch instead of the runtime asked, for ``reason``."""
        return cls(modalities={modality: ModalityCounts(on_torch_instead=records, fallback=reason)})

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
        self.rows_unchanged += other.rows_unchanged
        self.rows_added += other.rows_added
        self.rows_replaced += other.rows_replaced
        self.rows_dropped += other.rows_dropped
        self.rows_kept_absent += other.rows_kept_absent
        for name, counts in other.modalities.items():
            mine = self.modalities.setdefault(name, ModalityCounts())
            mine.present += counts.present
            mine.embedded += counts.embedded
            mine.shared += counts.shared
            mine.kept += counts.kept
            mine.failed += counts.failed
            mine.on_torch_instead += counts.on_torch_instead
            mine.fallback = mine.fallback or counts.fallback  # workers' reasons alike: one tells
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
