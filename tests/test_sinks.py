"""Tests for mmfeatures.sinks: type unification, Arrow conversion and the Beam Parquet table sink."""

import datetime
import json
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import apache_beam as beam
import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.util import assert_that, equal_to
from fsspec import AbstractFileSystem
from fsspec.implementations.memory import MemoryFileSystem

from mmfeatures import column_types, schema, sinks

DIMS = {"text": 3, "image": 2, "audio": 4, "fused": 5}
WHEN = datetime.datetime(2024, 5, 1, 12, 30, tzinfo=datetime.timezone.utc)
METADATA = {"fusion": {"method": "concat"}, "models": {"text": "tiny"}}


def feature_row(
    i: int, *, text: bool = True, image: bool = False, audio: bool = False, **carried: Any
) -> dict[str, Any]:
    """A feature row whose floats are exact in float32, so read-back values compare with ==."""
    row = {
        "id": f"r{i}",
        "label": str(i % 3) if i % 2 else None,
        "split": "train",
        "text_embedding": np.array([i, 0.5, -1.0], np.float32) if text else None,
        "image_embedding": np.array([i, 2.0], np.float64) if image else None,
        "audio_embedding": [0.25, 0.5, 0.75, float(i)] if audio else None,
        "fused": np.full(5, i / 4, np.float32),
        "has_text": text,
        "has_image": image,
        "has_audio": audio,
        "failed_modalities": [] if text else ["text"],
        "event_timestamp": WHEN,
    }
    row.update(carried)
    return row


def expected(row: Mapping[str, Any], carried_types: Mapping[str, pa.DataType]) -> dict[str, Any]:
    """What reading ``row`` back should give: lists of floats, conformed carried values."""
    out = {}
    for name, value in row.items():
        if name.endswith("_embedding") or name == "fused":
            out[name] = None if value is None else [float(x) for x in value]
        elif name in carried_types:
            out[name] = column_types.conform_value(value, carried_types[name])
        else:
            out[name] = value
    for name in carried_types:
        out.setdefault(name, None)
    return out


# -- unify_types, value_type, conform_value ----------------------------------------------------


STRUCT_A = pa.struct([("a", pa.int64())])
STRUCT_B = pa.struct([("b", pa.string())])


@pytest.mark.parametrize(
    "left, right, result",
    [
        (None, None, None),
        (None, pa.int64(), pa.int64()),
        (pa.null(), pa.string(), pa.string()),
        (pa.float64(), None, pa.float64()),
        (pa.bool_(), pa.null(), pa.bool_()),
        (pa.int64(), pa.int64(), pa.int64()),
        (pa.int64(), pa.float64(), pa.float64()),
        (pa.float64(), pa.int64(), pa.float64()),
        (pa.int32(), pa.float32(), pa.float64()),
        (pa.int64(), pa.string(), pa.string()),
        (pa.string(), pa.float64(), pa.string()),
        (pa.bool_(), pa.int64(), pa.string()),
        (STRUCT_A, STRUCT_A, STRUCT_A),
        (STRUCT_A, STRUCT_B, pa.string()),
        (STRUCT_A, pa.int64(), pa.string()),
        (pa.list_(pa.int64()), pa.list_(pa.string()), pa.string()),
    ],
)
def test_unify_types(left, right, result):
    assert column_types.unify_types(left, right) == result
    assert column_types.unify_types(right, left) == result


@pytest.mark.parametrize(
    "value, arrow_type",
    [
        (None, None),
        (1, pa.int64()),
        (1.5, pa.float64()),
        ("x", pa.string()),
        (True, pa.bool_()),
        ({"a": 1}, STRUCT_A),
        ([1, 2], pa.list_(pa.int64())),
        (2**70, pa.string()),  # does not fit an int64
        (object(), pa.string()),  # not convertible at all
    ],
)
def test_value_type(value, arrow_type):
    assert column_types.value_type(value) == arrow_type


