"""Tables committed by hand the way a run commits them, for tests of what reads a run's output."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

import pyarrow as pa

from mmfeatures import __version__, outputs, sinks, storage
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
