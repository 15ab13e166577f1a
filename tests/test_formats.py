"""One data set in every input format the job reads gives one feature table: the sample set
written as JSONL, gzipped JSONL, a ";"-separated gzipped CSV, Parquet, Hugging Face ``to_parquet``
files (media as paths, and embedded as the Hub holds them), a ``save_to_disk`` DatasetDict (built
by ``datasets`` itself, with ``Image()``, ``Audio()`` and ``ClassLabel`` columns under their own
names), a WebDataset tar shard and a folder of media files. Each is run through the real job, and
every table must equal the JSONL run's: the same ids, labels, splits and carried column, the same
vectors bit for bit, the same error rows."""

from __future__ import annotations

import csv
import gzip
import io
import json
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmfeatures.sample import build_sample_dataset
from mmfeatures.schema import read_features
from pipelines.extract_features import run

N_RECORDS = 12
MEDIA = ("image", "audio")
COLUMNS = ("id", "text", "image", "audio", "label", "split", "speaker")


def _rows(sample: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (sample / "manifest.jsonl").read_text().splitlines()]


def _jsonl(sample: Path, out: Path) -> tuple[str, list[str]]:
    shutil.copytree(sample, out)
    return str(out / "manifest.jsonl"), []


def _jsonl_gz(sample: Path, out: Path) -> tuple[str, list[str]]:
    shutil.copytree(sample, out)
    path = out / "manifest.jsonl.gz"
    path.write_bytes(gzip.compress((sample / "manifest.jsonl").read_bytes()))
    (out / "manifest.jsonl").unlink()
    return str(path), []


def _csv_gz(sample: Path, out: Path) -> tuple[str, list[str]]:
    """A European spreadsheet's export: ";"-separated, CRLF, empty cells for nulls, gzipped."""
    shutil.copytree(sample, out)
    (out / "manifest.jsonl").unlink()
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=COLUMNS, delimiter=";")
    writer.writeheader()
    writer.writerows({key: "" if row.get(key) is None else row[key] for key in COLUMNS} for row in _rows(sample))
    path = out / "manifest.csv.gz"
    path.write_bytes(gzip.compress(text.getvalue().encode()))
    return str(path), []


def _parquet(sample: Path, out: Path) -> tuple[str, list[str]]:
    shutil.copytree(sample, out)
    rows = [{key: row.get(key) for key in COLUMNS} for row in _rows(sample)]
    pq.write_table(pa.Table.from_pylist(rows), out / "manifest.parquet")
    return str(out / "manifest.parquet"), []


def _hugging_face(sample: Path, rows: list[dict[str, Any]]) -> Any:
    """The set as a ``datasets`` user holds it: media as ``Image()`` / ``Audio()``, digits as a
    ``ClassLabel``, columns named freely (no ``id``, so the record id is mapped from ``uid``)."""
    import datasets

    table = {
        "uid": [row["id"] for row in rows],
        "sentence": [row.get("text") for row in rows],
        "img": [str(sample / row["image"]) if row.get("image") else None for row in rows],
        "sound": [str(sample / row["audio"]) if row.get("audio") else None for row in rows],
        "digit": [row["label"] for row in rows],
        "speaker": [row.get("speaker") for row in rows],
        "split": [row["split"] for row in rows],
    }
    features = datasets.Features(
        {
            "uid": datasets.Value("string"),
            "sentence": datasets.Value("string"),
            "img": datasets.Value("string"),
            "sound": datasets.Value("string"),
            "digit": datasets.ClassLabel(names=[str(digit) for digit in range(10)]),
            "speaker": datasets.Value("string"),
            "split": datasets.Value("string"),
        }
    )
    # Casting path strings needs no media encoder (encoding audio would need torchcodec).
    dataset = datasets.Dataset.from_dict(table, features=features)
    return dataset.cast_column("img", datasets.Image()).cast_column("sound", datasets.Audio())


HUGGING_FACE_COLUMNS = ["--columns", "id=uid,text=sentence,image=img,audio=sound,label=digit"]


def _hf_parquet(sample: Path, out: Path) -> tuple[str, list[str]]:
    out.mkdir()
    _hugging_face(sample, _rows(sample)).to_parquet(str(out / "train.parquet"))  # the media as absolute paths
    return str(out / "train.parquet"), HUGGING_FACE_COLUMNS


