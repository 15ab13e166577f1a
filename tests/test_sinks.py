"""Tests for mmfeatures.sinks: type unification, Arrow conversion and the Beam Parquet table sink."""

import datetime
import json
import os
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmfeatures import column_types, schema, sinks, storage
from tests.committed_tables import stage_and_commit

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
        "created_timestamp": WHEN,
        "content_hash": None,
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
    array = column_types.embedding_array([np.array([1, 2], np.float64), None, [3.0, 4.0], None], 2)
    assert array.type == pa.list_(pa.float32())
    assert array.to_pylist() == [[1.0, 2.0], None, [3.0, 4.0], None]
    assert array.null_count == 2
    assert array.offsets.to_pylist() == [0, 2, 2, 4, 4]


def test_embedding_array_all_null_and_empty():
    assert column_types.embedding_array([None, None], 3).to_pylist() == [None, None]
    assert column_types.embedding_array([], 3).to_pylist() == []


@pytest.mark.parametrize("vectors", [[np.zeros(3), np.zeros(2)], [None, np.zeros(4)], [[1.0]]])
def test_embedding_array_wrong_dimension(vectors):
    with pytest.raises(ValueError, match="dimension 3"):
        column_types.embedding_array(vectors, 3)


def test_rows_to_table_parquet_round_trip_keeps_nulls(tmp_path):
    carried = {"score": pa.float64(), "note": pa.string()}
    features = schema.features_schema(DIMS, carried=carried, metadata=METADATA)
    rows = [
        feature_row(0, score=1, note="plain"),
        feature_row(1, text=False, image=True, score=2.5, note={"k": [1]}),
        feature_row(2, image=True, audio=True, note=None),
        feature_row(3, text=False, audio=True),
    ]
    table = column_types.rows_to_table(rows, features)
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
    staged = sinks.write_staged_part(str(tmp_path), column_types.rows_to_table(rows, features))
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
        column_types.rows_to_table([row], features)


def test_an_earlier_tables_rows_conform_to_this_runs_schema_as_their_values_would() -> None:
    """``conform_table`` makes an earlier run's columns fit this run's schema: the table it gives
    is the one ``rows_to_table`` makes of the same rows as Python values."""
    carried = {"score": pa.float64(), "note": pa.string(), "tags": pa.list_(pa.string()), "new": pa.int64()}
    earlier = column_types.rows_to_table(
        [
            feature_row(0, score=1, note=7, tags=[], gone="x"),
            feature_row(1, image=True, score=None, note=None, tags=[], gone="y"),
        ],
        schema.features_schema(
            DIMS,
            carried={"gone": pa.string(), "tags": pa.list_(pa.null()), "note": pa.int64(), "score": pa.int64()},
        ),
    )
    features = schema.features_schema(DIMS, carried=carried, metadata=METADATA)
    conformed = column_types.conform_table(earlier, features)
    assert conformed.schema == features and conformed.schema.metadata == features.metadata
    assert conformed.equals(column_types.rows_to_table(earlier.to_pylist(), features))
    assert conformed.column("note").to_pylist() == ["7", None] and conformed.column("new").null_count == 2


# -- StageParquetTable and CommitRun ---------------------------------------------------------


CARRIED = {"score": pa.float64()}
FEATURES = schema.features_schema(DIMS, carried=CARRIED, metadata=METADATA)
ERRORS = schema.errors_schema()


def rows_for(ids: Iterable[int]) -> list[dict[str, Any]]:
    return [feature_row(i, text=i % 2 == 0, image=i % 2 == 1, audio=i % 3 == 0, score=i) for i in ids]


def check_committed(output: str, rows: list[dict[str, Any]], rows_per_file: int) -> None:
    """The output holds one commit: each table folder holds exactly the parts _run.json lists,
    named after the commit, and they hold ``rows``; no staging is left."""
    fs, root = fsspec.core.url_to_fs(output)
    root = root.rstrip("/")
    manifest = json.loads(fs.cat_file(f"{root}/_run.json"))
    commit = manifest["commit"]
    for name, table_rows in (("features", rows), ("errors", [])):
        listed = manifest["tables"][name]["files"]
        count = len(listed)
        assert [f["path"] for f in listed] == [
            f"{name}/part-{commit}-{i:05d}-of-{count:05d}.parquet" for i in range(count)
        ]
        assert sorted(fs.ls(f"{root}/{name}", detail=False)) == [f"{root}/{f['path']}" for f in listed]
        tables = [pq.read_table(fs.open(f"{root}/{f['path']}", "rb")) for f in listed]
        assert [f["rows"] for f in listed] == [t.num_rows for t in tables]
        assert all(t.num_rows <= rows_per_file for t in tables)
        assert sum(t.num_rows for t in tables) == manifest["tables"][name]["rows"] == len(table_rows)
    assert manifest["features"] == {"files": len(manifest["tables"]["features"]["files"]), "rows": len(rows)}
    assert manifest["errors"] == {"files": 1, "rows": 0}  # an empty table is one readable part
    assert not fs.exists(f"{root}/_staging")
    assert read_rows(output) == [expected(r, CARRIED) for r in rows]