@pytest.mark.parametrize(
    "value, arrow_type, result",
    [
        (None, pa.string(), None),
        ("x", pa.string(), "x"),
        (5, pa.string(), "5"),
        (1.5, pa.string(), "1.5"),
        (True, pa.string(), "true"),
        ({"b": [1, 2], "a": None}, pa.string(), '{"a": null, "b": [1, 2]}'),
        ([1, "x"], pa.string(), '[1, "x"]'),
        (3, pa.float64(), 3.0),
        (2.5, pa.float64(), 2.5),
        (7, pa.int64(), 7),
    ],
)
def test_conform_value(value, arrow_type, result):
    conformed = column_types.conform_value(value, arrow_type)
    assert conformed == result
    assert type(conformed) is type(result)


def _value_types(rows: list[dict[str, Any]]) -> dict[str, pa.DataType | None]:
    types: dict[str, pa.DataType | None] = {}
    for row in rows:
        column_types.add_value_types(types, row)
    return types


def test_column_types_are_inferred_per_source_and_merged_in_first_seen_order():
    first = _value_types([{"n": 1, "s": "a", "empty": None}, {"n": 2.5, "mixed": 1}])
    second = _value_types([{"mixed": "x", "z": {"k": 1}}])
    result = column_types.merge_column_types([first, second])
    assert list(result) == ["n", "s", "empty", "mixed", "z"]
    assert result == {
        "empty": pa.string(),
        "mixed": pa.string(),
        "n": pa.float64(),
        "s": pa.string(),
        "z": pa.struct([("k", pa.int64())]),
    }
    assert column_types.merge_column_types([{"i": pa.int32()}, {"i": pa.int64()}]) == {"i": pa.int64()}


def test_carried_values_fit_unified_types():
    carried: list[dict[str, Any]] = [{"v": 1}, {"v": "x"}, {"v": {"a": 1}}, {"v": None}, {"w": 2}, {"w": 0.5}]
    types = column_types.merge_column_types([_value_types(carried)])
    column_v = pa.array([column_types.conform_value(c.get("v"), types["v"]) for c in carried], type=types["v"])
    column_w = pa.array([column_types.conform_value(c.get("w"), types["w"]) for c in carried], type=types["w"])
    assert column_v.to_pylist() == ["1", "x", '{"a": 1}', None, None, None]
    assert column_w.to_pylist() == [None, None, None, None, 2.0, 0.5]


# -- embedding_array and rows_to_table ---------------------------------------------------------


def test_embedding_array_with_nulls():
    array = sinks.embedding_array([np.array([1, 2], np.float64), None, [3.0, 4.0], None], 2)
    assert array.type == pa.list_(pa.float32())
    assert array.to_pylist() == [[1.0, 2.0], None, [3.0, 4.0], None]
    assert array.null_count == 2
    assert array.offsets.to_pylist() == [0, 2, 2, 4, 4]


def test_embedding_array_all_null_and_empty():
    assert sinks.embedding_array([None, None], 3).to_pylist() == [None, None]
    assert sinks.embedding_array([], 3).to_pylist() == []


@pytest.mark.parametrize("vectors", [[np.zeros(3), np.zeros(2)], [None, np.zeros(4)], [[1.0]]])
def test_embedding_array_wrong_dimension(vectors):
    with pytest.raises(ValueError, match="dimension 3"):
        sinks.embedding_array(vectors, 3)


def test_rows_to_table_parquet_round_trip_keeps_nulls(tmp_path):
    carried = {"score": pa.float64(), "note": pa.string()}
    features = schema.features_schema(DIMS, carried=carried, metadata=METADATA)
    rows = [
        feature_row(0, score=1, note="plain"),
        feature_row(1, text=False, image=True, score=2.5, note={"k": [1]}),
        feature_row(2, image=True, audio=True, note=None),
        feature_row(3, text=False, audio=True),
    ]
    table = sinks.rows_to_table(rows, features)
    assert table.schema == features
    path = tmp_path / "f.parquet"
    pq.write_table(table, path)

    # stored as variable-length lists: a null fixed_size_list does not survive Parquet in pyarrow
    stored = pq.read_schema(path)
    assert pa.types.is_list(stored.field("text_embedding").type)

    read = schema.read_features(str(path))
    for name, modality in [
        ("text_embedding", "text"),
        ("image_embedding", "image"),
        ("audio_embedding", "audio"),
        ("fused", "fused"),
    ]:
        assert read.schema.field(name).type == pa.list_(pa.float32(), DIMS[modality])
    assert read.column("text_embedding").null_count == 2
    assert read.column("image_embedding").null_count == 2
    assert read.column("audio_embedding").null_count == 2
    assert read.column("fused").null_count == 0
    assert read.to_pylist() == [expected(row, carried) for row in rows]
    assert schema.read_run_metadata(read.schema) == METADATA


