"""The job's table folders as common Parquet readers take them, each by its folder alone: Polars,
pandas, pyarrow.dataset, Hugging Face datasets and DuckDB all read the same rows, ids and vectors
as ``read_features``, with the types each should give. The manifest lives beside the folder, so the
folder holds nothing those readers would refuse."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mmfeatures import schema
from mmfeatures.sample import build_sample_dataset
from pipelines.extract_features import run

COLUMN = "image_embedding"  # null where an image is absent or broken, so nulls are compared too
EMBEDDINGS = [f["name"] for f in schema.load_contract("features")["fields"] if f["type"] == "embedding"]
Vectors = dict[str, np.ndarray | None]


@pytest.fixture(scope="module")
def output(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real job on a 24-record sample set (three broken images among them), in parts of 5 rows."""
    folder = tmp_path_factory.mktemp("readers")
    manifest = build_sample_dataset(str(folder / "data"), n=24, seed=1)
    run([f"--input={manifest}", f"--output={folder / 'out'}", "--rows_per_file=5"])
    return folder / "out"


@pytest.fixture(scope="module")
def features(output: Path) -> str:
    folder = output / "features"
    assert len(os.listdir(folder)) > 1 and all(
        name.startswith("part-") and name.endswith(".parquet") for name in os.listdir(folder)
    )
    listed = json.loads((output / "_run.json").read_text())["tables"]["features"]["files"]
    assert sorted(f"features/{name}" for name in os.listdir(folder)) == [part["path"] for part in listed]
    return str(folder)


@pytest.fixture(scope="module")
def expected(features: str) -> Vectors:
    """``read_features``' vectors of the compared column, by id."""
    table = schema.read_features(features)
    assert table.column(COLUMN).null_count > 0
    return vectors(table.column("id").to_pylist(), table.column(COLUMN).to_pylist())


def vectors(ids: Iterable[str], values: Iterable[Any]) -> Vectors:
    ids = list(ids)
    assert all(isinstance(i, str) for i in ids) and len(set(ids)) == len(ids)
    return {i: None if v is None else np.asarray(v, np.float32) for i, v in zip(ids, values, strict=True)}


def assert_same_vectors(read: Vectors, expected: Vectors) -> None:
    assert set(read) == set(expected)
    for key, vector in expected.items():
        if vector is None:
            assert read[key] is None, key
        else:
            np.testing.assert_array_equal(read[key], vector, err_msg=key, strict=True)


def test_polars_reads_the_folder(features: str, expected: Vectors) -> None:
    import polars as pl

    frame = pl.read_parquet(features)
    assert frame.schema["id"] == pl.String
    assert all(frame.schema[name] == pl.List(pl.Float32) for name in EMBEDDINGS)
    assert frame.schema["event_timestamp"] == pl.Datetime("us", "UTC")
    assert_same_vectors(vectors(frame["id"].to_list(), frame[COLUMN].to_list()), expected)


def test_pandas_reads_the_folder(features: str, expected: Vectors) -> None:
    import pandas as pd

    frame = pd.read_parquet(features)
    assert pd.api.types.is_string_dtype(frame["id"])
    assert frame["event_timestamp"].dtype == pd.DatetimeTZDtype("us", "UTC")
    for name in EMBEDDINGS:  # object columns of float32 arrays, None where absent
        assert {v.dtype for v in frame[name] if v is not None} == {np.dtype(np.float32)}, name
    assert_same_vectors(vectors(frame["id"], frame[COLUMN]), expected)


def test_pyarrow_dataset_reads_the_folder(features: str, expected: Vectors) -> None:
    import pyarrow as pa
    import pyarrow.dataset as ds

    table = ds.dataset(features, format="parquet").to_table()
    assert table.schema.field("id").type == pa.string()
    assert all(table.schema.field(name).type == pa.list_(pa.float32()) for name in EMBEDDINGS)
    assert table.schema.field("event_timestamp").type == pa.timestamp("us", tz="UTC")
    assert_same_vectors(vectors(table.column("id").to_pylist(), table.column(COLUMN).to_pylist()), expected)


def test_hugging_face_datasets_loads_the_folder(
    features: str, expected: Vectors, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}.items():
        monkeypatch.setenv(name, value)
    import datasets

    loaded = datasets.load_dataset("parquet", data_dir=features, cache_dir=str(tmp_path / "cache"))["train"]
    assert loaded.features["id"] == datasets.Value("string")
    assert all(loaded.features[name] == datasets.List(datasets.Value("float32")) for name in EMBEDDINGS)
    assert loaded.features["event_timestamp"] == datasets.Value("timestamp[us, tz=UTC]")
    columns = loaded.to_dict()
    assert_same_vectors(vectors(columns["id"], columns[COLUMN]), expected)


def test_duckdb_reads_the_folder_by_glob(features: str, expected: Vectors) -> None:
    import duckdb

    with duckdb.connect() as connection:
        relation = connection.sql(f"select * from '{features}/**/*.parquet'")
        types = dict(zip(relation.columns, map(str, relation.types), strict=True))
        rows = relation.select("id", COLUMN).fetchall()
    assert types["id"] == "VARCHAR"
    assert all(types[name] == "FLOAT[]" for name in EMBEDDINGS)
    assert types["event_timestamp"] == "TIMESTAMP WITH TIME ZONE"
    assert_same_vectors(vectors(*zip(*rows, strict=True)), expected)


def test_polars_reads_the_errors_folder(output: Path) -> None:
    import polars as pl

    errors = output / "errors"
    assert all(name.startswith("part-") and name.endswith(".parquet") for name in os.listdir(errors))
    frame = pl.read_parquet(errors)
    assert frame.height > 0 and all(dtype == pl.String for dtype in frame.schema.values())
    committed = schema.read_features(str(errors)).to_pylist()
    key = ("id", "modality", "stage", "error_type")
    assert sorted(frame.to_dicts(), key=lambda r: [r[k] or "" for k in key]) == sorted(
        committed, key=lambda r: [r[k] or "" for k in key]
    )
