"""Safety caps on untrusted input, each set by an option (see ``options.py``) with a safe default,
and the one check every numeric option goes through."""

from __future__ import annotations

import math
from dataclasses import dataclass

from mmfeatures.errors import ConfigurationError, FetchError

# A media file is read whole into memory: 1 TiB is more than any worker holds.
MOST_BYTES = 2**40
# Audio shorter than 20 ms is refused as too short (``audio_too_short``): a lower limit refuses every clip.
LEAST_AUDIO_SECONDS = 0.02


def check_option(
    name: str, value: object, least: float, most: float = math.inf, *, integer: bool = True, why: str = ""
) -> None:
    """Refuse the value of option ``name`` unless it is a finite number (an integer, if
    ``integer``) from ``least`` to ``most``, in one line naming the option and ``why`` the bound
    holds: a value out of range would fail only once the models ran, or quietly lift a limit
    (a NaN compares false with everything)."""
    if (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and (isinstance(value, int) or (not integer and math.isfinite(value)))
        and least <= value <= most
    ):
        return
    kind = "an integer" if integer else "a finite number"
    bounds = f"at least {least}" if most == math.inf else f"from {least} to {most}"
    raise ConfigurationError(f"--{name} must be {kind} {bounds}" + (f" ({why})" if why else "") + f", not {value!r}")


@dataclass(frozen=True)
class Limits:
    max_bytes: int = 64 * 1024 * 1024  # one media file
    max_pixels: int = 64_000_000  # one image's width x height
    max_audio_seconds: float = 600.0  # one clip
    max_text_chars: int = 1_000_000  # one text

    def __post_init__(self) -> None:
        check_option("max_bytes", self.max_bytes, 1, MOST_BYTES, why="a media file is read whole into memory")
        check_option("max_pixels", self.max_pixels, 1)
        check_option(
            "max_audio_seconds",
            self.max_audio_seconds,
            LEAST_AUDIO_SECONDS,
            integer=False,
            why="audio shorter than 20 ms is refused as too short",
        )
        check_option("max_text_chars", self.max_text_chars, 1)


def check_size(size: int | None, max_bytes: int | None) -> None:
    """Refuse media of ``size`` bytes over ``max_bytes`` (None: unknown size, or no limit)."""
    if size is not None and max_bytes is not None and size > max_bytes:
        raise FetchError(f"{size} bytes is over the {max_bytes}-byte limit", error_type="file_too_large")