def test_embeddings_are_stored_plain_and_the_other_columns_with_dictionaries(tmp_path):
    features = schema.features_schema(DIMS, carried={"note": pa.string()}, metadata=METADATA)
    rows = [feature_row(i, image=True, note="same") for i in range(50)]
    staged = sinks._WriteStagedFile(str(tmp_path)).write(sinks.rows_to_table(rows, features))
    columns = pq.ParquetFile(staged).metadata.row_group(0)
    encodings = {columns.column(i).path_in_schema: columns.column(i).encodings for i in range(columns.num_columns)}
    for name in ("text_embedding", "image_embedding", "audio_embedding", "fused"):
        assert "RLE_DICTIONARY" not in encodings[f"{name}.list.element"], name
    for name in ("id", "note", "failed_modalities.list.element"):
        assert "RLE_DICTIONARY" in encodings[name], name


def test_rows_to_table_rejects_wrong_embedding_dimension():
    features = schema.features_schema(DIMS)
    row = feature_row(0)
    row["fused"] = np.zeros(4, np.float32)
    with pytest.raises(ValueError, match="dimension 5"):
        sinks.rows_to_table([row], features)


# -- WriteParquetTable -------------------------------------------------------------------------


CARRIED = {"score": pa.float64()}
FEATURES = schema.features_schema(DIMS, carried=CARRIED, metadata=METADATA)


def rows_for(ids: Iterable[int]) -> list[dict[str, Any]]:
    return [feature_row(i, text=i % 2 == 0, image=i % 2 == 1, audio=i % 3 == 0, score=i) for i in ids]


def write_tables(targets: list[tuple[str, list[dict[str, Any]], int, Callable[..., None]]]) -> None:
    """One pipeline writing each ``directory -> rows`` in ``targets``; returns nothing, asserts
    the {"files", "rows"} output of each write inside the pipeline."""
    with beam.Pipeline(runner="FnApiRunner") as p:
        features = p | "Schema" >> beam.Create([FEATURES])
        for n, (directory, rows, rows_per_file, expected_output) in enumerate(targets):
            written = (
                p
                | f"Rows{n}" >> beam.Create(rows, reshuffle=False)
                | f"Write{n}" >> sinks.WriteParquetTable(directory, features, rows_per_file=rows_per_file)
            )
            assert_that(written, expected_output, label=f"Check{n}")


def output_is(rows: int, min_files: int) -> Callable[[list[dict[str, int]]], None]:
    """A matcher for the single {"files", "rows"} output of a write whose file count depends on
    how Beam batches: at least ``min_files`` (the rows over ``rows_per_file``)."""

    def match(outputs: list[dict[str, int]]) -> None:
        assert len(outputs) == 1, outputs
        (output,) = outputs
        assert set(output) == {"files", "rows"}, output
        assert output["rows"] == rows, output
        assert output["files"] >= min_files, output

    return match


def part_files(fs: AbstractFileSystem, root: str) -> list[str]:
    return sorted(fs.glob(f"{root.rstrip('/')}/part-*.parquet"))


def read_table_files(fs: AbstractFileSystem, paths: list[str]) -> list[pa.Table]:
    tables = []
    for path in paths:
        with fs.open(path, "rb") as handle:
            tables.append(pq.read_table(handle))
    return tables


def read_manifest(fs: AbstractFileSystem, root: str) -> dict[str, Any]:
    return json.loads(fs.cat_file(schema.manifest_path(root)))


