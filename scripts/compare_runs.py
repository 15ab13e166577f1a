"""Compare the outputs of two runs of the job: the same feature and error rows (matched by id),
time columns and run metadata left out, embeddings equal within a tolerance.

    python scripts/compare_runs.py OUTPUT_A OUTPUT_B [--tolerance 1e-6]

Exits 0 when they match, 1 with the differences otherwise. Used to check that a change to the
code leaves the job's output as it was.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa

from mmfeatures.schema import embedding_dimension, read_features

TIME_COLUMNS = ("event_timestamp",)


def _rows(table: pa.Table) -> dict[str, dict[str, Any]]:
    """Rows by id (error rows by id, modality, stage, type and source, since a record may have
    several, and rejected rows have no id); a key seen twice gets a running number."""
    keyed: dict[str, dict[str, Any]] = {}
    seen: Counter[str] = Counter()
    for row in table.drop_columns([c for c in TIME_COLUMNS if c in table.column_names]).to_pylist():
        key = "|".join(str(row.get(c)) for c in ("id", "modality", "stage", "error_type", "source") if c in row)
        keyed[f"{key}#{seen[key]}"] = row
        seen[key] += 1
    return keyed


def compare(a: pa.Table, b: pa.Table, tolerance: float) -> list[str]:
    problems: list[str] = []
    if a.num_rows != b.num_rows:
        problems.append(f"{a.num_rows} rows against {b.num_rows}")
    if a.schema.names != b.schema.names:
        problems.append(f"columns differ: {a.schema.names} != {b.schema.names}")
    vectors = {field.name for field in a.schema if embedding_dimension(field) is not None}
    rows_a, rows_b = _rows(a), _rows(b)
    if rows_a.keys() != rows_b.keys():
        problems.append(
            f"ids differ: only in A {sorted(rows_a.keys() - rows_b.keys())[:5]}, "
            f"only in B {sorted(rows_b.keys() - rows_a.keys())[:5]}"
        )
    for key in sorted(rows_a.keys() & rows_b.keys()):
        for column, value in rows_a[key].items():
            other = rows_b[key].get(column)
            if column in vectors and value is not None and other is not None:
                gap = float(np.max(np.abs(np.asarray(value) - np.asarray(other))))
                if gap > tolerance:
                    problems.append(f"{key}.{column}: vectors differ by {gap:.3g}")
            elif value != other:
                problems.append(f"{key}.{column}: {value!r} != {other!r}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--tolerance", type=float, default=1e-6)
    args = parser.parse_args(argv)
    problems: list[str] = []
    for table in ("features", "errors"):
        a, b = read_features(f"{args.a}/{table}"), read_features(f"{args.b}/{table}")
        found = compare(a, b, args.tolerance)
        print(f"{table}: {a.num_rows} and {b.num_rows} rows, {'same' if not found else f'{len(found)} differences'}")
        problems += [f"{table}: {problem}" for problem in found]
    for problem in problems[:20]:
        print(problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
