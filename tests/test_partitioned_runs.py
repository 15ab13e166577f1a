"""The job with ``--partition-by``, end to end with the tiny models: the feature table in
Hive-style folders that readers prune by, the same rows as an unpartitioned run's, incremental
reruns that keep its rows in their folders, and a column no folder can name refused."""

from __future__ import annotations

import datetime
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pytest

from mmfeatures import schema
from mmfeatures.cli import main as cli_main
from mmfeatures.modalities import Preprocessor
from tests.jobs import extract, feature_rows, png, write_manifest

SPLITS = ["train", "train", "test", "train", None, "test"]
CAPTURED = [  # --timestamp-column: the UTC dates 2026-12-04, -04, -05, -05, -05, -06
    "2026-12-04T08:00:00Z",
    "2026-12-04T23:59:59Z",
    "2026-12-05T00:00:00Z",
    "2026-12-04T21:30:00-05:00",
    "2026-12-05T12:00:00+02:00",
    "2026-12-06T09:15:00Z",
]
DATES = ["2026-12-04", "2026-12-04", "2026-12-05", "2026-12-05", "2026-12-05", "2026-12-06"]
VECTORS = ("text_embedding", "image_embedding", "audio_embedding", "fused")


@pytest.fixture(scope="module")
def records(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Six records of text and images, with a split (one none), a year, a score and a time each."""
    media = tmp_path_factory.mktemp("media")
    rows = []
    for i, (split, captured) in enumerate(zip(SPLITS, CAPTURED, strict=True)):
        image = media / f"{i}.png"
        image.write_bytes(png(i))
        rows.append(
            {
                "id": f"r{i}",
                "text": f"record number {i}",
                "image": str(image),
                "label": f"l{i % 2}",
                **({"split": split} if split else {}),
                "year": 2024 + i % 2,
                "score": i / 4,
                "captured": captured,
            }
        )
    return rows


@pytest.fixture(scope="module")
def manifest(records: list[dict[str, Any]], tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_manifest(tmp_path_factory.mktemp("manifest"), records)


@pytest.fixture(scope="module")
def unpartitioned(manifest: str, tiny_model_options: list[str], tmp_path_factory: pytest.TempPathFactory) -> str:
    """The output of a run over ``manifest`` with no ``--partition-by``."""
    output = str(tmp_path_factory.mktemp("unpartitioned") / "out")
    extract(manifest, output, tiny_model_options, "--timestamp-column", "captured")
    return output


def parts_by_folder(output: str) -> dict[str, list[str]]:
    """The folders of ``_run.json``'s feature parts, each with its parts' file names."""
    with open(os.path.join(output, "_run.json")) as handle:
        listed = json.load(handle)["tables"]["features"]["files"]
    folders: dict[str, list[str]] = {}
    for part in listed:
        folder, name = os.path.split(part["path"])
        folders.setdefault(folder, []).append(name)
    return folders


def assert_same_rows(rows: dict[str, dict[str, Any]], other: dict[str, dict[str, Any]], exact: bool) -> None:
    """The same ids and values; vectors equal, or, from another run's inference, equal to float32
    rounding (its batches may pad differently). ``created_timestamp`` is each run's own."""
    assert sorted(rows) == sorted(other)
    for record_id, row in rows.items():
        for name, value in row.items():
            if name == "created_timestamp":
                continue
            if name in VECTORS and value is not None and not exact:
                np.testing.assert_allclose(value, other[record_id][name], rtol=1e-5, atol=1e-6, err_msg=name)
            else:
                assert value == other[record_id][name], (record_id, name)


def test_a_table_partitioned_by_split_holds_an_unpartitioned_runs_rows_in_split_folders(
    manifest: str, unpartitioned: str, tiny_model_options: list[str], tmp_path: Path
) -> None:
    output = str(tmp_path / "out")
    summary = extract(manifest, output, tiny_model_options, "--timestamp-column", "captured", "--partition-by", "split")
    assert summary["reconciles"] and summary["feature_rows"] == len(SPLITS)
    folders = parts_by_folder(output)
    assert sorted(folders) == [
        "features/split=__HIVE_DEFAULT_PARTITION__",
        "features/split=test",
        "features/split=train",
    ]
    features = Path(output, "features")
    assert sorted(p.name for p in features.iterdir()) == sorted(os.path.basename(f) for f in folders)
    for folder, names in folders.items():
        assert sorted(os.listdir(os.path.join(output, folder))) == sorted(names)  # nothing else

    rows = feature_rows(output)
    assert_same_rows(rows, feature_rows(unpartitioned), exact=False)
    table = schema.read_features(str(features))
    assert table.schema.names == schema.read_features(os.path.join(unpartitioned, "features")).schema.names

    # pyarrow prunes by the folders: the train parts, made unreadable, are never opened.
    for part in (features / "split=train").iterdir():
        part.write_bytes(b"not parquet")
    dataset = ds.dataset(str(features), format="parquet", partitioning="hive")
    with pytest.raises(pa.ArrowInvalid):
        dataset.to_table(columns=["id"])
    tested = dataset.to_table(columns=["id", "split"], filter=ds.field("split") == "test")
    assert sorted(tested.column("id").to_pylist()) == ["r2", "r5"]
    assert set(tested.column("split").to_pylist()) == {"test"}


def test_a_table_partitioned_by_event_date_is_in_folders_of_each_rows_utc_date(
    manifest: str, tiny_model_options: list[str], tmp_path: Path
) -> None:
    import duckdb
    import polars as pl

    output = str(tmp_path / "out")
    extract(manifest, output, tiny_model_options, "--timestamp-column", "captured", "--partition-by", "event_date")
    assert sorted(parts_by_folder(output)) == [f"features/event_date={day}" for day in sorted(set(DATES))]
    rows = feature_rows(output)
    want = {f"r{i}": datetime.date.fromisoformat(day) for i, day in enumerate(DATES)}
    assert {record_id: row["event_date"] for record_id, row in rows.items()} == want
    assert all(row["event_date"] == row["event_timestamp"].date() for row in rows.values())
    assert list(rows["r0"])[-1] == "event_date"  # after the carried columns, where Hive readers put it

    folder = os.path.join(output, "features")
    day = datetime.date(2026, 12, 5)
    dates = ds.partitioning(pa.schema([("event_date", pa.date32())]), flavor="hive")  # else read as text
    pruned = ds.dataset(folder, format="parquet", partitioning=dates).to_table(filter=ds.field("event_date") == day)
    assert sorted(pruned.column("id").to_pylist()) == ["r2", "r3", "r4"]
    assert pruned.schema.field("event_date").type == pa.date32()
    with duckdb.connect() as connection:
        found = connection.execute(
            f"select id from read_parquet('{folder}/**/*.parquet', hive_partitioning = true) where event_date = ?",
            [day],
        ).fetchall()
    assert sorted(found) == [("r2",), ("r3",), ("r4",)]
    frame = pl.scan_parquet(f"{folder}/**/*.parquet", hive_partitioning=True).filter(pl.col("event_date") == day)
    assert sorted(frame.select("id").collect()["id"].to_list()) == ["r2", "r3", "r4"]


@pytest.mark.parametrize("column, kind", [("split", pa.string()), ("event_date", pa.date32()), ("year", pa.int64())])
def test_an_incremental_rerun_keeps_a_partitioned_tables_rows_in_their_folders(
    column: str,
    kind: pa.DataType,
    records: list[dict[str, Any]],
    tiny_model_options: list[str],
    tmp_path: Path,
) -> None:
    options = [*tiny_model_options, "--timestamp-column", "captured", "--partition-by", column, "--incremental"]
    output = str(tmp_path / "out")
    manifest = write_manifest(tmp_path, records)
    extract(manifest, output, options)
    first, folders = feature_rows(output), parts_by_folder(output)
    assert schema.read_features(os.path.join(output, "features")).schema.field(column).type == kind

    rerun = extract(manifest, output, options)
    assert rerun["incremental"]["unchanged"] == len(records) and rerun["reconciles"]
    assert sum(counts["embedded"] for counts in rerun["modalities"].values()) == 0
    assert sorted(parts_by_folder(output)) == sorted(folders)
    assert_same_rows(feature_rows(output), first, exact=True)

    # r1 changes, r2 moves to another split (its row kept), r4 is absent (its row kept as it
    # was), r6 is new: each row in the folder of its value.
    changed = [dict(record) for record in records if record["id"] != "r4"]
    changed[1]["text"] = "record number one, rewritten"
    changed[2]["split"] = "validation"
    changed.append({**records[0], "id": "r6", "text": "a new record"})
    third = extract(write_manifest(tmp_path, changed), output, options)
    assert {k: third["incremental"][k] for k in ("unchanged", "replaced", "added", "kept_absent")} == {
        "unchanged": 4,
        "replaced": 1,
        "added": 1,
        "kept_absent": 1,
    }
    after = feature_rows(output)
    assert after["r4"] == first["r4"] and after["r6"][column] == after["r0"][column]
    assert after["r2"]["split"] == "validation" and after["r2"]["fused"] == first["r2"]["fused"]
    assert schema.read_features(os.path.join(output, "features")).schema.field(column).type == kind
    folder_of = {
        record_id: folder
        for folder, names in parts_by_folder(output).items()
        for record_id in ds.dataset([os.path.join(output, folder, name) for name in names]).to_table()["id"].to_pylist()
    }
    assert folder_of == {
        record_id: f"features/{column}={'__HIVE_DEFAULT_PARTITION__' if row[column] is None else row[column]}"
        for record_id, row in after.items()
    }


@pytest.mark.parametrize("column", ["_year", "fused", "event_timestamp", "text", "a/b"])
def test_a_column_no_input_could_give_is_refused_before_any_work(
    column: str,
    manifest: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(Preprocessor, "__init__", lambda *_: pytest.fail("a preprocessor was built"))
    output = tmp_path / "out"
    assert cli_main(["extract", "--input", manifest, "--output", str(output), "--partition-by", column]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("mmfeatures extract: error: --partition-by: cannot partition by")
    assert not output.exists()


@pytest.mark.parametrize(
    "column, says",
    [("no_such_col", "has no such column (carried: year, score, captured)"), ("score", "a double column")],
)
def test_a_column_the_inputs_lack_or_cannot_name_folders_by_fails_the_run_and_keeps_the_table(
    column: str,
    says: str,
    manifest: str,
    unpartitioned: str,
    tiny_model_options: list[str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Known only once the inputs' columns are: the run fails with exit status 2 and the one
    line of its error, and commits nothing, so the table it would have replaced stays whole."""
    output = tmp_path / "out"
    shutil.copytree(unpartitioned, output)
    before = {path: path.read_bytes() for path in output.rglob("*") if path.is_file() and "_lease" not in path.parts}
    argv = ["extract", "--input", manifest, "--output", str(output), *tiny_model_options, "--partition-by", column]
    assert cli_main(argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("mmfeatures extract: error: --partition-by: cannot partition by")
    assert says in errors[0]
    after = {path: path.read_bytes() for path in output.rglob("*") if path.is_file() and "_lease" not in path.parts}
    assert after == before