def check_written(fs: AbstractFileSystem, root: str, rows: list[dict[str, Any]], rows_per_file: int) -> int:
    """The folder holds one commit's parts and nothing else; the manifest beside it lists exactly them."""
    files = part_files(fs, root)
    assert files, "no part files"
    count = len(files)
    manifest = read_manifest(fs, root)
    commit = manifest["commit"]
    assert [f.rsplit("/", 1)[1] for f in files] == [
        f"part-{commit}-{i:05d}-of-{count:05d}.parquet" for i in range(count)
    ]
    assert [entry["path"] for entry in manifest["files"]] == [f.rsplit("/", 1)[1] for f in files]
    assert not fs.exists(f"{root.rstrip('/')}/_staging")
    tables = read_table_files(fs, files)
    assert [entry["rows"] for entry in manifest["files"]] == [t.num_rows for t in tables]
    assert all(t.num_rows <= rows_per_file for t in tables)
    assert all(schema.read_run_metadata(t.schema) == METADATA for t in tables)
    assert sum(t.num_rows for t in tables) == len(rows)
    assert sorted(fs.ls(root, detail=False)) == files  # only Parquet parts: any reader takes the folder
    return count


def read_rows(path: str, **kwargs: Any) -> list[dict[str, Any]]:
    return sorted(schema.read_features(path, **kwargs).to_pylist(), key=lambda r: r["id"])


def test_write_parquet_table_local_and_memory_and_empty(tmp_path):
    local = tmp_path / "features"
    empty = tmp_path / "empty"
    memory = f"memory://sinks-{uuid.uuid4().hex}/features"
    # leftovers of an earlier run: old part files and an orphan in staging
    local.mkdir()
    (local / "_staging").mkdir()
    (local / "_staging" / "orphan.parquet").write_bytes(b"junk")
    stale = sinks.rows_to_table(rows_for([100, 101]), FEATURES)
    for i in range(4):
        pq.write_table(stale, local / f"part-{i:05d}-of-00004.parquet")

    rows = rows_for(range(7))
    write_tables(
        [
            (str(local), rows, 3, output_is(rows=7, min_files=3)),
            (str(empty), [], 3, equal_to([{"files": 1, "rows": 0}])),
            (memory, rows, 100, equal_to([{"files": 1, "rows": 7}])),
        ]
    )

    local_fs = fsspec.filesystem("file")
    count = check_written(local_fs, str(local), rows, 3)
    assert count >= 3
    read = schema.read_features(str(local))
    assert sorted(read.to_pylist(), key=lambda r: r["id"]) == [expected(r, CARRIED) for r in rows]
    assert read.schema.field("fused").type == pa.list_(pa.float32(), 5)

    # no rows: one readable file with the full schema
    (part,) = part_files(local_fs, str(empty))
    assert [p.name for p in empty.iterdir()] == [part.rsplit("/", 1)[1]]
    assert (tmp_path / "_empty_manifest.json").is_file()
    read_empty = schema.read_features(str(empty))
    assert read_empty.num_rows == 0
    assert read_empty.schema.names == FEATURES.names
    assert schema.read_run_metadata(read_empty.schema) == METADATA

    # memory://: same files, same rows, read by URL or with the filesystem
    memory_fs, memory_root = fsspec.core.url_to_fs(memory)
    assert check_written(memory_fs, memory_root, rows, 100) == 1
    assert read_rows(memory) == read_rows(memory_root, filesystem=memory_fs) == [expected(r, CARRIED) for r in rows]

    # a rerun replaces the table: no stale part files, no duplicate rows
    rerun = rows_for(range(10, 13))
    write_tables(
        [
            (str(local), rerun, 2, output_is(rows=3, min_files=2)),
            (memory, rerun, 2, output_is(rows=3, min_files=2)),
        ]
    )
    check_written(local_fs, str(local), rerun, 2)
    check_written(memory_fs, memory_root, rerun, 2)
    assert read_rows(str(local)) == read_rows(memory) == [expected(r, CARRIED) for r in rerun]
    assert pq.read_table(str(local)).num_rows == 3  # a plain reader of the folder sees the same table
    beside = ["_empty_manifest.json", "_features_manifest.json", "empty", "features"]
    assert sorted(p.name for p in tmp_path.iterdir()) == beside  # and _staging is gone
    memory_fs.rm(memory_root.rsplit("/", 1)[0], recursive=True)


