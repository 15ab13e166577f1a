"""Offline image + audio + text classification set in the spirit of AV-MNIST (MultiBench).

Each record's label (a digit 0-9) is

* *drawn*: a real MNIST digit, degraded as AV-MNIST does (projected onto the leading
  principal components, so most of its energy is gone) plus pixel noise and an occluding block;
* *spoken*: the English word, synthesised by one of many text-to-speech "speakers" (espeak-ng
  accents x voice variants, flite's and festival's voices) and buried in coloured noise;
* *written*: a short caption that names the digit only sometimes, hints at it sometimes
  ("an even number") and otherwise says nothing about it.

No modality alone gives the label away, so fusing them has something to add. Speakers are
disjoint between the train, val and test splits, so the audio side measures generalisation
to unheard voices rather than memorised ones.

Everything is derived from ``(n, seed)``: two builds on one machine give byte-identical
manifests and files (the TTS engines are deterministic for given arguments).

    mmfeatures sample --kind avmnist --out OUT_DIR [--n N] [--seed SEED]
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soxr

from mmfeatures.sample import (
    IMAGE_SIDE,
    MNIST_SIDE,
    WORDS,
    deal_labels,
    encode_image,
    encode_samples,
    fetch_mnist,
    load_digits,
    render_digit,
    require_binary,
    run_tts,
    write_manifest,
)

# ----------------------------------------------------------------- difficulty
# Fixed before any model saw this data; never tune them to make results look better.
#
# Images, as AV-MNIST: keep only the leading principal components that together hold 25% of
# the digits' variance (about the first four), then add pixel noise and an occluding block.
PCA_VARIANCE_KEPT = 0.25
IMAGE_NOISE_STD = 0.1  # Gaussian noise on [0, 1] intensities, at 28x28
OCCLUDER_SIDES = (6, 11)  # square block, side in [6, 11) px of 28: 5-15% of the area
# Audio: the word at a signal-to-noise ratio drawn uniformly from this range (dB, speech power
# over the spoken part vs noise power), in white, pink or brown noise.
SNR_DB_RANGE = (-10.0, 0.0)
NOISE_EXPONENTS = {"white": 0.0, "pink": 1.0, "brown": 2.0}  # noise power ~ 1 / f^exponent
# Text: how often a caption names the digit, hints at it, or says nothing about it.
CAPTION_KIND_WEIGHTS = {"names": 0.3, "hint": 0.3, "plain": 0.4}

# ------------------------------------------------------------ speech variety
TEMPO_RANGE = (0.8, 1.25)  # speaking rate relative to each voice's default
ESPEAK_PITCH_RANGE = (30, 71)  # espeak-ng -p (0-99, default 50), drawn from [30, 71)
ESPEAK_WORDS_PER_MINUTE = 175  # espeak-ng's default -s, scaled by the tempo
ENGINE_WEIGHTS = {"espeak-ng": 0.6, "flite": 0.25, "festival": 0.15}
AUDIO_RATE = 16_000
CLIP_SECONDS = 1.5  # the word sits at a random offset in a clip this long
SILENCE_FRACTION = 0.01  # below 1% of the peak (-40 dB) counts as silence when trimming
NOISE_LOWEST_HZ = 50.0  # no inaudible rumble: it would dominate brown noise's power
PEAK_LEVEL = 0.9  # every clip is scaled to this peak, whatever the engine's level

# espeak-ng's built-in English accents (the mbrola voices need a separate package).
ESPEAK_ACCENTS = (
    "en",
    "en-us",
    "en-gb-scotland",
    "en-gb-x-gbclan",
    "en-gb-x-rp",
    "en-gb-x-gbcwmd",
    "en-029",
    "en-us-nyc",
)
HELD_OUT_SHARE = 0.15  # of voice sources, for val and for test each (at least one)

# ----------------------------------------------------------------- captions
NAMING_TEMPLATES = (
    "a handwritten {word}",
    "the digit {digit}",
    "number {word}, slightly smudged",
    "a scan of a {digit}",
    "{word}",
)
# Each hint is true of a subset of the digits; a caption uses one that is true of its label.
HINTS = {
    "an even number": frozenset({0, 2, 4, 6, 8}),
    "an odd number": frozenset({1, 3, 5, 7, 9}),
    "a low digit": frozenset({0, 1, 2, 3, 4}),
    "a high digit": frozenset({5, 6, 7, 8, 9}),
    "a prime number": frozenset({2, 3, 5, 7}),
    "not a prime number": frozenset({0, 1, 4, 6, 8, 9}),
}
HINT_TEMPLATES = ("a handwritten digit, {hint}", "{hint}, written by hand", "the scan shows {hint}")
PLAIN_CAPTIONS = (
    "a handwritten mark",
    "a scanned digit",
    "ink on paper",
    "a small grey scan",
    "a mark on a form",
    "a digit, hard to read",
    "a blurry pen stroke",
)

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Speaker:
    """One synthetic voice. ``source`` is whose voice it is: flite's and festival's voices are
    built from recordings of real people, and voices made from the same person's recordings
    share a source; an espeak-ng voice variant is one source across all accents. All voices of
    one source fall in the same split."""

    engine: str  # "espeak-ng", "flite" or "festival"
    voice: str  # the engine's own name for it
    source: str
    package: str  # the Debian package that provides it

    @property
    def name(self) -> str:
        return f"{self.engine}:{self.voice}"


# flite's and festival's English voices ("awb_time" is left out: it only says clock times).
RECORDED_VOICES = (
    Speaker("flite", "awb", "awb", "flite"),
    Speaker("flite", "kal", "kal", "flite"),  # 8 kHz: telephone-band speech
    Speaker("flite", "kal16", "kal", "flite"),
    Speaker("flite", "rms", "rms", "flite"),
    Speaker("flite", "slt", "slt", "flite"),
    Speaker("festival", "kal_diphone", "kal", "festvox-kallpc16k"),
    Speaker("festival", "ked_diphone", "ked", "festvox-kdlpc16k"),
    Speaker("festival", "cmu_us_slt_arctic_hts", "slt", "festvox-us-slt-hts"),
)
ENGINE_BINARIES = {
    "espeak-ng": ("espeak-ng", "espeak-ng"),
    "flite": ("flite", "flite"),
    "festival": ("text2wave", "festival"),
}  # engine: (binary, Debian package)


@dataclass(frozen=True)
class Occluder:
    """A grey square pasted over the 28x28 digit."""

    top: int
    left: int
    side: int
    grey: float


@dataclass(frozen=True)
class Utterance:
    """How one record's word is spoken and buried in noise."""

    speaker: Speaker
    tempo: float
    pitch: int | None  # espeak-ng only; flite's and festival's voices keep their recorded pitch
    snr_db: float
    noise: str  # a NOISE_EXPONENTS key
    onset: float  # where the word starts, as a fraction of the clip's spare time


