"""Safety caps on untrusted input, each set by an option (see ``options.py``) with a safe default."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    max_bytes: int = 64 * 1024 * 1024  # one media file
    max_pixels: int = 64_000_000  # one image's width x height
    max_audio_seconds: float = 600.0  # one clip
    max_text_chars: int = 1_000_000  # one text