def commit_directly(directory: str, batches: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Stage ``batches`` of rows and run the commit step on them, outside a pipeline."""
    staging = sinks.staging_directory(directory)
    writer = sinks._WriteStagedFile(staging)
    staged = [(writer.write(sinks.rows_to_table(batch, FEATURES)), len(batch)) for batch in batches]
    return list(sinks._CommitFiles(staging, directory).process(staged, FEATURES))


def test_a_part_that_would_not_read_back_fails_before_anything_is_staged(tmp_path):
    """Arrow writes a value nested 150 levels deep but cannot read it: such a part must stop the
    run before its commit could replace a readable table with an unreadable one."""
    deep: Any = 1
    for _ in range(150):
        deep = [deep]
    staging = str(tmp_path / "_staging" / "features")
    with pytest.raises(OSError, match="does not read back"):
        sinks._WriteStagedFile(staging).write(pa.table({"deep": pa.array([deep])}))
    assert not (tmp_path / "_staging" / "features").exists() or not any((tmp_path / "_staging" / "features").iterdir())
    assert sinks.parquet_bytes(pa.table({"shallow": pa.array([[[1]]])})).to_pybytes()[:4] == b"PAR1"


def test_local_commit_killed_between_the_folder_swap_and_the_manifest(tmp_path, monkeypatch):
    """The old manifest then names parts that were swapped out: readers take the folder, which
    the swap put in place whole, and the next commit puts everything right."""
    directory = str(tmp_path / "features")
    old, new = rows_for(range(5)), rows_for(range(20, 24))
    commit_directly(directory, [old])

    def killed(source: str, target: str) -> None:
        raise OSError("killed")

    monkeypatch.setattr(sinks.os, "replace", killed)
    with pytest.raises(OSError, match="killed"):
        commit_directly(directory, [new[:2], new[2:]])
    monkeypatch.undo()

    assert read_rows(directory) == [expected(r, CARRIED) for r in new]
    committed = schema.committed_table(directory)
    assert committed is not None and committed.rows == len(new)
    commit_directly(directory, [old])
    assert read_rows(directory) == [expected(r, CARRIED) for r in old]


@pytest.mark.parametrize(
    "method, calls, survivor",
    [
        ("cp_file", 1, "old"),  # killed after one new part is copied in, before the manifest
        ("rm_file", 1, "new"),  # killed after the manifest, while deleting the old parts
    ],
)
def test_object_store_commit_killed_part_way(monkeypatch, method, calls, survivor):
    memory = f"memory://sinks-{uuid.uuid4().hex}/features"
    fs, root = fsspec.core.url_to_fs(memory)
    old, new = rows_for(range(5)), rows_for(range(20, 24))
    try:
        write_tables([(memory, old, 2, output_is(rows=5, min_files=3))])

        original = getattr(MemoryFileSystem, method)
        done: list[tuple[Any, ...]] = []

        def dies_part_way(self, *args, **kwargs):
            if len(done) == calls:
                raise OSError("killed")
            done.append(args)
            return original(self, *args, **kwargs)

        monkeypatch.setattr(MemoryFileSystem, method, dies_part_way)
        with pytest.raises(OSError, match="killed"):
            commit_directly(memory, [new[:2], new[2:]])
        monkeypatch.undo()

        # the folder holds parts of both commits, but the manifest names one whole table
        assert len(part_files(fs, root)) > len(read_manifest(fs, root)["files"])
        assert read_rows(memory) == [expected(r, CARRIED) for r in {"old": old, "new": new}[survivor]]

        rerun = rows_for(range(40, 43))
        write_tables([(memory, rerun, 2, output_is(rows=3, min_files=2))])
        check_written(fs, root, rerun, 2)
        assert read_rows(memory) == [expected(r, CARRIED) for r in rerun]
        assert not fs.exists(sinks.staging_directory(root))
    finally:
        fs.rm(root.rsplit("/", 1)[0], recursive=True)


def unified(left: pa.DataType | None, right: pa.DataType | None) -> pa.DataType:
    result = column_types.unify_types(left, right)
    assert result is not None
    return result


def test_empty_lists_give_way_to_typed_lists() -> None:
    empty, strings = column_types.value_type([]), column_types.value_type(["x"])
    assert unified(empty, strings).equals(pa.list_(pa.string()))
    assert unified(strings, empty).equals(pa.list_(pa.string()))
    assert unified(column_types.value_type([1]), column_types.value_type([2.5])).equals(pa.list_(pa.float64()))
