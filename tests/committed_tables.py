"""Tables committed by hand the way a run commits them, for tests of what reads a run's output."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import apache_beam as beam
import fsspec
import pyarrow as pa
import pytest
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem

from mmfeatures import __version__, outputs, schema, sinks, storage
from mmfeatures.lease import held


def commit_tables(output: str, tables: Mapping[str, list[pa.Table]], summary: Mapping[str, Any] | None = None) -> dict:
    """Stage each table's parts under ``output`` and publish them with a ``_run.json`` holding
    ``summary``; returns the ``_run.json`` written."""
    run = f"run-{uuid.uuid4().hex}"
    staged = {
        name: [
            (sinks.write_staged_part(storage.join(output, outputs.STAGING, run, name), part), part.num_rows)
            for part in parts
        ]
        for name, parts in tables.items()
    }
    with held(output, run) as lease:
        return sinks.publish(lease, f"test-{run[-8:]}", staged, {"package_version": __version__, **(summary or {})})


def _summary(counts: int, **written: Any) -> dict[str, Any]:
    """The run summary a test commit publishes: what the commit step counted as staged."""
    return {"package_version": __version__, "counts": counts, **written}


def stage_and_commit(
    output: str,
    rows: list[dict[str, Any]],
    features: pa.Schema,
    rows_per_file: int,
    partition_by: str | None = None,
    tables: Sequence[pa.Table | sinks.WrittenPart] = (),
) -> dict[str, Any]:
    """One pipeline that stages ``rows`` as the feature table of schema ``features`` (and no
    error rows) through ``StageParquetTable``, with ``tables`` (more rows as columns: Arrow
    tables of that schema, or parts written before) beside them, then commits the run under
    ``output``, holding its lease as a run does; returns ``_run.json``."""
    run = f"run-{uuid.uuid4().hex}"
    with held(output, run) as lease:
        with beam.Pipeline(runner="FnApiRunner") as p:
            as_tables = p | "Tables" >> beam.Create(tables, reshuffle=False).with_output_types(sinks.COLUMNAR_ROWS)
            staged = {
                name: (p | f"Rows[{name}]" >> beam.Create(table_rows, reshuffle=False), *streams)
                | f"Stage[{name}]"
                >> sinks.StageParquetTable(
                    storage.join(output, outputs.STAGING, run, name),
                    p | f"Schema[{name}]" >> beam.Create([table_schema]),
                    rows_per_file,
                    partition,
                )
                for name, table_rows, streams, table_schema, partition in (
                    ("features", rows, (as_tables,), features, partition_by),
                    ("errors", [], (), schema.errors_schema(), None),
                )
            }
            counts = p | "Counts" >> beam.Create([len(rows)])
            p | "Commit" >> sinks.CommitRun(lease, f"test-{run[-8:]}", _summary, 0.0, counts=counts, **staged)
    fs, root = fsspec.core.url_to_fs(output)
    return json.loads(fs.cat_file(f"{root.rstrip('/')}/_run.json"))


# Each point of a commit that a kill or a fault can cut: (what fails, on which call).
COMMIT_STEPS = [
    ("move", 1),  # one part moved in, the others not
    ("manifest", 0),  # every part moved in, _run.json not written
    ("delete", 0),  # _run.json written, the replaced parts not yet deleted
]


def cut_commit_short(monkeypatch: pytest.MonkeyPatch, output: str, step: str, after: int) -> None:
    """Make the next commit at ``output`` (local, or in fsspec's memory file system) fail with
    ``OSError("cut short")`` at ``step``, once ``after`` calls of it have succeeded."""
    local = "://" not in output
    owner, name = {
        "move": (os, "rename") if local else (MemoryFileSystem, "copy"),
        "manifest": (os, "replace") if local else (MemoryFileSystem, "pipe_file"),
        "delete": (LocalFileSystem if local else MemoryFileSystem, "rm_file"),
    }[step]
    original = getattr(owner, name)
    calls: list[Any] = []

    def cut(*args: Any, **kwargs: Any) -> Any:
        if step == "manifest" and not str(args[1]).endswith("_run.json"):
            return original(*args, **kwargs)  # the intent and the lease, written atomically too
        if len(calls) == after:
            raise OSError("cut short")
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, cut)
