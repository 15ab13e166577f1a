"""Record: one validated manifest row, the unit that every stage of the job accounts for."""

from __future__ import annotations

import datetime
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from mmfeatures.errors import ErrorRow, RecordError, ValidationError
from mmfeatures.schema import field_names, load_contract, reserved_record_columns

_FIELDS = load_contract("record")["fields"]
MODALITY_COLUMNS: tuple[str, ...] = tuple(f["name"] for f in _FIELDS if f.get("modality"))
REFERENCE_COLUMNS: frozenset[str] = frozenset(f["name"] for f in _FIELDS if f.get("reference"))
# A tar shard's member extension -> the column its bytes fill ("sample.jpg" fills image).
TAR_COLUMNS: dict[str, str] = {extension: f["name"] for f in _FIELDS for extension in f.get("tar_extensions", ())}


Payload = str | bytes  # a media reference or inline text; bytes are the content itself (tar shards)


@dataclass(frozen=True)
class Record:
    id: str
    source: str
    manifest_dir: str
    payloads: Mapping[str, Payload] = field(default_factory=dict)  # modality -> payload
    label: str | None = None
    split: str | None = None
    carried: Mapping[str, Any] = field(default_factory=dict)
    # Modalities rejected while reading (a value of the wrong type, an oversized tar member): they
    # count as present and failed, and their error rows are emitted once the record is kept.
    rejected: tuple[ErrorRow, ...] = ()
    event_time: datetime.datetime | None = None  # from --timestamp-column, in UTC
    # Content shared with other records of the run (the same photo under two ids) is embedded
    # once: ``copies`` names, per modality, the records (id, source) that take this record's
    # vector; ``embedded_elsewhere`` the modalities whose vector this record takes from another.
    copies: Mapping[str, tuple[tuple[str, str], ...]] = field(default_factory=dict)
    embedded_elsewhere: frozenset[str] = frozenset()
    # Whether the record's row replaces one of the previous table (an incremental run).
    replaces: bool = False
    # What embedding has made of it so far, modality by modality: its vectors (with the digest of
    # the content each was computed from) and the modalities that failed.
    vectors: Mapping[str, tuple[Any, str | None]] = field(default_factory=dict)
    failed: frozenset[str] = frozenset()

    def modalities(self) -> list[str]:
        """The modalities this record holds, in a fixed order."""
        return [name for name in MODALITY_COLUMNS if name in self.payloads]

    def payload(self, modality: str) -> Payload | None:
        """The inline text, media reference or media content of one modality, None when absent."""
        return self.payloads.get(modality)

    def embeds(self, modality: str) -> bool:
        """Whether this record holds ``modality`` and embeds it, rather than take another record's vector."""
        return modality in self.payloads and modality not in self.embedded_elsewhere

    def own_columns(self) -> dict[str, Any]:
        """The columns of this record's row that are its own, whatever its vectors: id, label,
        split and carried columns."""
        return {**self.carried, "id": self.id, "label": self.label, "split": self.split}

    def without_content(self) -> Record:
        """This record with inline media bytes emptied: what the join needs, without shuffling
        images and audio a second time."""
        payloads = {m: (b"" if isinstance(v, bytes) else v) for m, v in self.payloads.items()}
        return replace(self, payloads=payloads, copies={})

    def with_vector(self, modality: str, vector: Any, digest: str | None) -> Record:
        """This record with ``modality`` embedded as ``vector``, computed from content of ``digest``."""
        return replace(self, vectors={**self.vectors, modality: (vector, digest)})

    def with_failure(self, modality: str) -> Record:
        """This record with ``modality`` failed (its error row is reported where it failed)."""
        return replace(self, failed=self.failed | {modality})


def media_digest(data: Payload) -> str:
    """The sha256 (hex) of a modality's content: media bytes, or text as UTF-8."""
    return hashlib.sha256(data if isinstance(data, bytes) else data.encode("utf-8", "surrogatepass")).hexdigest()


def content_hash(digests: Mapping[str, str]) -> str:
    """A record's content hash: one sha256 over each modality it holds (``digests``: modality ->
    ``media_digest``), by name, so that the same bytes under another modality hash apart."""
    lines = "".join(f"{name}:{digests[name]}\n" for name in MODALITY_COLUMNS if name in digests)
    return hashlib.sha256(lines.encode("ascii")).hexdigest()


