"""One ModelHandler for every modality, and the batching in front of it.

``BatchByCost`` groups prepared records into batches weighed by cost (tokens, pixels, mel values),
one length bucket at a time, cut to whole micro-batches; Beam's ``RunInference`` then loads the
model once per worker process (shared by its threads, or by processes with ``model_copies``) and
calls ``run_inference`` on each batch. A batch that raises is retried record by record, so one
poison record fails alone; an embedding with NaN or Inf becomes an error, never a feature.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Iterable, Iterator, Optional, Sequence

import apache_beam as beam
import numpy as np
import torch
from apache_beam.ml.inference.base import ModelHandler
from apache_beam.utils.windowed_value import WindowedValue
from torch.nn.utils.fusion import fuse_conv_bn_eval
from transformers.utils import logging as transformers_logging

from mmfeatures.errors import EncodeError, RecordError
from mmfeatures.host import CPU_TURNS, available_cores, settle_worker_process
from mmfeatures.modalities.base import Modality, Prepared, Window
from mmfeatures.progress import Progress
from mmfeatures.redaction import redact

_LOG = logging.getLogger(__name__)

Keyed = tuple[str, Prepared]

# Autocast dtypes; "fp32" runs the model as loaded.
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

# Micro-batch rows per device type and modality (others: "default"). Measured on 2 CPU cores: MiniLM
# runs short sentences 3x faster 8 at a time, MobileNetV2 is fastest 4 at a time (slower at 8 and
# more: its activations leave the caches), and the Whisper encoder gains under 10% from batching
# clips of a second or more, less than the repeats that fill a bucket's last micro-batch cost. A GPU
# needs many rows per pass to stay busy. The batch cost is scaled up on a GPU to hold many passes.
MICRO_BATCH_SIZES = {
    "cpu": {"text": 8, "image": 4, "audio": 1, "default": 8},
    "cuda": {"default": 64},
}
BATCH_COST_FACTORS = {"cpu": 1, "cuda": 16}

# BatchByCost holds at most this many batches' cost across its length buckets: memory stays
# bounded by the batch size, whatever the input's size or spread of lengths.
BUFFERED_BATCHES = 4
# A length bucket goes out once it fills this many micro-batches, whatever its cost: short inputs
# would otherwise wait for thousands of records while the model idles. On a CPU a batch is one turn
# of the model at the cores (see CoreTurns), and each turn costs something of its own: its first
# pass runs 3.5 ms slower as it refills the caches that preparing used, and the preparing threads
# stop and start. That tells where preparing is heavy: with 16 micro-batches of 4 images a turn
# rather than 8, a 4,000-image job ran about 1 s (3%) faster (32 gained nothing more), while
# texts ran the same at 8 and 16. A GPU gains nothing from more passes in one batch: it already
# runs them without waiting for the host.
MICRO_BATCHES_PER_BATCH = {
    "cpu": {"image": 16, "default": 8},
    "cuda": {"default": 8},
}


def device_type(device: str) -> str:
    """``cpu`` or ``cuda`` (for ``cuda:1`` too)."""
    return torch.device(device).type


def per_device_and_modality(table: dict[str, dict[str, int]], modality: Modality, device: str) -> int:
    """``table``'s value for the device's type and the modality, or that device type's default."""
    values = table[device_type(device)]
    return values.get(modality.name, values["default"])


def default_micro_batch_size(modality: Modality, device: str) -> int:
    return per_device_and_modality(MICRO_BATCH_SIZES, modality, device)


def default_batch_cost(modality: Modality, device: str) -> int:
    return modality.default_batch_cost * BATCH_COST_FACTORS[device_type(device)]


@dataclass(frozen=True)
class Outcome:
    """One record's result: an embedding, or the error that stopped it."""

    record_id: str
    source: str | None
    vector: np.ndarray | None = None
    error: RecordError | None = None


# -- batching ------------------------------------------------------------------------------------
@dataclass
class _Bucket:
    items: list[Keyed] = field(default_factory=list)
    cost: int = 0
    windows: int = 0