def read_rows(output: str, **kwargs: Any) -> list[dict[str, Any]]:
    table = schema.read_features(storage.join(output, "features"), **kwargs)
    return sorted(table.to_pylist(), key=lambda r: r["id"])


@pytest.mark.parametrize("where", ["local", "memory"])
def test_a_run_commits_both_tables_in_one_run_manifest_and_a_rerun_replaces_them(tmp_path, where):
    output = str(tmp_path / "out") if where == "local" else f"memory://sinks-{uuid.uuid4().hex}/out"
    rows = rows_for(range(7))
    stage_and_commit(output, rows, FEATURES, 3)
    check_committed(output, rows, 3)
    read = schema.read_features(storage.join(output, "features"))
    assert read.schema.field("fused").type == pa.list_(pa.float32(), 5)
    assert all(schema.read_run_metadata(read.schema)[key] == value for key, value in METADATA.items())

    rerun = rows_for(range(10, 13))
    stage_and_commit(output, rerun, FEATURES, 2)
    check_committed(output, rerun, 2)  # no part of the first run is left
    if where == "local":
        assert pq.read_table(f"{output}/features").num_rows == 3  # a plain reader of the folder agrees
        assert sorted(os.listdir(output)) == ["_lease", "_run.json", "errors", "features"]


@pytest.mark.parametrize("where", ["local", "memory"])
def test_a_part_written_before_is_copied_where_a_part_written_now_would_be_the_same(tmp_path, where):
    """An incremental run hands the sink the parts it keeps whole: each is copied as it is (a hard
    link on a local disk, a copy elsewhere) when it has the table's schema and fits a part, and
    its rows are written again otherwise."""
    base = str(tmp_path) if where == "local" else f"memory://sinks-{uuid.uuid4().hex}"
    fs, root = fsspec.core.url_to_fs(base)

    def part_of(manifest: dict[str, Any], output: str) -> str:
        (part,) = manifest["tables"]["features"]["files"]
        return f"{root}/{output}/{part['path']}"

    rows = rows_for(range(5))
    source = part_of(stage_and_commit(f"{base}/first", rows, FEATURES, 5), "first")
    written = sinks.WrittenPart(source, 5)
    copied = part_of(stage_and_commit(f"{base}/copied", [], FEATURES, 5, None, [written]), "copied")
    assert fs.cat_file(copied) == fs.cat_file(source)
    if where == "local":
        assert os.path.samefile(copied, source)  # a hard link: the committed part's file, shared

    # Copied unread: a part whose pages no longer decode (its footer intact) goes in as it is.
    garbled = bytearray(fs.cat_file(source))
    garbled[8:400] = bytes(392)
    fs.pipe_file(f"{root}/garbled.parquet", bytes(garbled))
    with pytest.raises((OSError, pa.ArrowException)):
        pq.read_table(fs.open(f"{root}/garbled.parquet", "rb"))
    unread = sinks.WrittenPart(f"{root}/garbled.parquet", 5)
    unread_copy = part_of(stage_and_commit(f"{base}/unread", [], FEATURES, 5, None, [unread]), "unread")
    assert fs.cat_file(unread_copy) == garbled

    cut = stage_and_commit(f"{base}/cut", [], FEATURES, 2, None, [written])
    assert sorted(part["rows"] for part in cut["tables"]["features"]["files"]) == [1, 2, 2]
    check_committed(f"{base}/cut", rows, 2)

    other = schema.features_schema(DIMS, carried=CARRIED, metadata={**METADATA, "fingerprint": "another"})
    rewritten = part_of(stage_and_commit(f"{base}/rewritten", [], other, 5, None, [written]), "rewritten")
    assert fs.cat_file(rewritten) != fs.cat_file(source)
    table = schema.read_features(f"{base}/rewritten/features")
    assert schema.read_run_metadata(table.schema)["fingerprint"] == "another"
    assert sorted(table.to_pylist(), key=lambda r: r["id"]) == [expected(r, CARRIED) for r in rows]


def test_a_part_that_would_not_read_back_fails_before_anything_is_staged(tmp_path):
    """Arrow writes a value nested 150 levels deep but cannot read it: such a part must stop the
    run before its commit could replace a readable table with an unreadable one."""
    deep: Any = 1
    for _ in range(150):
        deep = [deep]
    staging = tmp_path / "_staging" / "features"
    with pytest.raises(OSError, match="does not read back"):
        sinks.write_staged_part(str(staging), pa.table({"deep": pa.array([deep])}))
    assert not staging.exists() or not any(staging.iterdir())
    assert sinks.parquet_bytes(pa.table({"shallow": pa.array([[[1]]])})).to_pybytes()[:4] == b"PAR1"


def unified(left: pa.DataType | None, right: pa.DataType | None) -> pa.DataType:
    result = column_types.unify_types(left, right)
    assert result is not None
    return result


def test_empty_lists_give_way_to_typed_lists() -> None:
    empty, strings = column_types.value_type([]), column_types.value_type(["x"])
    assert unified(empty, strings).equals(pa.list_(pa.string()))
    assert unified(strings, empty).equals(pa.list_(pa.string()))
    assert unified(column_types.value_type([1]), column_types.value_type([2.5])).equals(pa.list_(pa.float64()))
