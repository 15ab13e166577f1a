"""The run's files reduced to what the page shows: the feature table digested part by part, the
error rows grouped by type, and a training run's scores."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
from fsspec.core import url_to_fs

from mmfeatures import outputs, schema, storage
from mmfeatures.records import MODALITY_COLUMNS
from mmfeatures.redaction import redact
from mmfeatures.train import METRICS_FILE

SAMPLE_SIZE = 5000  # most points in one projection: enough to see structure, small enough to draw
SAMPLE_SEED = 0
EXAMPLES_PER_ERROR_TYPE = 3
REQUIRED_METRICS = ("accuracy", "macro_f1")
OPTIONAL_METRICS = ("macro_recall",)
PER_CLASS_F1 = "per_class_f1"
TEST_RECORDS = "n"
ALL_MODALITIES_ACCURACY = "accuracy_all_modalities"  # our name for test_all_modalities.accuracy

# {"text": "text_embedding", "image": ..., "audio": ..., "fused": "fused"}, from the contract, so a
# new modality's column is reported without a change here.
EMBEDDING_COLUMNS: dict[str, str] = {
    f["modality"]: f["name"] for f in schema.load_contract("features")["fields"] if f["type"] == "embedding"
}


class ReportError(Exception):
    """The report cannot be made: no run output at the path, or ``--train`` has no metrics file."""


def read_json(path: str) -> Any | None:
    """A JSON file's content, or None where there is no such file."""
    fs, fs_path = url_to_fs(path)
    try:
        return outputs.read_json(fs, fs_path)
    except ValueError as exc:  # not JSON, or not UTF-8
        raise ReportError(f"{redact(path)} is not JSON: {exc}") from None


def read_parts(table: outputs.CommittedTable) -> Iterator[pa.Table]:
    """A committed table one part at a time, embeddings as ``fixed_size_list``: the report's memory
    stays that of one part, however large the table."""
    for part in table.parts:
        yield schema.read_features(part, filesystem=table.fs)


@dataclass
class EmbeddingDigest:
    """One embedding column, reduced to what the page shows."""

    norms: list[np.ndarray] = field(default_factory=list)
    sample: list[np.ndarray] = field(default_factory=list)
    sample_labels: list[str | None] = field(default_factory=list)

    def all_norms(self) -> np.ndarray:
        return np.concatenate(self.norms) if self.norms else np.zeros(0, np.float32)

    def sample_vectors(self) -> np.ndarray:
        return np.concatenate(self.sample) if self.sample else np.zeros((0, 0), np.float32)


@dataclass
class FeatureDigest:
    """The feature table reduced part by part: norms of every vector, a seeded sample of records
    (the same records in every modality, so their projections can be compared), and how many rows
    have each subset of modalities embedded."""

    rows: int = 0
    embeddings: dict[str, EmbeddingDigest] = field(
        default_factory=lambda: {name: EmbeddingDigest() for name in EMBEDDING_COLUMNS}
    )
    subsets: Counter[tuple[str, ...]] = field(default_factory=Counter)

    def add_part(self, part: pa.Table, sampled_rows: np.ndarray) -> None:
        """Fold in one part; ``sampled_rows`` are the sampled positions within it."""
        labels = part.column("label").to_pylist() if "label" in part.column_names else [None] * part.num_rows
        for modality, column in EMBEDDING_COLUMNS.items():
            if column in part.column_names:
                self._add_vectors(modality, part.column(column).combine_chunks(), sampled_rows, labels)
        self._add_subsets(part)
        self.rows += part.num_rows

    def _add_vectors(self, modality: str, column: pa.Array, sampled_rows: np.ndarray, labels: list[str | None]) -> None:
        present = np.asarray(column.is_valid(), dtype=bool)
        dim = column.type.list_size
        vectors = np.asarray(column.filter(pa.array(present)).flatten(), dtype=np.float32).reshape(-1, dim)
        digest = self.embeddings[modality]
        digest.norms.append(np.linalg.norm(vectors, axis=1))
        sampled_present = sampled_rows[present[sampled_rows]]
        digest.sample.append(vectors[(np.cumsum(present) - 1)[sampled_present]])
        digest.sample_labels.extend(labels[row] for row in sampled_present)

    def _add_subsets(self, part: pa.Table) -> None:
        codes = np.zeros(part.num_rows, np.int64)
        for bit, modality in enumerate(MODALITY_COLUMNS):
            if f"has_{modality}" in part.column_names:
                codes |= np.asarray(part.column(f"has_{modality}"), dtype=np.int64) << bit
        for code, count in enumerate(np.bincount(codes, minlength=1 << len(MODALITY_COLUMNS))):
            if count:
                self.subsets[tuple(m for bit, m in enumerate(MODALITY_COLUMNS) if code >> bit & 1)] += int(count)


