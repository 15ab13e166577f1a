"""Record: one validated manifest row, the unit that every stage of the job accounts for."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from mmfeatures.errors import ValidationError
from mmfeatures.schema import load_contract, reserved_record_columns

MODALITY_COLUMNS = tuple(f["name"] for f in load_contract("record")["fields"] if f.get("modality"))


@dataclass(frozen=True)
class Record:
    id: str
    source: str
    manifest_dir: str
    text: str | None = None
    image: str | None = None
    audio: str | None = None
    label: str | None = None
    split: str | None = None
    carried: Mapping[str, Any] = field(default_factory=dict)

    def modalities(self) -> list[str]:
        """The modalities this record holds, in a fixed order."""
        return [name for name in MODALITY_COLUMNS if getattr(self, name) is not None]

    def payload(self, modality: str) -> str:
        """The inline text or the media reference of one modality."""
        return getattr(self, modality)


def _optional_string(row: Mapping[str, Any], column: str, *, allow_int: bool = False) -> str | None:
    value = row.get(column)
    if value is None or (isinstance(value, float) and value != value):  # NaN from Parquet/pandas
        return None
    if isinstance(value, str):
        return value
    if allow_int and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise ValidationError(
        f"column {column!r} must be a string, got {type(value).__name__}", error_type="wrong_type"
    )


def parse_record(row: Mapping[str, Any], *, source: str, manifest_dir: str) -> Record:
    """Validate one manifest row; raises ``ValidationError`` with a stable code when it is unusable."""
    record_id = _optional_string(row, "id", allow_int=True)
    if record_id is None or not record_id.strip():
        raise ValidationError("the record has no id", error_type="missing_id")
    values = {
        "text": _optional_string(row, "text"),
        "image": _optional_string(row, "image"),
        "audio": _optional_string(row, "audio"),
        "label": _optional_string(row, "label", allow_int=True),
        "split": _optional_string(row, "split"),
    }
    for reference in ("image", "audio"):
        if values[reference] is not None and not values[reference].strip():
            values[reference] = None
    reserved = reserved_record_columns()
    carried = {key: value for key, value in row.items() if key not in reserved}
    record = Record(
        id=record_id, source=source, manifest_dir=manifest_dir, carried=carried, **values
    )
    if not record.modalities():
        raise ValidationError("the record has no text, image or audio", error_type="no_modality")
    return record