def _hf_parquet_embedded(sample: Path, out: Path) -> tuple[str, list[str]]:
    """As ``push_to_hub`` writes its Parquet files: the media bytes embedded, the paths bare names."""
    from datasets.table import embed_table_storage

    out.mkdir()
    dataset = _hugging_face(sample, _rows(sample)).with_format("arrow")
    dataset.map(embed_table_storage, batched=True).with_format(None).to_parquet(str(out / "train.parquet"))
    return str(out / "train.parquet"), HUGGING_FACE_COLUMNS


def _hf_saved(sample: Path, out: Path) -> tuple[str, list[str]]:
    """A DatasetDict by split, its media bytes embedded; the split names fill ``split``."""
    import datasets

    splits = {
        name: _hugging_face(sample, [row for row in _rows(sample) if row["split"] == name]).remove_columns("split")
        for name in ("train", "val", "test")
    }
    datasets.DatasetDict(splits).save_to_disk(str(out))
    return str(out), HUGGING_FACE_COLUMNS


def _members(sample: Path, row: dict[str, Any]) -> dict[str, bytes]:
    """A record as WebDataset members: media bytes, text, and a ``.json`` of the other columns."""
    members = {f"{row['id']}.json": json.dumps({k: row.get(k) for k in ("label", "split", "speaker")}).encode()}
    if row.get("text") is not None:
        members[f"{row['id']}.txt"] = row["text"].encode()
    for column in MEDIA:
        if row.get(column):
            members[f"{row['id']}{Path(row[column]).suffix}"] = (sample / row[column]).read_bytes()
    return members


def _tar(sample: Path, out: Path) -> tuple[str, list[str]]:
    out.mkdir()
    path = out / "shard-000000.tar"
    with tarfile.open(path, "w") as archive:
        for row in _rows(sample):
            for name, data in _members(sample, row).items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    return str(path), []


def _media_folder(sample: Path, out: Path) -> tuple[str, list[str]]:
    out.mkdir()
    for row in _rows(sample):
        for name, data in _members(sample, row).items():
            (out / name).write_bytes(data)
    return str(out), []


FORMATS: dict[str, Callable[[Path, Path], tuple[str, list[str]]]] = {
    "jsonl": _jsonl,
    "jsonl.gz": _jsonl_gz,
    "csv.gz;": _csv_gz,
    "parquet": _parquet,
    "datasets to_parquet": _hf_parquet,
    "datasets to_parquet, embedded": _hf_parquet_embedded,
    "datasets save_to_disk": _hf_saved,
    "tar": _tar,
    "media folder": _media_folder,
}


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("sample")
    build_sample_dataset(str(folder), n=N_RECORDS, seed=1)
    return folder


def _table(output: Path) -> tuple[dict[str, dict[str, Any]], set[tuple[Any, ...]], dict[str, Any]]:
    features = read_features(str(output / "features")).to_pylist()
    times = ("event_timestamp", "created_timestamp")  # each run's own
    rows = {row.pop("id"): {k: v for k, v in row.items() if k not in times} for row in features}
    errors = {(e["id"], e["modality"], e["error_type"]) for e in read_features(str(output / "errors")).to_pylist()}
    return rows, errors, json.loads((output / "_run.json").read_text())


@pytest.fixture(scope="module")
def baseline(sample: Path, tiny_model_options: list[str], tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, ...]:
    root = tmp_path_factory.mktemp("baseline")
    path, extra = _jsonl(sample, root / "input")
    run(["--input", path, "--output", str(root / "out"), *tiny_model_options, *extra])
    return _table(root / "out")


@pytest.mark.parametrize("name", list(FORMATS)[1:])
def test_every_format_gives_the_jsonl_table(name, sample, tiny_model_options, baseline, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    path, extra = FORMATS[name](sample, tmp_path / "input")
    run(["--input", path, "--output", str(tmp_path / "out"), *tiny_model_options, *extra])
    rows, errors, summary = _table(tmp_path / "out")
    expected_rows, expected_errors, expected_summary = baseline

    assert summary["reconciles"] and summary["records"] == expected_summary["records"]
    assert summary["records"]["read"] == N_RECORDS
    assert errors == expected_errors and errors  # the sample's broken image, in every format
    assert sorted(rows) == sorted(expected_rows)
    for record_id, row in rows.items():
        assert row == expected_rows[record_id], record_id  # labels, splits, speaker, vectors bit for bit
