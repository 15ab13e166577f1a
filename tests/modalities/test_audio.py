"""Audio modality: decoding with soundfile (formats, down-mix, errors, limits), resampling,
30 s windows, and embeddings from the default whisper-tiny.en encoder and tiny random Whisper
and Wav2Vec2 models loaded from ``save_pretrained`` folders."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import pytest
import soundfile

from mmfeatures.encoders.whisper_clip import WhisperClipEncoder
from mmfeatures.errors import DecodeError, PreprocessError, Stage
from mmfeatures.limits import Limits
from mmfeatures.modalities.audio import (
    AUDIO,
    MAX_CHANNELS,
    MAX_SAMPLE_RATE,
    AudioPreprocessor,
    WaveformAudioEncoder,
    WhisperAudioEncoder,
    decode_audio,
    feature_extractor_for,
    split_windows,
)
from tests.conftest import forward

RATE = 16000


def tone(seconds: float, rate: int = RATE, frequency: float = 440.0, amplitude: float = 0.3) -> np.ndarray:
    t = np.arange(int(round(seconds * rate))) / rate
    return (amplitude * np.sin(2 * np.pi * frequency * t)).astype(np.float32)


def noise(seconds: float, rate: int = RATE, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 0.1, int(round(seconds * rate))).astype(np.float32)


def audio_bytes(samples: np.ndarray, rate: int = RATE, fmt: str = "WAV", subtype: str | None = None) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, rate, format=fmt, subtype=subtype)
    return buffer.getvalue()


# -- decoding ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("fmt", "subtype", "rate", "tolerance"),
    [
        ("WAV", "FLOAT", 44100, 1e-7),
        ("WAV", "PCM_16", 22050, 1 / 16000),
        ("FLAC", "PCM_24", 48000, 1e-6),
        ("OGG", "VORBIS", 32000, None),
        ("MP3", "MPEG_LAYER_III", 44100, None),
    ],
)
def test_formats_decode_to_mono_at_their_own_rate(fmt: str, subtype: str, rate: int, tolerance: float | None) -> None:
    if fmt not in soundfile.available_formats():
        pytest.skip(f"this libsndfile cannot write {fmt}")
    left, right = tone(1.0, rate, 440.0, 0.4), tone(1.0, rate, 660.0, 0.2)
    waveform, decoded_rate = decode_audio(audio_bytes(np.stack([left, right], axis=1), rate, fmt, subtype))
    assert decoded_rate == rate
    assert waveform.ndim == 1 and waveform.dtype == np.float32
    expected = (left + right) / 2
    if tolerance is not None:
        assert len(waveform) == len(expected)
        np.testing.assert_allclose(waveform, expected, atol=tolerance)
    else:  # lossy codecs add delay and padding: compare the overlap's shape, not samples
        assert abs(len(waveform) - rate) < rate * 0.1
        lag = int(np.argmax(np.correlate(waveform[: rate // 2], expected[: rate // 4], mode="valid")))
        overlap = waveform[lag : lag + rate // 2]
        assert np.corrcoef(overlap, expected[: len(overlap)])[0, 1] > 0.95


def test_mono_files_stay_as_they_are() -> None:
    samples = noise(0.5)
    waveform, rate = decode_audio(audio_bytes(samples, RATE, "WAV", "FLOAT"))
    assert rate == RATE
    np.testing.assert_array_equal(waveform, samples)


@pytest.mark.parametrize(
    ("data", "error_type"),
    [
        (b"", "empty_file"),
        (b"definitely not audio" * 10, "corrupt_audio"),
        (b"RIFF\x24\x00\x00\x00WAVEfmt " + b"\x00" * 20, "corrupt_audio"),  # a WAV header cut short
        (audio_bytes(np.zeros((0, 1), np.float32)), "empty_audio"),
        (audio_bytes(np.array([0.1, np.nan, 0.2], np.float32), subtype="FLOAT"), "non_finite_audio"),
        (audio_bytes(np.full(1600, np.nan, np.float32), subtype="FLOAT"), "non_finite_audio"),
        (audio_bytes(np.array([0.1, np.inf, 0.2], np.float32), subtype="FLOAT"), "non_finite_audio"),
        (audio_bytes(np.full(1600, -np.inf, np.float32), subtype="FLOAT"), "non_finite_audio"),
        (audio_bytes(np.array([[0.1, 0.2], [np.inf, -np.inf]], np.float32), subtype="FLOAT"), "non_finite_audio"),
        (audio_bytes(np.array([0.1, np.nan, 0.2]), subtype="DOUBLE"), "non_finite_audio"),
        (audio_bytes(np.full(1600, 1e300), subtype="DOUBLE"), "non_finite_audio"),  # past float32's range
        (audio_bytes(tone(1.0))[:9000], "truncated_audio"),  # libsndfile would read the first half
        (audio_bytes(tone(1.0), fmt="AIFF")[:9000], "truncated_audio"),
        (audio_bytes(tone(1.0), fmt="FLAC")[:3000], "corrupt_audio"),
    ],
)
def test_bad_audio_is_a_decode_error(data: bytes, error_type: str) -> None:
    with pytest.raises(DecodeError) as caught:
        AudioPreprocessor().decode(data)
    assert caught.value.error_type == error_type
    assert caught.value.stage == Stage.DECODE
    assert "BytesIO at 0x" not in str(caught.value)


def test_a_wav_streamed_without_its_length_is_read_whole() -> None:
    """Streaming encoders leave the RIFF and data sizes at 0xFFFFFFFF: that is not truncation."""
    data = bytearray(audio_bytes(tone(0.5)))
    data[4:8] = b"\xff\xff\xff\xff"
    at = data.index(b"data") + 4
    data[at : at + 4] = b"\xff\xff\xff\xff"
    assert len(AudioPreprocessor().decode(bytes(data))[0]) == RATE // 2


def test_audio_over_the_duration_limit_is_refused() -> None:
    short_limit = AudioPreprocessor(limits=Limits(max_audio_seconds=1.0))
    assert len(short_limit.decode(audio_bytes(tone(1.0)))[0]) == RATE
    with pytest.raises(DecodeError) as caught:
        short_limit.decode(audio_bytes(tone(1.5)))
    assert caught.value.error_type == "audio_too_long"

    # The default limit (600 s), with a 601 s clip at 1 kHz to keep the file small.
    with pytest.raises(DecodeError) as caught:
        AudioPreprocessor().decode(audio_bytes(np.zeros(601 * 1000, np.float32), 1000, "WAV", "PCM_16"))
    assert caught.value.error_type == "audio_too_long"


@pytest.mark.parametrize(
    ("channels", "rate", "error_type"),
    [
        (MAX_CHANNELS, MAX_SAMPLE_RATE, None),
        (MAX_CHANNELS + 1, 16000, "unsupported_audio"),
        (1, MAX_SAMPLE_RATE + 1, "unsupported_audio"),
    ],
)
def test_rates_and_channel_counts_over_the_maxima_are_refused(channels: int, rate: int, error_type: str | None) -> None:
    data = audio_bytes(np.tile(tone(0.01, rate)[:, None], (1, channels)), rate)
    if error_type is None:
        assert len(decode_audio(data)[0]) == len(tone(0.01, rate))
        return
    with pytest.raises(DecodeError) as caught:
        decode_audio(data)
    assert caught.value.error_type == error_type
    assert str(caught.value) == (
        f"{channels} channels at {rate} Hz is over the maximum of {MAX_CHANNELS} channels at {MAX_SAMPLE_RATE} Hz"
    )


@pytest.mark.parametrize(
    ("fmt", "subtype", "channels"),
    [
        ("WAV", "PCM_16", 1),
        ("WAV", "PCM_16", 2),
        ("FLAC", "PCM_24", 2),
        ("WAV", "FLOAT", 12),
        ("OGG", "VORBIS", 6),
        ("MP3", "MPEG_LAYER_III", 2),
    ],
)
@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_the_down_mix_decoded_by_blocks_is_the_mean_of_all_samples(
    fmt: str, subtype: str, channels: int, rate: int
) -> None:
    """Decoded a block at a time, the waveform is bit for bit the mean of the channels of all the
    samples read at once, so embeddings do not move: 14 s is several blocks of 12 or 6 channels."""
    if fmt not in soundfile.available_formats():
        pytest.skip(f"this libsndfile cannot write {fmt}")
    samples = np.stack([noise(14.0, rate, seed) + tone(14.0, rate) for seed in range(channels)], axis=1)
    data = audio_bytes(samples, rate, fmt, subtype)
    waveform, decoded_rate = decode_audio(data)
    everything, _ = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    assert decoded_rate == rate
    np.testing.assert_array_equal(waveform, everything.mean(axis=1))


# -- resampling and windows ----------------------------------------------------------------------
@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_resampling_to_16_khz_keeps_duration_and_pitch(tiny_wav2vec2_dir: Path, rate: int) -> None:
    preprocessor = AudioPreprocessor(model=str(tiny_wav2vec2_dir))
    assert preprocessor.sample_rate == RATE
    (window,) = preprocessor.preprocess((tone(1.0, rate, frequency=1000.0), rate))
    values = window["input_values"]
    assert abs(len(values) - RATE) <= 2
    spectrum = np.abs(np.fft.rfft(values[:RATE]))
    assert np.argmax(spectrum) * RATE / len(values[:RATE]) == pytest.approx(1000.0, abs=2.0)


@pytest.mark.parametrize("rate", [8000, 44100])
def test_whisper_features_follow_the_16_khz_duration(audio_default: AudioPreprocessor, rate: int) -> None:
    (window,) = audio_default.preprocess((tone(2.0, rate), rate))
    assert window["input_features"].shape == (80, 200)  # 10 ms mel frames at 16 kHz
    assert window["input_features"].dtype == np.float32


def test_a_70_s_clip_gives_windows_of_30_30_and_10_s(audio_default: AudioPreprocessor, tiny_wav2vec2_dir: Path) -> None:
    clip = (noise(70.0), RATE)
    assert [w["input_features"].shape for w in audio_default.preprocess(clip)] == [(80, 3000), (80, 3000), (80, 1000)]
    wav2vec2 = AudioPreprocessor(model=str(tiny_wav2vec2_dir))
    assert [w["input_values"].shape for w in wav2vec2.preprocess(clip)] == [(480000,), (480000,), (160000,)]


def test_a_short_tail_is_dropped_but_a_short_clip_is_kept(audio_default: AudioPreprocessor) -> None:
    assert len(audio_default.preprocess((noise(60.05), RATE))) == 2
    assert len(audio_default.preprocess((noise(60.2), RATE))) == 3
    (only,) = audio_default.preprocess((noise(0.05), RATE))
    assert only["input_features"].shape == (80, 5)
    with pytest.raises(PreprocessError) as caught:
        audio_default.preprocess((noise(0.01), RATE))
    assert caught.value.error_type == "audio_too_short"


def test_split_windows_covers_the_waveform_in_order() -> None:
    waveform = np.arange(25, dtype=np.float32)
    pieces = split_windows(waveform, 10, 3)
    assert [len(p) for p in pieces] == [10, 10, 5]
    np.testing.assert_array_equal(np.concatenate(pieces), waveform)
    assert [len(p) for p in split_windows(waveform[:22], 10, 3)] == [10, 10]
    assert [len(p) for p in split_windows(waveform[:2], 10, 3)] == [2]


# -- default model -------------------------------------------------------------------------------
def test_default_model_gives_384_d_finite_embeddings(audio_default, audio_default_encoder, embed, cos) -> None:
    assert AUDIO.dimension(audio_default) == audio_default_encoder.dimension == 384
    assert audio_default.settings()["window_seconds"] == 30.0
    assert isinstance(audio_default_encoder, WhisperAudioEncoder)
    assert isinstance(audio_default_encoder.model, WhisperClipEncoder)
    speechy, low, hum = embed(
        audio_default,
        audio_default_encoder,
        [audio_bytes(noise(1.0)), audio_bytes(tone(1.5, 8000, 200.0), 8000), audio_bytes(tone(1.0, 44100), 44100)],
    )
    for vector in (speechy, low, hum):
        assert vector.shape == (384,)
        assert vector.dtype == np.float32
        assert np.all(np.isfinite(vector))
    assert cos(speechy, hum) < 0.999


def test_default_embedding_alone_equals_embedding_beside_a_longer_clip(
    audio_default, audio_default_encoder, embed
) -> None:
    clip = audio_bytes(tone(1.0))
    (alone,) = embed(audio_default, audio_default_encoder, [clip])
    batched = embed(audio_default, audio_default_encoder, [audio_bytes(noise(4.0)), clip])
    np.testing.assert_allclose(batched[1], alone, atol=1e-4)

    # The encoder itself masks padding, so the same holds for one padded forward pass.
    windows = audio_default.preprocess((tone(1.0), RATE)) + audio_default.preprocess((noise(4.0), RATE))
    together = forward(audio_default_encoder, windows)
    single = forward(audio_default_encoder, windows[:1])
    np.testing.assert_allclose(together[0], single[0], atol=1e-4)


# -- tiny random Hugging Face models -------------------------------------------------------------
def test_tiny_whisper_folder_runs_end_to_end(tiny_whisper_dir: Path, embed) -> None:
    preprocessor = AudioPreprocessor(model=str(tiny_whisper_dir))
    assert preprocessor.resolved.bundled is False
    assert preprocessor.is_whisper and preprocessor.mel_bins == 16
    assert AUDIO.dimension(preprocessor) == 32
    assert "16 bins" in preprocessor.settings()["features"]
    (window,) = preprocessor.preprocess(preprocessor.decode(audio_bytes(tone(1.0, 22050), 22050)))
    assert window["input_features"].shape == (16, 100)

    encoder = AUDIO.load_encoder(preprocessor, "cpu")
    assert isinstance(encoder, WhisperAudioEncoder)
    assert isinstance(encoder.model, WhisperClipEncoder)
    assert encoder.dimension == 32
    assert not any(p.requires_grad for p in encoder.model.parameters())
    short, long = embed(preprocessor, encoder, [audio_bytes(tone(1.0)), audio_bytes(noise(3.0))])
    assert short.shape == long.shape == (32,)
    assert np.all(np.isfinite(short)) and np.all(np.isfinite(long))
    (alone,) = embed(preprocessor, encoder, [audio_bytes(tone(1.0))])
    np.testing.assert_allclose(short, alone, atol=1e-5)


def test_tiny_whisper_without_preprocessor_config_uses_its_mel_bins(tiny_whisper_without_extractor_dir: Path) -> None:
    preprocessor = AudioPreprocessor(model=str(tiny_whisper_without_extractor_dir))
    assert preprocessor.mel_bins == 16
    (window,) = preprocessor.preprocess((tone(0.5), RATE))
    assert window["input_features"].shape == (16, 50)


def test_tiny_wav2vec2_folder_runs_end_to_end(tiny_wav2vec2_dir: Path, embed) -> None:
    preprocessor = AudioPreprocessor(model=str(tiny_wav2vec2_dir))
    assert not preprocessor.is_whisper
    assert AUDIO.dimension(preprocessor) == 32
    assert "features" not in preprocessor.settings()  # no mel features: the model reads the waveform
    (window,) = preprocessor.preprocess(preprocessor.decode(audio_bytes(tone(1.0))))
    values = window["input_values"]
    assert values.shape == (RATE,)
    assert abs(values.mean()) < 1e-3 and values.std() == pytest.approx(1.0, abs=1e-2)  # do_normalize

    encoder = AUDIO.load_encoder(preprocessor, "cpu")
    assert isinstance(encoder, WaveformAudioEncoder)
    assert not isinstance(encoder.model, WhisperClipEncoder)
    assert encoder.dimension == 32
    assert not encoder.model.training
    short, long = embed(preprocessor, encoder, [audio_bytes(tone(1.0)), audio_bytes(noise(2.5))])
    assert short.shape == long.shape == (32,)
    assert np.all(np.isfinite(short)) and np.all(np.isfinite(long))
    assert not np.allclose(short, long)


def test_a_fresh_or_unpickled_preprocessor_loads_the_right_encoder(
    tiny_wav2vec2_dir: Path, tiny_whisper_dir: Path
) -> None:
    """The encoder is chosen from what the preprocessor read when it was built, which travels in
    its pickle. The pickle stays small, without the feature extractor: a preprocessor pickles to
    about 300 bytes, where the tiny Whisper's extractor alone (its mel filters) takes about 26 KB."""
    fresh = AudioPreprocessor(model=str(tiny_wav2vec2_dir))
    encoder = AUDIO.load_encoder(fresh, "cpu")
    assert isinstance(encoder, WaveformAudioEncoder)
    assert type(encoder.model).__name__ == "Wav2Vec2Model"

    data = pickle.dumps(AudioPreprocessor(model=str(tiny_wav2vec2_dir)))
    assert len(data) < 10 * 1024
    encoder = AUDIO.load_encoder(pickle.loads(data), "cpu")
    assert isinstance(encoder, WaveformAudioEncoder)
    assert type(encoder.model).__name__ == "Wav2Vec2Model"

    data = pickle.dumps(AudioPreprocessor(model=str(tiny_whisper_dir)))
    assert len(data) < 10 * 1024
    encoder = AUDIO.load_encoder(pickle.loads(data), "cpu")
    assert isinstance(encoder, WhisperAudioEncoder)
    assert isinstance(encoder.model, WhisperClipEncoder)


