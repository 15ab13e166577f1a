"""Incremental runs: rows kept for unchanged records, recomputed for changed ones, added, carried
over or dropped for absent ones, each counted; and the time columns of the rows."""

from __future__ import annotations

import datetime
import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from mmfeatures.cli import main as cli_main
from mmfeatures.records import content_hash
from tests.jobs import extract, feature_rows, png, write_manifest


def _embedded(summary: dict[str, Any]) -> int:
    return sum(counts["embedded"] for counts in summary["modalities"].values())


def _part_digests(output: str) -> list[str]:
    """The sha256 of each part of the feature table, sorted."""
    parts = Path(output, "features").glob("*.parquet")
    return sorted(hashlib.sha256(part.read_bytes()).hexdigest() for part in parts)


def test_a_rerun_keeps_unchanged_rows_and_recomputes_what_changed(
    corpus: dict[str, Any], tiny_model_options: list[str], tmp_path: Path
) -> None:
    rows, output = corpus["rows"], str(tmp_path / "out")
    manifest = write_manifest(corpus["folder"], rows)
    first = extract(manifest, output, tiny_model_options, "--incremental")
    assert first["incremental"] == {
        "previous_commit": None,
        "previous_rows": 0,
        "unchanged": 0,
        "added": 8,
        "replaced": 0,
        "dropped": 0,
        "kept_absent": 0,
    }
    assert first["reconciles"]
    before = feature_rows(output)
    started = datetime.datetime.fromisoformat(first["started"])
    for record in rows:
        row = before[record["id"]]
        assert row["created_timestamp"] == row["event_timestamp"] == started
        digests = {
            "text": hashlib.sha256(record["text"].encode()).hexdigest(),
            "image": hashlib.sha256(Path(record["image"]).read_bytes()).hexdigest(),
        }
        assert row["content_hash"] == content_hash(digests)

    # Unchanged input: nothing is embedded, every row is kept as it was, in its part as it was.
    parts = _part_digests(output)
    second = extract(manifest, output, tiny_model_options, "--incremental")
    assert second["incremental"]["unchanged"] == 8 and second["incremental"]["previous_commit"] == first["commit"]
    assert _embedded(second) == 0 and second["modalities"]["image"]["kept"] == 8
    assert second["reconciles"]
    assert feature_rows(output) == before
    assert _part_digests(output) == parts

    # One text and one photo change, one record is new, one is gone, one has a new label.
    changed = [dict(row) for row in rows if row["id"] != "r5"]
    changed[0]["text"] = "record number zero, rewritten"
    Path(changed[1]["image"]).write_bytes(png(100))
    changed[2]["label"] = "b"
    new_image = corpus["media"] / "new.png"
    new_image.write_bytes(png(200))
    changed.append({"id": "r8", "text": "a new record", "image": str(new_image)})
    manifest = write_manifest(corpus["folder"], changed)
    third = extract(manifest, output, tiny_model_options, "--incremental")
    assert third["incremental"] == {
        "previous_commit": second["commit"],
        "previous_rows": 8,
        "unchanged": 5,
        "added": 1,
        "replaced": 2,
        "dropped": 0,
        "kept_absent": 1,
    }
    assert third["reconciles"] and third["feature_rows"] == 9
    assert third["modalities"]["text"]["embedded"] == 3  # r0, r1 (its photo changed) and r8
    after = feature_rows(output)
    started = datetime.datetime.fromisoformat(third["started"])
    for record_id in ("r0", "r1", "r8"):
        assert after[record_id]["created_timestamp"] == started
        assert after[record_id]["content_hash"] != before.get(record_id, {}).get("content_hash")
    assert not np.array_equal(after["r1"]["image_embedding"], before["r1"]["image_embedding"])
    np.testing.assert_array_equal(after["r0"]["image_embedding"], before["r0"]["image_embedding"])
    assert after["r5"] == before["r5"]  # absent, kept as it was
    assert after["r2"]["label"] == "b"  # kept vectors, this run's fields
    assert {k: v for k, v in after["r2"].items() if k != "label"} == {
        k: v for k, v in before["r2"].items() if k != "label"
    }

    fourth = extract(manifest, output, tiny_model_options, "--incremental", "--drop-missing")
    assert fourth["incremental"]["dropped"] == 1 and fourth["incremental"]["unchanged"] == 8
    assert sorted(feature_rows(output)) == sorted(row["id"] for row in changed)
    assert fourth["reconciles"]


def test_changed_settings_recompute_every_row(corpus: dict[str, Any], tiny_model_options: list[str], tmp_path) -> None:
    output = str(tmp_path / "out")
    manifest = write_manifest(corpus["folder"], corpus["rows"])
    extract(manifest, output, tiny_model_options, "--incremental")
    # Absent records' rows were made with other settings: they can be neither kept nor hidden.
    weights = ["--fusion-weights", "text=2,image=1,audio=1"]
    code = cli_main(
        ["extract", "--input", manifest, "--output", output, *tiny_model_options, *weights, "--incremental"]
    )
    assert code == 2
    summary = extract(manifest, output, tiny_model_options, *weights, "--incremental", "--drop-missing")
    assert summary["incremental"]["replaced"] == 8 and summary["incremental"]["unchanged"] == 0
    assert summary["reconciles"]


def test_drop_missing_needs_incremental(corpus: dict[str, Any], tmp_path: Path, capsys) -> None:
    manifest = write_manifest(corpus["folder"], corpus["rows"])
    assert cli_main(["extract", "--input", manifest, "--output", str(tmp_path / "o"), "--drop-missing"]) == 2
    assert "--incremental" in capsys.readouterr().err


def test_a_records_own_time_is_its_event_timestamp(
    corpus: dict[str, Any], tiny_model_options: list[str], tmp_path: Path
) -> None:
    rows = [dict(row) for row in corpus["rows"][:4]]
    rows[0]["captured"] = "2026-11-30T08:15:00+01:00"
    rows[1]["captured"] = "2026-12-01"
    rows[2]["captured"] = "2026-12-02T10:00:00"  # no zone: UTC
    rows[3]["captured"] = 1764000000  # seconds or milliseconds? refused
    manifest = write_manifest(corpus["folder"], rows)
    output = str(tmp_path / "out")
    summary = extract(manifest, output, tiny_model_options, "--timestamp-column", "captured")
    utc = datetime.timezone.utc
    times = {record_id: row["event_timestamp"] for record_id, row in feature_rows(output).items()}
    assert times == {
        "r0": datetime.datetime(2026, 11, 30, 7, 15, tzinfo=utc),
        "r1": datetime.datetime(2026, 12, 1, tzinfo=utc),
        "r2": datetime.datetime(2026, 12, 2, 10, tzinfo=utc),
    }
    assert summary["errors_by_type"] == {"validate/invalid_timestamp": 1}
    errors = pq.read_table(os.path.join(output, "errors")).to_pylist()
    assert [(e["id"], e["error_type"]) for e in errors] == [("r3", "invalid_timestamp")]


@pytest.mark.parametrize("column", ["id", "text", ""])
def test_timestamp_column_must_be_a_column_of_its_own(column: str, corpus: dict[str, Any], tmp_path: Path) -> None:
    manifest = write_manifest(corpus["folder"], corpus["rows"])
    argv = ["extract", "--input", manifest, "--output", str(tmp_path / "o"), "--timestamp-column", column]
    assert cli_main(argv) == 2
