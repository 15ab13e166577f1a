"""Small end-to-end runs of the job for tests: a manifest of generated images and texts, the
``mmfeatures extract`` command, and the committed table read back by id."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pyarrow.parquet as pq

from mmfeatures import schema
from mmfeatures.cli import main as cli_main


def png(seed: int) -> bytes:
    """A small PNG of random pixels; the same seed gives the same bytes."""
    pixels = np.random.default_rng(seed).integers(0, 255, (40, 48, 3), dtype=np.uint8)
    return cv2.imencode(".png", pixels)[1].tobytes()


def write_manifest(folder: Path, rows: list[dict[str, Any]]) -> str:
    path = folder / "manifest.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def extract(manifest: str, output: str, options: list[str], *extra: str) -> dict[str, Any]:
    """Run the job; its ``_run.json``."""
    assert cli_main(["extract", "--input", manifest, "--output", output, *options, *extra]) == 0
    with open(os.path.join(output, "_run.json")) as handle:
        return json.load(handle)


def feature_rows(output: str) -> dict[str, dict[str, Any]]:
    """The committed feature table's rows by id; a plain Parquet reader of the folder agrees."""
    table = schema.read_features(os.path.join(output, "features"))
    assert pq.read_table(os.path.join(output, "features")).num_rows == table.num_rows
    return {row["id"]: row for row in table.to_pylist()}
