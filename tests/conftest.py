"""Shared fixtures: the real default models (each loaded once per session) and tiny random
Hugging Face models saved with ``save_pretrained`` into session folders, so that the
"any Hugging Face folder" paths run end to end without a hub download."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from mmfeatures.encoders.weights import resolve_model
from mmfeatures.inference.batching import Keyed
from mmfeatures.inference.handler import EmbeddingModelHandler, Outcome
from mmfeatures.inference.torch_runtime import TorchRuntime
from mmfeatures.modalities import MODALITIES
from mmfeatures.modalities.audio import AUDIO, AudioEncoder, AudioPreprocessor
from mmfeatures.modalities.base import Encoder, Prepared, Preprocessor, Window
from mmfeatures.modalities.image import IMAGE, ImageEncoder, ImagePreprocessor
from mmfeatures.modalities.text import MINILM, TEXT, TextEncoder, TextPreprocessor
from mmfeatures.records import Record
from mmfeatures.settings import InferenceSettings
from tests.jobs import png

TINY_BERT_POSITIONS = 64
TINY_WHISPER_MELS = 16


# -- real default models (loaded once) -------------------------------------------------------
@pytest.fixture(scope="session")
def text_default() -> TextPreprocessor:
    return TextPreprocessor()


@pytest.fixture(scope="session")
def text_default_encoder(text_default: TextPreprocessor) -> TextEncoder:
    encoder = TEXT.load_encoder(text_default, "cpu")
    assert isinstance(encoder, TextEncoder)
    return encoder


@pytest.fixture(scope="session")
def image_default() -> ImagePreprocessor:
    return ImagePreprocessor()


@pytest.fixture(scope="session")
def image_default_encoder(image_default: ImagePreprocessor) -> ImageEncoder:
    encoder = IMAGE.load_encoder(image_default, "cpu")
    assert isinstance(encoder, ImageEncoder)
    return encoder


@pytest.fixture(scope="session")
def audio_default() -> AudioPreprocessor:
    return AudioPreprocessor()


@pytest.fixture(scope="session")
def audio_default_encoder(audio_default: AudioPreprocessor) -> AudioEncoder:
    encoder = AUDIO.load_encoder(audio_default, "cpu")
    assert isinstance(encoder, AudioEncoder)
    return encoder


# -- tiny random Hugging Face folders --------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 32-wide BERT with the bundled MiniLM tokenizer saved beside it."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny_bert")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("default", MINILM).directory)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=TINY_BERT_POSITIONS,
    )
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_vit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    folder = tmp_path_factory.mktemp("tiny_vit")
    torch.manual_seed(0)
    config = ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37
    )
    ViTModel(config).save_pretrained(folder)
    ViTImageProcessor(
        size={"height": 32, "width": 32}, image_mean=[0.5, 0.5, 0.5], image_std=[0.25, 0.25, 0.25]
    ).save_pretrained(folder)
    return folder


def _tiny_whisper_config() -> Any:
    from transformers import WhisperConfig

    return WhisperConfig(
        vocab_size=64,
        num_mel_bins=TINY_WHISPER_MELS,
        d_model=32,
        encoder_layers=1,
        encoder_attention_heads=2,
        encoder_ffn_dim=37,
        decoder_layers=1,
        decoder_attention_heads=2,
        decoder_ffn_dim=37,
        max_target_positions=32,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
        suppress_tokens=None,
        begin_suppress_tokens=None,
    )


@pytest.fixture(scope="session")
def tiny_whisper_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1-layer Whisper with 16 mel bins and a matching feature extractor."""
    from transformers import WhisperFeatureExtractor, WhisperModel

    folder = tmp_path_factory.mktemp("tiny_whisper")
    torch.manual_seed(0)
    WhisperModel(_tiny_whisper_config()).save_pretrained(folder)
    WhisperFeatureExtractor(feature_size=TINY_WHISPER_MELS).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_whisper_without_extractor_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same tiny Whisper, but with no ``preprocessor_config.json``."""
    from transformers import WhisperModel

    folder = tmp_path_factory.mktemp("tiny_whisper_bare")
    torch.manual_seed(0)
    WhisperModel(_tiny_whisper_config()).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_wav2vec2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1-layer Wav2Vec2 (320-sample frames, like the real ones) and its feature extractor."""
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    folder = tmp_path_factory.mktemp("tiny_wav2vec2")
    torch.manual_seed(0)
    config = Wav2Vec2Config(
        vocab_size=8,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=37,
        conv_dim=(16, 16, 16),
        conv_stride=(5, 8, 8),
        conv_kernel=(10, 8, 8),
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
        feat_extract_norm="layer",
        do_stable_layer_norm=True,
    )
    Wav2Vec2Model(config).save_pretrained(folder)
    Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True, return_attention_mask=True
    ).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_text(tiny_bert_dir: Path) -> TextPreprocessor:
    return TextPreprocessor(model=str(tiny_bert_dir))


