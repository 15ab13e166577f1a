"""``EmbedModality``: the composite that embeds one modality of the records that hold it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import RunInference

from mmfeatures import storage
from mmfeatures.content import for_copies
from mmfeatures.counts import NAMESPACE, error_output
from mmfeatures.errors import ERRORS_TAG, ErrorRow
from mmfeatures.inference.batching import BatchByCost
from mmfeatures.inference.handler import EmbeddingModelHandler, Outcome
from mmfeatures.inference.prepare import Prepare
from mmfeatures.modalities.base import Modality, Preprocessor
from mmfeatures.records import Record
from mmfeatures.settings import InferenceSettings


def _split_outcome(outcome: Outcome, modality: str) -> Iterator[Any]:
    """A record's outcome as its embedding or error row, and the same for each of its copies."""
    if outcome.error is not None:
        row = ErrorRow.from_exception(
            outcome.error, record_id=outcome.record_id, modality=modality, source=outcome.source
        )
        yield from map(error_output, [row, *for_copies(row, outcome.copies)])
        return
    Metrics.counter(NAMESPACE, f"{modality}_embedded").inc()
    Metrics.counter(NAMESPACE, f"{modality}_shared").inc(len(outcome.copies))
    for record_id in [outcome.record_id, *(copy_id for copy_id, _ in outcome.copies)]:
        yield record_id, (modality, outcome.vector, outcome.digest)


def _embeds(record: Record, modality: str) -> bool:
    """Whether ``record`` holds ``modality`` and embeds it, rather than take another record's vector."""
    return record.payload(modality) is not None and modality not in record.embedded_elsewhere


class EmbedModality(beam.PTransform):
    """Records holding ``modality`` to ``(id, (modality, vector, digest))``, and error rows (content
    that several records share is embedded once, by the record that ``copies`` names them in): prepared
    in a pool of threads, batched by cost one length bucket at a time, and embedded by
    RunInference, with ``preprocessor``'s model, as ``settings`` say."""

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
        name = self.preprocessor.name
        prepare = Prepare(self.preprocessor, self.location_policy, self.settings.prepare_ahead)
        prepared = (
            records
            | "Holding" >> beam.Filter(_embeds, name)
            | "Prepare" >> beam.ParDo(prepare).with_outputs(ERRORS_TAG, main="prepared")
        )
        embedded = (
            prepared.prepared
            | "BatchByCost" >> BatchByCost(self.preprocessor, self.settings)
            | "RunInference" >> RunInference(self.handler)
            | "Split" >> beam.FlatMap(_split_outcome, name).with_outputs(ERRORS_TAG, main="embeddings")
        )
        errors = (prepared[ERRORS_TAG], embedded[ERRORS_TAG]) | "Errors" >> beam.Flatten()
        return {"embeddings": embedded.embeddings, ERRORS_TAG: errors}
