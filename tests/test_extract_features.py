"""The whole job on the sample data set, on Beam's local runner, with the real default models, on
each runtime."""

from __future__ import annotations

import json
import os
from itertools import combinations

import numpy as np
import pyarrow.parquet as pq
import pytest

from mmfeatures import schema
from mmfeatures.cli import main as cli_main
from mmfeatures.modalities import MODALITIES as REGISTRY
from mmfeatures.sample import build_sample_dataset
from mmfeatures.settings import RUNTIMES
from pipelines.extract_features import run

MODALITIES = ("text", "image", "audio")
DIMS = {"text": 384, "image": 1280, "audio": 384}


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("sample")
    manifest = build_sample_dataset(str(folder), n=60, seed=0)
    with open(manifest) as handle:
        records = [json.loads(line) for line in handle]
    with open(folder / "expected_errors.json") as handle:
        broken = json.load(handle)
    return {"manifest": manifest, "records": {r["id"]: r for r in records}, "broken": broken}


@pytest.fixture(scope="module", params=RUNTIMES)
def runtime(request: pytest.FixtureRequest) -> str:
    """Every test runs the job on each runtime."""
    return str(request.param)


@pytest.fixture(scope="module")
def output(sample: dict, runtime: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    out = str(tmp_path_factory.mktemp("run1"))
    assert cli_main(["extract", "--input", sample["manifest"], "--output", out, "--runtime", runtime]) == 0
    return out


def _features(out: str) -> dict[str, dict]:
    table = schema.read_features(os.path.join(out, "features"))
    return {row["id"]: row for row in table.to_pylist()}


def _summary(out: str) -> dict:
    with open(os.path.join(out, "_run.json")) as handle:
        return json.load(handle)


def test_feature_table_follows_the_contract(output: str) -> None:
    files = sorted(os.listdir(os.path.join(output, "features")))
    assert files and all(f.startswith("part-") and f.endswith(".parquet") for f in files)  # nothing else
    with open(os.path.join(output, "_run.json")) as handle:
        listed = json.load(handle)["tables"]["features"]["files"]
    assert [f"features/{name}" for name in files] == [part["path"] for part in listed]
    file_schema = pq.read_schema(os.path.join(output, "features", files[0]))
    declared = schema.field_names("features")
    assert file_schema.names[: len(declared)] == declared
    assert file_schema.names[len(declared) :] == ["speaker"]  # the sample's extra column is carried
    table = schema.read_features(os.path.join(output, "features"))
    for name, dim in {**{f"{m}_embedding": d for m, d in DIMS.items()}, "fused": sum(DIMS.values())}.items():
        assert table.schema.field(name).type.list_size == dim
    assert str(table.schema.field("event_timestamp").type) == "timestamp[us, tz=UTC]"

    metadata = schema.read_run_metadata(file_schema)
    assert metadata["schema_version"] == "v1"
    assert metadata["modalities"]["text"]["model_id"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert metadata["modalities"]["image"]["model_id"].startswith("torchvision/mobilenet_v2")
    assert metadata["modalities"]["audio"]["model_id"] == "openai/whisper-tiny.en"
    for modality, dim in DIMS.items():
        described = metadata["modalities"][modality]
        assert described["dimension"] == dim
        assert len(described["weights_sha256"]) == 64
        assert described["preprocessing"]
    assert metadata["fusion"]["method"] == "concat"

    errors = pq.read_table(os.path.join(output, "errors"))
    assert errors.schema.names == schema.field_names("errors")


def test_every_record_is_accounted_for(output: str, sample: dict) -> None:
    features = _features(output)
    errors = pq.read_table(os.path.join(output, "errors")).to_pylist()
    records = sample["records"]
    assert set(features) == set(records)  # no sample record loses every modality

    failed = {(e["id"], e["modality"]) for e in errors}
    assert failed == set(sample["broken"].items())
    for record_id, record in records.items():
        row = features[record_id]
        assert row["label"] == str(record["label"]) and row["split"] == record["split"]
        assert row["speaker"] == record.get("speaker")
        for modality in MODALITIES:
            holds = record.get(modality) is not None
            broken = sample["broken"].get(record_id) == modality
            vector = row[f"{modality}_embedding"]
            assert row[f"has_{modality}"] == (holds and not broken)
            assert (vector is not None) == (holds and not broken), (record_id, modality)
            if vector is not None:
                assert len(vector) == DIMS[modality] and np.all(np.isfinite(vector))
        assert row["failed_modalities"] == ([sample["broken"][record_id]] if record_id in sample["broken"] else [])
        assert len(row["fused"]) == sum(DIMS.values())


def test_run_summary_reconciles(output: str, sample: dict, runtime: str) -> None:
    summary = _summary(output)
    records = sample["records"].values()
    assert summary["reconciles"] and all(summary["checks"].values())
    assert summary["records"]["read"] == len(sample["records"])
    assert summary["feature_rows"] == len(sample["records"])
    assert summary["error_rows"] == len(sample["broken"])
    folder = os.path.dirname(sample["manifest"])
    for modality in MODALITIES:
        present = sum(r.get(modality) is not None for r in records)
        failed = sum(m == modality for m in sample["broken"].values())
        # Content that an earlier record holds too is embedded once, for both.
        contents = [
            r[modality].encode() if modality == "text" else open(os.path.join(folder, r[modality]), "rb").read()
            for r in records
            if r.get(modality) is not None and sample["broken"].get(r["id"]) != modality
        ]
        assert summary["modalities"][modality] == {
            "present": present,
            "embedded": present - failed,
            "shared": len(contents) - len(set(contents)),
            "kept": 0,
            "failed": failed,
            "absent": len(sample["records"]) - present,
            "runtime": REGISTRY[modality].runtime(runtime),  # audio has no export: torch
            "fallback": None,
        }
    assert summary["models"]["audio"]["model_id"] == "openai/whisper-tiny.en"
    assert summary["options"]["fusion"] == "concat" and summary["wall_seconds"] > 0


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize("modality", MODALITIES)
def test_embeddings_mean_something(output: str, modality: str) -> None:
    """Same-label records are on average closer than different-label ones, for every modality."""
    rows = [r for r in _features(output).values() if r[f"{modality}_embedding"] is not None]
    same: list[float] = []
    different: list[float] = []
    for a, b in combinations(rows, 2):
        similarity = _cosine(np.asarray(a[f"{modality}_embedding"]), np.asarray(b[f"{modality}_embedding"]))
        (same if a["label"] == b["label"] else different).append(similarity)
    assert np.mean(same) > np.mean(different), (np.mean(same), np.mean(different))


def test_two_runs_give_the_same_vectors(output: str, sample: dict, runtime: str, tmp_path) -> None:
    run(["--input", sample["manifest"], "--output", str(tmp_path), "--runtime", runtime])
    first, second = _features(output), _features(str(tmp_path))
    assert first.keys() == second.keys()
    for record_id, row in first.items():
        for column in [f"{m}_embedding" for m in MODALITIES] + ["fused"]:
            if row[column] is None:
                assert second[record_id][column] is None
            else:
                np.testing.assert_allclose(row[column], second[record_id][column], atol=1e-6, rtol=0)


def test_mean_fusion_records_its_projection(sample: dict, runtime: str, tmp_path) -> None:
    subset = tmp_path / "subset.jsonl"
    lines = open(sample["manifest"]).read().splitlines()[:8]
    manifest_dir = os.path.dirname(sample["manifest"])
    with open(subset, "w") as handle:
        for line in lines:
            record = json.loads(line)
            for key in ("image", "audio"):
                if record.get(key):
                    record[key] = os.path.join(manifest_dir, record[key])
            handle.write(json.dumps(record) + "\n")
    out = tmp_path / "out"
    run(["--input", str(subset), "--output", str(out), "--fusion", "mean", "--fusion_dim", "64", "--runtime", runtime])
    table = schema.read_features(str(out / "features"))
    assert table.schema.field("fused").type.list_size == 64
    fusion = schema.read_run_metadata(table.schema)["fusion"]
    assert fusion["method"] == "mean" and fusion["projection"]["dimension"] == 64


def test_parquet_and_csv_manifests_carry_their_columns(runtime: str, tmp_path) -> None:
    """Text-only records from a Parquet manifest (typed extra columns) and a CSV one."""
    import datetime

    import pyarrow as pa

    created = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)
    pq.write_table(
        pa.table(
            {
                "id": ["p1", "p2", "p3"],
                "text": ["a red apple", "a green pear", None],
                "label": [1, 2, 3],
                "score": [0.5, None, 1.5],
                "tags": [["x"], [], ["y", "z"]],
                "created": [created] * 3,
                "count": pa.array([1, None, 3], pa.int32()),
                "fused": ["collides", "with", "an output column"],
            }
        ),
        tmp_path / "part.parquet",
    )
    (tmp_path / "rows.csv").write_text("id,text,split,score\nc1,a yellow banana,test,7\n")
    out = tmp_path / "out"
    run(["--input", str(tmp_path / "part.parquet"), "--output", str(out), "--runtime", runtime])
    table = schema.read_features(str(out / "features"))
    assert sorted(table.column("id").to_pylist()) == ["p1", "p2"]
    assert table.schema.field("score").type == "double"
    assert table.schema.field("tags").type.equals(pa.list_(pa.string()))
    assert table.schema.field("created").type.tz is not None
    assert table.schema.field("count").type == pa.int32()  # a Parquet manifest's own types are kept
    carried = table.schema.names[len(schema.field_names("features")) :]
    assert carried == ["score", "tags", "created", "count", "manifest_fused"]  # manifest order
    rows = {row["id"]: row for row in table.to_pylist()}
    assert rows["p1"]["tags"] == ["x"] and rows["p1"]["created"] == created and rows["p1"]["label"] == "1"
    assert rows["p1"]["manifest_fused"] == "collides" and len(rows["p1"]["fused"]) == 2048
    errors = pq.read_table(out / "errors").to_pylist()
    assert [(e["id"], e["error_type"]) for e in errors] == [("p3", "no_modality")]

    both = tmp_path / "both"
    inputs = ["--input", str(tmp_path / "part.parquet"), "--input", str(tmp_path / "rows.csv")]
    run([*inputs, "--output", str(both), "--runtime", runtime])
    mixed = schema.read_features(str(both / "features"))
    assert mixed.num_rows == 3
    assert mixed.schema.field("score").type == "string"  # CSV has no types: a mixed column is text
    assert {r["id"]: r["score"] for r in mixed.to_pylist()} == {"p1": "0.5", "p2": None, "c1": "7"}


def test_a_value_nested_too_deep_is_an_error_row_and_the_previous_table_stays_readable(
    tmp_path, tiny_model_options: list[str], runtime: str
) -> None:
    """A carried value 150 levels deep is written by Arrow but cannot be read back: the record is
    an error row, and the committed table (which replaces the previous one) reads."""
    deep: object = "leaf"
    for _ in range(150):
        deep = [deep]
    manifest = tmp_path / "m.jsonl"
    rows = [{"id": "ok", "text": "a fine text", "tree": [["leaf"]]}, {"id": "deep", "text": "words", "tree": deep}]
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "out"
    run(["--input", str(manifest), "--output", str(out), *tiny_model_options, "--runtime", runtime])
    table = schema.read_features(str(out / "features"))
    assert table.column("id").to_pylist() == ["ok"] and table.column("tree").to_pylist() == [[["leaf"]]]
    errors = schema.read_features(str(out / "errors")).to_pylist()
    assert [(e["id"], e["error_type"]) for e in errors] == [("deep", "value_too_deep")]
    assert json.loads((out / "_run.json").read_text())["reconciles"]
