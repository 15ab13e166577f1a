"""Does fusion help, and what do the pretrained models add? One command, offline:

    .venv/bin/python -m benchmarks.quality [--n 1500] [--seed 0] [--work benchmarks_out/quality]

1. builds the AV-MNIST-style set (``mmfeatures sample --kind avmnist``);
2. runs the feature job on it (``mmfeatures extract``, Beam's local runner);
3. trains and scores every method of ``mmfeatures train`` on the feature table;
4. does the same on raw features of the same records (pixels, log-mel statistics, character
   n-grams), so the table shows what the pretrained models add and where raw features win;
5. prints both side by side and writes ``quality.json``.

The target: the best fusion method beats the best single modality by at least 5 points of
accuracy. The data set's difficulty is fixed in ``mmfeatures.avmnist``, never tuned here.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pyarrow as pa
from sklearn.feature_extraction.text import HashingVectorizer
from transformers import WhisperFeatureExtractor

from mmfeatures import train
from mmfeatures.avmnist import build_avmnist
from mmfeatures.column_types import rows_to_table
from mmfeatures.fusion import Fusion
from mmfeatures.modalities.audio import decode_audio
from mmfeatures.modalities.image import decode_image
from mmfeatures.schema import features_schema, read_features
from pipelines.extract_features import run as run_job

TARGET_GAIN = 0.05  # best fusion over best single modality, in accuracy
RAW_IMAGE_SIDE = 28  # MNIST's own resolution: the pixels themselves
RAW_AUDIO_RATE = 16_000
RAW_TEXT_FEATURES = 1024  # hashed character 1-3-grams
FUSION_PREFIXES = ("early_fusion", "late_fusion", "stacking")


def raw_image_features(path: str) -> np.ndarray:
    """Grey pixels at 28 x 28, scaled to [0, 1]."""
    with open(path, "rb") as handle:
        grey = cv2.cvtColor(decode_image(handle.read()), cv2.COLOR_RGB2GRAY)
    small = cv2.resize(grey, (RAW_IMAGE_SIDE, RAW_IMAGE_SIDE), interpolation=cv2.INTER_AREA)
    return small.astype(np.float32).ravel() / 255.0


def raw_audio_features(path: str, extractor: WhisperFeatureExtractor) -> np.ndarray:
    """The mean and standard deviation over time of each of 80 log-mel bands."""
    with open(path, "rb") as handle:
        waveform, rate = decode_audio(handle.read())
    if rate != RAW_AUDIO_RATE:
        raise ValueError(f"{path}: expected {RAW_AUDIO_RATE} Hz audio, got {rate}")
    mel = extractor(waveform, sampling_rate=rate, padding="longest", return_tensors="np").input_features[0]
    return np.concatenate([mel.mean(axis=1), mel.std(axis=1)]).astype(np.float32)


def raw_feature_table(manifest: str) -> pa.Table:
    """A feature table of raw features for the records of ``manifest``, in the job's own schema,
    so ``mmfeatures train`` scores it exactly as it scores the job's table."""
    folder = os.path.dirname(manifest)
    with open(manifest, encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle if line.strip()]
    hashing = HashingVectorizer(
        analyzer="char_wb", ngram_range=(1, 3), n_features=RAW_TEXT_FEATURES, alternate_sign=False
    )
    extractor = WhisperFeatureExtractor(feature_size=80, sampling_rate=RAW_AUDIO_RATE)
    texts = hashing.transform([record.get("text") or "" for record in records]).toarray().astype(np.float32)
    dims = {"text": RAW_TEXT_FEATURES, "image": RAW_IMAGE_SIDE**2, "audio": 160}
    fusion = Fusion(method="concat", dims=dims)
    rows = []
    for record, text in zip(records, texts, strict=True):
        embeddings: dict[str, np.ndarray] = {}
        if record.get("text"):
            embeddings["text"] = text
        if record.get("image"):
            embeddings["image"] = raw_image_features(os.path.join(folder, record["image"]))
        if record.get("audio"):
            embeddings["audio"] = raw_audio_features(os.path.join(folder, record["audio"]), extractor)
        row: dict[str, Any] = {
            "id": record["id"],
            "label": record["label"],
            "split": record["split"],
            "fused": fusion.fuse(embeddings),
            "failed_modalities": [],
        }
        for modality in dims:
            row[f"{modality}_embedding"] = embeddings.get(modality)
            row[f"has_{modality}"] = modality in embeddings
        rows.append(row)
    return rows_to_table(rows, features_schema({**dims, "fused": fusion.output_dim}))


