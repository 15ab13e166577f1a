"""Audio: decoded with soundfile (WAV, FLAC, OGG, MP3), down-mixed to mono, resampled with soxr to
the model's rate; clips longer than the model's window become several windows whose embeddings
are mean-pooled. The default model is OpenAI whisper-tiny.en's encoder (384-d), pooled over the
frames that hold real audio; Hugging Face Whisper models and waveform encoders (Wav2Vec2, HuBERT,
...) work too."""

from __future__ import annotations

import io
import re
from typing import Any

import numpy as np
import soundfile
import soxr
import torch
from transformers import AutoConfig, AutoFeatureExtractor, AutoModel, WhisperFeatureExtractor, WhisperModel

from mmfeatures.encoders.models import pretrained_kwargs
from mmfeatures.encoders.whisper_ctranslate2 import WhisperClipEncoder, load_whisper_from_ctranslate2
from mmfeatures.errors import DecodeError, PreprocessError
from mmfeatures.modalities.base import Modality, Window, round_up

SILENCE_PEAK = 1e-5  # -100 dBFS: nothing a model could hear
MIN_WINDOW_SECONDS = 0.1  # a shorter tail than this is dropped unless it is the whole clip


def _too_long(seconds: float, max_seconds: float) -> DecodeError:
    return DecodeError(f"{seconds:.1f} s of audio is over the {max_seconds:g} s limit", error_type="audio_too_long")


def decode_audio(data: bytes, max_seconds: float | None = None) -> tuple[np.ndarray, int]:
    """Bytes to (mono float32 waveform, sample rate); raises ``DecodeError``. A clip whose header
    says it is longer than ``max_seconds`` is refused before any sample is decoded."""
    if not data:
        raise DecodeError("the audio file is empty", error_type="empty_file")
    try:
        info = soundfile.info(io.BytesIO(data))
        if max_seconds is not None and info.samplerate > 0 and info.frames / info.samplerate > max_seconds:
            raise _too_long(info.frames / info.samplerate, max_seconds)
        _check_not_truncated(info.extra_info)
        samples, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, ValueError, TypeError) as exc:
        reason = str(exc).rsplit(">: ", 1)[-1]  # drop libsndfile's "Error opening <BytesIO at 0x...>"
        raise DecodeError(f"soundfile could not decode the audio: {reason}", error_type="corrupt_audio") from exc
    except MemoryError as exc:  # soundfile allocates the frame count the header claims, true or not
        raise DecodeError(f"the header claims more audio than memory holds: {exc}", error_type="corrupt_audio") from exc
    if samples.shape[0] == 0:
        raise DecodeError("the audio holds no samples", error_type="empty_audio")
    mono = samples.mean(axis=1)
    if not np.all(np.isfinite(mono)):
        raise DecodeError("the audio holds NaN or Inf samples", error_type="non_finite_audio")
    if max_seconds is not None and len(mono) / rate > max_seconds:  # the header understated it
        raise _too_long(len(mono) / rate, max_seconds)
    if float(np.max(np.abs(mono))) < SILENCE_PEAK:
        raise DecodeError("the audio is silent (peak below -100 dBFS)", error_type="silent_audio")
    return mono, int(rate)


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


