"""Hive-style partitioned feature tables (``--partition-by``): each part lies in the folder of its
partition, named as pyarrow names it, so pyarrow, DuckDB and Polars read the folder and prune by
it; ``read_features`` gives the partition column back with its own type; and the output stays
the job's: a run still refuses files it did not write, and replaces a table of another layout."""

from __future__ import annotations

import datetime
import json
import os
import posixpath
import shutil
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from mmfeatures import __version__, column_types, outputs, schema, sinks, storage
from mmfeatures.lease import Lease, held
from tests.committed_tables import COMMIT_STEPS, cut_commit_short, stage_and_commit

DIMS = {"text": 2, "image": 2, "audio": 2, "fused": 3}
METADATA = {"fusion": {"method": "concat"}}
CARRIED = {"year": pa.int64(), "kept": pa.bool_(), "score": pa.float64(), "tags": pa.list_(pa.string())}
FEATURES = schema.features_schema(DIMS, carried=CARRIED, metadata=METADATA)
ERRORS = schema.errors_schema()
UTC = datetime.timezone.utc
WHEN = datetime.datetime(2024, 5, 1, 12, 30, tzinfo=UTC)
ODD = "a/b=c d%"  # a value every character of which but the letters is escaped in a folder's name
SPLITS = ["train", "train", "train", ODD, ODD, None, None]  # in parts of 2 rows: 2 + 1 + 1 + 1 parts


def row(i: int, split: str | None = "train", when: datetime.datetime = WHEN, **carried: Any) -> dict[str, Any]:
    """A feature row whose floats are exact in float32."""
    return {
        "id": f"r{i}",
        "label": f"l{i % 2}",
        "split": split,
        "text_embedding": [float(i), 0.5],
        "image_embedding": None,
        "audio_embedding": None,
        "fused": [i / 4, 0.0, 1.0],
        "has_text": True,
        "has_image": False,
        "has_audio": False,
        "failed_modalities": [],
        "event_timestamp": when,
        "created_timestamp": WHEN,
        "year": 2020 + i % 2,
        "kept": i % 3 == 0,
        "score": i / 2,
        "tags": [f"t{i}"],
        **carried,
    }


def expected(rows: Sequence[Mapping[str, Any]], table_schema: pa.Schema = FEATURES) -> list[dict[str, Any]]:
    """What reading ``rows`` back gives: the table's columns, by id."""
    return sorted(({name: r.get(name) for name in table_schema.names} for r in rows), key=lambda r: r["id"])


def stage_by_hand(output: str, run: str, parts: list[list[dict[str, Any]]], partition_by: str | None) -> dict:
    """Stage ``parts`` (each of one partition's rows) as run ``run``'s feature table, one by one,
    and an empty error table; returns what ``publish`` takes."""
    staging = storage.join(output, outputs.STAGING, run)
    features = [column_types.rows_to_table(rows, FEATURES) for rows in parts]
    return {
        "features": [
            (sinks.write_staged_part(storage.join(staging, "features"), t, partition_by), t.num_rows) for t in features
        ],
        "errors": [(sinks.write_staged_part(storage.join(staging, "errors"), ERRORS.empty_table()), 0)],
    }


def commit_by_hand(output: str, parts: list[list[dict[str, Any]]], partition_by: str | None) -> dict:
    """Commit ``parts`` (each of one partition's rows) as the feature table."""
    run = f"run-{uuid.uuid4().hex}"
    staged = stage_by_hand(output, run, parts, partition_by)
    with held(output, run) as lease:
        return sinks.publish(lease, f"test-{run[-8:]}", staged, {"package_version": __version__})


def files_under(output: str) -> list[str]:
    """Every file of the output but the lease's."""
    fs, root = fsspec.core.url_to_fs(output)
    found = (path[len(root.rstrip("/")) + 1 :] for path in fs.find(root))
    return sorted(path for path in found if not path.startswith("_lease/"))


def listed(manifest: Mapping[str, Any]) -> list[str]:
    return sorted(["_run.json"] + [part["path"] for table in manifest["tables"].values() for part in table["files"]])


def fields(table_schema: pa.Schema) -> list[tuple[str, pa.DataType, bool, Any]]:
    """A schema's fields compared by type equality (Parquet names a list's item ``element``)."""
    return [(field.name, field.type, field.nullable, field.metadata) for field in table_schema]


