"""Peak memory of decoding hostile inputs, each case in a fresh process: the growth of the process's
peak resident set (``ru_maxrss``) over a baseline taken once the modules are imported and a small
file of the same kind decoded, under a bound derived from the limits the case passes:

- an 8-bit image: ``max_pixels`` x 3 bytes x 2 (OpenCV's decoded image and a converted copy) + ``SLACK``
  (the colour conversions of images with alpha or float pixels have working copies of their own);
- audio: ``max_audio_seconds`` x rate x 4 bytes (the mono float32 waveform; the rate is at most
  ``MAX_SAMPLE_RATE``) + one block of ``BLOCK_SAMPLES`` x 4 bytes + ``SLACK``, whatever the channel count.

``SLACK`` is what no limit governs: the decoders' own buffers, and code and tables touched for the first
time. Each case runs in a process forked from a server that imported the modalities once (Python's
forkserver), as importing torch and transformers takes seconds: the child's peak starts from its own
resident set at the fork, so that the growth is the case's alone."""

from __future__ import annotations

import io
import multiprocessing
import resource
import sys
from collections.abc import Callable, Iterator
from multiprocessing.pool import Pool

import numpy as np
import pytest
import soundfile

from mmfeatures.errors import DecodeError
from mmfeatures.limits import Limits
from mmfeatures.modalities.audio import BLOCK_SAMPLES, MAX_SAMPLE_RATE, AudioPreprocessor
from mmfeatures.modalities.base import Preprocessor
from mmfeatures.modalities.image import ImagePreprocessor
from tests.modalities.test_image import HOSTILE_IMAGES, encode

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss is in kilobytes on Linux only")

MIB = 1 << 20
SLACK = 16 * MIB
MAX_PIXELS = 1_000_000
BOMB_SIDE = 8000  # 64 M pixels: about 370 MB once decoded, well over the bound at MAX_PIXELS


def image_bound(limits: Limits) -> int:
    return limits.max_pixels * 3 * 2 + SLACK


def audio_bound(limits: Limits, rate: int) -> int:
    return int(limits.max_audio_seconds * min(rate, MAX_SAMPLE_RATE) * 4) + BLOCK_SAMPLES * 4 + SLACK


def constant_flac(seconds: int, rate: int, channels: int = 8) -> bytes:
    """A FLAC of a constant level on every channel: a few bytes per FLAC block, so a few hundred
    kilobytes hold minutes of 8 channels."""
    buffer = io.BytesIO()
    with soundfile.SoundFile(buffer, "w", rate, channels, format="FLAC", subtype="PCM_16") as sound:
        second = np.full((rate, channels), 0.25, np.float32)
        for _ in range(seconds):
            sound.write(second)
    return buffer.getvalue()


def wav(seconds: float, rate: int, channels: int = 1) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, np.full((int(seconds * rate), channels), 0.25, np.float32), rate, format="WAV")
    return buffer.getvalue()


WARM_UP = {"image": encode(np.full((16, 16, 3), 128, np.uint8), ".png"), "audio": wav(0.1, 16000)}


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def decode_growth(kind: str, data: bytes, limits: Limits) -> tuple[str, int]:
    """In the fresh process: decode ``data`` as ``kind``, and give the error type ("decoded" when
    there is none) and the growth of the peak resident set, in bytes."""
    preprocessor: Preprocessor = (ImagePreprocessor if kind == "image" else AudioPreprocessor)(limits=limits)
    preprocessor.decode(WARM_UP[kind])
    baseline = _peak_rss()
    try:
        preprocessor.decode(data)
        outcome = "decoded"
    except DecodeError as exc:
        outcome = exc.error_type
    return outcome, _peak_rss() - baseline


@pytest.fixture(scope="module")
def fresh_processes() -> Iterator[Pool]:
    """One process per case (``maxtasksperchild=1``), each forked from a server that imported the
    modalities once (by the names it can import from the repository's root: its ``sys.path`` is its own)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["mmfeatures.modalities", "tests.modalities.test_image"])
    with context.Pool(1, maxtasksperchild=1) as pool:
        yield pool


@pytest.mark.parametrize("name", HOSTILE_IMAGES)
def test_hostile_image_headers_decode_within_the_bound(fresh_processes: Pool, name: str) -> None:
    make, error_type = HOSTILE_IMAGES[name]
    limits = Limits(max_pixels=MAX_PIXELS)
    outcome, growth = fresh_processes.apply(decode_growth, ("image", make(BOMB_SIDE, BOMB_SIDE), limits))
    assert growth < image_bound(limits), f"{growth / MIB:.0f} MiB"
    assert outcome == error_type


def test_an_image_at_the_pixel_limit_decodes_within_the_bound(fresh_processes: Pool) -> None:
    """The bound holds for what it is meant to admit, not only for what is refused before decoding."""
    limits = Limits(max_pixels=MAX_PIXELS)
    noise = np.random.default_rng(0).integers(0, 256, (1000, 1000, 3), dtype=np.uint8)
    outcome, growth = fresh_processes.apply(decode_growth, ("image", encode(noise, ".png"), limits))
    assert growth < image_bound(limits), f"{growth / MIB:.0f} MiB"
    assert outcome == "decoded"


@pytest.mark.parametrize(
    ("make", "max_seconds", "rate", "outcome"),
    [
        # Decoded whole, 8 channels would take 8 times the mono waveform: 180 MB here.
        pytest.param(lambda: constant_flac(59, 96000), 60.0, 96000, "decoded", id="8-channels-96-kHz"),
        pytest.param(lambda: constant_flac(14, 384000), 15.0, 384000, "decoded", id="8-channels-384-kHz"),
        pytest.param(lambda: wav(0.1, 1_000_000, 8), 15.0, 1_000_000, "unsupported_audio", id="1-MHz"),
    ],
)
def test_audio_decodes_within_the_bound(
    fresh_processes: Pool, make: Callable[[], bytes], max_seconds: float, rate: int, outcome: str
) -> None:
    limits = Limits(max_audio_seconds=max_seconds)
    result, growth = fresh_processes.apply(decode_growth, ("audio", make(), limits))
    assert growth < audio_bound(limits, rate), f"{growth / MIB:.0f} MiB"
    assert result == outcome