class CostBatcher:
    """Cuts a stream of prepared records into batches of about ``max_batch_cost`` input values.

    Records are bucketed by the padded length of their longest window, so a batch holds records of
    one length and its micro-batches are full rows, not padding; a bucket goes out once it holds
    ``max_batch_cost`` or ``micro_batches_per_batch`` micro-batches (and at least one), cut to a
    whole number of micro-batches with the rest kept for the next batch. When all buckets together
    hold more than ``BUFFERED_BATCHES`` batches' worth, the fullest goes out early. ``flush``
    empties every bucket.
    """

    def __init__(self, modality: Modality, max_batch_cost: int, micro_batch_size: int, micro_batches_per_batch: int):
        self.modality = modality
        self.max_batch_cost = max_batch_cost
        self.micro_batch_size = micro_batch_size
        self.micro_batches_per_batch = micro_batches_per_batch
        self._buckets: dict[int, _Bucket] = defaultdict(_Bucket)
        self._buffered_cost = 0

    def add(self, item: Keyed) -> Iterator[list[Keyed]]:
        """Buffer one record; yield the batches it completes."""
        prepared = item[1]
        length = max(self.modality.padded_length(window) for window in prepared.windows)
        bucket = self._buckets[length]
        bucket.items.append(item)
        bucket.cost += prepared.cost
        bucket.windows += len(prepared.windows)
        self._buffered_cost += prepared.cost
        rows = self.micro_batch_size
        enough = bucket.cost >= self.max_batch_cost or bucket.windows >= self.micro_batches_per_batch * rows
        if enough and bucket.windows >= rows:
            yield self._cut(length)
        while self._buffered_cost > BUFFERED_BATCHES * self.max_batch_cost:
            yield self._cut(max(self._buckets, key=lambda key: self._buckets[key].cost))

    def flush(self) -> Iterator[list[Keyed]]:
        """Every buffered record, one batch per bucket."""
        for length in sorted(self._buckets):
            bucket = self._buckets.pop(length)
            self._buffered_cost -= bucket.cost
            yield bucket.items

    def _cut(self, length: int) -> list[Keyed]:
        """The bucket's oldest records that fill whole micro-batches (all of them if none do)."""
        bucket = self._buckets[length]
        take, windows = len(bucket.items), 0
        for index, (_, prepared) in enumerate(bucket.items, start=1):
            windows += len(prepared.windows)
            if windows % self.micro_batch_size == 0:
                take = index
        batch, bucket.items = bucket.items[:take], bucket.items[take:]
        cost = sum(prepared.cost for _, prepared in batch)
        bucket.cost -= cost
        bucket.windows -= sum(len(prepared.windows) for _, prepared in batch)
        self._buffered_cost -= cost
        if not bucket.items:
            del self._buckets[length]
        return batch


class _BatchByCostFn(beam.DoFn):
    """A ``CostBatcher`` per window, emptied at the end of each bundle."""

    def __init__(self, handler: "EmbeddingModelHandler"):
        self.handler = handler

    def setup(self) -> None:
        self.handler.modality.setup()  # padded_length needs the tokenizer or feature extractor

    def start_bundle(self) -> None:
        self._batchers: dict[Any, CostBatcher] = {}

    def process(self, item: Keyed, window: Any = beam.DoFn.WindowParam) -> Iterator[list[Keyed]]:
        if window not in self._batchers:
            self._batchers[window] = self.handler.batcher()
        yield from self._batchers[window].add(item)

    def finish_bundle(self) -> Iterator[WindowedValue]:
        for window, batcher in self._batchers.items():
            for batch in batcher.flush():
                yield WindowedValue(batch, window.max_timestamp(), (window,))
        self._batchers = {}


class BatchByCost(beam.PTransform):
    """``(id, Prepared)`` pairs to the batches ``handler`` embeds (see ``CostBatcher``)."""

    def __init__(self, handler: "EmbeddingModelHandler"):
        super().__init__()
        self.handler = handler

    def expand(self, records: beam.PCollection) -> beam.PCollection:
        return records | beam.ParDo(_BatchByCostFn(self.handler))


