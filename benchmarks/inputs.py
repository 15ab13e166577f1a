"""Realistic benchmark inputs, built offline and deterministically from ``(modality, count, seed)``.

- image: JPEG photos of about 640x480, cut from the real photos bundled with scikit-image (random
  4:3 or 3:4 crops, resized, flipped, brightness/contrast/noise jitter, quality 70-95), so decode
  and resize cost what camera photos cost;
- text: English-like sentences (6-25 words) and paragraphs (3-9 sentences), 60:40, from a seeded
  grammar, so token lengths spread from a few to a couple of hundred, as in real corpora;
- audio: speech of 1 to 15 s spoken by espeak-ng in several voices, speeds and pitches, stored as
  16 kHz mono 16-bit WAV. Where espeak-ng is missing (an offline GPU machine) a speech-like signal
  (voiced syllables with a pitch contour and two formants, separated by pauses) stands in: the
  model's cost depends on the duration only, and the report says which source was used.

Each modality's set is a folder of media kept between runs, with one manifest per record count
(``manifest-N.jsonl``, rows in the job's input format): record i is the same whatever the count,
so a smaller set is the start of a larger one.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import soundfile
import soxr

MODALITIES = ("text", "image", "audio")  # the modalities this module makes inputs for; indexes seed them
SAMPLE_RATE = 16_000
SHORTEST_CLIP_SECONDS, LONGEST_CLIP_SECONDS = 1.0, 15.0
_LAYOUT_VERSION = 2  # bump when what a set holds changes, so kept sets are made again

# -- text --------------------------------------------------------------------------------------
_WORDS = {
    "det": "the a this that every one some another each our their".split(),
    "adj": (
        "quiet old bright small heavy local early final public careful green narrow modern "
        "cheap broken silent northern recent simple strange wooden"
    ).split(),
    "noun": (
        "engineer river bridge market council station report garden teacher village train "
        "window harbour museum storm library factory kitchen doctor journey budget camera "
        "festival mountain question student machine picture evening"
    ).split(),
    "verb": (
        "measured opened described crossed repaired painted followed carried announced "
        "visited closed found moved watched explained replaced delayed"
    ).split(),
    "prep": "near behind across under beside after before during without toward".split(),
    "adverb": "slowly quickly again finally carefully yesterday today rarely".split(),
}


def _sentence(rng: np.random.Generator, words: int) -> str:
    """About ``words`` words of subject-verb-object English with prepositional phrases."""

    def pick(kind: str) -> str:
        return _WORDS[kind][rng.integers(len(_WORDS[kind]))]

    parts = [pick("det"), pick("adj"), pick("noun"), pick("verb"), pick("det"), pick("noun")]
    while len(parts) < words:
        parts += [pick("prep"), pick("det"), pick("adj"), pick("noun")] if rng.random() < 0.8 else [pick("adverb")]
    text = " ".join(parts[:words])
    return text[0].upper() + text[1:] + "."


def _text(rng: np.random.Generator) -> str:
    """A sentence (60%) or a paragraph of 3 to 9 sentences (40%), at most about 230 tokens."""
    if rng.random() < 0.6:
        return _sentence(rng, int(rng.integers(6, 26)))
    return " ".join(_sentence(rng, int(rng.integers(6, 21))) for _ in range(int(rng.integers(3, 10))))


# -- images ------------------------------------------------------------------------------------
_PHOTOS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "stereo_motorcycle",
)


def _photo_sources() -> list[np.ndarray]:
    from skimage import data

    sources = []
    for name in _PHOTOS:
        photo = getattr(data, name)()
        sources.append(photo[0] if isinstance(photo, tuple) else photo)  # stereo pairs: the left view
    return sources


def _jpeg(rng: np.random.Generator, source: np.ndarray) -> bytes:
    """A random 4:3 (or 3:4) crop of ``source``, resized to about 640x480, jittered, as JPEG."""
    height, width = source.shape[:2]
    aspect = 3 / 4 if rng.random() < 0.2 else 4 / 3  # width / height; one in five portrait
    crop_height = int(min(height, width / aspect) * rng.uniform(0.6, 1.0))
    crop_width = int(crop_height * aspect)
    top = int(rng.integers(0, height - crop_height + 1))
    left = int(rng.integers(0, width - crop_width + 1))
    crop = source[top : top + crop_height, left : left + crop_width]
    long_side = int(rng.integers(576, 705))
    size = (long_side, round(long_side / aspect)) if aspect > 1 else (round(long_side * aspect), long_side)
    image = cv2.resize(crop, size, interpolation=cv2.INTER_AREA).astype(np.float32)
    if rng.random() < 0.5:
        image = image[:, ::-1]
    image = image * rng.uniform(0.8, 1.2) + rng.uniform(-20, 20) + rng.normal(0, rng.uniform(0, 4), image.shape)
    bgr = cv2.cvtColor(np.clip(image, 0, 255).astype(np.uint8), cv2.COLOR_RGB2BGR)
    ok, encoded = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(70, 96))])
    if not ok:
        raise RuntimeError("OpenCV could not encode a JPEG")
    return encoded.tobytes()


# -- audio -------------------------------------------------------------------------------------
_VOICES = ("en-us", "en-gb", "en-us+f2", "en+m3", "en-gb-scotland+m1", "en+f4", "en-029")


def _spoken(rng: np.random.Generator, seconds: float, espeak: str, scratch: Path) -> np.ndarray:
    """About ``seconds`` of espeak-ng speech at 16 kHz, cut to ``seconds`` when it runs over."""
    speed = int(rng.integers(140, 201))  # words per minute
    words = max(2, round(seconds * speed / 60))
    command = [
        espeak,
        "-v",
        _VOICES[rng.integers(len(_VOICES))],
        "-s",
        str(speed),
        "-p",
        str(int(rng.integers(30, 71))),
        "-w",
        str(scratch),
        _sentence(rng, words),
    ]
    subprocess.run(command, check=True, capture_output=True, timeout=120)
    samples, rate = soundfile.read(scratch, dtype="float32")
    return soxr.resample(samples, rate, SAMPLE_RATE)[: int(seconds * SAMPLE_RATE)]


def _speech_like(rng: np.random.Generator, seconds: float) -> np.ndarray:
    """``seconds`` of voiced syllables (harmonics of a drifting pitch shaped by two formants), a
    few of them followed by a pause: the stand-in for speech where espeak-ng is missing. Built for
    the whole clip at once, in large numpy operations that other threads can run beside."""
    total = int(seconds * SAMPLE_RATE)
    lengths = rng.integers(int(0.12 * SAMPLE_RATE), int(0.25 * SAMPLE_RATE), total // 1920 + 1)
    syllable = np.repeat(np.arange(len(lengths)), lengths)[:total]  # which syllable each sample is in
    position = np.arange(total) - np.concatenate([[0], np.cumsum(lengths)[:-1]])[syllable]
    time = np.arange(total, dtype=np.float32) / SAMPLE_RATE
    pitch = rng.uniform(90, 220, len(lengths)).astype(np.float32)[syllable] * (
        1 + 0.1 * np.sin(2 * np.pi * rng.uniform(1, 4) * time)
    )
    phase = 2 * np.pi * np.cumsum(pitch, dtype=np.float64).astype(np.float32) / SAMPLE_RATE
    harmonics = np.arange(1, 17, dtype=np.float32)[:, None]
    formants = [  # two per syllable
        rng.uniform(low, high, len(lengths)).astype(np.float32)[syllable] for low, high in ((300, 900), (900, 2500))
    ]
    loudness = sum(np.exp(-((((harmonics * pitch) - formant) / 200) ** 2)) for formant in formants)
    voiced = (np.sin(harmonics * phase) * loudness).sum(axis=0)
    envelope = np.sin(np.pi * position / lengths[syllable])  # each syllable swells and fades
    envelope[(rng.random(len(lengths)) < 0.2)[syllable]] = 0.0  # one in five: a pause
    signal = voiced * envelope
    return (0.3 * signal / max(1e-9, float(np.abs(signal).max()))).astype(np.float32)


def _wav(samples: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, SAMPLE_RATE, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


# -- sets --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class InputSet:
    """The first ``count`` records of one modality's benchmark inputs, and what made them."""

    modality: str
    folder: Path
    count: int
    source: str  # what made them: "generated text", "skimage photos", "espeak-ng" or "speech-like"

    @property
    def manifest(self) -> Path:
        return self.folder / f"manifest-{self.count}.jsonl"

    def rows(self) -> list[dict[str, Any]]:
        with open(self.manifest, encoding="utf-8") as handle:
            return [json.loads(line) for line in handle]