@dataclass(frozen=True)
class Plan:
    """Every random decision for one record, fixed before any file is written."""

    rec_id: str
    label: int
    split: str
    mnist_index: int
    occluder: Occluder
    utterance: Utterance
    caption: str
    noise_seed: int  # seeds the record's pixel and audio noise, whichever thread draws it


# ----------------------------------------------------------------- speakers


def espeak_variants(espeak: str) -> list[str]:
    """espeak-ng's voice variants ("m3", "Alex", "croak", ...), as this install lists them."""
    listing = subprocess.run(
        [espeak, "--voices=variant"], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    # Rows after the header: Pty Language Age/Gender VoiceName File ...; File is "!v/<variant>".
    return sorted(row.split()[4].removeprefix("!v/") for row in listing.splitlines()[1:])


def check_recorded_voices() -> None:
    """Fail early, naming the packages to install, if a flite or festival voice is missing:
    flite silently falls back to its default voice for an unknown name."""
    flite_list = subprocess.run(
        [require_binary("flite", "flite"), "-lv"], capture_output=True, text=True, timeout=30, check=True
    ).stdout.split()
    festival_list = (
        subprocess.run(
            [require_binary("festival", "festival"), "--batch", "(print (voice.list))"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        .stdout.strip("()\n")
        .split()
    )
    available = {"flite": set(flite_list), "festival": set(festival_list)}
    missing = sorted({s.package for s in RECORDED_VOICES if s.voice not in available[s.engine]})
    if missing:
        raise RuntimeError(f"text-to-speech voices missing: install them with `apt-get install -y {' '.join(missing)}`")


def all_speakers(espeak: str) -> list[Speaker]:
    """Every accent x variant of espeak-ng, then flite's and festival's voices."""
    return [
        Speaker("espeak-ng", f"{accent}+{variant}", f"espeak-ng+{variant}", "espeak-ng")
        for variant in espeak_variants(espeak)
        for accent in ESPEAK_ACCENTS
    ] + list(RECORDED_VOICES)


def deal_sources(sources: set[str], rng: np.random.Generator) -> dict[str, str]:
    """Shuffle voice sources and deal ~15% to val, ~15% to test (at least one each) and the
    rest to train, so that no voice is heard in two splits."""
    order = rng.permutation(sorted(sources)).tolist()
    held_out = max(1, round(HELD_OUT_SHARE * len(order)))
    return {
        source: "val" if k < held_out else "test" if k < 2 * held_out else "train" for k, source in enumerate(order)
    }


def speaker_pools(speakers: list[Speaker], rng: np.random.Generator) -> dict[str, dict[str, list[Speaker]]]:
    """{split: {engine: speakers}}. espeak-ng's variants and the recorded voices are dealt
    separately, so every held-out split gets both kinds of voice."""
    espeak_sources = {s.source for s in speakers if s.engine == "espeak-ng"}
    recorded_sources = {s.source for s in speakers} - espeak_sources
    split_of = deal_sources(espeak_sources, rng) | deal_sources(recorded_sources, rng)
    pools: dict[str, dict[str, list[Speaker]]] = {split: {} for split in SPLITS}
    for speaker in speakers:
        pools[split_of[speaker.source]].setdefault(speaker.engine, []).append(speaker)
    return pools


# --------------------------------------------------------------- planning


def caption(label: int, rng: np.random.Generator) -> str:
    """A caption that names the digit, hints at it, or says nothing about it
    (CAPTION_KIND_WEIGHTS), never anything false."""
    kinds = list(CAPTION_KIND_WEIGHTS)
    kind = kinds[rng.choice(len(kinds), p=list(CAPTION_KIND_WEIGHTS.values()))]
    if kind == "names":
        template = NAMING_TEMPLATES[rng.integers(len(NAMING_TEMPLATES))]
        return template.format(word=WORDS[label], digit=label)
    if kind == "hint":
        true_hints = [hint for hint, digits in HINTS.items() if label in digits]
        template = HINT_TEMPLATES[rng.integers(len(HINT_TEMPLATES))]
        return template.format(hint=true_hints[rng.integers(len(true_hints))])
    return PLAIN_CAPTIONS[rng.integers(len(PLAIN_CAPTIONS))]


def draw_utterance(pool: dict[str, list[Speaker]], rng: np.random.Generator) -> Utterance:
    """Pick an engine (ENGINE_WEIGHTS, among those with voices in this split), one of its
    voices, and how the word is spoken and masked."""
    engines = sorted(pool)
    weights = np.array([ENGINE_WEIGHTS[e] for e in engines])
    voices = pool[engines[rng.choice(len(engines), p=weights / weights.sum())]]
    speaker = voices[rng.integers(len(voices))]
    return Utterance(
        speaker=speaker,
        tempo=round(float(rng.uniform(*TEMPO_RANGE)), 3),
        pitch=int(rng.integers(*ESPEAK_PITCH_RANGE)) if speaker.engine == "espeak-ng" else None,
        snr_db=round(float(rng.uniform(*SNR_DB_RANGE)), 2),
        noise=sorted(NOISE_EXPONENTS)[rng.integers(len(NOISE_EXPONENTS))],
        onset=float(rng.random()),
    )


def draw_occluder(rng: np.random.Generator) -> Occluder:
    side = int(rng.integers(*OCCLUDER_SIDES))
    return Occluder(
        top=int(rng.integers(MNIST_SIDE - side + 1)),
        left=int(rng.integers(MNIST_SIDE - side + 1)),
        side=side,
        grey=float(rng.random()),
    )


def plan_records(
    n: int, counts: dict[int, int], pools: dict[str, dict[str, list[Speaker]]], rng: np.random.Generator
) -> list[Plan]:
    """Make every random choice up front, in one order, so the output does not depend on
    the order files are written in. Each MNIST digit is used at most once."""
    return [
        Plan(
            rec_id=f"avm-{i:05d}",
            label=label,
            split=split,
            mnist_index=mnist_index,
            occluder=draw_occluder(rng),
            utterance=draw_utterance(pools[split], rng),
            caption=caption(label, rng),
            noise_seed=int(rng.integers(2**63)),
        )
        for i, (label, split, mnist_index) in enumerate(deal_labels(n, counts, rng))
    ]


# ----------------------------------------------------------------- images


@dataclass(frozen=True)
class DigitPCA:
    """The leading principal components of the MNIST digits (flattened 28x28)."""

    mean: np.ndarray  # (784,)
    basis: np.ndarray  # (784, k), orthonormal columns
    variance_kept: float

    def project(self, pixels: np.ndarray) -> np.ndarray:
        """The digit rebuilt from its leading components only: a blurred, ambiguous ghost."""
        centred = pixels.reshape(-1).astype(np.float64) - self.mean
        return (self.mean + self.basis @ (self.basis.T @ centred)).reshape(pixels.shape)


def fit_pca(digits: dict[int, np.ndarray], variance_kept: float = PCA_VARIANCE_KEPT) -> DigitPCA:
    """Fewest components holding ``variance_kept`` of all the digits' variance (eigh of the
    784x784 covariance: exact, deterministic, and faster than an SVD of the data)."""
    data = np.concatenate([digits[label] for label in sorted(digits)]).reshape(-1, MNIST_SIDE**2)
    data = data.astype(np.float64)
    mean = data.mean(axis=0)
    eigenvalues, eigenvectors = np.linalg.eigh(np.cov(data - mean, rowvar=False))
    eigenvalues, eigenvectors = eigenvalues[::-1], eigenvectors[:, ::-1]  # largest first
    shares = np.cumsum(eigenvalues) / eigenvalues.sum()
    k = int(np.searchsorted(shares, variance_kept) + 1)
    return DigitPCA(mean=mean, basis=np.ascontiguousarray(eigenvectors[:, :k]), variance_kept=float(shares[k - 1]))


def degrade_digit(pixels: np.ndarray, pca: DigitPCA, occluder: Occluder, rng: np.random.Generator) -> np.ndarray:
    """AV-MNIST's PCA cut, then the occluding block, then sensor-like noise on top (28x28)."""
    image = pca.project(pixels)
    image[occluder.top : occluder.top + occluder.side, occluder.left : occluder.left + occluder.side] = occluder.grey
    return image + rng.normal(0.0, IMAGE_NOISE_STD, image.shape)


# ------------------------------------------------------------------ audio


def tts_command(binary: str, utterance: Utterance, word: str, wav: Path) -> tuple[list[str], str | None]:
    """(argv, stdin) that make the utterance's engine say ``word`` into ``wav``."""
    speaker, tempo = utterance.speaker, utterance.tempo
    if speaker.engine == "espeak-ng":
        return [
            binary,
            "-v",
            speaker.voice,
            "-s",
            str(round(ESPEAK_WORDS_PER_MINUTE * tempo)),
            "-p",
            str(utterance.pitch),
            "-w",
            str(wav),
            word,
        ], None
    if speaker.engine == "flite":
        return [
            binary,
            "-voice",
            speaker.voice,
            "--setf",
            f"duration_stretch={1 / tempo:.4f}",
            "-t",
            word,
            "-o",
            str(wav),
        ], None
    # festival's text2wave reads the text on stdin. HTS voices take their speed from the
    # engine's "-r" option; diphone voices from Duration_Stretch (HTS ignores it, and the
    # HTS parameters are unbound for diphone voices).
    if speaker.voice.endswith("_hts"):
        speed = f'(set! hts_engine_params (append hts_engine_params \'(("-r" {tempo}))))'
    else:
        speed = f"(Parameter.set 'Duration_Stretch {1 / tempo:.4f})"
    return [binary, "-eval", f"(voice_{speaker.voice})", "-eval", speed, "-o", str(wav)], word


def trim_silence(samples: np.ndarray) -> np.ndarray:
    """The span from the first to the last sample above SILENCE_FRACTION of the peak."""
    loud = np.flatnonzero(np.abs(samples) > SILENCE_FRACTION * np.abs(samples).max())
    return samples[loud[0] : loud[-1] + 1]


def coloured_noise(length: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    """Unit-power Gaussian noise with power ~ 1/f^exponent above NOISE_LOWEST_HZ."""
    spectrum = np.fft.rfft(rng.standard_normal(length))
    freqs = np.fft.rfftfreq(length, d=1 / AUDIO_RATE)
    audible = freqs >= NOISE_LOWEST_HZ
    spectrum[~audible] = 0
    spectrum[audible] /= freqs[audible] ** (exponent / 2)
    noise = np.fft.irfft(spectrum, n=length)
    return noise / np.sqrt(np.mean(noise**2))


def mix_clip(word: np.ndarray, utterance: Utterance, rng: np.random.Generator) -> np.ndarray:
    """The trimmed word at its onset in a CLIP_SECONDS clip (longer if the word is), in noise
    at the planned SNR, scaled to PEAK_LEVEL."""
    length = max(round(CLIP_SECONDS * AUDIO_RATE), len(word))
    start = int(utterance.onset * (length - len(word)))
    speech = np.zeros(length)
    speech[start : start + len(word)] = word
    noise_power = np.mean(word.astype(np.float64) ** 2) / 10 ** (utterance.snr_db / 10)
    noise = coloured_noise(length, NOISE_EXPONENTS[utterance.noise], rng)
    clip = speech + np.sqrt(noise_power) * noise
    return PEAK_LEVEL * clip / np.abs(clip).max()


def write_audio(path: Path, binaries: dict[str, str], plan: Plan, workdir: Path) -> None:
    """Synthesise the record's word, put it in noise and write a 16 kHz mono WAV."""
    scratch = workdir / f"{plan.rec_id}.wav"  # one per record: calls run in threads
    utterance = plan.utterance
    argv, stdin = tts_command(binaries[utterance.speaker.engine], utterance, WORDS[plan.label], scratch)
    samples, rate = run_tts(argv, scratch, stdin)
    if rate != AUDIO_RATE:
        samples = soxr.resample(samples, rate, AUDIO_RATE, quality="HQ")
    clip = mix_clip(trim_silence(samples), utterance, np.random.default_rng([plan.noise_seed, 1]))
    path.write_bytes(encode_samples(clip, AUDIO_RATE, "wav"))


def engine_versions() -> dict[str, str]:
    """What each engine says of its version: another version may speak differently."""
    return {
        engine: " ".join(
            subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30).stdout.split()
        )
        for engine, binary in (("espeak-ng", "espeak-ng"), ("flite", "flite"), ("festival", "festival"))
    }  # text2wave has no --version


# ------------------------------------------------------------------ build


def manifest_row(plan: Plan) -> dict:
    """The manifest line: paths relative to the manifest; label as a string; the speaker and
    the MNIST digit used are carried along for analysis."""
    return {
        "id": plan.rec_id,
        "image": f"images/{plan.rec_id}.png",
        "audio": f"audio/{plan.rec_id}.wav",
        "text": plan.caption,
        "label": str(plan.label),
        "split": plan.split,
        "speaker": plan.utterance.speaker.name,
        "mnist_index": plan.mnist_index,
    }


def describe(
    n: int,
    seed: int,
    pca: DigitPCA,
    plans: list[Plan],
    pools: dict[str, dict[str, list[Speaker]]],
    versions: dict[str, str],
) -> dict:
    """dataset.json: the generation constants, and which voices belong to which split."""
    splits = {}
    for split in SPLITS:
        used = [p for p in plans if p.split == split]
        voices = [s for engine in sorted(pools[split]) for s in pools[split][engine]]
        splits[split] = {
            "records": len(used),
            "voice_sources": sorted({s.source for s in voices}),
            "speakers": sorted({p.utterance.speaker.name for p in used}),
        }
    return {
        "name": "avmnist-offline",
        "n": n,
        "seed": seed,
        "image": {
            "pca_variance_target": PCA_VARIANCE_KEPT,
            "pca_variance_kept": round(pca.variance_kept, 4),
            "pca_components": pca.basis.shape[1],
            "noise_std": IMAGE_NOISE_STD,
            "occluder_sides": list(OCCLUDER_SIDES),
            "side_px": IMAGE_SIDE,
        },
        "audio": {
            "rate": AUDIO_RATE,
            "clip_seconds": CLIP_SECONDS,
            "snr_db_range": list(SNR_DB_RANGE),
            "noise_exponents": NOISE_EXPONENTS,
            "tempo_range": list(TEMPO_RANGE),
            "espeak_pitch_range": list(ESPEAK_PITCH_RANGE),
            "engine_weights": ENGINE_WEIGHTS,
            "engine_versions": versions,
        },
        "text": {
            "caption_kind_weights": CAPTION_KIND_WEIGHTS,
            "hints": {hint: sorted(digits) for hint, digits in HINTS.items()},
        },
        "splits": splits,
    }


def build_avmnist(out_dir: str, n: int, seed: int = 0) -> str:
    """Write ``n`` records under ``out_dir`` and return the path of manifest.jsonl.

    Layout: manifest.jsonl, dataset.json, images/*.png (112x112 grey), audio/*.wav (16 kHz
    mono). Existing files of the same names are overwritten; nothing else is touched.
    """
    if n < 1:
        raise ValueError("n must be >= 1")
    binaries = {engine: require_binary(binary, package) for engine, (binary, package) in ENGINE_BINARIES.items()}
    check_recorded_voices()
    digits = load_digits(fetch_mnist())
    counts = {label: len(d) for label, d in digits.items()}
    if -(-n // 10) > min(counts.values()):
        raise ValueError(
            f"n={n} needs more than the {min(counts.values())} MNIST digits "
            f"of the rarest label: use n <= {10 * min(counts.values())}"
        )
    pca = fit_pca(digits)
    rng = np.random.default_rng(seed)
    pools = speaker_pools(all_speakers(binaries["espeak-ng"]), rng)
    plans = plan_records(n, counts, pools, rng)

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "audio").mkdir(parents=True, exist_ok=True)
    rows = [manifest_row(p) for p in plans]
    for plan, row in zip(plans, rows, strict=True):
        noisy = degrade_digit(
            digits[plan.label][plan.mnist_index], pca, plan.occluder, np.random.default_rng([plan.noise_seed, 0])
        )
        (out / row["image"]).write_bytes(encode_image(render_digit(noisy), "png"))

    with tempfile.TemporaryDirectory() as workdir, ThreadPoolExecutor(max_workers=4) as pool:
        jobs = [
            pool.submit(write_audio, out / row["audio"], binaries, plan, Path(workdir))
            for plan, row in zip(plans, rows, strict=True)
        ]
        for job in jobs:
            job.result()

    description = describe(n, seed, pca, plans, pools, engine_versions())
    (out / "dataset.json").write_text(json.dumps(description, indent=2) + "\n")
    return write_manifest(out, rows)