# -- running the model ---------------------------------------------------------------------------
class Embedder:
    """A model with what running it takes: its device, precision and micro-batch size.

    ``embed`` is the one call a batch needs, taking and returning numpy arrays, so the same object
    serves threads in its process or, behind Beam's multi-process proxy, other processes. ``model``
    may be a function that loads it: then it is loaded on first use, once, so a worker whose input
    holds no record of this modality never pays for its model.
    """

    def __init__(
        self,
        modality: Modality,
        model: torch.nn.Module | Callable[[], torch.nn.Module],
        *,
        device: str,
        precision: str,
        micro_batch_size: int,
    ):
        self.modality = modality
        self._model = model if isinstance(model, torch.nn.Module) else None
        self._load = None if isinstance(model, torch.nn.Module) else model
        self._loading = threading.Lock()
        self._channels_last = False
        self.device = device
        self.precision = precision
        self.micro_batch_size = micro_batch_size
        self._on_cuda = device_type(device) == "cuda"

    @property
    def model(self) -> torch.nn.Module:
        return self._loaded()[0]

    def _loaded(self) -> tuple[torch.nn.Module, bool]:
        """The model, loaded now if it was not, and whether it runs channels-last: a convolutional
        network that this object loads does (see ``optimize_convolutions``)."""
        if self._model is None:
            with self._loading:
                if self._model is None and self._load is not None:
                    model = self._load()
                    self._channels_last = any(isinstance(m, torch.nn.Conv2d) for m in model.modules())
                    self._model = optimize_convolutions(model) if self._channels_last else model
        return self._model, self._channels_last

    def embed(self, records: Sequence[Prepared]) -> list[np.ndarray]:
        """Embed every window of every record, then mean-pool each record's windows.

        The outputs stay on the device until the batch is done, so a GPU runs ahead of the host
        (one device-to-host copy per batch, not per micro-batch). Pooling is done in the model's
        turn too: after it, the preparing threads take the GIL, and the same pooling took 1.1 s
        over 4,000 images, against 0.04 s within the turn.
        """
        windows = [window for record in records for window in record.windows]
        outputs, order = [], []
        passes: Iterable[tuple[list[int], dict[str, torch.Tensor]]] = self.micro_batches(windows)
        if not self._on_cuda:
            # Stacked before the model's turn, beside the preparing threads: within it, one core
            # would wait while the other copies (0.6 s over 4,000 images).
            passes = list(passes)
        with contextlib.nullcontext() if self._on_cuda else CPU_TURNS.model_turn():
            for indices, tensors in passes:
                outputs.append(self.forward(tensors)[: len(indices)])
                order += indices
            per_window = np.empty((len(windows), outputs[0].shape[1]), dtype=np.float32)
            per_window[order] = torch.cat(outputs).cpu().numpy()
            pooled, start = [], 0
            for record in records:
                stop = start + len(record.windows)
                pooled.append(per_window[start:stop].mean(axis=0))
                start = stop
        return pooled

    def micro_batches(self, windows: Sequence[Window]) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
        """``(window indices, tensors on the device)`` per micro-batch.

        Windows are grouped by padded length and stacked in micro-batches of exactly
        ``micro_batch_size`` rows (the last one filled with repeats), so every forward pass has a
        shape that depends on the window alone: CPU and GPU kernels pick their algorithm by shape,
        and this keeps a record's embedding identical whatever it was batched with. On CUDA the
        host tensors are pinned and copied without blocking, overlapping the copy with compute.
        """
        by_length: dict[int, list[int]] = defaultdict(list)
        for index, window in enumerate(windows):
            by_length[self.modality.padded_length(window)].append(index)
        size = self.micro_batch_size
        _, channels_last = self._loaded()
        for length, indices in sorted(by_length.items()):
            for start in range(0, len(indices), size):
                chunk = indices[start : start + size]
                rows = [windows[i] for i in chunk]
                rows += [rows[0]] * (size - len(rows))
                tensors = self.modality.collate(rows, length)
                if channels_last:  # images [rows, channels, height, width]
                    tensors = {
                        name: t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t
                        for name, t in tensors.items()
                    }
                if self._on_cuda:
                    tensors = {name: t.pin_memory().to(self.device, non_blocking=True) for name, t in tensors.items()}
                yield chunk, tensors

    def forward(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """One float32 embedding per row, left on the device."""
        with torch.inference_mode(), self._autocast():
            return self.modality.encode(self.model, tensors).float()

    def _autocast(self) -> ContextManager[Any]:
        dtype = PRECISIONS[self.precision]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device_type(self.device), dtype=dtype)


