"""Tests for mmfeatures.schema: the JSON contracts and the Arrow schemas built from them."""

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmfeatures import outputs, schema

CONTRACT_DIR = Path(__file__).resolve().parents[1] / "schemas" / "v1"
DIMS = {"text": 384, "image": 1280, "audio": 512, "fused": 2176}


def contract_file(name: str) -> dict[str, Any]:
    return json.loads((CONTRACT_DIR / f"{name}.json").read_text())


@pytest.mark.parametrize("name", ["record", "features", "errors"])
def test_load_contract_matches_the_file(name):
    contract = schema.load_contract(name)
    assert contract == contract_file(name)
    assert contract["name"] == name
    assert contract["version"] == schema.SCHEMA_VERSION == "v1"
    assert all({"name", "type", "nullable", "description"} <= set(f) for f in contract["fields"])


def test_load_contract_unknown_name():
    with pytest.raises(FileNotFoundError):
        schema.load_contract("no_such_table")


def test_reserved_record_columns():
    assert schema.reserved_record_columns() == {"id", "text", "image", "audio", "label", "split"}


def test_features_schema_fields_and_order():
    carried = {"score": pa.float64(), "tags": pa.list_(pa.string()), "a_first": pa.string()}
    result = schema.features_schema(DIMS, carried=carried)
    declared = [f["name"] for f in contract_file("features")["fields"]]
    assert result.names == declared + ["score", "tags", "a_first"]
    for f in contract_file("features")["fields"]:
        assert result.field(f["name"]).nullable == f["nullable"], f["name"]
    assert result.field("id").type == pa.string()
    assert result.field("has_text").type == pa.bool_()
    assert result.field("failed_modalities").type == pa.list_(pa.string())
    assert result.field("event_timestamp").type == pa.timestamp("us", tz="UTC")
    assert result.field("score").type == pa.float64()
    assert result.field("tags").type == pa.list_(pa.string())
    assert result.metadata is None


def test_embedding_fields_carry_their_dimension():
    result = schema.features_schema(DIMS)
    for name, modality in [
        ("text_embedding", "text"),
        ("image_embedding", "image"),
        ("audio_embedding", "audio"),
        ("fused", "fused"),
    ]:
        field = result.field(name)
        assert field.type == pa.list_(pa.float32())
        assert field.metadata[schema.DIMENSION_KEY] == str(DIMS[modality]).encode()
        assert schema.embedding_dimension(field) == DIMS[modality]
    for name in ("id", "label", "has_text", "failed_modalities", "event_timestamp"):
        assert schema.embedding_dimension(result.field(name)) is None
    assert result.field("fused").nullable is False
    assert result.field("text_embedding").nullable is True


def test_features_schema_needs_every_dimension():
    with pytest.raises(KeyError):
        schema.features_schema({"text": 3, "image": 3, "audio": 3})  # no "fused"


def test_metadata_round_trips_through_parquet(tmp_path):
    metadata = {
        "models": {"text": {"name": "m", "dim": 384}},
        "fusion": {"method": "concat"},
        "list": [1, 2.5, None, "x"],
    }
    result = schema.features_schema(DIMS, metadata=metadata)
    assert json.loads(result.metadata[schema.METADATA_KEY]) == metadata
    assert schema.read_run_metadata(result) == metadata

    path = tmp_path / "empty.parquet"
    pq.write_table(result.empty_table(), path)
    assert schema.read_run_metadata(pq.read_schema(path)) == metadata
    read = schema.read_features(str(path))
    assert schema.read_run_metadata(read.schema) == metadata
    assert read.num_rows == 0
    assert read.schema.field("image_embedding").type == pa.list_(pa.float32(), 1280)


def test_errors_schema_matches_contract():
    result = schema.errors_schema()
    fields = contract_file("errors")["fields"]
    assert result.names == [f["name"] for f in fields] == ["id", "modality", "stage", "error_type", "message", "source"]
    for f in fields:
        assert result.field(f["name"]).type == pa.string()
        assert result.field(f["name"]).nullable == f["nullable"]


def test_errors_schema_matches_error_row():
    from dataclasses import fields

    from mmfeatures.errors import ErrorRow

    assert [f.name for f in fields(ErrorRow)] == schema.errors_schema().names


def test_a_folder_or_file_without_a_run_manifest_listing_it_is_not_committed(tmp_path):
    folder = tmp_path / "features"
    folder.mkdir()
    pq.write_table(schema.errors_schema().empty_table(), folder / "part-0.parquet")
    assert outputs.committed_table(str(folder)) is None
    assert outputs.committed_table(str(folder / "part-0.parquet")) is None
    (tmp_path / "_run.json").write_text('{"package_version": "0.1.0"}')  # a summary without tables
    assert outputs.committed_table(str(folder)) is None
    assert schema.read_features(str(folder)).num_rows == 0  # read as the plain folder it is
