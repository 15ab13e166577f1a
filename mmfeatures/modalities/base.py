"""The two small parts every modality is made of, as Beam splits preprocessing from its ModelHandler:

- a ``Preprocessor``, picklable and free of model state: it turns one record's payload (bytes, or
  inline text) into model-ready *windows* of numpy arrays. It runs in the preparing step's threads;
- an ``Encoder``, built when the model loads on a worker: it stacks windows into batches and runs
  the model on them (collate, forward, pooling). Which encoder serves a model is decided there,
  once. The interface names no deep-learning library: the arrays it takes and gives are numpy's,
  and ``forward`` works in whatever array type its runtime uses.

A record may need several windows (long text, long audio); their embeddings are mean-pooled. A
``Modality`` (the registry's entry) names a modality's two parts.
"""

from __future__ import annotations

import functools
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

import numpy as np

from mmfeatures.encoders.weights import DEFAULT, BundledModel, ResolvedModel, resolve_model
from mmfeatures.limits import Limits

Window = dict[str, np.ndarray]
Batch = dict[str, np.ndarray]

_Tool = TypeVar("_Tool")


def round_up(length: int, multiple: int, cap: int) -> int:
    """``length`` rounded up to a multiple of ``multiple``, but never past ``cap``."""
    return min(-(-length // multiple) * multiple, max(cap, length))


def per_thread(load: Callable[[str], _Tool]) -> Callable[[str], _Tool]:
    """``load(model)`` cached per thread and argument.

    Tokenizers and feature extractors hold buffers that two threads must not share, and are too
    heavy to pickle with every preprocessor: each thread that needs one loads its own, once.
    """
    local = threading.local()

    @functools.wraps(load)
    def cached(model: str) -> _Tool:
        tools: dict[str, _Tool] = local.__dict__.setdefault("tools", {})
        if model not in tools:
            tools[model] = load(model)
        return tools[model]

    return cached


@dataclass(frozen=True)
class Prepared:
    """One record's model input for one modality."""

    windows: list[Window]
    source: str | None = None  # where the input came from, for error rows
    digest: str | None = None  # the content's sha256 (``records.media_digest``), for the row's content hash

    @property
    def cost(self) -> int:
        """Batch weight: the number of values the model will read (tokens, pixels, frames)."""
        return sum(int(next(iter(window.values())).size) for window in self.windows)


class Preprocessor(ABC):
    """Decode and preprocess one modality's payloads for one model (the preparing step fetches them).

    Built where the job is launched, from a model reference (``default``, a folder, a URL or a
    Hugging Face id) and the input limits; it reads the model's preprocessing settings then, and
    carries them as plain values to the workers. Whatever is heavy (a tokenizer) is loaded per
    thread where it is used (``per_thread``).
    """

    name: ClassVar[str]
    default_model: ClassVar[BundledModel | None] = None  # what the model reference ``default`` names
    inline: ClassVar[bool] = False  # True when the manifest holds the content itself (text)
    batch_cost: ClassVar[int]  # most input values (tokens, pixels, mel values) in one batch
    # Most batches' cost the batcher holds across this modality's length buckets before it sends
    # the fullest out part-filled: room for every bucket to fill a batch of several passes.
    buffered_batches: ClassVar[int] = 4
    # Records whose raw values ``preprocess_batch`` takes in one call: more than 1 where the
    # preprocessing has a faster batched form (a tokenizer's), 1 where each record stands alone.
    preprocess_batch_size: ClassVar[int] = 1

    def __init__(self, model: str = DEFAULT, limits: Limits | None = None):
        self.model = model
        self.limits = limits or Limits()

    @property
    def resolved(self) -> ResolvedModel:
        """The model's local files, resolved on first use in each process (workers resolve their own)."""
        if self.model == DEFAULT and self.default_model is None:
            raise ValueError(f"there is no bundled {self.name} model: name one with --{self.name}_model")
        return resolve_model(self.model, self.default_model)

    def load_tools(self) -> None:
        """Load what preprocessing needs in the calling thread (a tokenizer), where it is loaded
        per thread: the preparing step calls it as each of its threads starts, so that a model that
        cannot be loaded fails the worker rather than every record. The default loads nothing."""
        return

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

    def padded_length(self, window: Window) -> int:
        """The length this window is padded to (tokens, frames, samples), a function of the window
        alone so that its embedding never depends on what it is batched with; 0 when inputs have
        a fixed size."""
        return 0

    @abstractmethod
    def settings(self) -> dict[str, Any]:
        """The preprocessing settings recorded in the output's metadata."""


_Array = TypeVar("_Array")


class Encoder(ABC, Generic[_Array]):
    """A loaded model and what running it takes: stacking windows, the forward pass, pooling.

    ``_Array`` is the runtime's array type (a torch tensor, say): ``forward`` takes the batch that
    ``collate`` stacked, moved onto the runtime's device, and gives one pooled embedding per row.
    """

    dimension: int
    # The axes of each input that vary between passes, by name (0, the rows, in every input):
    # dynamic in an ONNX export, so that one file serves every micro-batch size and length. None:
    # the encoder has no ONNX export, and its modality runs on torch.
    export_axes: ClassVar[dict[str, dict[int, str]] | None] = None

    @abstractmethod
    def collate(self, windows: Sequence[Window], length: int = 0) -> Batch:
        """Stack windows into one batch of host arrays, padded to at least ``length``."""

    @abstractmethod
    def forward(self, batch: dict[str, _Array]) -> _Array:
        """One embedding per row: ``[rows, dimension]``."""


@dataclass(frozen=True)
class Modality:
    """A registry entry: a modality's preprocessor and how its encoder is made.

    ``load_encoder(preprocessor, device)`` loads the weights and picks the encoder that serves the
    model; ``dimension(preprocessor)`` is the embedding's length, known without loading them;
    ``runtimes``: the runtimes its encoders run on (those with ``export_axes`` run on ONNX Runtime too).
    """

    preprocessor: type[Preprocessor]
    load_encoder: Callable[[Any, str], Encoder[Any]]
    dimension: Callable[[Any], int]
    runtimes: tuple[str, ...] = ("torch",)

    @property
    def name(self) -> str:
        return self.preprocessor.name

    def runtime(self, asked: str) -> str:
        """The runtime this modality runs on when ``asked`` is: torch where it has no other."""
        return asked if asked in self.runtimes else "torch"

    def describe(self, preprocessor: Preprocessor) -> dict[str, Any]:
        """What the output records about this modality's model."""
        resolved = preprocessor.resolved
        return {
            "model_id": resolved.model_id,
            "weights_sha256": resolved.weights_sha256(),
            "dimension": self.dimension(preprocessor),
            "preprocessing": preprocessor.settings(),
        }