def parse_event_time(value: Any, column: str) -> datetime.datetime:
    """A record's own event time from its ``--timestamp-column`` value, in UTC: ISO 8601 text, a
    timestamp or a date (read as midnight); a time without a zone is taken as UTC. Numbers are
    refused: seconds, milliseconds and microseconds since 1970 cannot be told apart."""
    when: Any = value
    if isinstance(value, str):
        try:
            when = datetime.datetime.fromisoformat(value.strip())
        except ValueError:
            when = None
    elif isinstance(value, datetime.date) and not isinstance(value, datetime.datetime):
        when = datetime.datetime.combine(value, datetime.time())
    if not isinstance(when, datetime.datetime):
        shown = "no value" if _is_missing(value) else f"{type(value).__name__} {str(value)[:40]!r}"
        message = f"--timestamp-column {column!r}: the record has {shown}, not an ISO 8601 time, a timestamp or a date"
        raise ValidationError(message, error_type="invalid_timestamp")
    if when.tzinfo is None:
        return when.replace(tzinfo=datetime.timezone.utc)
    return when.astimezone(datetime.timezone.utc)


CARRIED_PREFIX = "manifest_"
_NAMES_OF_THE_TABLE = frozenset(field_names("features")) | frozenset(field_names("record"))


def carried_column_name(name: str) -> str:
    """A carried column's name in the feature table: prefixed when, once any prefixes are taken
    off, it names one of the table's own columns or a record field (a manifest column ``fused``, a
    ``text`` that ``--columns`` displaced, a manifest column ``manifest_fused``). So no two input
    columns ever share a name in the table, and columns of other names keep theirs."""
    bare = name
    while bare.startswith(CARRIED_PREFIX):
        bare = bare[len(CARRIED_PREFIX) :]
    return f"{CARRIED_PREFIX}{name}" if bare in _NAMES_OF_THE_TABLE else name


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
    raise ValidationError(f"column {column!r} must be a string, got {type(value).__name__}", error_type="wrong_type")


# Levels of lists and objects a carried value may nest. Arrow writes deeper values to Parquet but
# cannot read them back (about 150 levels fail: "Invalid flatbuffers message").
MAX_NESTING = 64


