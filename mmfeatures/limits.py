"""Safety caps on untrusted input, each set by an option (see ``options.py``) with a safe default."""

from __future__ import annotations

from dataclasses import dataclass

from mmfeatures.errors import FetchError


@dataclass(frozen=True)
class Limits:
    max_bytes: int = 64 * 1024 * 1024  # one media file
    max_pixels: int = 64_000_000  # one image's width x height
    max_audio_seconds: float = 600.0  # one clip
    max_text_chars: int = 1_000_000  # one text


def check_size(size: int | None, max_bytes: int | None) -> None:
    """Refuse media of ``size`` bytes over ``max_bytes`` (None: unknown size, or no limit)."""
    if size is not None and max_bytes is not None and size > max_bytes:
        raise FetchError(f"{size} bytes is over the {max_bytes}-byte limit", error_type="file_too_large")
