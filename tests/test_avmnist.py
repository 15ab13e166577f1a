"""Tests for mmfeatures.avmnist: a real 40-record build (MNIST; espeak-ng, flite, festival)."""

import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import soundfile as sf

from mmfeatures.avmnist import (
    AUDIO_RATE,
    CLIP_SECONDS,
    HINTS,
    PCA_VARIANCE_KEPT,
    PEAK_LEVEL,
    SPLITS,
    DigitPCA,
    all_speakers,
    build_avmnist,
    fit_pca,
)
from mmfeatures.sample import WORDS, fetch_mnist, load_digits, render_digit, require_binary

N = 40


def read_manifest(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def named_digits(text: str) -> set[int]:
    """The digits a caption names, as a word or a numeral (whole words only)."""
    return {d for d, word in enumerate(WORDS) if re.search(rf"\b({word}|{d})\b", text)}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[dict], dict]:
    out = tmp_path_factory.mktemp("avmnist")
    manifest = Path(build_avmnist(str(out), n=N, seed=0))
    return out, manifest, read_manifest(manifest), json.loads((out / "dataset.json").read_text())


@pytest.fixture(scope="module")
def digits() -> dict[int, np.ndarray]:
    return load_digits(fetch_mnist())


@pytest.fixture(scope="module")
def pca(digits: dict[int, np.ndarray]) -> DigitPCA:
    return fit_pca(digits)


def test_manifest_rows(built):
    out, manifest, rows, description = built
    assert manifest == out / "manifest.jsonl"
    assert len(rows) == N
    assert len({r["id"] for r in rows}) == N
    for row in rows:
        assert {"id", "image", "audio", "text", "label", "split"} <= row.keys()
        assert row["label"] in {str(d) for d in range(10)}
        assert row["split"] in SPLITS
        assert row["text"]
    assert {r["label"] for r in rows} == {str(d) for d in range(10)}
    assert {r["split"] for r in rows} == set(SPLITS)
    assert {s: description["splits"][s]["records"] for s in SPLITS} == {
        s: sum(r["split"] == s for r in rows) for s in SPLITS
    }


def test_files_decode(built):
    out, _, rows, _ = built
    for row in rows:
        image = cv2.imread(str(out / row["image"]), cv2.IMREAD_UNCHANGED)
        assert image is not None and image.shape == (112, 112) and image.dtype == np.uint8
        samples, rate = sf.read(str(out / row["audio"]), dtype="float32")
        assert rate == AUDIO_RATE and samples.ndim == 1
        assert len(samples) == round(CLIP_SECONDS * AUDIO_RATE)
        assert abs(np.abs(samples).max() - PEAK_LEVEL) < 0.01


def test_speakers_disjoint_between_splits(built):
    _, _, rows, description = built
    splits = description["splits"]
    sources = {s.name: s.source for s in all_speakers(require_binary("espeak-ng", "espeak-ng"))}
    for i, first in enumerate(SPLITS):
        for second in SPLITS[i + 1 :]:
            assert not set(splits[first]["speakers"]) & set(splits[second]["speakers"])
            assert not set(splits[first]["voice_sources"]) & set(splits[second]["voice_sources"])
    for row in rows:
        assert row["speaker"] in splits[row["split"]]["speakers"]
        assert sources[row["speaker"]] in splits[row["split"]]["voice_sources"]
    engines = {row["speaker"].split(":")[0] for row in rows}
    assert engines == {"espeak-ng", "flite", "festival"}


def test_same_seed_gives_identical_bytes(built, tmp_path):
    out, manifest, _, _ = built
    again = Path(build_avmnist(str(tmp_path), n=N, seed=0))
    assert again.read_bytes() == manifest.read_bytes()
    assert (tmp_path / "dataset.json").read_bytes() == (out / "dataset.json").read_bytes()
    for sub in ("images", "audio"):
        names = sorted(p.name for p in (out / sub).iterdir())
        assert names == sorted(p.name for p in (tmp_path / sub).iterdir())
        for name in names:
            assert (out / sub / name).read_bytes() == (tmp_path / sub / name).read_bytes(), name


def test_pca_keeps_about_a_quarter_of_the_variance(pca):
    assert PCA_VARIANCE_KEPT <= pca.variance_kept < PCA_VARIANCE_KEPT + 0.1
    assert pca.basis.shape[1] < 10


def test_images_lose_most_of_the_digit(built, digits, pca):
    """Most of each digit's (mean-removed) energy is gone after the PCA cut, and the written
    image is far from the clean digit, yet still correlated with it."""
    out, _, rows, _ = built
    kept, correlations = [], []
    for row in rows:
        pixels = digits[int(row["label"])][row["mnist_index"]]
        centred, projected = pixels.ravel() - pca.mean, pca.project(pixels).ravel() - pca.mean
        kept.append(projected @ projected / (centred @ centred))
        image = cv2.imread(str(out / row["image"]), cv2.IMREAD_UNCHANGED)
        assert image is not None, row["image"]
        written = image.astype(float)
        correlations.append(np.corrcoef(written.ravel(), render_digit(pixels).ravel())[0, 1])
    assert np.mean(kept) < 0.5
    assert max(correlations) < 0.95
    assert 0.2 < np.mean(correlations) < 0.85


def test_captions_only_partly_informative(built):
    _, _, rows, _ = built
    naming = [row for row in rows if named_digits(row["text"])]
    assert 0.1 < len(naming) / len(rows) < 0.6
    hinting = [row for row in rows if any(hint in row["text"] for hint in HINTS)]
    assert hinting and len(naming) + len(hinting) < len(rows)  # some say nothing at all
    for row in rows:  # never misleading
        assert named_digits(row["text"]) <= {int(row["label"])}, row["text"]
        for hint, matching in HINTS.items():
            if hint in row["text"] and f"not {hint}" not in row["text"]:
                assert int(row["label"]) in matching, row["text"]


def test_too_many_records_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="rarest label"):
        build_avmnist(str(tmp_path), n=100_000)
    assert not (tmp_path / "manifest.jsonl").exists()


def test_missing_engine_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", "")
    with pytest.raises(RuntimeError, match="apt-get install -y"):
        build_avmnist(str(tmp_path), n=5)
    assert not (tmp_path / "manifest.jsonl").exists()