def test_wav2vec2_batching(tiny_wav2vec2_dir: Path, embed, cos) -> None:
    """Through the handler a clip's embedding does not depend on its batch. One padded forward
    pass is only approximately invariant: the pooling counts real frames as the clip's share of
    the output frames, which over-counts by the conv receptive field (measured on this tiny model:
    cosine about 0.9996, relative difference about 3% for 1 s beside 3 s)."""
    preprocessor = AudioPreprocessor(model=str(tiny_wav2vec2_dir))
    encoder = AUDIO.load_encoder(preprocessor, "cpu")
    clip = tone(1.0)
    (alone,) = embed(preprocessor, encoder, [audio_bytes(clip)])
    batched = embed(preprocessor, encoder, [audio_bytes(noise(3.0)), audio_bytes(clip)])
    np.testing.assert_allclose(batched[1], alone, atol=1e-5)

    windows = preprocessor.preprocess((clip, RATE)) + preprocessor.preprocess((noise(3.0), RATE))
    single = forward(encoder, windows[:1])[0]
    padded = forward(encoder, windows)[0]
    assert cos(single, padded) > 0.99
    assert np.linalg.norm(single - padded) / np.linalg.norm(single) < 0.1


@pytest.mark.parametrize("peak, silent", [(0.0, True), (5e-6, True), (1e-3, False)])
def test_silent_audio_is_a_decode_error(peak: float, silent: bool) -> None:
    buffer = io.BytesIO()
    soundfile.write(buffer, np.full(16000, peak, np.float32), 16000, format="WAV", subtype="FLOAT")
    if silent:
        with pytest.raises(DecodeError) as info:
            decode_audio(buffer.getvalue())
        assert info.value.error_type == "silent_audio"
    else:
        waveform, rate = decode_audio(buffer.getvalue())
        assert rate == 16000 and np.allclose(waveform, peak)


def test_the_bundled_model_settings_known_without_transformers_are_its_feature_extractor() -> None:
    """The bundled whisper-tiny.en's sample rate, window, mel bins and hop, resolved at launch
    without transformers, are what its feature extractor uses."""
    preprocessor = AudioPreprocessor()
    extractor = feature_extractor_for(preprocessor.model)
    assert preprocessor.is_whisper
    assert (preprocessor.sample_rate, preprocessor.window_samples, preprocessor.mel_bins, preprocessor.hop_length) == (
        extractor.sampling_rate,
        extractor.n_samples,
        extractor.feature_size,
        extractor.hop_length,
    )
