"""The v1 data contracts, loaded from ``schemas/v1/*.json`` and turned into Arrow schemas.

The JSON files are the single declaration of every table; the code and the tests both read them so
that the written files cannot drift from the documented contract.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from importlib import resources
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec import AbstractFileSystem
from fsspec.core import url_to_fs

from mmfeatures.outputs import PARTITION_COLUMN, committed_table, partition_of, partition_value

SCHEMA_VERSION = "v1"
METADATA_KEY = b"mmfeatures"

_SCALAR_TYPES: dict[str, pa.DataType] = {
    "string": pa.string(),
    "bool": pa.bool_(),
    "int64": pa.int64(),
    "float64": pa.float64(),
    "list<string>": pa.list_(pa.string()),
    "timestamp[us, UTC]": pa.timestamp("us", tz="UTC"),
}


@cache
def load_contract(name: str) -> dict[str, Any]:
    """The parsed JSON contract ``schemas/v1/<name>.json`` (record, features or errors)."""
    text = resources.files(f"schemas.{SCHEMA_VERSION}").joinpath(f"{name}.json").read_text("utf-8")
    return json.loads(text)


def field_names(name: str) -> list[str]:
    return [field["name"] for field in load_contract(name)["fields"]]


DIMENSION_KEY = b"dimension"


def _arrow_field(field: Mapping[str, Any], dims: Mapping[str, int]) -> pa.Field:
    """Embeddings are ``list<float32>`` whose length is fixed and recorded in the field's metadata.

    Arrow's ``fixed_size_list`` would carry the length in the type, but pyarrow (up to 25 at least)
    cannot read a null fixed-size list back from Parquet, and absent embeddings must be null.
    ``read_features`` gives the fixed-size view in memory.
    """
    if field["type"] == "embedding":
        dim = str(dims[field["modality"]]).encode()
        return pa.field(field["name"], pa.list_(pa.float32()), field["nullable"], {DIMENSION_KEY: dim})
    return pa.field(field["name"], _SCALAR_TYPES[field["type"]], nullable=field["nullable"])


def embedding_dimension(field: pa.Field) -> int | None:
    """The fixed length of an embedding column, or None for other columns."""
    if field.metadata and DIMENSION_KEY in field.metadata:
        return int(field.metadata[DIMENSION_KEY])
    return None


_READERS = 16  # parts read at once: an object store's latency, not its bandwidth, bounds one read


def read_features(
    path: str, columns: Sequence[str] | None = None, filesystem: AbstractFileSystem | None = None
) -> pa.Table:
    """Read a feature table (a folder, file or URL) with embedding columns as ``fixed_size_list``,
    and the column a partitioned table's folders name back in its place (``read_part``).

    A committed table folder is read from the parts its run's ``_run.json`` lists only (a few at
    once): the folder may also hold parts of a commit that was cut short. A single part is read as
    ``read_part`` reads it; another folder as pyarrow reads it. A ``filesystem`` passed in must be
    an fsspec one, with ``path`` in its terms; ``columns`` picks columns.
    """
    fs, fs_path = (filesystem, path) if filesystem else url_to_fs(path)
    committed = committed_table(fs_path, fs)
    if committed is not None:
        with ThreadPoolExecutor(max_workers=min(_READERS, len(committed.parts))) as pool:
            table = pa.concat_tables(
                list(pool.map(lambda part: read_part(committed.fs, part, columns), committed.parts))
            )
    elif fs.isfile(fs_path):
        table = read_part(fs, fs_path, columns)
    else:
        table = pq.read_table(fs_path, columns=columns, filesystem=fs)
    for index, field in enumerate(table.schema):
        dim = embedding_dimension(field)
        if dim is not None:
            fixed = pa.field(field.name, pa.list_(pa.float32(), dim), field.nullable, field.metadata)
            table = table.set_column(index, fixed, table.column(index).cast(fixed.type))
    return table


# The column a partitioned table's parts leave to their folders' names, recorded in each part's
# schema metadata (its place and its Arrow field, IPC-serialised) so that reading gives it back.
PARTITION_KEY = b"mmfeatures.partition"
EVENT_DATE = "event_date"  # --partition-by's derived column: the UTC date of event_timestamp
PARTITION_FIELDS = ("split", "label")  # the only declared columns whose values many rows share
# Types whose Arrow text is a plain value that casts back to it exactly.
_PARTITION_TYPES = (
    pa.types.is_string,
    pa.types.is_large_string,
    pa.types.is_integer,
    pa.types.is_boolean,
    pa.types.is_date,
)
_PARTITION_RULE = (
    f"partition by {' or '.join(PARTITION_FIELDS)}, a carried column of text, integers, booleans or dates, "
    f"or {EVENT_DATE} (the UTC date of event_timestamp)"
)


def check_partition_name(column: str) -> None:
    """``ValueError`` for a column that no feature table can be partitioned by, whatever its
    inputs hold, so that a run can refuse it before any work: a name that readers would skip or
    misread as a folder's, or a declared column or record field other than split and label (one
    value a row, a vector, a time, a payload)."""
    if not PARTITION_COLUMN.fullmatch(column):
        raise ValueError(
            f"cannot partition by {column!r}: a partition column's name must be letters, digits, "
            "'_', '.' and '-', starting with a letter or digit, since readers take folder names as they are"
        )
    if column in {*field_names("features"), *reserved_record_columns()} - set(PARTITION_FIELDS):
        raise ValueError(f"cannot partition by {column}: {_PARTITION_RULE}")


def partition_column(schema: pa.Schema, column: str) -> tuple[pa.Field, str]:
    """The field that reading a table of ``schema`` partitioned by ``column`` gives back, and the
    stored column its values come from: the table's own column, or, for ``event_date``, always
    ``event_timestamp`` (a date column of that name is the one an earlier partitioned run's rows
    bring back). ``ValueError`` for a column that cannot name folders (``check_partition_name``),
    one the table has not, or one of a type whose text is not a plain, exact value (floats,
    timestamps, lists)."""
    check_partition_name(column)
    if column == EVENT_DATE:
        if column in schema.names and schema.field(column).type != pa.date32():
            raise ValueError(
                f"cannot partition by {EVENT_DATE}, the UTC date of event_timestamp: the table carries a "
                f"{schema.field(column).type} column of that name"
            )
        return pa.field(EVENT_DATE, pa.date32()), "event_timestamp"
    if column not in schema.names:
        declared = set(field_names("features"))
        carried = ", ".join(name for name in schema.names if name not in declared) or "none"
        raise ValueError(f"cannot partition by {column}: the feature table has no such column (carried: {carried})")
    field = schema.field(column)
    if not any(test(field.type) for test in _PARTITION_TYPES):
        raise ValueError(f"cannot partition by {column}, a {field.type} column: {_PARTITION_RULE}")
    return field, column


def partition_values(table: pa.Table, column: str) -> pa.ChunkedArray:
    """Each row's value of the partition column ``column`` as the text its folder names (Arrow's
    text of the value, which casts back to it)."""
    field, source = partition_column(table.schema, column)
    return table.column(source).cast(field.type).cast(pa.string())


def partition_part(table: pa.Table, column: str) -> pa.Table:
    """``table``, the rows of one partition, as its part stores them: without the partition
    column, which the part's folder names (as Spark and pyarrow's ``write_dataset`` leave it, so
    no reader meets it twice), and with that column's field and place recorded for reading back.
    A derived ``event_date`` goes last, where Hive-style readers put partition columns, unless
    the table carries it already."""
    field, _ = partition_column(table.schema, column)
    index = table.schema.get_field_index(field.name)
    if index < 0:
        index = table.num_columns
    else:
        table = table.remove_column(index)
    record = {"index": index, "field": base64.b64encode(pa.schema([field]).serialize()).decode()}
    return table.replace_schema_metadata({**(table.schema.metadata or {}), PARTITION_KEY: json.dumps(record).encode()})


def stored_schema(table_schema: pa.Schema, partition_by: str | None) -> pa.Schema:
    """The schema a part of a table of ``table_schema`` partitioned by ``partition_by`` (or
    not: None) is stored with (see ``partition_part``)."""
    if partition_by is None:
        return table_schema
    return partition_part(table_schema.empty_table(), partition_by).schema


def read_part(fs: AbstractFileSystem, path: str, columns: Sequence[str] | None = None) -> pa.Table:
    """One committed part (``path`` in ``fs``'s terms) with the schema the job gave its rows: a
    partitioned table's partition column is back, in its place and with its type, from the name
    of the part's folder; embeddings are ``list<float32>``, as stored. ``columns`` picks columns,
    in the table's order. ``ValueError`` for a part of a partitioned table outside its folder."""
    with fs.open(path, "rb") as handle:
        stored = pq.ParquetFile(handle)
        restored, field = _as_read(stored.schema_arrow)
        stored_columns = None if columns is None else [name for name in columns if field is None or name != field.name]
        table = stored.read(columns=stored_columns)
    if field is not None:
        folder = partition_of(path)
        if folder is None or partition_value(folder)[0] != field.name:
            raise ValueError(f"{path}: a part of a table partitioned by {field.name}, outside a {field.name}= folder")
        if columns is None or field.name in columns:
            text = partition_value(folder)[1]
            table = table.append_column(field, pa.array([text] * table.num_rows, pa.string()).cast(field.type))
        table = table.replace_schema_metadata(restored.metadata)
    return table.select([name for name in restored.names if name in table.column_names])


def part_schema(fs: AbstractFileSystem, path: str) -> pa.Schema:
    """The schema ``read_part`` gives one part, read from its footer alone."""
    with fs.open(path, "rb") as handle:
        return _as_read(pq.read_schema(handle))[0]


def _as_read(stored: pa.Schema) -> tuple[pa.Schema, pa.Field | None]:
    """A part's stored schema as ``read_part`` gives it (a recorded partition column back in its
    place, the record of it dropped), and that column's field, or None."""
    partition = _recorded_partition(stored)
    if partition is None:
        return stored, None
    index, field = partition
    metadata = {key: value for key, value in (stored.metadata or {}).items() if key != PARTITION_KEY}
    return stored.insert(index, field).with_metadata(metadata), field


def _recorded_partition(stored: pa.Schema) -> tuple[int, pa.Field] | None:
    """The place and field of the partition column a part's schema records, or None."""
    recorded = (stored.metadata or {}).get(PARTITION_KEY)
    if recorded is None:
        return None
    record = json.loads(recorded)
    return record["index"], pa.ipc.read_schema(pa.py_buffer(base64.b64decode(record["field"]))).field(0)


def features_schema(
    dims: Mapping[str, int],
    carried: Mapping[str, pa.DataType] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> pa.Schema:
    """The feature table's schema for one run.

    ``dims`` maps text/image/audio/fused to their dimensions; ``carried`` adds the manifest's extra
    columns after the declared ones; ``metadata`` is stored as JSON under the ``mmfeatures`` key.
    """
    fields = [_arrow_field(f, dims) for f in load_contract("features")["fields"]]
    fields += [pa.field(name, arrow_type) for name, arrow_type in (carried or {}).items()]
    encoded = {METADATA_KEY: json.dumps(metadata, sort_keys=True).encode()} if metadata else None
    return pa.schema(fields, metadata=encoded)


def errors_schema() -> pa.Schema:
    return pa.schema([_arrow_field(f, {}) for f in load_contract("errors")["fields"]])


def reserved_record_columns() -> frozenset[str]:
    """Manifest columns with a meaning of their own; every other column is carried."""
    return frozenset(field_names("record"))


def read_run_metadata(schema: pa.Schema) -> dict[str, Any]:
    """The JSON that a feature file carries under the ``mmfeatures`` metadata key."""
    return json.loads(schema.metadata[METADATA_KEY])
