"""Tests for mmfeatures.train on real feature tables written with the job's own schema.

Each synthetic record's class shows in every modality it has, through noise drawn independently
per modality: no modality alone is reliable, but averaging their evidence is, so late fusion must
beat the best unimodal baseline.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterator
from contextlib import redirect_stdout
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from threadpoolctl import threadpool_limits

from mmfeatures.fusion import Fusion
from mmfeatures.records import MODALITY_COLUMNS
from mmfeatures.schema import features_schema, read_features
from mmfeatures.train import (
    Features,
    TrainingResult,
    load_models,
    main,
    prepare_dataset,
    save_models,
    train,
)
from tests.committed_tables import commit_tables

DIMS = {"text": 6, "image": 8, "audio": 5}
CLASSES = ["0", "1", "2", "3", "4"]
METADATA = {"package": "mmfeatures", "models": {"text": {"model": "tiny-text"}}, "fusion": {"method": "concat"}}
METHODS = {f"unimodal:{m}" for m in MODALITY_COLUMNS} | {
    "early_fusion",
    "late_fusion_mean",
    "late_fusion_weighted",
    "stacking",
}
SIGNAL = 0.8  # class centres against unit noise: each modality alone is right 50-70% of the time


def feature_table(
    n: int = 600,
    seed: int = 0,
    split: str = "column",
    missing_rate: float = 0.2,
    unlabelled_rate: float = 0.05,
    labels: list[str] = CLASSES,
    absent_modality: str | None = None,
) -> pa.Table:
    """A feature table in the job's schema. ``split``: "column" (train/val/test values), "null"
    (the column with no values) or "absent" (no column)."""
    rng = np.random.default_rng(seed)
    targets = rng.integers(len(labels), size=n)
    centres = {m: rng.standard_normal((len(labels), d)) * SIGNAL for m, d in DIMS.items()}
    present = {m: rng.random(n) >= missing_rate for m in DIMS}
    present["text"] |= ~np.logical_or.reduce(list(present.values()))  # every row has an embedding
    if absent_modality:
        present[absent_modality][:] = False
        present["text"][:] = True
    embeddings = {m: (centres[m][targets] + rng.standard_normal((n, d))).astype(np.float32) for m, d in DIMS.items()}
    fusion = Fusion("concat", DIMS)
    fused = [fusion.fuse({m: embeddings[m][i] for m in DIMS if present[m][i]}).tolist() for i in range(n)]
    label_values = [None if rng.random() < unlabelled_rate else labels[t] for t in targets]
    split_values = rng.choice(["train", "val", "test"], size=n, p=[0.7, 0.15, 0.15]).tolist()
    columns = {
        "id": [f"r{i:04d}" for i in range(n)],
        "label": label_values,
        "split": split_values if split == "column" else [None] * n,
        **{f"{m}_embedding": [embeddings[m][i].tolist() if present[m][i] else None for i in range(n)] for m in DIMS},
        "fused": fused,
        **{f"has_{m}": present[m].tolist() for m in DIMS},
        "failed_modalities": [[] for _ in range(n)],
        "event_timestamp": [datetime(2025, 1, 1, tzinfo=timezone.utc)] * n,
        "created_timestamp": [datetime(2025, 1, 1, tzinfo=timezone.utc)] * n,
        "content_hash": [None] * n,
    }
    schema = features_schema({**DIMS, "fused": fusion.output_dim}, carried=None, metadata=METADATA)
    table = pa.Table.from_pydict(columns, schema=schema)
    return table.drop_columns(["split"]) if split == "absent" else table


def write_table(table: pa.Table, folder: Path) -> str:
    """A committed table as the job leaves it: two parts (so columns come chunked) listed in
    the ``_run.json`` beside the folder, and a part no commit lists that ``read_features`` must skip."""
    half = table.num_rows // 2
    commit_tables(str(folder.parent), {folder.name: [table.slice(0, half), table.slice(half)]})
    # a part no commit lists (a killed run's): readers must not take it
    pq.write_table(table.slice(0, 10), folder / "part-c1-00000-of-00001.parquet")
    return str(folder)


def run_main(features: str, out: Path, *extra: str) -> dict:
    assert main(["--features", features, "--out", str(out), *extra]) == 0
    return json.loads((out / "metrics.json").read_text())


@pytest.fixture(autouse=True, scope="module")
def one_blas_thread() -> Iterator[None]:
    """The tables are tiny: BLAS threads would only add overhead (several times the run time on a
    busy machine)."""
    with threadpool_limits(limits=1, user_api="blas"):
        yield


@dataclass(frozen=True)
class Run:
    features: str
    out: Path
    metrics: dict
    printed: str


@pytest.fixture(scope="module")
def table_with_splits(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_table(feature_table(), tmp_path_factory.mktemp("column") / "features")


@pytest.fixture(scope="module")
def run(table_with_splits: str, tmp_path_factory: pytest.TempPathFactory) -> Run:
    """One ``mmfeatures train`` run on the table with a split column, shared by the tests that read it."""
    out = tmp_path_factory.mktemp("out")
    with redirect_stdout(io.StringIO()) as printed:
        metrics = run_main(table_with_splits, out)
    return Run(table_with_splits, out, metrics, printed.getvalue())


@pytest.fixture(scope="module")
def metrics(run: Run) -> dict:
    return run.metrics


@pytest.fixture(scope="module")
def trained(table_with_splits: str) -> TrainingResult:
    return train(read_features(table_with_splits))


def test_every_method_scored_with_finite_metrics(metrics: dict) -> None:
    assert set(metrics["methods"]) == METHODS
    for method, result in metrics["methods"].items():
        for subset in ("test", "test_all_modalities"):
            scores = result[subset]
            assert scores["n"] > 0, (method, subset)
            for name in ("accuracy", "macro_recall", "macro_f1"):
                assert math.isfinite(scores[name]) and 0 <= scores[name] <= 1, (method, subset, name)
            assert set(scores["per_class_f1"]) == set(CLASSES)
            assert all(0 <= f1 <= 1 for f1 in scores["per_class_f1"].values())
        assert result["test"]["accuracy"] > 0.3, method  # above chance (0.2) for every method


def test_metrics_describe_the_run(metrics: dict, table_with_splits: str) -> None:
    assert metrics["classes"] == CLASSES
    assert metrics["features"] == table_with_splits
    assert metrics["split_source"] == "column 'split'"
    assert metrics["seeds"] == {"split": None, "classifiers": 0, "stacking_folds": 0}
    assert metrics["feature_table_metadata"] == METADATA
    assert metrics["skipped_modalities"] == {}
    weights = metrics["late_fusion_weights"]
    assert set(weights) == set(MODALITY_COLUMNS) and math.isclose(sum(weights.values()), 1.0)
    assert all(round(w * 10, 9) == round(w * 10) for w in weights.values())  # on the 0.1 grid
    assert metrics["stacking"]["fitted_on"] == "out-of-fold predictions for the training split"


def test_late_fusion_beats_every_unimodal_baseline(metrics: dict) -> None:
    methods = metrics["methods"]
    for subset in ("test", "test_all_modalities"):
        best_unimodal = max(methods[f"unimodal:{m}"][subset]["macro_f1"] for m in MODALITY_COLUMNS)
        for method in ("late_fusion_mean", "late_fusion_weighted", "stacking"):
            assert methods[method][subset]["macro_f1"] > best_unimodal + 0.05, (method, subset)


def test_counts_exclude_unlabelled_records(metrics: dict) -> None:
    table = feature_table()
    labels = table.column("label").to_pylist()
    splits = table.column("split").to_pylist()
    counts = metrics["counts"]
    assert counts["records"] == len(labels)
    assert counts["without_label"] == labels.count(None) > 0
    assert counts["without_split"] == 0
    assert sum(part["records"] for part in counts["splits"].values()) == len(labels) - labels.count(None)
    test_labelled = sum(1 for label, split in zip(labels, splits, strict=True) if label is not None and split == "test")
    assert counts["splits"]["test"]["records"] == test_labelled
    assert sum(counts["splits"]["test"]["classes"].values()) == test_labelled
    for result in metrics["methods"].values():
        assert result["test"]["n"] == test_labelled
        assert result["test_all_modalities"]["n"] == counts["splits"]["test"]["all_modalities"] < test_labelled


@pytest.mark.parametrize("split", ["null", "absent"])
def test_seeded_stratified_split_without_a_split_column(split: str, tmp_path: Path) -> None:
    features = write_table(feature_table(split=split), tmp_path / "features")
    metrics = run_main(features, tmp_path / "out", "--seed", "7")
    assert metrics["split_source"] == "seeded stratified 70/15/15"
    assert metrics["seeds"]["split"] == 7
    splits = metrics["counts"]["splits"]
    labelled = sum(part["records"] for part in splits.values())
    for name, share in {"train": 0.70, "validation": 0.15, "test": 0.15}.items():
        assert abs(splits[name]["records"] / labelled - share) < 0.02
        for label in CLASSES:  # stratified: each class split the same way
            class_total = sum(part["classes"][label] for part in splits.values())
            assert abs(splits[name]["classes"][label] - share * class_total) <= 1
    assert set(metrics["methods"]) == METHODS


def test_rerun_gives_identical_metrics_and_models(run: Run, tmp_path: Path) -> None:
    run_main(run.features, tmp_path)
    written = sorted(p.name for p in run.out.iterdir())
    assert written == sorted(p.name for p in tmp_path.iterdir())
    assert {"metrics.json", "models.json", "early_fusion.safetensors", "stacking.safetensors"} <= set(written)
    for name in written:
        assert (run.out / name).read_bytes() == (tmp_path / name).read_bytes(), name


def test_reloaded_models_reproduce_the_probabilities(
    trained: TrainingResult, table_with_splits: str, tmp_path: Path
) -> None:
    save_models(trained.models, str(tmp_path))
    assert not list(tmp_path.glob("*.pkl"))
    reloaded = load_models(str(tmp_path))
    features = Features.from_table(read_features(table_with_splits))
    expected = trained.models.predict_proba(features)
    actual = reloaded.predict_proba(features)
    assert set(actual) == set(expected) == METHODS
    for method in METHODS:
        np.testing.assert_array_equal(actual[method], expected[method], err_msg=method)
        np.testing.assert_allclose(actual[method].sum(axis=1), 1.0, rtol=1e-9)
    assert reloaded.classes == CLASSES
    assert reloaded.late_fusion_weights == trained.models.late_fusion_weights


def test_reloaded_models_rescore_the_test_split(run: Run) -> None:
    """The saved models alone give the accuracies in metrics.json."""
    dataset, _ = prepare_dataset(read_features(run.features), "label", "split", seed=0)
    test = dataset.select("test")
    for method, probabilities in load_models(str(run.out)).predict_proba(test.features).items():
        accuracy = float(np.mean(probabilities.argmax(axis=1) == test.targets))
        assert accuracy == run.metrics["methods"][method]["test"]["accuracy"], method


def test_a_record_without_usable_modality_gets_the_prior(trained: TrainingResult, table_with_splits: str) -> None:
    features = Features.from_table(read_features(table_with_splits)).rows(np.arange(3))
    nothing = Features(features.embeddings, {m: np.zeros(3, dtype=bool) for m in MODALITY_COLUMNS}, features.fused)
    probabilities = trained.models.predict_proba(nothing)
    for method in METHODS - {"early_fusion"}:  # the fused vector is always there
        np.testing.assert_array_equal(probabilities[method], np.tile(trained.models.prior, (3, 1)), err_msg=method)


def test_a_modality_missing_everywhere_is_skipped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    features = write_table(feature_table(n=400, absent_modality="audio"), tmp_path / "features")
    metrics = run_main(features, tmp_path / "out")
    assert "audio" in metrics["skipped_modalities"]
    assert set(metrics["methods"]) == METHODS - {"unimodal:audio"}
    assert metrics["counts"]["splits"]["test"]["audio"] == 0
    for result in metrics["methods"].values():
        assert result["test_all_modalities"] == {
            "n": 0,
            "accuracy": None,
            "macro_recall": None,
            "macro_f1": None,
            "per_class_f1": {label: None for label in CLASSES},
        }
        assert math.isfinite(result["test"]["macro_f1"])
    assert "- (0)" in capsys.readouterr().out
    assert set(load_models(str(tmp_path / "out")).unimodal) == {"text", "image"}


def test_main_prints_the_table_sorted_by_macro_f1(run: Run) -> None:
    lines = run.printed.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("method"))
    assert "macro F1" in lines[header] and "all-modalities accuracy" in lines[header]
    rows = [line.split() for line in lines[header + 1 : header + 1 + len(METHODS)]]
    assert {row[0] for row in rows} == METHODS
    printed_f1 = [float(row[3]) for row in rows]
    assert printed_f1 == sorted(printed_f1, reverse=True)
    for row in rows:
        result = run.metrics["methods"][row[0]]
        assert float(row[1]) == pytest.approx(result["test"]["accuracy"], abs=5e-4)
        assert int(row[4]) == result["test"]["n"]
        assert float(row[5]) == pytest.approx(result["test_all_modalities"]["accuracy"], abs=5e-4)


def test_two_classes_and_records_without_a_split(tmp_path: Path) -> None:
    """Binary classifiers take other code paths in scikit-learn (one coefficient row); records whose
    split is null, in a table that has splits, are left out and counted."""
    table = feature_table(n=300, labels=["cat", "dog"])
    splits = table.column("split").to_pylist()
    splits[:20] = [None] * 20
    labelled_without_split = sum(1 for label in table.column("label").to_pylist()[:20] if label is not None)
    table = table.set_column(table.schema.get_field_index("split"), "split", pa.array(splits, pa.string()))
    features = write_table(table, tmp_path / "features")
    metrics = run_main(features, tmp_path / "out")
    assert metrics["classes"] == ["cat", "dog"]
    assert metrics["counts"]["without_split"] == labelled_without_split > 0
    assert set(metrics["methods"]) == METHODS
    reloaded = load_models(str(tmp_path / "out"))
    assert reloaded.stacking["logistic"].coef_.shape[0] == 1
    table = read_features(features)
    expected = train(table).models.predict_proba(Features.from_table(table))
    for method, probabilities in reloaded.predict_proba(Features.from_table(table)).items():
        np.testing.assert_array_equal(probabilities, expected[method], err_msg=method)


def test_tables_and_models_at_fsspec_urls(tmp_path: Path) -> None:
    local = write_table(feature_table(n=300), tmp_path / "features")
    fs = fsspec.filesystem("memory")
    for path in Path(local).iterdir():
        fs.pipe_file(f"/train-test/features/{path.name}", path.read_bytes())
    fs.pipe_file("/train-test/_run.json", (Path(local).parent / "_run.json").read_bytes())
    try:
        assert main(["--features", "memory://train-test/features", "--out", "memory://train-test/out"]) == 0
        metrics = json.loads(fs.cat_file("/train-test/out/metrics.json"))
        assert metrics["counts"]["records"] == 300
        assert set(metrics["methods"]) == METHODS
        assert set(load_models("memory://train-test/out").unimodal) == set(MODALITY_COLUMNS)
    finally:
        fs.rm("/train-test", recursive=True)


def test_missing_label_column_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    features = write_table(feature_table(n=100), tmp_path / "features")
    assert main(["--features", features, "--out", str(tmp_path / "out"), "--label", "category"]) == 2
    err = capsys.readouterr().err
    assert "mmfeatures train: error:" in err and "no label column 'category'" in err
    assert not (tmp_path / "out").exists()


def test_fewer_than_two_classes_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    features = write_table(feature_table(n=100, labels=["only"]), tmp_path / "features")
    assert main(["--features", features, "--out", str(tmp_path / "out")]) == 2
    assert "holds 1 class(es)" in capsys.readouterr().err


def test_unknown_split_values_are_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    table = feature_table(n=100)
    table = table.set_column(table.schema.get_field_index("split"), "split", pa.array(["holdout"] * 100))
    features = write_table(table, tmp_path / "features")
    assert main(["--features", features, "--out", str(tmp_path / "out")]) == 2
    assert "'holdout'" in capsys.readouterr().err


def test_missing_table_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--features", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")]) == 2
    assert "cannot read a feature table" in capsys.readouterr().err
