"""An encoder with what running it takes: its runtime, micro-batches of a fixed size, and pooling."""

from __future__ import annotations

import contextlib
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from mmfeatures.host import CPU_TURNS
from mmfeatures.inference.runtime import Runtime
from mmfeatures.modalities.base import Encoder, Prepared, Preprocessor, Window


class Embedder:
    """Embeds batches of prepared records with one encoder on one runtime.

    ``embed`` is the one call a batch needs, taking and returning numpy arrays, so the same object
    serves threads in its process or, behind Beam's multi-process proxy, other processes.
    ``encoder`` may be a function that loads it: then it is loaded on first use, once, so a worker
    whose input holds no record of this modality never pays for its model.
    """

    def __init__(
        self,
        preprocessor: Preprocessor,
        encoder: Encoder[Any] | Callable[[], Encoder[Any]],
        runtime: Runtime[Any],
        micro_batch_size: int,
    ):
        self.preprocessor = preprocessor
        self._encoder = encoder if isinstance(encoder, Encoder) else None
        self._load = None if isinstance(encoder, Encoder) else encoder
        self._loading = threading.Lock()
        self.runtime = runtime
        self.micro_batch_size = micro_batch_size
        self._lanes: ThreadPoolExecutor | None = None

    @property
    def encoder(self) -> Encoder[Any]:
        """The encoder, loaded now if it was not."""
        if self._encoder is None:
            with self._loading:
                if self._encoder is None and self._load is not None:
                    self._encoder = self._load()
        assert self._encoder is not None
        return self._encoder

    def fallback(self) -> str | None:
        """Why the encoder runs on torch instead of the runtime asked, where it does (known once it
        has embedded a batch)."""
        return None if self._encoder is None else self.runtime.fallback(self._encoder)

    def embed(self, records: Sequence[Prepared]) -> list[np.ndarray]:
        """Embed every window of every record, then mean-pool each record's windows.

        The outputs stay on the device until the batch is done, so an asynchronous runtime runs
        ahead of the host (one copy to the host per batch, not per pass). A synchronous one takes
        its turn at the cores (``host.CoreTurns``) with the batch already stacked beside the
        preparing threads, and pools within its turn, before they take the GIL again.
        """
        windows = [window for record in records for window in record.windows]
        passes: Iterable[tuple[list[int], dict[str, Any]]] = self.micro_batches(windows)
        asynchronous = self.runtime.asynchronous
        if not asynchronous:
            passes = list(passes)
        with contextlib.nullcontext() if asynchronous else CPU_TURNS.model_turn():
            chunks: list[list[int]] = []  # each pass's windows, noted as its inputs are taken

            def inputs() -> Iterator[dict[str, Any]]:
                for indices, tensors in passes:
                    chunks.append(indices)
                    yield tensors

            outputs = [output[: len(chunks[n])] for n, output in enumerate(self.forward_passes(inputs()))]
            order = [index for chunk in chunks for index in chunk]
            on_host = self.runtime.to_host(outputs)
            if on_host.shape[1] != self.encoder.dimension:  # the tables' columns are sized by it
                raise ValueError(
                    f"the model gives {on_host.shape[1]}-d embeddings, not the {self.encoder.dimension} "
                    "its configuration declares"
                )
            per_window = np.empty((len(windows), self.encoder.dimension), dtype=np.float32)
            per_window[order] = on_host
            pooled, start = [], 0
            for record in records:
                stop = start + len(record.windows)
                pooled.append(per_window[start:stop].mean(axis=0))
                start = stop
        return pooled

    def forward_passes(self, passes: Iterable[dict[str, Any]]) -> Iterator[Any]:
        """Each pass's output, in order: side by side on the runtime's lanes where it has several."""
        encoder = self.encoder
        if self.runtime.lanes == 1:
            return (self.runtime.forward(encoder, inputs) for inputs in passes)
        if self._lanes is None:
            with self._loading:
                if self._lanes is None:
                    self._lanes = ThreadPoolExecutor(
                        self.runtime.lanes,
                        f"{self.preprocessor.name}-lane",
                        initializer=torch.set_num_threads,
                        initargs=(1,),
                    )
        return self._lanes.map(lambda inputs: self.runtime.forward(encoder, inputs), passes)

    def micro_batches(self, windows: Sequence[Window]) -> Iterator[tuple[list[int], dict[str, Any]]]:
        """``(window indices, inputs on the device)`` per micro-batch.

        Windows are grouped by padded length and stacked in micro-batches of exactly
        ``micro_batch_size`` rows (the last one filled with repeats), so every forward pass has a
        shape that depends on the window alone: CPU and GPU kernels pick their algorithm by shape,
        and this keeps a record's embedding identical whatever it was batched with.
        """
        by_length: dict[int, list[int]] = defaultdict(list)
        for index, window in enumerate(windows):
            by_length[self.preprocessor.padded_length(window)].append(index)
        size = self.micro_batch_size
        encoder = self.encoder
        for length, indices in sorted(by_length.items()):
            for start in range(0, len(indices), size):
                chunk = indices[start : start + size]
                rows = [windows[i] for i in chunk]
                rows += [rows[0]] * (size - len(rows))
                yield chunk, self.runtime.to_device(encoder.collate(rows, length))