def build_input_set(modality: str, folder: Path, count: int, seed: int) -> InputSet:
    """The first ``count`` records of the set for ``(modality, seed)`` kept in ``folder``.

    Record i is the same in every set of that seed, so media files are made once and kept: a later
    run, or one asking for more records, makes only those missing (a folder made with other
    settings, or by another source, is made again).
    """
    media = None if modality == "text" else _media_maker(modality)  # text: the manifest holds it
    source = "generated text" if media is None else media[0]
    settings = {"modality": modality, "seed": seed, "version": _LAYOUT_VERSION, "source": source}
    stamp = folder / "inputs.json"
    recorded = json.loads(stamp.read_text()) if stamp.is_file() else {}
    if {key: recorded.get(key) for key in settings} != settings:
        shutil.rmtree(folder, ignore_errors=True)
        recorded = {}
    folder.mkdir(parents=True, exist_ok=True)
    rngs = [np.random.default_rng([seed, MODALITIES.index(modality), index]) for index in range(count)]
    ids = [f"{modality}-{index:06d}" for index in range(count)]
    if media is None:
        rows = [{"id": record_id, modality: _text(rng)} for record_id, rng in zip(ids, rngs, strict=True)]
    else:
        _, make, extension = media
        names = [f"{modality}/{record_id}.{extension}" for record_id in ids]
        made = recorded.get("records", 0)
        (folder / modality).mkdir(exist_ok=True)
        with ThreadPoolExecutor(os.cpu_count()) as pool:  # espeak-ng, JPEG encoding, numpy: no GIL held
            for name, data in zip(names[made:], pool.map(make, rngs[made:]), strict=True):
                (folder / name).write_bytes(data)
        rows = [{"id": record_id, modality: name} for record_id, name in zip(ids, names, strict=True)]
    with open(folder / f"manifest-{count}.jsonl", "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    stamp.write_text(json.dumps({**settings, "records": max(count, recorded.get("records", 0))}))
    return InputSet(modality, folder, count, source)


def _media_maker(modality: str) -> tuple[str, Callable[[np.random.Generator], bytes], str]:
    """(source, one record's file content from its generator, file extension) for image or audio."""
    if modality == "image":
        photos = _photo_sources()
        return "skimage photos", lambda rng: _jpeg(rng, photos[rng.integers(len(photos))]), "jpg"
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        return "speech-like", lambda rng: _wav(_speech_like(rng, _clip_seconds(rng))), "wav"

    def speak(rng: np.random.Generator) -> bytes:
        with tempfile.TemporaryDirectory() as scratch:
            return _wav(_spoken(rng, _clip_seconds(rng), espeak, Path(scratch) / "speech.wav"))

    return "espeak-ng", speak, "wav"


def _clip_seconds(rng: np.random.Generator) -> float:
    return float(rng.uniform(SHORTEST_CLIP_SECONDS, LONGEST_CLIP_SECONDS))
