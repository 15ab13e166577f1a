"""The modality registry: adding one (video, say) is one module, one line here, and its columns in
``schemas/v1/record.json`` and ``features.json``."""

from __future__ import annotations

from mmfeatures.modalities.audio import AudioModality
from mmfeatures.modalities.base import Limits, Modality, Prepared
from mmfeatures.modalities.image import ImageModality
from mmfeatures.modalities.text import TextModality
from mmfeatures.records import MODALITY_COLUMNS

MODALITIES: dict[str, type[Modality]] = {
    "text": TextModality,
    "image": ImageModality,
    "audio": AudioModality,
}

if set(MODALITIES) != set(MODALITY_COLUMNS):
    raise ImportError(
        f"the modality registry {sorted(MODALITIES)} and the record contract's modality columns "
        f"{sorted(MODALITY_COLUMNS)} (schemas/v1/record.json) must name the same modalities"
    )

__all__ = ["MODALITIES", "Limits", "Modality", "Prepared"]
