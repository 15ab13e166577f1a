"""PyTorch as a runtime: a CPU or a CUDA device; fp32, or bf16 and fp16 under autocast."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from mmfeatures.host import available_cores
from mmfeatures.inference.runtime import Runtime
from mmfeatures.modalities.base import Batch, Encoder
from mmfeatures.settings import device_type

_LOG = logging.getLogger(__name__)


class TorchRuntime(Runtime[torch.Tensor]):
    """PyTorch on a CPU or a CUDA device; fp32, or bf16 and fp16 under autocast."""

    AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

    def __init__(self, device: str, precision: str):
        self.device = device
        self.precision = precision
        self.asynchronous = device_type(device) == "cuda"

    def prepare_process(self, threads: int | None) -> None:
        if self.asynchronous and not torch.cuda.is_available():
            raise RuntimeError("--device cuda was asked for, but torch sees no CUDA device")
        threads = threads or available_cores()
        self.lanes = 1 if self.asynchronous else threads
        per_pass = threads if self.asynchronous else 1
        if torch.get_num_threads() != per_pass:
            torch.set_num_threads(per_pass)
        _LOG.info("torch runs %d lane(s) of %d thread(s) in this worker process", self.lanes, per_pass)

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