def _check_storable(column: str, value: Any) -> None:
    """Refuse what the table cannot hold, at any depth of a carried value: text the Parquet writers
    cannot encode (a lone surrogate, JSON's "\\ud800"), and nesting deeper than ``MAX_NESTING``.
    Walked with a stack, so no depth makes it recurse."""
    pending: list[tuple[Any, int]] = [(column, 0), (value, 0)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as exc:
                message = f"column {column!r} is not valid Unicode: {exc}"
                raise ValidationError(message, error_type="invalid_utf8") from None
        elif isinstance(item, (list, tuple, dict)):
            if depth == MAX_NESTING:
                message = f"column {column!r} holds a value nested deeper than {MAX_NESTING} levels"
                raise ValidationError(message, error_type="value_too_deep")
            children = [part for pair in item.items() for part in pair] if isinstance(item, dict) else item
            pending.extend((child, depth + 1) for child in children)


def row_label(row: Mapping[str, Any]) -> str | None:
    """A row's label as the job stores it: a string, integers (and the floats pandas makes of them)
    as their decimal string; raises ``ValidationError`` for a value no label can be."""
    value = row.get("label")
    if isinstance(value, float) and not _is_missing(value):  # pandas stores int labels with gaps as float
        return str(int(value)) if value.is_integer() else str(value)
    return _optional_string(row, "label", allow_int=True)


def _stored_media(modality: str, value: Mapping[str, Any]) -> bytes | str | None:
    """A media value as Hugging Face ``datasets`` stores ``Image()`` and ``Audio()``
    (``struct<bytes, path>``): the bytes when present, else the path."""
    if modality not in REFERENCE_COLUMNS or not set(value) <= {"bytes", "path"}:
        keys = ", ".join(sorted(map(str, value)))
        raise ValidationError(
            f"column {modality!r} must be a string, bytes or a {{bytes, path}} struct, got an object of {keys}",
            error_type="wrong_type",
        )
    content, path = value.get("bytes"), value.get("path")
    if content:
        return bytes(content)
    if path is None or isinstance(path, str):
        return path
    raise ValidationError(f"column {modality!r}: the path must be a string", error_type="wrong_type")


def _payload(row: Mapping[str, Any], modality: str) -> Payload | None:
    value = row.get(modality)
    if isinstance(value, Mapping):
        value = _stored_media(modality, value)
    elif not isinstance(value, (bytes, bytearray)):
        value = _optional_string(row, modality)
    if isinstance(value, (bytes, bytearray)):  # content, from a tar shard or a Parquet binary column
        return bytes(value)
    if value is not None and modality in REFERENCE_COLUMNS and not value.strip():
        return None  # a blank reference is no reference; blank text is an error later
    return value


def parse_column_map(text: str) -> dict[str, str]:
    """``--columns text=sentence,image=img,id=uid``: each of the job's fields and the input column
    that fills it. ``ValueError`` for a field the job has not, or a column named twice."""
    fields = field_names("record")
    mapping: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        target, separator, column = (part.strip() for part in item.partition("="))
        if not separator or not target or not column:
            raise ValueError(f"--columns: {item!r} is not FIELD=COLUMN")
        if target not in fields:
            raise ValueError(f"--columns: {target!r} is not a field; the fields are {', '.join(fields)}")
        if target in mapping:
            raise ValueError(f"--columns: {target!r} is mapped twice")
        mapping[target] = column
    if len(set(mapping.values())) < len(mapping):
        raise ValueError("--columns: one column fills two fields")
    return mapping


def map_columns(row: Mapping[str, Any], columns: Mapping[str, str]) -> dict[str, Any]:
    """``row`` as a record reads it: each field from the column ``columns`` (field -> column) maps
    to it, or else from its own; every other column under its carried name (``carried_column_name``),
    a field a mapping displaces included (a ``text`` beside the ``sentence`` mapped to text is
    carried as ``manifest_text``): nothing is lost. A mapped column missing from the row leaves its
    field empty (an ``id`` so mapped is a missing id, not a derived one)."""
    sources = set(columns.values())
    fields = reserved_record_columns()
    shaped = {
        (name if name in fields and name not in columns else carried_column_name(name)): value
        for name, value in row.items()
        if name not in sources
    }
    shaped.update({field: row.get(column) for field, column in columns.items()})
    return shaped


def _derived_id(row: Mapping[str, Any], derived: str) -> str:
    """``derived``, for a row with no id column, unless a column looks like one ("ID", " id"):
    then the user meant it, and deriving an id would hide that it was never read."""
    near = [name for name in row if isinstance(name, str) and name.strip().lower() == "id"]
    if near:
        message = f"the record has no 'id' column but has {near[0]!r}: name it with --columns id={near[0]}"
        raise ValidationError(message, error_type="missing_id")
    return derived


def parse_record(
    row: Mapping[str, Any],
    *,
    source: str,
    manifest_dir: str,
    rejected: Mapping[str, RecordError] | None = None,
    default_id: str | None = None,
    timestamp_column: str | None = None,
) -> Record:
    """Validate one manifest row, as ``map_columns`` shapes it (fields under their names, other
    columns under their carried names); raises ``ValidationError`` with a stable code when it is
    unusable. A row without an ``id`` column is named ``default_id``, or else by its ``source``;
    ``timestamp_column`` (a manifest column's name) holds its event time.

    A modality whose value is unusable (wrong type, or in ``rejected`` by the reader) fails alone:
    the record keeps its other modalities, and is accepted even when all of them failed, so that
    each failure is counted once, against its modality."""
    # A row with no id column (a Hugging Face dataset's, say) is named by where it was read
    # (``default_id``, else ``source``), which is the same on every run over the same input.
    record_id = _optional_string(row, "id", allow_int=True) if "id" in row else _derived_id(row, default_id or source)
    if record_id is None or not record_id.strip():
        raise ValidationError("the record has no id", error_type="missing_id")
    reserved = reserved_record_columns()
    for column, value in row.items():
        if column not in MODALITY_COLUMNS:  # a modality's text is checked, and fails alone, when decoded
            _check_storable(column, value)
    payloads: dict[str, Payload] = {}
    failures: dict[str, RecordError] = dict(rejected or {})
    for modality in MODALITY_COLUMNS:
        if modality in failures:
            continue
        try:
            value = _payload(row, modality)
        except ValidationError as exc:
            failures[modality] = exc
            continue
        if value is not None:
            payloads[modality] = value
    if not payloads and not failures:
        raise ValidationError(f"the record has none of {', '.join(MODALITY_COLUMNS)}", error_type="no_modality")
    event_time = None
    if timestamp_column is not None:
        event_time = parse_event_time(row.get(carried_column_name(timestamp_column)), timestamp_column)
    return Record(
        id=record_id,
        source=source,
        manifest_dir=manifest_dir,
        payloads=payloads,
        label=row_label(row),
        split=_optional_string(row, "split"),
        carried={key: value for key, value in row.items() if key not in reserved},
        rejected=tuple(
            ErrorRow.from_exception(failures[m], record_id=record_id, modality=m, source=source)
            for m in MODALITY_COLUMNS
            if m in failures
        ),
        event_time=event_time,
    )