def optimize_convolutions(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen convolutional network made ready for inference: each batch norm that follows a
    convolution in an ``nn.Sequential`` folded into that convolution's weights, and the weights
    laid out channels-last, oneDNN's and cuDNN's fastest layout.

    A batch norm in eval mode is a fixed per-channel scale and shift, so folding it changes the
    output by float rounding alone (2e-6 relative for MobileNetV2), and saves a pass over every
    activation: on 2 CPU cores, passes of 4 images took 5.0 ms an image folded against 10.3 ms
    unfolded (both channels-last), and the benchmark's model step went from about 130 to about 190
    images/s.
    """
    for sequence in [module for module in model.modules() if isinstance(module, torch.nn.Sequential)]:
        for index in range(len(sequence) - 1):
            convolution, norm = sequence[index], sequence[index + 1]
            if (
                isinstance(convolution, torch.nn.Conv2d)
                and isinstance(norm, torch.nn.BatchNorm2d)
                and not convolution.training
                and not norm.training
            ):
                sequence[index] = fuse_conv_bn_eval(convolution, norm)
                sequence[index + 1] = torch.nn.Identity()
    return model.to(memory_format=torch.channels_last)


class EmbeddingModelHandler(ModelHandler[Keyed, Outcome, Embedder]):
    """Embeds batches of ``(record_id, Prepared)`` pairs, made by ``BatchByCost``, with
    ``modality``'s model on ``device``.

    ``threads``: torch's intra-op threads in the worker process (None: one per core it may use),
    set once, when the model is loaded. ``model_copies``: load that many copies per machine, shared
    by all of its worker processes (Beam's multi-process shared model), instead of one per process.
    """

    def __init__(
        self,
        modality: Modality,
        *,
        device: str = "cpu",
        max_batch_cost: int,
        micro_batch_size: int = MICRO_BATCH_SIZES["cpu"]["default"],
        precision: str = "fp32",
        threads: int | None = None,
        model_copies: int | None = None,
    ):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, not {precision!r}")
        super().__init__(model_copies=model_copies)
        self.modality = modality
        self.device = device
        self.max_batch_cost = max_batch_cost
        self.micro_batch_size = micro_batch_size
        self.precision = precision
        self.threads = threads
        self._progress = Progress(f"{modality.name} records embedded", every=500)

    def batcher(self) -> CostBatcher:
        """A ``CostBatcher`` cutting the batches this handler embeds."""
        return CostBatcher(
            self.modality,
            self.max_batch_cost,
            self.micro_batch_size,
            per_device_and_modality(MICRO_BATCHES_PER_BATCH, self.modality, self.device),
        )

    def should_skip_batching(self) -> bool:
        return True  # the input is already batched by BatchByCost, which Beam's BatchElements cannot do

    def load_model(self) -> Embedder:
        """Check the device and set torch's threads and the allocator for this process now; the
        weights are loaded with the first batch (see ``Embedder``)."""
        if device_type(self.device) == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("--device cuda was asked for, but torch sees no CUDA device")
        threads = self.threads or available_cores()
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        settle_worker_process()
        transformers_logging.disable_progress_bar()  # one bar per worker and model is noise in job logs
        self.modality.setup()
        return self.embedder(self._load_weights)

    def _load_weights(self) -> torch.nn.Module:
        model = self.modality.load_model(self.device)
        model_id = redact(self.modality.resolved.model_id)
        _LOG.info(
            "loaded %s model %s on %s (%s, %d torch threads)",
            self.modality.name,
            model_id,
            self.device,
            self.precision,
            torch.get_num_threads(),
        )
        return model

    def embedder(self, model: torch.nn.Module | Callable[[], torch.nn.Module]) -> Embedder:
        return Embedder(
            self.modality, model, device=self.device, precision=self.precision, micro_batch_size=self.micro_batch_size
        )

    def run_inference(
        self,
        batch: Sequence[Keyed],
        model: Embedder | torch.nn.Module,
        inference_args: Optional[dict[str, Any]] = None,
    ) -> Iterable[Outcome]:
        """``model``: what ``load_model`` returned (or its proxy), or a bare module, which is wrapped."""
        if not batch:
            return []
        embedder = self.embedder(model) if isinstance(model, torch.nn.Module) else model
        self._progress.add(len(batch))
        try:
            vectors = embedder.embed([prepared for _, prepared in batch])
        except Exception as exc:  # noqa: BLE001 - retried one by one so only the poison record fails
            if len(batch) == 1:
                return [self._failure(batch[0], exc)]
            return [outcome for item in batch for outcome in self.run_inference([item], embedder)]
        return [_checked(item, vector) for item, vector in zip(batch, vectors)]

    def _failure(self, item: Keyed, exc: Exception) -> Outcome:
        record_id, prepared = item
        _LOG.warning("%s model failed on record %s: %s", self.modality.name, record_id, exc)
        error = EncodeError(f"the model failed: {exc!r}", error_type="model_error")
        return Outcome(record_id, prepared.source, error=error)

    def get_num_bytes(self, batch: Sequence[Keyed]) -> int:
        return sum(prepared.cost for _, prepared in batch) * 4

    def get_metrics_namespace(self) -> str:
        return f"mmfeatures.{self.modality.name}"


def _checked(item: Keyed, vector: np.ndarray) -> Outcome:
    record_id, prepared = item
    if not np.all(np.isfinite(vector)):
        error = EncodeError("the embedding holds NaN or Inf", error_type="non_finite_embedding")
        return Outcome(record_id, prepared.source, error=error)
    return Outcome(record_id, prepared.source, vector=vector.astype(np.float32))
