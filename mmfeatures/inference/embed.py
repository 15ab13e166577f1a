"""``EmbedRecords``: each record's modalities embedded one after another, the record carrying its
vectors on, so that no stage holds the run's records or vectors to join them up again."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import RunInference

from mmfeatures import storage
from mmfeatures.content import for_copies
from mmfeatures.counts import COUNTS_TAG, NAMESPACE, RunCounts, error_output
from mmfeatures.errors import ERRORS_TAG, ErrorRow
from mmfeatures.inference.batching import BatchByCost
from mmfeatures.inference.handler import EmbeddingModelHandler, Outcome
from mmfeatures.inference.prepare import Prepare
from mmfeatures.modalities.base import Modality, Preprocessor
from mmfeatures.settings import InferenceSettings

# (copy id, (modality, vector, digest)): a vector that a record embedded for a record holding the
# same content (``Record.copies``), which takes it in ``join.JoinShared``.
SHARED_TAG = "shared"


def _attach(outcome: Outcome, modality: str) -> Iterator[Any]:
    """The record with its vector or failure for ``modality`` (as it was, where it had nothing to
    embed); the error rows of a failure, its copies' too; the vector each copy takes; the count of
    a vector made on torch instead of the runtime asked."""
    record = outcome.record
    copies = record.copies.get(modality, ())
    if outcome.error is not None:
        row = ErrorRow.from_exception(outcome.error, record_id=record.id, modality=modality, source=outcome.source)
        yield from map(error_output, [row, *for_copies(row, copies)])
        yield record.with_failure(modality)
        return
    if outcome.vector is None:
        yield record
        return
    Metrics.counter(NAMESPACE, f"{modality}_embedded").inc()
    Metrics.counter(NAMESPACE, f"{modality}_shared").inc(len(copies))
    yield record.with_vector(modality, outcome.vector, outcome.digest)
    if outcome.fallback is not None:
        counts = RunCounts.of_fallback(modality, 1 + len(copies), outcome.fallback)
        yield beam.pvalue.TaggedOutput(COUNTS_TAG, counts)
    for copy_id, _ in copies:
        yield beam.pvalue.TaggedOutput(SHARED_TAG, (copy_id, (modality, outcome.vector, outcome.digest)))


class EmbedModality(beam.PTransform):
    """Records to the same records with ``modality`` embedded (or failed) where they hold it and
    embed it, with error rows, the vectors their copies take (``SHARED_TAG``) and the counts of
    vectors made on torch instead of the runtime asked (``COUNTS_TAG``): prepared in a
    pool of threads, batched by cost one length bucket at a time, and embedded by RunInference,
    with ``preprocessor``'s model, as ``settings`` say. Every record comes out, once."""

    def __init__(
        self,
        modality: Modality,
        preprocessor: Preprocessor,
        settings: InferenceSettings,
        location_policy: storage.LocationPolicy | None = None,
    ):
        super().__init__()
        self.preprocessor = preprocessor
        self.settings = settings
        self.location_policy = location_policy or storage.LocationPolicy()
        self.handler = EmbeddingModelHandler(modality, preprocessor, settings)

    def expand(self, records: beam.PCollection) -> dict[str, beam.PCollection]:
        prepare = Prepare(self.preprocessor, self.location_policy, self.settings.prepare_ahead)
        prepared = records | "Prepare" >> beam.ParDo(prepare).with_outputs(ERRORS_TAG, main="prepared")
        embedded = (
            prepared.prepared
            | "BatchByCost" >> BatchByCost(self.preprocessor, self.settings)
            | "RunInference" >> RunInference(self.handler)
            | "Attach"
            >> beam.FlatMap(_attach, self.preprocessor.name).with_outputs(
                ERRORS_TAG, SHARED_TAG, COUNTS_TAG, main="records"
            )
        )
        errors = (prepared[ERRORS_TAG], embedded[ERRORS_TAG]) | "Errors" >> beam.Flatten()
        return {
            "records": embedded.records,
            ERRORS_TAG: errors,
            SHARED_TAG: embedded[SHARED_TAG],
            COUNTS_TAG: embedded[COUNTS_TAG],
        }


class EmbedRecords(beam.PTransform):
    """Records through ``EmbedModality`` for each of ``preprocessors`` in turn (with the
    ``modalities`` and ``settings`` of the same names): out come the records with their vectors
    and failures, the error rows, the vectors shared with copies and the counts, of every modality."""

    def __init__(
        self,
        modalities: Mapping[str, Modality],
        preprocessors: Mapping[str, Preprocessor],
        settings: Mapping[str, InferenceSettings],
        location_policy: storage.LocationPolicy | None = None,
    ):
        super().__init__()
        self.modalities = modalities
        self.preprocessors = preprocessors
        self.settings = settings
        self.location_policy = location_policy

    def expand(self, records: beam.PCollection) -> dict[str, beam.PCollection]:
        outputs: dict[str, list[beam.PCollection]] = {ERRORS_TAG: [], SHARED_TAG: [], COUNTS_TAG: []}
        for name, preprocessor in self.preprocessors.items():
            step = EmbedModality(self.modalities[name], preprocessor, self.settings[name], self.location_policy)
            embedded = records | name.title() >> step
            records = embedded["records"]
            for tag, collections in outputs.items():
                collections.append(embedded[tag])
        pipeline = records.pipeline
        return {
            "records": records,
            **{
                tag: collections | tag.title() >> beam.Flatten(pipeline=pipeline)
                for tag, collections in outputs.items()
            },
        }
