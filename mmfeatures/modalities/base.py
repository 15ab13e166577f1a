"""The small interface every modality implements, so that one transform and one ModelHandler can
drive text, image and audio alike (and a new modality is one module plus one registry entry).

A modality runs in two places:
- preprocessing workers: ``setup`` (light: tokenizer, processor settings), ``decode`` and
  ``preprocess``, which turn a payload into model-ready *windows*;
- the model handler: ``load_model``, ``collate`` and ``encode``, which embed batches of windows.
A record may need several windows (long text, long audio); their embeddings are mean-pooled.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from mmfeatures.encoders.models import ResolvedModel, resolve_model
from mmfeatures.limits import Limits

Window = dict[str, np.ndarray]


def round_up(length: int, multiple: int, cap: int) -> int:
    """``length`` rounded up to a multiple of ``multiple``, but never past ``cap``."""
    return min(-(-length // multiple) * multiple, max(cap, length))


@dataclass(frozen=True)
class Prepared:
    """One record's model input for one modality."""

    windows: list[Window]
    source: str | None = None  # where the input came from, for error rows

    @property
    def cost(self) -> int:
        """Batch weight: the number of values the model will read (tokens, pixels, frames)."""
        return sum(int(next(iter(window.values())).size) for window in self.windows)


class Modality(ABC):
    """Base class: subclasses fill in the model-specific steps."""

    name: ClassVar[str]
    inline: ClassVar[bool] = False  # True when the manifest holds the content itself (text)
    default_batch_cost: ClassVar[int]  # most input values in one RunInference batch
    # Records whose raw values ``preprocess_batch`` takes in one call: more than 1 where the
    # preprocessing has a faster batched form (a tokenizer's), 1 where each record stands alone.
    preprocess_batch_size: ClassVar[int] = 1

    def __init__(self, model: str = "default", limits: Limits | None = None):
        self.model_reference = model
        self.limits = limits or Limits()

    @property
    def resolved(self) -> ResolvedModel:
        return resolve_model(self.name, self.model_reference)

    # -- preprocessing workers -------------------------------------------------------------
    @abstractmethod
    def setup(self) -> None:
        """Load what preprocessing needs (never the weights). Idempotent."""

    @abstractmethod
    def decode(self, payload: bytes | str) -> Any:
        """Bytes (or inline text) to a raw value; raises ``DecodeError``."""

    @abstractmethod
    def preprocess(self, raw: Any) -> list[Window]:
        """A raw value to one or more model-ready windows; raises ``PreprocessError``."""

    def preprocess_batch(self, raws: list[Any]) -> list[list[Window]]:
        """``preprocess`` of several raw values in one call, each giving the windows it would give
        alone. Modalities with a batched form override it; a failure fails the whole call."""
        return [self.preprocess(raw) for raw in raws]

    @abstractmethod
    def settings(self) -> dict[str, Any]:
        """The preprocessing settings recorded in the output's metadata."""

    # -- model handler ---------------------------------------------------------------------
    @abstractmethod
    def load_model(self, device: str) -> torch.nn.Module:
        """The encoder, in eval mode on ``device``, gradients off."""

    def padded_length(self, window: Window) -> int:
        """The length this window is padded to (tokens, frames, samples), a function of the window
        alone so that its embedding never depends on what it is batched with; 0 when inputs have
        a fixed size."""
        return 0

    @abstractmethod
    def collate(self, windows: list[Window], length: int = 0) -> dict[str, torch.Tensor]:
        """Stack windows into one batch of CPU tensors, padded to at least ``length``."""

    @abstractmethod
    def encode(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """One embedding per window: a float tensor [len(windows), dim]."""

    @abstractmethod
    def dimension(self) -> int:
        """The embedding dimension, known without loading the weights."""

    def describe(self) -> dict[str, Any]:
        """What the output records about this modality's model."""
        self.setup()
        resolved = self.resolved
        return {
            "model_id": resolved.model_id,
            "weights_sha256": resolved.weights_sha256(),
            "dimension": self.dimension(),
            "preprocessing": self.settings(),
        }
