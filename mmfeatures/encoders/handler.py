"""One ModelHandler for every modality: Beam's RunInference batches the prepared records, loads
the model once per worker process (shared by its threads) and calls ``run_inference``.

A batch that raises is retried record by record, so one poison record fails alone; an embedding
with NaN or Inf becomes an error, never a feature.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import torch
from apache_beam.ml.inference.base import ModelHandler
from transformers.utils import logging as transformers_logging

from mmfeatures.errors import EncodeError, RecordError
from mmfeatures.modalities.base import Modality, Prepared
from mmfeatures.progress import Progress
from mmfeatures.redaction import redact

_LOG = logging.getLogger(__name__)

Keyed = tuple[str, Prepared]


@dataclass(frozen=True)
class Outcome:
    """One record's result: an embedding, or the error that stopped it."""

    record_id: str
    source: str | None
    vector: np.ndarray | None = None
    error: RecordError | None = None


class EmbeddingModelHandler(ModelHandler[Keyed, Outcome, torch.nn.Module]):
    """Embeds ``(record_id, Prepared)`` pairs with ``modality``'s model on ``device``.

    Batches are weighed by cost (tokens, pixels, mel values), capped at ``max_batch_cost``; the
    model runs on fixed-shape micro-batches of ``micro_batch_size`` windows.
    """

    def __init__(
        self, modality: Modality, *, device: str = "cpu", max_batch_cost: int, micro_batch_size: int = 8
    ):
        super().__init__(
            min_batch_size=1,
            max_batch_size=max_batch_cost,  # with element_size_fn this caps the batch's weight
            element_size_fn=_cost,
        )
        self.modality = modality
        self.device = device
        self.micro_batch_size = micro_batch_size
        self._progress = Progress(f"{modality.name} records embedded", every=500)

    def load_model(self) -> torch.nn.Module:
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError("--device cuda was asked for, but torch sees no CUDA device")
        transformers_logging.disable_progress_bar()  # one bar per worker and model is noise in job logs
        self.modality.setup()
        model = self.modality.load_model(self.device)
        model_id = redact(self.modality.resolved.model_id)
        _LOG.info("loaded %s model %s on %s", self.modality.name, model_id, self.device)
        return model

    def run_inference(
        self,
        batch: Sequence[Keyed],
        model: torch.nn.Module,
        inference_args: Optional[dict[str, Any]] = None,
    ) -> Iterable[Outcome]:
        if not batch:  # BatchElements can emit an empty batch when one element outweighs the cap
            return []
        self._progress.add(len(batch))
        try:
            vectors = self._embed([prepared for _, prepared in batch], model)
        except Exception as exc:  # noqa: BLE001 - retried one by one so only the poison record fails
            if len(batch) == 1:
                return [self._failure(batch[0], exc)]
            return [outcome for item in batch for outcome in self.run_inference([item], model)]
        return [_checked(item, vector) for item, vector in zip(batch, vectors)]

    def _embed(self, records: list[Prepared], model: torch.nn.Module) -> list[np.ndarray]:
        """Embed every window of every record, then mean-pool each record's windows.

        Windows are grouped by padded length and run in micro-batches of exactly
        ``micro_batch_size`` rows (the last one filled with repeats), so every forward pass has a
        shape that depends on the window alone: CPU and GPU kernels pick their algorithm by shape,
        and this keeps a record's embedding identical whatever it was batched with.
        """
        windows = [window for record in records for window in record.windows]
        by_length: dict[int, list[int]] = defaultdict(list)
        for index, window in enumerate(windows):
            by_length[self.modality.padded_length(window)].append(index)
        embeddings: list[np.ndarray | None] = [None] * len(windows)
        size = self.micro_batch_size
        for length, indices in sorted(by_length.items()):
            for start in range(0, len(indices), size):
                chunk = indices[start : start + size]
                rows = [windows[i] for i in chunk]
                rows += [rows[0]] * (size - len(rows))
                tensors = {
                    name: tensor.to(self.device, non_blocking=True)
                    for name, tensor in self.modality.collate(rows, length).items()
                }
                with torch.inference_mode():
                    output = self.modality.encode(model, tensors).float().cpu().numpy()
                for row, index in enumerate(chunk):
                    embeddings[index] = output[row]
        pooled, start = [], 0
        for record in records:
            stop = start + len(record.windows)
            pooled.append(np.mean(embeddings[start:stop], axis=0))
            start = stop
        return pooled

    def _failure(self, item: Keyed, exc: Exception) -> Outcome:
        record_id, prepared = item
        _LOG.warning("%s model failed on record %s: %s", self.modality.name, record_id, exc)
        error = EncodeError(f"the model failed: {exc!r}", error_type="model_error")
        return Outcome(record_id, prepared.source, error=error)

    def get_num_bytes(self, batch: Sequence[Keyed]) -> int:
        return sum(_cost(item) for item in batch) * 4

    def get_metrics_namespace(self) -> str:
        return f"mmfeatures.{self.modality.name}"


def _cost(item: Keyed) -> int:
    return item[1].cost


def _checked(item: Keyed, vector: np.ndarray) -> Outcome:
    record_id, prepared = item
    if not np.all(np.isfinite(vector)):
        error = EncodeError("the embedding holds NaN or Inf", error_type="non_finite_embedding")
        return Outcome(record_id, prepared.source, error=error)
    return Outcome(record_id, prepared.source, vector=vector.astype(np.float32))
