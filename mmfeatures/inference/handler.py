"""One ModelHandler for every modality.

Beam's ``RunInference`` loads the model once per worker process (shared by its threads, or by
processes with ``model_copies``) and calls ``run_inference`` on each batch that ``BatchByCost``
made. A batch that raises is retried record by record, so one poison record fails alone; an
embedding with NaN or Inf becomes an error, never a feature.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from apache_beam.ml.inference.base import ModelHandler

from mmfeatures.errors import EncodeError, RecordError
from mmfeatures.host import settle_worker_process
from mmfeatures.inference.batching import Keyed
from mmfeatures.inference.embedder import Embedder
from mmfeatures.inference.torch_runtime import TorchRuntime
from mmfeatures.modalities.base import Encoder, Modality, Preprocessor
from mmfeatures.progress import Progress
from mmfeatures.redaction import redact
from mmfeatures.settings import InferenceSettings

_LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    """One record's result: an embedding, or the error that stopped it."""

    record_id: str
    source: str | None
    vector: np.ndarray | None = None
    error: RecordError | None = None
    digest: str | None = None  # of the content embedded
    copies: tuple[tuple[str, str], ...] = ()  # (id, source) of the records that take this outcome too


class EmbeddingModelHandler(ModelHandler[Keyed, Outcome, Embedder]):
    """Embeds batches of ``(record_id, Prepared)`` pairs with ``modality``'s encoder, loaded for
    ``preprocessor``'s model and run as ``settings`` say."""

    def __init__(self, modality: Modality, preprocessor: Preprocessor, settings: InferenceSettings):
        if not isinstance(preprocessor, modality.preprocessor):
            raise TypeError(f"a {type(preprocessor).__name__} cannot feed the {modality.name} encoder")
        super().__init__(model_copies=settings.model_copies)
        self.modality = modality
        self.preprocessor = preprocessor
        self.settings = settings
        self._progress = Progress(f"{modality.name} records embedded", every=500)

    def should_skip_batching(self) -> bool:
        return True  # the input is already batched by BatchByCost, which Beam's BatchElements cannot do

    def load_model(self) -> Embedder:
        """Set up this process for the runtime and find the model's files now, so that a model that
        cannot be found fails the worker; the weights are loaded with the first batch (see
        ``Embedder``), so a worker that sees no record of this modality never loads them."""
        embedder = self.embedder(self._load_encoder)
        embedder.runtime.prepare_process(self.settings.threads)
        settle_worker_process()
        _ = self.preprocessor.resolved
        return embedder

    def _load_encoder(self) -> Encoder[Any]:
        encoder = self.modality.load_encoder(self.preprocessor, self.settings.device)
        _LOG.info(
            "loaded %s model %s on %s (%s)",
            self.modality.name,
            redact(self.preprocessor.resolved.model_id),
            self.settings.device,
            self.settings.precision,
        )
        return encoder

    def embedder(self, encoder: Encoder[Any] | Callable[[], Encoder[Any]]) -> Embedder:
        """An embedder of ``encoder`` (or of what a function ``encoder`` loads) on this handler's runtime."""
        runtime = TorchRuntime(self.settings.device, self.settings.precision)
        return Embedder(self.preprocessor, encoder, runtime, self.settings.micro_batch_size)

    def run_inference(
        self,
        batch: Sequence[Keyed],
        model: Embedder,
        inference_args: dict[str, Any] | None = None,
    ) -> Iterable[Outcome]:
        """``model``: what ``load_model`` returned, or its proxy."""
        if not batch:
            return []
        self._progress.add(len(batch))
        try:
            vectors = model.embed([prepared for _, prepared in batch])
        except Exception as exc:  # noqa: BLE001 - retried one by one so only the poison record fails
            if len(batch) == 1:
                return [self._failure(batch[0], exc)]
            return [outcome for item in batch for outcome in self.run_inference([item], model)]
        return [_checked(item, vector) for item, vector in zip(batch, vectors, strict=True)]

    def _failure(self, item: Keyed, exc: Exception) -> Outcome:
        record_id, prepared = item
        _LOG.warning("%s model failed on record %s: %s", self.modality.name, record_id, exc)
        error = EncodeError(f"the model failed: {exc!r}", error_type="model_error")
        return Outcome(record_id, prepared.source, error=error, copies=prepared.copies)

    def get_num_bytes(self, batch: Sequence[Keyed]) -> int:
        return sum(prepared.cost for _, prepared in batch) * 4

    def get_metrics_namespace(self) -> str:
        return f"mmfeatures.{self.modality.name}"


def _checked(item: Keyed, vector: np.ndarray) -> Outcome:
    record_id, prepared = item
    if not np.all(np.isfinite(vector)):
        error = EncodeError("the embedding holds NaN or Inf", error_type="non_finite_embedding")
        return Outcome(record_id, prepared.source, error=error, copies=prepared.copies)
    return Outcome(
        record_id, prepared.source, vector=vector.astype(np.float32), digest=prepared.digest, copies=prepared.copies
    )
