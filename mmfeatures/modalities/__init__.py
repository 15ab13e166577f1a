"""The modality registry: adding one (video, say) is one module and one line here."""

from __future__ import annotations

from mmfeatures.modalities.audio import AudioModality
from mmfeatures.modalities.base import Limits, Modality, Prepared
from mmfeatures.modalities.image import ImageModality
from mmfeatures.modalities.text import TextModality

MODALITIES: dict[str, type[Modality]] = {
    "text": TextModality,
    "image": ImageModality,
    "audio": AudioModality,
}

__all__ = ["MODALITIES", "Limits", "Modality", "Prepared"]
