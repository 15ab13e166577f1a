"""Where an encoder's forward passes run: a device, a precision, and how arrays move on and off it.

The embedder speaks to a runtime through this small interface, so that the same batching and
pooling drive any runtime chosen when the model loads.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, Generic, TypeVar

import numpy as np
import torch

from mmfeatures.modalities.base import Batch, Encoder
from mmfeatures.settings import device_type

_Array = TypeVar("_Array")


class Runtime(ABC, Generic[_Array]):
    """Runs an encoder's forward passes on one device."""

    #: True where passes are queued and run beside the host (a GPU): then the host keeps preparing
    #: records meanwhile, instead of taking turns with the model at the cores.
    asynchronous: bool = False

    @abstractmethod
    def to_device(self, batch: Batch) -> dict[str, _Array]:
        """A collated batch moved onto the device."""

    @abstractmethod
    def forward(self, encoder: Encoder[_Array], inputs: dict[str, _Array]) -> _Array:
        """``encoder.forward`` at the runtime's precision: float32 embeddings, left on the device."""

    @abstractmethod
    def to_host(self, outputs: Sequence[_Array]) -> np.ndarray:
        """Outputs of several passes, in order, as one float32 array on the host."""


class TorchRuntime(Runtime[torch.Tensor]):
    """PyTorch on a CPU or a CUDA device; fp32, or bf16 and fp16 under autocast."""

    AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

    def __init__(self, device: str, precision: str):
        self.device = device
        self.precision = precision
        self.asynchronous = device_type(device) == "cuda"

    def to_device(self, batch: Batch) -> dict[str, torch.Tensor]:
        """On CUDA the host tensors are pinned and copied without blocking, overlapping the copy
        with compute."""
        tensors = {name: torch.from_numpy(array) for name, array in batch.items()}
        if self.asynchronous:
            return {name: t.pin_memory().to(self.device, non_blocking=True) for name, t in tensors.items()}
        return tensors

    def forward(self, encoder: Encoder[torch.Tensor], inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.inference_mode(), self._autocast():
            return encoder.forward(inputs).float()

    def to_host(self, outputs: Sequence[torch.Tensor]) -> np.ndarray:
        return torch.cat(list(outputs)).cpu().numpy()

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        dtype = self.AUTOCAST[self.precision]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device_type(self.device), dtype=dtype)
