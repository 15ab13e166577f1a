"""Tests for mmfeatures.sample: builds a real 30-record set (MNIST + espeak-ng)."""

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import soundfile as sf

from mmfeatures.sample import WORDS, build_sample_dataset

MODALITIES = ("image", "audio", "text")


def read_manifest(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[dict], dict[str, str]]:
    out = tmp_path_factory.mktemp("sample")
    manifest = Path(build_sample_dataset(str(out), n=30, seed=0))
    errors = json.loads((out / "expected_errors.json").read_text())
    return out, manifest, read_manifest(manifest), errors


def decode_image(path: Path) -> np.ndarray | None:
    return cv2.imread(str(path), cv2.IMREAD_UNCHANGED)


def decode_audio(path: Path) -> tuple[np.ndarray, int]:
    samples, rate = sf.read(str(path), dtype="float32")
    return samples, rate


def test_manifest_shape(built):
    out, manifest, rows, _ = built
    assert manifest == out / "manifest.jsonl"
    assert len(rows) == 30
    ids = [r["id"] for r in rows]
    assert len(set(ids)) == len(ids)
    for row in rows:
        assert isinstance(row["label"], int) and 0 <= row["label"] <= 9
        assert row["split"] in {"train", "val", "test"}
        assert "speaker" in row
        assert (row["speaker"] is None) == (row.get("audio") is None)
        assert any(row.get(m) is not None for m in MODALITIES), row
    assert {r["split"] for r in rows} == {"train", "val", "test"}
    assert {r["label"] for r in rows} == set(range(10))


def test_some_modalities_missing(built):
    _, _, rows, _ = built
    for modality in MODALITIES:
        missing = sum(row.get(modality) is None for row in rows)
        assert 0 < missing < len(rows) // 2, (modality, missing)


def test_text_names_the_label(built):
    _, _, rows, _ = built
    for row in rows:
        if row.get("text"):
            assert WORDS[row["label"]] in row["text"] or str(row["label"]) in row["text"]


def test_good_files_decode(built):
    out, _, rows, errors = built
    image_exts, audio_layouts = set(), set()
    for row in rows:
        if row.get("image") and errors.get(row["id"]) != "image":
            assert not Path(row["image"]).is_absolute()
            image = decode_image(out / row["image"])
            assert image is not None, row["image"]
            assert image.shape[:2] == (112, 112)
            assert image.max() > 100  # a real digit, not a blank
            image_exts.add(Path(row["image"]).suffix)
        if row.get("audio") and errors.get(row["id"]) != "audio":
            assert not Path(row["audio"]).is_absolute()
            samples, rate = decode_audio(out / row["audio"])
            assert 0.2 < len(samples) / rate < 3.0
            assert np.abs(samples).max() > 0.05  # speech, not silence
            audio_layouts.add((Path(row["audio"]).suffix, rate, samples.ndim))
    assert ".png" in image_exts and len(image_exts) >= 3
    assert {s for s, _, _ in audio_layouts} == {".wav", ".flac", ".ogg"}
    assert {r for _, r, _ in audio_layouts} >= {22050, 44100}
    assert {d for _, _, d in audio_layouts} == {1, 2}


def test_broken_files_fail_to_decode(built):
    out, _, rows, errors = built
    by_id = {row["id"]: row for row in rows}
    assert set(errors.values()) == {"image", "audio"}
    for rec_id, modality in errors.items():
        path = out / by_id[rec_id][modality]
        assert path.is_file()
        if modality == "image":
            assert decode_image(path) is None, path
        else:
            with pytest.raises(sf.LibsndfileError):
                decode_audio(path)


def test_same_seed_gives_the_same_files(built, tmp_path):
    """Byte-identical, except Ogg files: libsndfile gives each Vorbis stream a random serial
    number, so those are compared by their decoded samples."""
    out, manifest, _, _ = built
    again = Path(build_sample_dataset(str(tmp_path), n=30, seed=0))
    assert again.read_text() == manifest.read_text()
    for sub in ("images", "audio"):
        names = sorted(p.name for p in (out / sub).iterdir())
        assert names == sorted(p.name for p in (tmp_path / sub).iterdir())
        for name in names:
            first, second = out / sub / name, tmp_path / sub / name
            if name.endswith(".ogg"):
                np.testing.assert_array_equal(sf.read(first)[0], sf.read(second)[0])
            else:
                assert first.read_bytes() == second.read_bytes(), name
    assert (tmp_path / "expected_errors.json").read_text() == (out / "expected_errors.json").read_text()


def test_other_seed_differs(built, tmp_path):
    _, manifest, _, _ = built
    other = Path(build_sample_dataset(str(tmp_path), n=30, seed=1))
    assert other.read_text() != manifest.read_text()


def test_missing_espeak_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", "")
    with pytest.raises(RuntimeError, match="apt-get install -y espeak-ng"):
        build_sample_dataset(str(tmp_path), n=5)
    assert not (tmp_path / "manifest.jsonl").exists()
