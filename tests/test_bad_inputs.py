"""A corpus of bad inputs, made here, run through the whole job on Beam's local runner with the
real default models: the run finishes, every bad record has its error row with the documented
``error_type``, every good record (and every good modality of a partly bad record) its features,
and the run summary reconciles."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile

from mmfeatures import schema
from pipelines.extract_features import run
from tests.modalities.test_image import png_claiming
from tests.tar_shards import Member, build_tar

RATE = 16000
MAX_BYTES = 200_000
MAX_SECONDS = 5.0
MAX_CHARS = 2_000
# An error row expected for (id, modality); modality None: the whole row is rejected.
Expected = dict[tuple[str | None, str | None], str]


def _png(seed: int, size: int = 48) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return cv2.imencode(".png", pixels)[1].tobytes()


def _wav(samples: np.ndarray, subtype: str = "PCM_16") -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, RATE, format="WAV", subtype=subtype)
    return buffer.getvalue()


def _tone(seconds: float, amplitude: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (amplitude * np.sin(2 * np.pi * 440 * t)).astype(np.float32)


def build_corpus(root: Path) -> tuple[list[str], set[str], dict[str, set[str]], Expected, int]:
    """Write the corpus under ``root``. Returns the manifests, the ids expected in the feature
    table, the modalities each must hold, the expected error rows, and the rows read."""
    media = root / "media"
    media.mkdir()
    files = {
        "good.png": _png(0),
        "good2.png": _png(1),
        "empty.png": b"",
        "truncated.png": _png(2)[:300],
        "garbage.jpg": b"\xff\xd8\xff" + os.urandom(500),
        "vector.svg": b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>',
        "bomb.png": png_claiming(60_000, 60_000),
        "huge.bmp": b"BM" + bytes(MAX_BYTES + 10),
        "good.wav": _wav(_tone(1.0)),
        "corrupt.wav": b"RIFF" + os.urandom(400),
        "truncated.wav": _wav(_tone(1.0))[:12_000],
        "long.wav": _wav(_tone(MAX_SECONDS + 1)),
        "silent.wav": _wav(np.zeros(RATE, np.float32)),
        "nan.wav": _wav(np.where(np.arange(RATE) == 7, np.nan, _tone(1.0)).astype(np.float32), "FLOAT"),
    }
    for name, data in files.items():
        (media / name).write_bytes(data)
    outside = root.parent / f"{root.name}-outside.png"  # a real image the manifest may not reach
    outside.write_bytes(_png(3))

    rows = [
        {
            "id": "good-all",
            "text": "a red square",
            "image": "media/good.png",
            "audio": "media/good.wav",
            "label": "1",
            "colour": "red",
        },  # "colour": an unknown column, carried
        {"id": "good-text", "text": "only words"},
        {"id": "good-image", "image": "media/good2.png"},
        {"id": "good-text", "text": "the same id again"},
        {"id": "", "text": "no id"},
        {"id": None, "text": "a null id"},
        {"id": 4.5, "text": "a float id"},
        {"id": "no-modality", "label": "3"},
        {"id": "typed", "text": "fine words", "image": 42},
        {"id": "missing", "text": "words", "image": "media/nope.png"},
        {"id": "empty-image", "image": "media/empty.png"},
        {"id": "truncated-image", "image": "media/truncated.png"},
        {"id": "garbage-image", "image": "media/garbage.jpg"},
        {"id": "svg", "image": "media/vector.svg"},
        {"id": "bomb", "image": "media/bomb.png"},
        {"id": "huge", "image": "media/huge.bmp", "audio": "media/good.wav"},
        {"id": "corrupt-audio", "audio": "media/corrupt.wav"},
        {"id": "truncated-audio", "audio": "media/truncated.wav"},
        {"id": "long-audio", "audio": "media/long.wav"},
        {"id": "silent", "audio": "media/silent.wav"},
        {"id": "nan-audio", "audio": "media/nan.wav"},
        {"id": "empty-text", "text": "  \t "},
        {"id": "long-text", "text": "word " * MAX_CHARS},
        {"id": "escape", "text": "fine", "image": f"../{outside.name}"},
        {"id": "absolute", "image": str(outside)},
    ]
    csv_path = root / "extra.csv"
    csv_path.write_text("id,text,image\ncsv-good,from a csv file,\ncsv-bad,too,many,cells\n")
    empty = root / "empty.jsonl"
    empty.write_text("")

    table = pa.table(
        {"id": ["bytes-text", "bytes-image"], "text": [b"\xff\xfe not UTF-8", None], "image": [None, _png(4)]}
    )
    parquet = root / "inline.parquet"
    pq.write_table(table, parquet)

    shard = root / "shard.tar"
    shard.write_bytes(
        build_tar(
            [
                Member("s/0001.txt", b"a sample from a shard"),
                Member("s/0001.png", _png(5)),
                Member("s/0001.wav", _wav(_tone(0.5))),
                Member("s/0001.cls", b"2"),
                Member("../../etc/0002.txt", b"escape"),
                Member("/abs/0003.txt", b"absolute"),
                Member("s/0004.txt", type=tarfile.SYMTYPE, linkname="/etc/passwd"),
                Member("s/0005.txt", type=tarfile.CHRTYPE),
                Member("s/0006.txt", b"words kept"),
                Member("s/0006.npy", b"\x93NUMPY"),
                Member("s/0007.txt", b"words kept"),
                Member("s/0007.wav", bytes(MAX_BYTES + 1)),
            ]
        )
    )

    features = {
        "good-all",
        "good-text",
        "good-image",
        "typed",
        "missing",
        "huge",
        "escape",
        "csv-good",
        "bytes-image",
        "s/0001",
        "s/0006",
        "s/0007",
    }
    modalities = {
        "good-all": {"text", "image", "audio"},
        "good-text": {"text"},
        "good-image": {"image"},
        "typed": {"text"},
        "missing": {"text"},
        "huge": {"audio"},
        "escape": {"text"},
        "csv-good": {"text"},
        "bytes-image": {"image"},
        "s/0001": {"text", "image", "audio"},
        "s/0006": {"text"},
        "s/0007": {"text"},
    }
    expected: Expected = {
        ("good-text", None): "duplicate_id",
        ("4.5", None): "wrong_type",
        ("no-modality", None): "no_modality",
        ("typed", "image"): "wrong_type",
        ("missing", "image"): "missing_file",
        ("empty-image", "image"): "empty_file",
        ("truncated-image", "image"): "corrupt_image",
        ("garbage-image", "image"): "unreadable_image_header",
        ("svg", "image"): "corrupt_image",
        ("bomb", "image"): "image_too_large",
        ("huge", "image"): "file_too_large",
        ("corrupt-audio", "audio"): "corrupt_audio",
        ("truncated-audio", "audio"): "truncated_audio",
        ("long-audio", "audio"): "audio_too_long",
        ("silent", "audio"): "silent_audio",
        ("nan-audio", "audio"): "non_finite_audio",
        ("empty-text", "text"): "empty_text",
        ("long-text", "text"): "text_too_long",
        ("escape", "image"): "location_not_allowed",
        ("absolute", "image"): "location_not_allowed",
        ("bytes-text", "text"): "invalid_utf8",
        ("s/0006", None): "unsupported_member",
        ("s/0007", "audio"): "file_too_large",
    }
    # Rows with no id: the empty id and the null id, the malformed JSON line, the
    # malformed CSV row and the four hostile tar members. Keyed by their type, with a count.
    anonymous = {"missing_id": 2, "malformed_json": 1, "malformed_csv": 1, "unsafe_tar_member": 4}
    expected.update({(None, f"{kind}#{n}"): kind for kind, count in anonymous.items() for n in range(count)})
    if os.geteuid() != 0:  # root reads any file: permission denied cannot be made there
        locked = media / "locked.png"
        locked.write_bytes(_png(6))
        locked.chmod(0)
        rows.append({"id": "locked", "image": "media/locked.png"})
        expected[("locked", "image")] = "permission_denied"
    jsonl = root / "main.jsonl"
    with open(jsonl, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
        handle.write('{"id": "broken", "text": \n')  # a malformed line: the file goes on
    # main.jsonl: its rows and the malformed line; extra.csv 2 rows; inline.parquet 2; the shard:
    # 3 samples, 4 refused members and 1 skipped one.
    rows_read = len(rows) + 1 + 2 + 2 + 8
    manifests = [str(jsonl), str(csv_path), str(empty), str(parquet), str(shard)]
    return manifests, features, modalities, expected, rows_read


@pytest.fixture(scope="module")
def corpus_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("corpus")
    manifests, features, modalities, expected, rows_read = build_corpus(root)
    output = str(tmp_path_factory.mktemp("corpus-out"))
    argv = [f"--input={path}" for path in manifests] + [
        f"--output={output}",
        "--allowed_roots=inputs",
        f"--max_bytes={MAX_BYTES}",
        f"--max_audio_seconds={MAX_SECONDS}",
        f"--max_text_chars={MAX_CHARS}",
        "--max_pixels=4000000",
    ]
    run(argv)
    with open(os.path.join(output, "_run.json")) as handle:
        summary = json.load(handle)
    return {
        "features": {row["id"]: row for row in schema.read_features(os.path.join(output, "features")).to_pylist()},
        "errors": pq.read_table(os.path.join(output, "errors")).to_pylist(),
        "summary": summary,
        "expected_features": features,
        "expected_modalities": modalities,
        "expected_errors": expected,
        "rows_read": rows_read,
    }


def test_every_good_record_has_its_features(corpus_run: dict) -> None:
    features = corpus_run["features"]
    assert set(features) == corpus_run["expected_features"]
    for record_id, modalities in corpus_run["expected_modalities"].items():
        row = features[record_id]
        assert {m for m in ("text", "image", "audio") if row[f"has_{m}"]} == modalities, record_id
        assert all(np.isfinite(row[f"{m}_embedding"]).all() for m in modalities)
    assert features["good-all"]["colour"] == "red"
    assert features["s/0001"]["label"] == "2"
    assert features["typed"]["failed_modalities"] == ["image"]


def test_every_bad_input_has_its_error_row(corpus_run: dict) -> None:
    seen: dict[tuple[str | None, str | None], str] = {}
    anonymous: dict[str, int] = {}
    for row in corpus_run["errors"]:
        assert row["message"] and row["stage"]
        if row["id"] is None:
            kind = row["error_type"]
            seen[(None, f"{kind}#{anonymous.get(kind, 0)}")] = kind
            anonymous[kind] = anonymous.get(kind, 0) + 1
        else:
            key = (row["id"], row["modality"])
            assert key not in seen, f"two error rows for {key}"
            seen[key] = row["error_type"]
    assert seen == corpus_run["expected_errors"]


def test_the_run_summary_reconciles_and_nothing_is_lost(corpus_run: dict) -> None:
    summary = corpus_run["summary"]
    assert summary["reconciles"] and all(summary["checks"].values())
    records = summary["records"]
    assert records["read"] == corpus_run["rows_read"]
    assert records["read"] == records["rejected"] + records["accepted"]
    assert records["with_features"] == len(corpus_run["features"])
    for name, counts in summary["modalities"].items():
        assert counts["present"] == counts["embedded"] + counts["failed"], name
    assert summary["error_rows"] == len(corpus_run["errors"])


@pytest.mark.parametrize("name", ["empty.jsonl", "empty.csv", "empty.tar"])
def test_an_empty_manifest_gives_empty_tables_and_a_reconciled_summary(tmp_path: Path, name: str) -> None:
    manifest = tmp_path / name
    manifest.write_bytes(build_tar([]) if name.endswith(".tar") else b"")
    output = tmp_path / "out"
    run([f"--input={manifest}", f"--output={output}"])
    assert schema.read_features(str(output / "features")).num_rows == 0
    assert pq.read_table(output / "errors").num_rows == 0
    summary = json.loads((output / "_run.json").read_text())
    assert summary["reconciles"] and summary["records"]["read"] == 0 and summary["feature_rows"] == 0