@pytest.fixture(scope="session")
def tiny_text_encoder(tiny_text: TextPreprocessor) -> TextEncoder:
    encoder = TEXT.load_encoder(tiny_text, "cpu")
    assert isinstance(encoder, TextEncoder)
    return encoder


@pytest.fixture(scope="session")
def tiny_model_options(tiny_bert_dir: Path, tiny_vit_dir: Path, tiny_whisper_dir: Path) -> list[str]:
    """The job's model options for the three tiny models: end-to-end runs that test reading and
    writing, not the embeddings themselves, in a fraction of the bundled models' time."""
    return [
        "--text-model",
        str(tiny_bert_dir),
        "--image-model",
        str(tiny_vit_dir),
        "--audio-model",
        str(tiny_whisper_dir),
    ]


@pytest.fixture()
def corpus(tmp_path: Path) -> dict[str, Any]:
    """Eight records of text and images, two of which share one photo's bytes."""
    media = tmp_path / "media"
    media.mkdir()
    rows = []
    for i in range(8):
        image = media / f"{i}.png"
        image.write_bytes(png(3 if i == 7 else i))  # r7's photo is r3's
        rows.append({"id": f"r{i}", "text": f"record number {i}", "image": str(image), "label": "a"})
    return {"folder": tmp_path, "rows": rows, "media": media}


# -- helpers -----------------------------------------------------------------------------------
def prepare(preprocessor: Preprocessor, payload: bytes | str, source: str | None = None) -> Prepared:
    """A payload through the preprocessor's own decode and preprocess."""
    return Prepared(preprocessor.preprocess(preprocessor.decode(payload)), source=source)


def handler_for(preprocessor: Preprocessor, **settings: Any) -> EmbeddingModelHandler:
    """The real model handler for ``preprocessor``'s modality, with settings for it (on a CPU)."""
    defaults = InferenceSettings.for_modality(preprocessor.name, preprocessor.batch_cost, **settings)
    return EmbeddingModelHandler(MODALITIES[preprocessor.name], preprocessor, defaults)


def keyed(record_id: str, prepared: Prepared | None) -> Keyed:
    """``prepared`` as the model input of a record of id ``record_id`` (and source), for the batcher and handler."""
    return Record(record_id, source=record_id, manifest_dir=""), prepared


def embed_all(preprocessor: Preprocessor, encoder: Encoder[Any], payloads: list[bytes | str]) -> list[Outcome]:
    """Every payload embedded in one batch through the real model handler."""
    handler = handler_for(preprocessor, max_batch_cost=10**9)
    batch = [keyed(f"r{i}", prepare(preprocessor, payload)) for i, payload in enumerate(payloads)]
    return list(handler.run_inference(batch, handler.embedder(encoder)))


def forward(encoder: Encoder[Any], windows: list[Window], length: int = 0) -> np.ndarray:
    """One forward pass of ``encoder`` over ``windows`` collated to at least ``length``, on the CPU:
    one embedding per window, unpooled across windows."""
    runtime = TorchRuntime("cpu", "fp32")
    return runtime.to_host([runtime.forward(encoder, runtime.to_device(encoder.collate(windows, length)))])


@pytest.fixture(scope="session")
def embed() -> Callable[[Preprocessor, Encoder[Any], list[bytes | str]], list[np.ndarray]]:
    """``embed(preprocessor, encoder, payloads)``: one float32 vector per payload, in one batch."""

    def run(preprocessor: Preprocessor, encoder: Encoder[Any], payloads: list[bytes | str]) -> list[np.ndarray]:
        outcomes = embed_all(preprocessor, encoder, payloads)
        assert [o.error for o in outcomes] == [None] * len(payloads)
        return [o.vector for o in outcomes if o.vector is not None]

    return run


@pytest.fixture(scope="session")
def prepared() -> Callable[[Preprocessor, bytes | str], Prepared]:
    """``prepared(preprocessor, payload)``: the payload through decode and preprocess."""
    return prepare


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture(scope="session")
def cos() -> Callable[[np.ndarray, np.ndarray], float]:
    return cosine
