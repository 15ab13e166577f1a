"""The v1 data contracts, loaded from ``schemas/v1/*.json`` and turned into Arrow schemas.

The JSON files are the single declaration of every table; the code and the tests both read them so
that the written files cannot drift from the documented contract.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import cache
from importlib import resources
from typing import Any

import pyarrow as pa

from mmfeatures.outputs import committed_table

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


def read_features(path: str, **kwargs: Any) -> pa.Table:
    """Read a feature table (a folder, file or URL) with embedding columns as ``fixed_size_list``.

    A committed table folder is read from the parts its run's ``_run.json`` lists only: the
    folder may also hold parts of a commit that was cut short. A ``filesystem`` passed in must be
    an fsspec one, with ``path`` in its terms.
    """
    import pyarrow.parquet as pq

    committed = committed_table(path, kwargs.get("filesystem"))
    if committed is None:
        table = pq.read_table(path, **kwargs)
    else:
        table = pq.read_table(committed.parts, **{**kwargs, "filesystem": committed.fs})
    for index, field in enumerate(table.schema):
        dim = embedding_dimension(field)
        if dim is not None:
            fixed = pa.field(field.name, pa.list_(pa.float32(), dim), field.nullable, field.metadata)
            table = table.set_column(index, fixed, table.column(index).cast(fixed.type))
    return table


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
