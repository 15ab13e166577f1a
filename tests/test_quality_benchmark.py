"""The quality benchmark end to end on a small AV-MNIST-style set: it builds the set, runs the job,
trains on pretrained and on raw features, prints the comparison and writes quality.json."""

from __future__ import annotations

import json

import numpy as np

from benchmarks import quality
from mmfeatures.avmnist import build_avmnist
from mmfeatures.train import Features


def test_raw_features_follow_the_feature_table_contract(tmp_path) -> None:
    manifest = build_avmnist(str(tmp_path / "data"), n=30, seed=3)
    table = quality.raw_feature_table(manifest)
    features = Features.from_table(table)
    assert table.num_rows == 30
    assert {m: x.shape[1] for m, x in features.embeddings.items()} == {"text": 1024, "image": 784, "audio": 160}
    assert all(present.all() for present in features.present.values())
    assert np.isfinite(features.fused).all() and features.fused.shape[1] == 1024 + 784 + 160


def test_the_whole_benchmark_prints_both_tables_and_a_verdict(tmp_path, capsys) -> None:
    assert quality.main(["--n", "150", "--seed", "1", "--work", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    result = json.loads((tmp_path / "quality.json").read_text())
    for kind in ("pretrained", "raw"):
        verdict = result["verdicts"][kind]
        assert verdict["best_single"].startswith("unimodal:") and not verdict["best_fusion"].startswith("unimodal:")
        assert verdict["gain"] == verdict["best_fusion_accuracy"] - verdict["best_single_accuracy"]
        assert set(result[kind]["methods"]) >= {"stacking", "early_fusion", "late_fusion_mean", "unimodal:audio"}
    assert "stacking" in printed and "target: best fusion" in printed