def digest_features(
    table: outputs.CommittedTable | None, sample_size: int = SAMPLE_SIZE, seed: int = SAMPLE_SEED
) -> FeatureDigest:
    """The feature table's digest, its sample drawn from the whole table before any part is read."""
    digest = FeatureDigest()
    if table is None:
        return digest
    sampled = np.sort(np.random.default_rng(seed).choice(table.rows, min(sample_size, table.rows), replace=False))
    for part in read_parts(table):
        start, end = digest.rows, digest.rows + part.num_rows
        digest.add_part(part, sampled[(sampled >= start) & (sampled < end)] - start)
    return digest


@dataclass
class ErrorType:
    """The error rows of one ``error_type``: how many, where they arose, and the first few."""

    rows: int = 0
    stages: Counter[str] = field(default_factory=Counter)
    modalities: Counter[str] = field(default_factory=Counter)
    examples: list[dict[str, Any]] = field(default_factory=list)


def digest_errors(table: outputs.CommittedTable | None) -> dict[str, ErrorType]:
    """Error rows grouped by type, most frequent first, keeping only a few examples of each; rows
    become Python objects one record batch at a time."""
    groups: dict[str, ErrorType] = {}
    batches = (batch for part in read_parts(table) for batch in part.to_batches()) if table else ()
    for batch in batches:
        for row in batch.to_pylist():
            group = groups.setdefault(row.get("error_type") or "unknown", ErrorType())
            group.rows += 1
            group.stages[row.get("stage") or "—"] += 1
            group.modalities[row.get("modality") or "record"] += 1
            if len(group.examples) < EXAMPLES_PER_ERROR_TYPE:
                group.examples.append(row)
    return dict(sorted(groups.items(), key=lambda item: (-item[1].rows, item[0])))


@dataclass(frozen=True)
class TrainMetrics:
    """The usable methods of a ``metrics.json`` as flat score mappings, and the names of entries
    that lacked scores."""

    methods: dict[str, dict[str, Any]]
    ignored: list[str]


def read_train_metrics(train_dir: str) -> TrainMetrics:
    """``TRAIN_DIR/metrics.json``, read defensively. The methods are a mapping of method name to
    entry, under ``"methods"`` (or at the top level); an entry's scores are the entry itself or its
    ``"test"`` mapping, and count when ``accuracy`` and ``macro_f1`` are finite numbers. Shown where
    present: ``macro_recall``, ``n`` (test records), ``per_class_f1`` (class -> F1) and the
    entry's ``test_all_modalities.accuracy``. Anything else in the file is left alone."""
    content = read_json(storage.join(train_dir, METRICS_FILE))
    if content is None:
        raise ReportError(f"no {METRICS_FILE} in {redact(train_dir)}")
    candidates = content.get("methods", content) if isinstance(content, dict) else {}
    entries = {
        str(name): entry
        for name, entry in (candidates.items() if isinstance(candidates, dict) else ())
        if isinstance(entry, dict)
    }
    methods = {name: scores for name, entry in entries.items() if (scores := _method_scores(entry)) is not None}
    return TrainMetrics(methods, [name for name in entries if name not in methods])


def _method_scores(entry: Mapping[str, Any]) -> dict[str, Any] | None:
    for scores in (entry, entry.get("test")):
        if isinstance(scores, dict) and all(is_number(scores.get(key)) for key in REQUIRED_METRICS):
            complete = entry.get("test_all_modalities")
            if isinstance(complete, dict) and is_number(complete.get("accuracy")):
                return {**scores, ALL_MODALITIES_ACCURACY: complete["accuracy"]}
            return scores
    return None


def is_number(value: Any) -> bool:
    """A finite int or float; JSON's ``true`` and ``false`` are not scores."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
