"""The modality registry. Adding one (video, say) takes one module beside these (its preprocessor,
encoder and ``Modality``), one entry here, and its columns in ``schemas/v1/record.json`` (the input
column) and ``schemas/v1/features.json`` (``<name>_embedding`` and ``has_<name>``)."""

from __future__ import annotations

from mmfeatures.modalities.audio import AUDIO
from mmfeatures.modalities.base import Encoder, Modality, Prepared, Preprocessor, Window
from mmfeatures.modalities.image import IMAGE
from mmfeatures.modalities.text import TEXT
from mmfeatures.records import MODALITY_COLUMNS
from mmfeatures.schema import field_names, load_contract

MODALITIES: dict[str, Modality] = {modality.name: modality for modality in (TEXT, IMAGE, AUDIO)}


def _check_contracts() -> None:
    """The registry and the data contracts must agree, or a modality's values would be dropped."""
    if set(MODALITIES) != set(MODALITY_COLUMNS):
        raise ImportError(
            f"the modality registry {sorted(MODALITIES)} and the record contract's modality columns "
            f"{sorted(MODALITY_COLUMNS)} (schemas/v1/record.json) must name the same modalities"
        )
    embeddings = {f["name"]: f.get("modality") for f in load_contract("features")["fields"] if f["type"] == "embedding"}
    features = set(field_names("features"))
    missing = [f"has_{name}" for name in MODALITIES if f"has_{name}" not in features]
    missing += [
        f"{name}_embedding (an embedding of modality {name!r})"
        for name in MODALITIES
        if embeddings.get(f"{name}_embedding") != name
    ]
    if missing:
        raise ImportError(f"the feature contract (schemas/v1/features.json) lacks {', '.join(missing)}")


_check_contracts()

__all__ = ["MODALITIES", "Encoder", "Modality", "Prepared", "Preprocessor", "Window"]
