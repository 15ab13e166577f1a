"""Record: one validated manifest row, the unit that every stage of the job accounts for."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from mmfeatures.errors import ValidationError
from mmfeatures.schema import field_names, load_contract, reserved_record_columns

_FIELDS = load_contract("record")["fields"]
MODALITY_COLUMNS = tuple(f["name"] for f in _FIELDS if f.get("modality"))
REFERENCE_COLUMNS = frozenset(f["name"] for f in _FIELDS if f.get("reference"))


@dataclass(frozen=True)
class Record:
    id: str
    source: str
    manifest_dir: str
    payloads: Mapping[str, str] = field(default_factory=dict)  # modality -> inline text or reference
    label: str | None = None
    split: str | None = None
    carried: Mapping[str, Any] = field(default_factory=dict)

    def modalities(self) -> list[str]:
        """The modalities this record holds, in a fixed order."""
        return [name for name in MODALITY_COLUMNS if name in self.payloads]

    def payload(self, modality: str) -> str | None:
        """The inline text or the media reference of one modality, None when absent."""
        return self.payloads.get(modality)


CARRIED_PREFIX = "manifest_"


def carried_column_name(name: str) -> str:
    """A carried column's name in the feature table: prefixed when it would collide with one of the
    table's own columns (a manifest column named ``fused``, say)."""
    return f"{CARRIED_PREFIX}{name}" if name in field_names("features") else name


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and value != value)  # NaN from Parquet/pandas


def reported_id(row: Mapping[str, Any]) -> str | None:
    """A rejected row's id as its error row reports it: None when it has none."""
    value = row.get("id")
    return None if _is_missing(value) or not str(value).strip() else str(value)


def _optional_string(row: Mapping[str, Any], column: str, *, allow_int: bool = False) -> str | None:
    value = row.get(column)
    if _is_missing(value):
        return None
    if isinstance(value, str):
        return value
    if allow_int and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise ValidationError(
        f"column {column!r} must be a string, got {type(value).__name__}", error_type="wrong_type"
    )


def _label(row: Mapping[str, Any]) -> str | None:
    value = row.get("label")
    if isinstance(value, float) and not _is_missing(value):  # pandas stores int labels with gaps as float
        return str(int(value)) if value.is_integer() else str(value)
    return _optional_string(row, "label", allow_int=True)


def parse_record(row: Mapping[str, Any], *, source: str, manifest_dir: str) -> Record:
    """Validate one manifest row; raises ``ValidationError`` with a stable code when it is unusable."""
    record_id = _optional_string(row, "id", allow_int=True)
    if record_id is None or not record_id.strip():
        raise ValidationError("the record has no id", error_type="missing_id")
    payloads = {}
    for modality in MODALITY_COLUMNS:
        value = _optional_string(row, modality)
        if value is not None and not (modality in REFERENCE_COLUMNS and not value.strip()):
            payloads[modality] = value  # a blank reference is no reference; blank text is an error later
    if not payloads:
        raise ValidationError(f"the record has none of {', '.join(MODALITY_COLUMNS)}", error_type="no_modality")
    reserved = reserved_record_columns()
    return Record(
        id=record_id,
        source=source,
        manifest_dir=manifest_dir,
        payloads=payloads,
        label=_label(row),
        split=_optional_string(row, "split"),
        carried={carried_column_name(key): value for key, value in row.items() if key not in reserved},
    )
