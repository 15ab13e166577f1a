"""The feature table's columns: one type per column over the whole run, however the manifests
and an earlier run's table differ.

A reader infers each manifest's types (``add_value_types``), the run merges them
(``merge_column_types``), and each value is made to fit its column (``conform_value``) as rows
become Arrow tables (``rows_to_table``), or an earlier table's rows become this run's
(``conform_table``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from mmfeatures.schema import embedding_dimension


def conform_value(value: Any, arrow_type: pa.DataType) -> Any:
    """Make a carried value fit its column's unified type (see ``unify_types``)."""
    if value is None:
        return None
    if pa.types.is_string(arrow_type) and not isinstance(value, str):
        return json.dumps(value, default=str, sort_keys=True)
    if pa.types.is_floating(arrow_type) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def unify_types(left: pa.DataType | None, right: pa.DataType | None) -> pa.DataType | None:
    """The column type that holds values of both types: null gives way, ints widen to floats,
    and any other disagreement falls back to string (non-strings stored as JSON)."""
    if left is None or pa.types.is_null(left):
        return right
    if right is None or pa.types.is_null(right) or left == right:
        return left
    if pa.types.is_integer(left) and pa.types.is_integer(right):
        return pa.int64()
    numeric = (pa.types.is_integer, pa.types.is_floating)
    if any(f(left) for f in numeric) and any(f(right) for f in numeric):
        return pa.float64()
    if pa.types.is_list(left) and pa.types.is_list(right):  # e.g. [] beside ["x"]
        inner = unify_types(left.value_type, right.value_type)
        items = (left.value_type, right.value_type)
        if not pa.types.is_string(inner) or all(pa.types.is_string(t) or pa.types.is_null(t) for t in items):
            return pa.list_(inner)
    return pa.string()


def value_type(value: Any) -> pa.DataType | None:
    if value is None:
        return None
    try:
        return pa.scalar(value).type
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError):
        return pa.string()


def add_value_types(types: dict[str, pa.DataType | None], row: Mapping[str, Any]) -> None:
    """Widen ``types`` (column -> type) to hold ``row``'s values: manifests without a schema."""
    for name, value in row.items():
        types[name] = unify_types(types.get(name), value_type(value))


def merge_column_types(per_source: Iterable[Mapping[str, pa.DataType | None]]) -> dict[str, pa.DataType]:
    """The carried columns of a run: every source's columns in first-seen order, one type each.
    A column that is null everywhere is still carried, as string."""
    merged: dict[str, pa.DataType | None] = {}
    for types in per_source:
        for name, arrow_type in types.items():
            merged[name] = unify_types(merged.get(name), arrow_type)
    return {name: arrow_type or pa.string() for name, arrow_type in merged.items()}


def embedding_array(vectors: Sequence[np.ndarray | Sequence[float] | None], dim: int) -> pa.ListArray:
    """Vectors (or None) as a float32 list column, checking each holds exactly ``dim`` values."""
    present = [v for v in vectors if v is not None]
    if any(len(v) != dim for v in present):
        raise ValueError(f"an embedding does not have the column's dimension {dim}")
    lengths = np.array([0 if v is None else dim for v in vectors], dtype=np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    values = np.concatenate(present).astype(np.float32) if present else np.zeros(0, np.float32)
    mask = pa.array([v is None for v in vectors], type=pa.bool_())
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values), mask=mask)


def rows_to_table(rows: Sequence[Mapping[str, Any]], schema: pa.Schema) -> pa.Table:
    """Dict rows as a table of ``schema``: a column a row lacks is null, each value made to fit."""
    columns = []
    for f in schema:
        values = [row.get(f.name) for row in rows]
        dim = embedding_dimension(f)
        if dim is not None:
            columns.append(embedding_array(values, dim))
        else:
            columns.append(pa.array([conform_value(v, f.type) for v in values], type=f.type))
    return pa.Table.from_arrays(columns, schema=schema)


def conform_table(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table``'s rows as a table of ``schema``: its columns in the schema's order, each of the
    schema's type (values made to fit as ``conform_value`` does, where the types differ), a
    column it lacks all null, and one the schema lacks left out."""
    columns: list[pa.Array | pa.ChunkedArray] = []
    for field in schema:
        if field.name not in table.column_names:
            columns.append(pa.nulls(table.num_rows, field.type))
            continue
        column = table.column(field.name)
        if column.type != field.type:
            column = pa.array([conform_value(value, field.type) for value in column.to_pylist()], type=field.type)
        columns.append(column)
    return pa.Table.from_arrays(columns, schema=schema)
