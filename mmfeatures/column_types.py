"""Carried columns' types: one type per column over the whole run, however the manifests differ.

A reader infers each manifest's types (``add_value_types``), the run merges them
(``merge_column_types``), and the sink makes each value fit its column (``conform_value``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

import pyarrow as pa


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
