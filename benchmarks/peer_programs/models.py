"""What a peer's UDF holds: the job's own preprocessing and a model, in one of two readings.

- ``stock``: the model as a user loads it from the job's weight files, run in plain PyTorch: the
  MobileNetV2 in torchvision's layout (torchvision itself cannot be installed beside this torch,
  so it is the job's copy of that architecture, unfolded and channels-first), a plain
  ``AutoModel`` with mean pooling for MiniLM, and transformers' Whisper encoder run on the clip's
  own frames (its position table sliced, as its ``forward`` takes only 30 s);
- ``job-model``: the job's own model runtime, as its ``ModelHandler`` loads it: the encoder the
  job loads, on the runtime the job picks (ONNX Runtime for image and text on a CPU). Against the
  job, this reading measures the engine and the job's stages apart from the model.

In both, a UDF call sorts its windows by length and runs them the job's forward sizes at a time
(``InferenceSettings``: 4 images, 8 texts, 1 clip a pass on a CPU), each pass padded to its own
longest window, as a user batching for speed writes it; a record's windows are pooled by their
mean, as the job does. Text comes 256 records a call, so that sorting has something to sort.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from mmfeatures.inference.handler import EmbeddingModelHandler
from mmfeatures.modalities import MODALITIES, Preprocessor, Window
from mmfeatures.settings import InferenceSettings, default_runtime

READINGS = ("stock", "job-model")
SETUPS = ("threads", "processes")  # one model on a thread per core; one single-threaded model per core
PEER_MODALITIES = ("image", "text", "audio")

Forward = Callable[[list[Window]], np.ndarray]  # a pass's windows to one embedding per window


def job_settings(modality: str, threads: int | None = None) -> InferenceSettings:
    """The job's settings for ``modality`` on a CPU (its forward sizes, its runtime), on ``threads``."""
    preprocessor = MODALITIES[modality].preprocessor
    runtime = MODALITIES[modality].runtime(default_runtime("cpu", "fp32"))
    return InferenceSettings.for_modality(modality, preprocessor.batch_cost, runtime=runtime, threads=threads)


def rows_per_call(modality: str) -> int:
    """Records handed to the UDF at a time: 256 texts (a sort's worth), else the job's largest batch."""
    settings = job_settings(modality)
    return 256 if modality == "text" else settings.micro_batch_size * settings.micro_batches_per_batch


class PeerModel:
    """``embed`` takes the payloads of a UDF's batch (media bytes, or text) and gives their vectors."""

    def __init__(self, modality: str, reading: str, threads: int):
        self.preprocessor: Preprocessor = MODALITIES[modality].preprocessor()
        self.rows = job_settings(modality).micro_batch_size
        if reading == "stock":
            torch.set_num_threads(threads)
            loader = {"image": _mobilenet_v2, "text": _minilm, "audio": _whisper}[modality]
            self.forward = loader(self.preprocessor)
        else:
            self.forward = _job_model(modality, self.preprocessor, threads)

    def embed(self, payloads: Sequence[bytes | str]) -> list[np.ndarray]:
        raws = [self.preprocessor.decode(payload) for payload in payloads]
        records = self.preprocessor.preprocess_batch(raws)
        windows = [window for record in records for window in record]
        order = sorted(range(len(windows)), key=lambda index: _length(windows[index]))
        vectors = np.empty((len(windows), 0), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(order), self.rows):
                chunk = order[start : start + self.rows]
                output = self.forward([windows[index] for index in chunk])
                if vectors.shape[1] == 0:
                    vectors = np.empty((len(windows), output.shape[1]), dtype=np.float32)
                vectors[chunk] = output
        pooled, start = [], 0
        for record in records:
            pooled.append(vectors[start : start + len(record)].mean(axis=0))
            start += len(record)
        return pooled


def _length(window: Window) -> int:
    """A window's length along its last axis: tokens, frames (images all have the same)."""
    return int(next(iter(window.values())).shape[-1])


