"""Where an encoder's forward passes run: a device, a precision, and how arrays move on and off it.

The embedder speaks to a runtime through this small interface, so that the same batching and
pooling drive any runtime chosen when the model loads.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

import numpy as np

from mmfeatures.modalities.base import Batch, Encoder

_Array = TypeVar("_Array")


class Runtime(ABC, Generic[_Array]):
    """Runs an encoder's forward passes on one device."""

    #: True where passes are queued and run beside the host (a GPU): then the host keeps preparing
    #: records meanwhile, instead of taking turns with the model at the cores.
    asynchronous: bool = False
    #: Passes run side by side on this many threads, each pass on one core (set by
    #: ``prepare_process``). On a CPU that is one per core: a pass of a few rows splits poorly
    #: across cores (docs/throughput.md has the measurements).
    lanes: int = 1

    @abstractmethod
    def prepare_process(self, threads: int | None) -> None:
        """Set up this worker process for the runtime: its device checked, ``threads`` compute
        threads (None: one per core the process may use): ``lanes`` of one thread each on a
        CPU, and one lane of ``threads`` on a GPU."""

    def compile(self, encoder: Encoder[Any], weights_sha256: Callable[[], str]) -> Encoder[_Array]:
        """``encoder`` (as its modality loaded it, in torch) made ready for this runtime, once per
        worker; ``weights_sha256`` gives the weights' sha256, for a runtime that keeps something
        made of them (it hashes every weight file: only one that needs it calls it)."""
        return encoder

    def fallback(self, encoder: Encoder[Any]) -> str | None:
        """Why ``encoder`` (as ``compile`` made it) runs on torch instead of this runtime, where it
        does; known once it has run a batch."""
        return None

    @abstractmethod
    def to_device(self, batch: Batch) -> dict[str, _Array]:
        """A collated batch moved onto the device."""

    @abstractmethod
    def forward(self, encoder: Encoder[_Array], inputs: dict[str, _Array]) -> _Array:
        """``encoder.forward`` at the runtime's precision: float32 embeddings, left on the device."""

    @abstractmethod
    def to_host(self, outputs: Sequence[_Array]) -> np.ndarray:
        """Outputs of several passes, in order, as one float32 array on the host."""
