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
from mmfeatures.inference.onnx_runtime import OnnxRuntime
from mmfeatures.inference.runtime import Runtime
from mmfeatures.inference.torch_runtime import TorchRuntime
from mmfeatures.modalities.base import Encoder, Modality, Prepared, Preprocessor
from mmfeatures.progress import Progress
from mmfeatures.records import Record
from mmfeatures.redaction import redact
from mmfeatures.settings import InferenceSettings

_LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    """One record's result: an embedding, the error that stopped it, or neither for a record that
    had nothing to embed."""

    record: Record
    source: str | None = None
    vector: np.ndarray | None = None
    error: RecordError | None = None
    digest: str | None = None  # of the content embedded
    fallback: str | None = None  # why the vector was made on torch instead of the runtime asked


class EmbeddingModelHandler(ModelHandler[Keyed, Outcome, Embedder]):
    """Embeds batches of ``(record, Prepared)`` pairs with ``modality``'s encoder, loaded for
    ``preprocessor``'s model and run as ``settings`` say; a record paired with None passes through."""

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
        """An embedder of ``encoder`` (or of what a function ``encoder`` loads) on this handler's
        runtime, which makes it ready (``Runtime.compile``) when it is first used."""
        runtime = self.runtime()

        def compiled() -> Encoder[Any]:
            loaded = encoder if isinstance(encoder, Encoder) else encoder()
            return runtime.compile(loaded, self.preprocessor.resolved.weights_sha256)

        return Embedder(self.preprocessor, compiled, runtime, self.settings.micro_batch_size)

    def runtime(self) -> Runtime[Any]:
        """The runtime that ``settings`` names, on their device."""
        if self.settings.runtime == "onnx":
            return OnnxRuntime(self.settings.device)
        return TorchRuntime(self.settings.device, self.settings.precision)

    def run_inference(
        self,
        batch: Sequence[Keyed],
        model: Embedder,
        inference_args: dict[str, Any] | None = None,
    ) -> Iterable[Outcome]:
        """``model``: what ``load_model`` returned, or its proxy."""
        passing = [Outcome(record) for record, prepared in batch if prepared is None]
        return passing + self._embed([(r, p) for r, p in batch if p is not None], model)

    def _embed(self, batch: list[tuple[Record, Prepared]], model: Embedder) -> list[Outcome]:
        if not batch:
            return []
        self._progress.add(len(batch))
        try:
            vectors = model.embed([prepared for _, prepared in batch])
        except Exception as exc:  # noqa: BLE001 - retried one by one so only the poison record fails
            if len(batch) == 1:
                return [self._failure(*batch[0], exc)]
            return [outcome for item in batch for outcome in self._embed([item], model)]
        fallback = model.fallback()
        return [_checked(*item, vector, fallback) for item, vector in zip(batch, vectors, strict=True)]

    def _failure(self, record: Record, prepared: Prepared, exc: Exception) -> Outcome:
        _LOG.warning("%s model failed on record %s: %s", self.modality.name, record.id, exc)
        error = EncodeError(f"the model failed: {exc!r}", error_type="model_error")
        return Outcome(record, prepared.source, error=error)

    def get_num_bytes(self, batch: Sequence[Keyed]) -> int:
        return sum(prepared.cost for _, prepared in batch if prepared is not None) * 4

    def get_metrics_namespace(self) -> str:
        return f"mmfeatures.{self.modality.name}"


def _checked(record: Record, prepared: Prepared, vector: np.ndarray, fallback: str | None) -> Outcome:
    if not np.all(np.isfinite(vector)):
        error = EncodeError("the embedding holds NaN or Inf", error_type="non_finite_embedding")
        return Outcome(record, prepared.source, error=error)
    vector = vector.astype(np.float32)
    return Outcome(record, prepared.source, vector=vector, digest=prepared.digest, fallback=fallback)