def _job_model(modality: str, preprocessor: Preprocessor, threads: int) -> Forward:
    """One pass of the job's encoder on its runtime, as its ``ModelHandler`` loads them in a worker
    (the weights load with the first pass, the ONNX export comes from the job's cache)."""
    handler = EmbeddingModelHandler(MODALITIES[modality], preprocessor, job_settings(modality, threads))
    embedder = handler.load_model()
    runtime = embedder.runtime

    def forward(windows: list[Window]) -> np.ndarray:
        encoder = embedder.encoder
        return runtime.to_host([runtime.forward(encoder, runtime.to_device(encoder.collate(windows)))])

    return forward


def _mobilenet_v2(preprocessor: Preprocessor) -> Forward:
    from mmfeatures.encoders.mobilenet_v2 import load_mobilenet_v2

    model = load_mobilenet_v2(preprocessor.resolved.weight_files[0])
    return lambda windows: model.forward_features(
        torch.from_numpy(np.stack([w["pixel_values"] for w in windows]))
    ).numpy()


def _minilm(preprocessor: Preprocessor) -> Forward:
    from transformers import AutoModel

    model = AutoModel.from_pretrained(preprocessor.resolved.directory).eval()

    def forward(windows: list[Window]) -> np.ndarray:
        longest = max(len(w["input_ids"]) for w in windows)
        ids = torch.zeros((len(windows), longest), dtype=torch.long)
        mask = torch.zeros((len(windows), longest), dtype=torch.long)
        for row, window in enumerate(windows):
            ids[row, : len(window["input_ids"])] = torch.from_numpy(window["input_ids"])
            mask[row, : len(window["input_ids"])] = 1
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
        weights = mask.unsqueeze(-1).float()
        return ((hidden * weights).sum(dim=1) / weights.sum(dim=1)).numpy()

    return forward


def _whisper(preprocessor: Preprocessor) -> Forward:
    """One clip a pass: transformers' encoder layers on the clip's frames, mean-pooled."""
    from mmfeatures.encoders.whisper_ctranslate2 import load_whisper_from_ctranslate2

    encoder = load_whisper_from_ctranslate2(preprocessor.resolved.directory).model.encoder.eval()

    def forward(windows: list[Window]) -> np.ndarray:
        (window,) = windows
        features = torch.from_numpy(window["input_features"]).unsqueeze(0)  # [1, mel bins, frames]
        hidden = torch.nn.functional.gelu(encoder.conv1(features))
        hidden = torch.nn.functional.gelu(encoder.conv2(hidden)).transpose(1, 2)
        hidden = hidden + encoder.embed_positions.weight[: hidden.shape[1]]
        for layer in encoder.layers:
            hidden = layer(hidden, None)
        return encoder.layer_norm(hidden).mean(dim=1).numpy()

    return forward


def peer_arguments(prog: str, description: str) -> argparse.ArgumentParser:
    """The command line every peer program takes, from ``benchmarks.peers``."""
    parser = argparse.ArgumentParser(prog=prog, description=description, allow_abbrev=False)
    parser.add_argument("--modality", required=True, choices=PEER_MODALITIES)
    parser.add_argument("--manifest", required=True, type=Path, help="A JSONL manifest of the job's input format.")
    parser.add_argument("--output", required=True, type=Path, help="A folder for the Parquet files (id, embedding).")
    parser.add_argument("--reading", required=True, choices=READINGS)
    parser.add_argument("--setup", required=True, choices=SETUPS)
    parser.add_argument("--cores", required=True, type=int, help="The cores the set-up spreads over.")
    return parser


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.cores < 1:
        parser.error(f"--cores must be at least 1, not {args.cores}")
    if not args.manifest.is_file():
        parser.error(f"--manifest {args.manifest} is not a file")


def media_path(manifest: Path, reference: str) -> str:
    """A manifest's media reference as a path: relative ones are to the manifest's folder."""
    return str(manifest.parent.resolve() / reference)