def ids_and_values(pairs: Iterable[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
    return sorted(pairs, key=lambda pair: pair[0])


# -- folder names ------------------------------------------------------------------------------


VALUES = ["train", ODD, "", "..", ".", "é", "x#y?z", "tab\there", "a+b~c-d_e.f", "100%", "[x]{y}^|'\"", "\x01"]


def test_partition_folders_are_named_as_pyarrow_names_them(tmp_path: Path) -> None:
    table = pa.table({"split": pa.array([*VALUES, None], pa.string()), "n": range(len(VALUES) + 1)})
    ds.write_dataset(table, tmp_path, format="parquet", partitioning=["split"], partitioning_flavor="hive")
    assert sorted(os.listdir(tmp_path)) == sorted(outputs.partition_folder("split", v) for v in [*VALUES, None])
    assert outputs.partition_folder("split", ODD) == "split=a%2Fb%3Dc%20d%25"
    assert outputs.partition_folder("split", None) == "split=__HIVE_DEFAULT_PARTITION__"
    for value in [*VALUES, None]:
        folder = outputs.partition_folder("split", value)
        assert outputs.PARTITION.fullmatch(folder) and outputs.partition_value(folder) == ("split", value)


@pytest.mark.parametrize(
    "name, taken",
    [
        ("features/part-c-00000-of-00001.parquet", True),
        ("features/split=train/part-c-00000-of-00001.parquet", True),
        ("features/split=a%2Fb%3Dc%20d%25/part-c-00000-of-00001.parquet", True),
        ("features/split=__HIVE_DEFAULT_PARTITION__/part-c-00000-of-00001.parquet", True),
        ("features/event_date=2024-05-01/part-c-00000-of-00001.parquet", True),
        ("features/split=../part-c-00000-of-00001.parquet", True),  # a folder named "split=..", inside features/
        ("features/../part-c-00000-of-00001.parquet", False),
        ("features/split=train/../../part-c-00000-of-00001.parquet", False),
        ("features/split=train/label=x/part-c-00000-of-00001.parquet", False),  # one level only
        ("features/split=a/b/part-c-00000-of-00001.parquet", False),
        ("features/split=a b/part-c-00000-of-00001.parquet", False),  # not escaped
        ("features/_split=a/part-c-00000-of-00001.parquet", False),  # readers skip such folders
        ("features/2024/part-c-00000-of-00001.parquet", False),
        ("errors/split=train/part-c-00000-of-00001.parquet", False),  # only features are partitioned
    ],
)
def test_a_part_is_taken_in_one_level_of_partition_folders_of_features_only(name: str, taken: bool) -> None:
    assert bool(outputs.PART_NAME.fullmatch(name)) == taken


# -- a table partitioned by split --------------------------------------------------------------


@pytest.fixture(scope="module")
def by_split(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[dict[str, Any]], dict[str, Any]]:
    """A table partitioned by split, committed by the job's sink: its output, rows and ``_run.json``."""
    output = str(tmp_path_factory.mktemp("by_split") / "out")
    rows = [row(i, split) for i, split in enumerate(SPLITS)]
    return output, rows, stage_and_commit(output, rows, FEATURES, 2, "split")


def test_each_part_lies_in_its_partition_folder_named_by_the_commit(
    by_split: tuple[str, list[dict[str, Any]], dict[str, Any]],
) -> None:
    output, rows, manifest = by_split
    parts = manifest["tables"]["features"]["files"]
    commit, count = manifest["commit"], len(parts)
    folders = ["split=__HIVE_DEFAULT_PARTITION__", "split=a%2Fb%3Dc%20d%25", "split=train", "split=train"]
    assert [part["path"] for part in parts] == [
        f"features/{folder}/part-{commit}-{i:05d}-of-{count:05d}.parquet" for i, folder in enumerate(folders)
    ]
    assert [part["rows"] for part in parts][:2] == [2, 2] and sorted(part["rows"] for part in parts[2:]) == [1, 2]
    assert files_under(output) == listed(manifest)
    for part in parts:  # the column lies in the folder's name only, as Spark and write_dataset leave it
        assert "split" not in pq.read_schema(os.path.join(output, part["path"])).names


def test_rows_given_as_tables_are_staged_by_partition_in_parts_of_at_most_rows_per_file(tmp_path: Path) -> None:
    """An incremental run stages the previous rows it keeps as Arrow tables beside its dict rows:
    a table of many partitions is cut into one partition's parts, none over ``rows_per_file``."""
    output = str(tmp_path / "out")
    rows = [row(i, split) for i, split in enumerate(SPLITS)]
    as_tables = [row(i, split) for i, split in enumerate([ODD, "train", None, "train", "test", "train"], len(rows))]
    tables = [column_types.rows_to_table(as_tables[:5], FEATURES), column_types.rows_to_table(as_tables[5:], FEATURES)]
    manifest = stage_and_commit(output, rows, FEATURES, 2, "split", tables)
    parts = manifest["tables"]["features"]["files"]
    assert all(0 < part["rows"] <= 2 for part in parts)
    fs, root = fsspec.core.url_to_fs(output)
    for part in parts:
        folder = part["path"].split("/")[1]
        values = schema.read_part(fs, f"{root}/{part['path']}", ["split"]).column("split").to_pylist()
        assert {outputs.partition_folder("split", value) for value in values} == {folder}
    table = schema.read_features(os.path.join(output, "features"))
    assert sorted(table.to_pylist(), key=lambda r: r["id"]) == expected(rows + as_tables)


def test_rows_given_as_tables_must_have_the_tables_schema(tmp_path: Path) -> None:
    narrow = column_types.rows_to_table([row(0)], pa.schema([field for field in FEATURES if field.name != "tags"]))
    with pytest.raises(ValueError, match="do not have its schema"):
        stage_and_commit(str(tmp_path / "out"), [], FEATURES, 2, None, [narrow])


def test_read_features_gives_the_partition_column_back_in_its_place(
    by_split: tuple[str, list[dict[str, Any]], dict[str, Any]],
) -> None:
    output, rows, _ = by_split
    table = schema.read_features(os.path.join(output, "features"))
    assert table.schema.names == FEATURES.names and table.schema.field("split").type == pa.string()
    assert table.schema.field("fused").type == pa.list_(pa.float32(), DIMS["fused"])
    assert schema.read_run_metadata(table.schema) == METADATA and schema.PARTITION_KEY not in table.schema.metadata
    assert sorted(table.to_pylist(), key=lambda r: r["id"]) == expected(rows)
    ids = schema.read_features(os.path.join(output, "features"), columns=["split", "id"])
    assert ids.column_names == ["id", "split"] and ids.num_rows == len(rows)


def test_read_part_reads_one_part_with_its_partition_column(
    by_split: tuple[str, list[dict[str, Any]], dict[str, Any]], tmp_path: Path
) -> None:
    output, rows, manifest = by_split
    fs, root = fsspec.core.url_to_fs(output)
    odd = next(part["path"] for part in manifest["tables"]["features"]["files"] if "a%2F" in part["path"])
    part = schema.read_part(fs, f"{root}/{odd}")
    assert fields(part.schema) == fields(FEATURES) and part.schema.metadata == FEATURES.metadata  # the job's schema
    assert part.to_pylist() == expected(rows[3:5])
    projected = schema.read_part(fs, f"{root}/{odd}", columns=["score", "split", "id"])
    assert projected.column_names == ["id", "split", "score"]  # in the table's order
    assert projected.column("split").to_pylist() == [ODD, ODD]
    assert schema.read_part(fs, f"{root}/{odd}", columns=["id"]).column_names == ["id"]

    moved = tmp_path / "elsewhere.parquet"
    shutil.copy(os.path.join(output, odd), moved)
    with pytest.raises(ValueError, match="outside a split= folder"):
        schema.read_part(fs, str(moved))


def test_pyarrow_duckdb_and_polars_read_the_folder_as_read_features_does(
    by_split: tuple[str, list[dict[str, Any]], dict[str, Any]],
) -> None:
    import duckdb
    import polars as pl

    output, _, _ = by_split
    folder = os.path.join(output, "features")
    committed = schema.read_features(folder)
    want = ids_and_values(zip(committed.column("id").to_pylist(), committed.column("split").to_pylist(), strict=True))
    arrow = ds.dataset(folder, format="parquet", partitioning="hive").to_table(columns=["id", "split"])
    assert ids_and_values(zip(*arrow.to_pydict().values(), strict=True)) == want
    with duckdb.connect() as connection:
        query = f"select id, split from read_parquet('{folder}/**/*.parquet', hive_partitioning=true)"
        assert ids_and_values(connection.sql(query).fetchall()) == want
    frame = pl.scan_parquet(f"{folder}/**/*.parquet", hive_partitioning=True).select("id", "split").collect()
    assert ids_and_values(frame.iter_rows()) == want


def test_readers_prune_by_an_escaped_value(
    by_split: tuple[str, list[dict[str, Any]], dict[str, Any]], tmp_path: Path
) -> None:
    """The train parts are replaced by bytes no reader can read: a query of the other partition
    that reads the folder whole fails, one that filters on it never opens them."""
    import duckdb
    import polars as pl

    output, _, _ = by_split
    folder = tmp_path / "features"
    shutil.copytree(os.path.join(output, "features"), folder)
    for part in (folder / "split=train").iterdir():
        part.write_bytes(b"not parquet")
    want = ["r3", "r4"]

    dataset = ds.dataset(folder, format="parquet", partitioning="hive")
    with pytest.raises(pa.ArrowInvalid):
        dataset.to_table()
    assert sorted(dataset.to_table(columns=["id"], filter=ds.field("split") == ODD).column("id").to_pylist()) == want
    with duckdb.connect() as connection:
        relation = f"read_parquet('{folder}/**/*.parquet', hive_partitioning=true)"
        with pytest.raises(duckdb.Error):
            connection.sql(f"select id from {relation}").fetchall()
        assert (
            sorted(i for (i,) in connection.execute(f"select id from {relation} where split = ?", [ODD]).fetchall())
            == want
        )
    scan = pl.scan_parquet(f"{folder}/**/*.parquet", hive_partitioning=True)
    with pytest.raises(pl.exceptions.ComputeError):
        scan.select("id").collect()
    assert sorted(scan.filter(pl.col("split") == ODD).select("id").collect()["id"].to_list()) == want


# -- event_date and typed columns --------------------------------------------------------------


def test_a_table_partitioned_by_event_date_reads_back_a_date_column(tmp_path: Path) -> None:
    import duckdb
    import polars as pl

    late = datetime.timezone(datetime.timedelta(hours=-5))
    times = [
        datetime.datetime(2024, 5, 1, 0, 0, tzinfo=UTC),
        datetime.datetime(2024, 5, 1, 23, 59, 59, 999999, tzinfo=UTC),
        datetime.datetime(2024, 5, 1, 20, 0, tzinfo=late),  # 01:00 UTC the next day
        datetime.datetime(2024, 5, 2, 9, 0, tzinfo=UTC),
    ]
    rows = [row(i, when=when) for i, when in enumerate(times)]
    output = str(tmp_path / "out")
    manifest = stage_and_commit(output, rows, FEATURES, 2, schema.EVENT_DATE)
    assert sorted({os.path.dirname(part["path"]) for part in manifest["tables"]["features"]["files"]}) == [
        "features/event_date=2024-05-01",
        "features/event_date=2024-05-02",
    ]
    folder = os.path.join(output, "features")
    table = schema.read_features(folder)
    assert table.schema.names == [*FEATURES.names, "event_date"]  # last, where Hive-style readers put it
    assert table.schema.field("event_date").type == pa.date32()
    dates = dict(zip(table.column("id").to_pylist(), table.column("event_date").to_pylist(), strict=True))
    assert dates == {"r0": datetime.date(2024, 5, 1), "r1": datetime.date(2024, 5, 1)} | {
        "r2": datetime.date(2024, 5, 2),
        "r3": datetime.date(2024, 5, 2),
    }
    assert table.select(FEATURES.names).to_pylist() == expected(rows)  # event_timestamp itself is kept

    for part in (Path(folder) / "event_date=2024-05-02").iterdir():
        part.write_bytes(b"not parquet")
    with duckdb.connect() as connection:
        relation = connection.sql(
            f"select id, event_date from read_parquet('{folder}/**/*.parquet', hive_partitioning=true) "
            "where event_date = DATE '2024-05-01'"
        )
        assert str(relation.types[1]) == "DATE" and sorted(relation.fetchall()) == [
            ("r0", datetime.date(2024, 5, 1)),
            ("r1", datetime.date(2024, 5, 1)),
        ]
    frame = (
        pl.scan_parquet(f"{folder}/**/*.parquet", hive_partitioning=True)
        .filter(pl.col("event_date") == datetime.date(2024, 5, 1))
        .collect()
    )
    assert frame.schema["event_date"] == pl.Date and sorted(frame["id"].to_list()) == ["r0", "r1"]


@pytest.mark.parametrize("column, values", [("year", [2020, 2021]), ("kept", [True, False]), ("label", ["l0", "l1"])])
def test_a_carried_or_label_partition_keeps_its_type(tmp_path: Path, column: str, values: list[Any]) -> None:
    rows = [row(i) for i in range(6)]
    output = str(tmp_path / "out")
    commit_by_hand(output, [[r for r in rows if r[column] == value] for value in values], column)
    table = schema.read_features(os.path.join(output, "features"))
    assert table.schema.names == FEATURES.names and table.schema.field(column).type == FEATURES.field(column).type
    assert sorted(table.to_pylist(), key=lambda r: r["id"]) == expected(rows)


DECLARED_RULE = (
    r"partition by split or label, a carried column of .*, or event_date \(the UTC date of event_timestamp\)"
)


@pytest.mark.parametrize(
    "column, message, by_name",
    [
        ("_year", "a partition column's name must be", True),
        ("a b", "a partition column's name must be", True),
        ("", "a partition column's name must be", True),
        ("event_timestamp", DECLARED_RULE, True),
        ("failed_modalities", DECLARED_RULE, True),
        ("id", DECLARED_RULE, True),
        ("text", DECLARED_RULE, True),  # a record field, never a column of the table
        ("colour", r"the feature table has no such column \(carried: year, kept, score, tags\)", False),
        ("score", "a double column: " + DECLARED_RULE, False),
        ("tags", "a list<item: string> column", False),
    ],
)
def test_a_column_no_folder_can_name_is_refused(tmp_path: Path, column: str, message: str, by_name: bool) -> None:
    """Refused by the sink and by the schema; by its name alone (as a run checks its options,
    before any work) only where no input could give the table such a column."""
    with pytest.raises(ValueError, match=message):
        sinks.write_staged_part(str(tmp_path), column_types.rows_to_table([row(0)], FEATURES), column)
    with pytest.raises(ValueError, match=message):
        schema.partition_column(FEATURES, column)
    if by_name:
        with pytest.raises(ValueError, match=message):
            schema.check_partition_name(column)
    else:
        schema.check_partition_name(column)


def test_event_date_is_always_the_date_of_event_timestamp(tmp_path: Path) -> None:
    """A date column named event_date, as the kept rows of an earlier run partitioned by it bring
    it back (empty in rows computed since), is replaced by the date of event_timestamp, in its
    place; one of another type is refused."""
    carrying = FEATURES.append(pa.field("event_date", pa.date32()))
    table = column_types.rows_to_table(
        [row(0, event_date=None), row(1, event_date=datetime.date(2000, 1, 1))], carrying
    )
    assert schema.partition_part(table, schema.EVENT_DATE).schema.names == FEATURES.names
    written = sinks.write_staged_part(str(tmp_path), table, schema.EVENT_DATE)
    assert posixpath.basename(posixpath.dirname(written)) == "event_date=2024-05-01"
    read = schema.read_part(fsspec.filesystem("file"), written)
    assert read.schema.names == carrying.names and read.column("event_date").to_pylist() == [WHEN.date()] * 2

    texts = FEATURES.append(pa.field("event_date", pa.string()))
    with pytest.raises(ValueError, match="the table carries a string column of that name"):
        schema.partition_column(texts, schema.EVENT_DATE)


def test_a_part_holds_the_rows_of_one_partition(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="rows of 2 partitions by split"):
        sinks.write_staged_part(
            str(tmp_path), column_types.rows_to_table([row(0, "train"), row(1, "test")], FEATURES), "split"
        )


def test_an_empty_partitioned_table_is_one_readable_part(tmp_path: Path) -> None:
    import duckdb

    output = str(tmp_path / "out")
    manifest = stage_and_commit(output, [], FEATURES, 2, "split")
    (part,) = manifest["tables"]["features"]["files"]
    assert part["path"] == f"features/split=__HIVE_DEFAULT_PARTITION__/part-{manifest['commit']}-00000-of-00001.parquet"
    table = schema.read_features(os.path.join(output, "features"))
    assert table.num_rows == 0 and table.schema.names == FEATURES.names
    with duckdb.connect() as connection:
        query = f"select id, split from read_parquet('{output}/features/**/*.parquet', hive_partitioning=true)"
        assert connection.sql(query).fetchall() == []


# -- what a run may replace --------------------------------------------------------------------


@pytest.mark.parametrize(
    "foreign",
    [
        "features/split=train/notes.txt",  # the user's file in a partition folder
        "features/split=train/part-x-00000-of-00001.parquet",  # a part no commit lists
        "features/2024/part-x-00000-of-00001.parquet",  # a subfolder that is no partition
        "features/split=train/label=l0/part-x-00000-of-00001.parquet",  # a second level
    ],
)
def test_a_run_refuses_an_output_holding_files_it_did_not_write_in_partitions(tmp_path: Path, foreign: str) -> None:
    output = tmp_path / "out"
    commit_by_hand(str(output), [[row(0, "train")], [row(1, "test")]], "split")
    outputs.check_replaceable(str(output))
    (output / foreign).parent.mkdir(parents=True, exist_ok=True)
    (output / foreign).write_text("mine")
    with pytest.raises(ValueError, match=f"features/ holds 1 file\\(s\\) this job did not write \\({foreign}"):
        outputs.check_replaceable(str(output))
    assert (output / foreign).read_text() == "mine"


@pytest.fixture(params=["local", "memory"])
def output(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "local":
        yield str(tmp_path / "out")
        return
    bucket = f"partitions-{uuid.uuid4().hex}"
    yield f"memory://{bucket}/out"
    fsspec.filesystem("memory").rm(bucket, recursive=True)


def test_a_partitioned_table_replaces_an_unpartitioned_one_and_the_reverse(output: str) -> None:
    """Each commit leaves exactly the files its ``_run.json`` lists, and no partition folder
    whose parts it replaced: unpartitioned, by split, by label, unpartitioned again."""
    fs, root = fsspec.core.url_to_fs(output)
    features = f"{root.rstrip('/')}/features"
    commits = [
        (range(0, 3), None, []),
        (range(3, 8), "split", ["split=__HIVE_DEFAULT_PARTITION__", "split=test", "split=train"]),
        (range(8, 12), "label", ["label=l0", "label=l1"]),
        (range(12, 14), None, []),
    ]
    for ids, partition_by, folders in commits:
        rows = [row(i, split=("train", "test", None)[i % 3]) for i in ids]
        parts: dict[Any, list[dict[str, Any]]] = {}
        for r in rows:
            parts.setdefault(r[partition_by] if partition_by else None, []).append(r)
        manifest = commit_by_hand(output, list(parts.values()), partition_by)
        assert files_under(output) == listed(manifest)
        read = schema.read_features(storage.join(output, "features"), columns=["id"])
        assert sorted(read.column("id").to_pylist()) == sorted(f"r{i}" for i in ids)
        assert sorted(posixpath.basename(p) for p in fs.ls(features, detail=False) if fs.isdir(p)) == folders


@pytest.mark.parametrize("step", ["move", "manifest", "delete"])
def test_a_partitioned_commit_cut_short_leaves_one_whole_table_and_recovery_no_empty_folder(
    output: str, step: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A table by split is replaced by one by label, the commit cut after one part moved in,
    before ``_run.json``, or before the old parts are deleted; the next run's recovery leaves
    exactly the committed table's files, and only its partitions' folders."""
    commit_by_hand(output, [[row(0, "train"), row(1, "train")], [row(2, "test")]], "split")
    run = f"run-{uuid.uuid4().hex}"
    staged = stage_by_hand(output, run, [[row(3)], [row(4)]], "label")
    lease = Lease.take(output, run)
    cut_commit_short(monkeypatch, output, step, dict(COMMIT_STEPS)[step])
    with pytest.raises(OSError, match="cut short"):
        sinks.publish(lease, "new", staged, {"package_version": __version__})
    monkeypatch.undo()
    lease.release()  # then killed: nothing cleaned up

    published = step == "delete"
    want = (
        (["r3", "r4"], ["label=l0", "label=l1"]) if published else (["r0", "r1", "r2"], ["split=test", "split=train"])
    )
    read = schema.read_features(storage.join(output, "features"), columns=["id"])
    assert sorted(read.column("id").to_pylist()) == want[0]
    assert outputs.recover(output)  # what the next run does first, holding the lease
    manifest = json.loads(fsspec.open(storage.join(output, "_run.json")).open().read())
    assert files_under(output) == listed(manifest)
    fs, root = fsspec.core.url_to_fs(output)
    features = f"{root.rstrip('/')}/features"
    assert sorted(posixpath.basename(p) for p in fs.ls(features, detail=False) if fs.isdir(p)) == want[1]