class AudioModality(Modality):
    name = "audio"
    default_batch_cost = 16 * 80 * 3000  # mel values: 16 windows of 30 s

    _extractor: Any = None
    _is_whisper: bool = True

    def setup(self) -> None:
        if self._extractor is not None:
            return
        resolved = self.resolved
        if resolved.bundled:
            self._extractor = WhisperFeatureExtractor()  # whisper-tiny.en: 80 mels, 16 kHz
            return
        config = AutoConfig.from_pretrained(resolved.directory)
        self._is_whisper = config.model_type == "whisper"
        if self._is_whisper:
            try:
                self._extractor = WhisperFeatureExtractor.from_pretrained(resolved.directory)
            except OSError:  # a folder without preprocessor_config.json
                self._extractor = WhisperFeatureExtractor(feature_size=config.num_mel_bins)
        else:
            self._extractor = AutoFeatureExtractor.from_pretrained(resolved.directory, trust_remote_code=False)

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("_extractor", "_is_whisper")}

    @property
    def sample_rate(self) -> int:
        self.setup()
        return int(self._extractor.sampling_rate)

    @property
    def window_samples(self) -> int:
        """Whisper reads at most its position table's worth (30 s); other models take 30 s too."""
        self.setup()
        if self._is_whisper:
            return int(self._extractor.n_samples)
        return 30 * self.sample_rate

    def decode(self, payload: bytes | str) -> tuple[np.ndarray, int]:
        return decode_audio(payload, self.limits.max_audio_seconds)  # type: ignore[arg-type]

    def preprocess(self, raw: tuple[np.ndarray, int]) -> list[Window]:
        waveform, rate = raw
        if rate != self.sample_rate:
            waveform = soxr.resample(waveform, rate, self.sample_rate).astype(np.float32)
        if len(waveform) < self.sample_rate * 0.02:
            raise PreprocessError("the audio is shorter than 20 ms", error_type="audio_too_short")
        pieces = split_windows(waveform, self.window_samples, int(MIN_WINDOW_SECONDS * self.sample_rate))
        if not self._is_whisper:
            windows = [self._waveform_window(piece) for piece in pieces]
        else:
            windows = [self._mel_window(piece) for piece in pieces]
        # Finite samples far outside [-1, 1] (a corrupt float WAV holds 1e20) overflow the features.
        if not all(np.isfinite(value).all() for window in windows for value in window.values()):
            raise PreprocessError("the audio's features hold NaN or Inf", error_type="non_finite_features")
        return windows

    def _mel_window(self, piece: np.ndarray) -> Window:
        features = self._extractor(piece, sampling_rate=self.sample_rate, padding="longest", return_tensors="np")[
            "input_features"
        ][0]
        return {"input_features": features.astype(np.float32)}

    def _waveform_window(self, piece: np.ndarray) -> Window:
        values = self._extractor(piece, sampling_rate=self.sample_rate, return_tensors="np")["input_values"][0]
        return {"input_values": values.astype(np.float32)}

    def settings(self) -> dict[str, Any]:
        self.setup()
        settings: dict[str, Any] = {
            "decoder": "soundfile",
            "channels": "mean down-mix to mono",
            "sample_rate": self.sample_rate,
            "resampler": "soxr (HQ)",
            "window_seconds": self.window_samples / self.sample_rate,
            "pooling": "mean over frames holding audio, then over windows",
        }
        if self._is_whisper:
            settings["features"] = f"whisper log-mel, {self._extractor.feature_size} bins, not padded to 30 s"
        return settings

    def dimension(self) -> int:
        if self.resolved.bundled:
            return 384
        config = AutoConfig.from_pretrained(self.resolved.directory)
        return config.d_model if config.model_type == "whisper" else config.hidden_size

    def load_model(self, device: str) -> torch.nn.Module:
        self.setup()  # sets _is_whisper; a fresh (or unpickled) instance would assume Whisper
        resolved = self.resolved
        if resolved.bundled:
            encoder = load_whisper_from_ctranslate2(resolved.directory).model.encoder
            model: torch.nn.Module = WhisperClipEncoder(encoder)
        elif self._is_whisper:
            model = WhisperClipEncoder(WhisperModel.from_pretrained(resolved.directory, **pretrained_kwargs()).encoder)
        else:
            model = AutoModel.from_pretrained(resolved.directory, **pretrained_kwargs())
        return model.eval().requires_grad_(False).to(device)

    def padded_length(self, window: Window) -> int:
        if "input_features" in window:  # whisper: 10 ms mel frames, at most one 30 s window
            return round_up(window["input_features"].shape[-1], 100, self.window_samples // self._extractor.hop_length)
        return round_up(window["input_values"].shape[-1], self.sample_rate // 10, self.window_samples)

    def collate(self, windows: list[Window], length: int = 0) -> dict[str, torch.Tensor]:
        key = "input_features" if "input_features" in windows[0] else "input_values"
        lengths = [w[key].shape[-1] for w in windows]
        longest = max([length] + lengths)
        padded = np.zeros((len(windows), *windows[0][key].shape[:-1], longest), dtype=np.float32)
        for row, window in enumerate(windows):
            padded[row, ..., : lengths[row]] = window[key]
        return {key: torch.from_numpy(padded), "lengths": torch.tensor(lengths, dtype=torch.long)}

    def encode(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if isinstance(model, WhisperClipEncoder):
            return model(batch["input_features"], batch["lengths"])
        values, lengths = batch["input_values"], batch["lengths"]
        mask = (torch.arange(values.shape[1], device=values.device) < lengths[:, None]).long()
        hidden = model(input_values=values, attention_mask=mask).last_hidden_state
        frames = _output_frames(model, lengths, hidden.shape[1], values.shape[1]).to(hidden.dtype)
        frame_mask = (torch.arange(hidden.shape[1], device=hidden.device) < frames[:, None]).unsqueeze(-1)
        return (hidden * frame_mask).sum(dim=1) / frames[:, None]


def _output_frames(model: torch.nn.Module, lengths: torch.Tensor, output: int, padded: int) -> torch.Tensor:
    """How many output frames hold real audio: the model's own conv arithmetic where it exposes
    it (Wav2Vec2, HuBERT, WavLM, ...), else the clip's share of the padded input."""
    output_lengths = getattr(model, "_get_feat_extract_output_lengths", None)
    if output_lengths is not None:
        frames = output_lengths(lengths)
    else:
        frames = torch.ceil(lengths.float() * output / padded)
    return torch.clamp(frames, min=1, max=output)