def best(methods: Mapping[str, Any], fusion: bool) -> tuple[str, float]:
    """The best single-modality method (``fusion`` False) or the best fusion method, by accuracy."""
    candidates = {
        name: result["test"]["accuracy"]
        for name, result in methods.items()
        if name.startswith(FUSION_PREFIXES) == fusion
    }
    name = max(candidates, key=lambda key: (candidates[key], key))
    return name, candidates[name]


def comparison(pretrained: Mapping[str, Any], raw: Mapping[str, Any]) -> dict[str, Any]:
    verdicts: dict[str, Any] = {}
    for kind, methods in (("pretrained", pretrained["methods"]), ("raw", raw["methods"])):
        single, single_accuracy = best(methods, fusion=False)
        fused, fused_accuracy = best(methods, fusion=True)
        verdicts[kind] = {
            "best_single": single,
            "best_single_accuracy": single_accuracy,
            "best_fusion": fused,
            "best_fusion_accuracy": fused_accuracy,
            "gain": fused_accuracy - single_accuracy,
        }
    verdicts["target_gain"] = TARGET_GAIN
    verdicts["target_met"] = verdicts["pretrained"]["gain"] >= TARGET_GAIN
    return verdicts


def format_comparison(pretrained: Mapping[str, Any], raw: Mapping[str, Any], verdicts: Mapping[str, Any]) -> str:
    order = sorted(pretrained["methods"], key=lambda m: -pretrained["methods"][m]["test"]["macro_f1"])
    lines = [f"{'method':<22} {'pretrained acc':>14} {'macro F1':>8}   {'raw acc':>8} {'macro F1':>8}"]
    for method in order:
        ours = pretrained["methods"][method]["test"]
        theirs = raw["methods"].get(method, {}).get("test")
        raw_cells = f"{theirs['accuracy']:>8.3f} {theirs['macro_f1']:>8.3f}" if theirs else f"{'-':>8} {'-':>8}"
        lines.append(f"{method:<22} {ours['accuracy']:>14.3f} {ours['macro_f1']:>8.3f}   {raw_cells}")
    for kind in ("pretrained", "raw"):
        v = verdicts[kind]
        lines.append(
            f"{kind}: best fusion {v['best_fusion']} {v['best_fusion_accuracy']:.3f} vs best single "
            f"{v['best_single']} {v['best_single_accuracy']:.3f}: {100 * v['gain']:+.1f} points"
        )
    met = "met" if verdicts["target_met"] else "NOT met"
    lines.append(f"target: best fusion >= best single + {100 * TARGET_GAIN:.0f} points (pretrained): {met}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1500, help="Records in the data set.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the data set and of the classifiers.")
    parser.add_argument("--work", default="benchmarks_out/quality", help="Folder for the data, features and results.")
    args = parser.parse_args(argv)
    work = Path(args.work)
    timings: dict[str, float] = {}

    started = time.perf_counter()
    manifest = build_avmnist(str(work / "data"), n=args.n, seed=args.seed)
    timings["build_data_s"] = time.perf_counter() - started

    started = time.perf_counter()
    output = work / "job"
    run_job([f"--input={manifest}", f"--output={output}"])
    timings["extract_s"] = time.perf_counter() - started

    started = time.perf_counter()
    pretrained = train.train(read_features(str(output / "features")), seed=args.seed).metrics
    raw = train.train(raw_feature_table(manifest), seed=args.seed).metrics
    timings["raw_features_and_training_s"] = time.perf_counter() - started

    verdicts = comparison(pretrained, raw)
    print(format_comparison(pretrained, raw, verdicts))
    result = {
        "n": args.n,
        "seed": args.seed,
        "timings": timings,
        "verdicts": verdicts,
        "pretrained": pretrained,
        "raw": raw,
    }
    (work / "quality.json").write_text(json.dumps(result, indent=1, sort_keys=True, default=str))
    print(f"results: {work / 'quality.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
