"""Inputs written by Hugging Face ``datasets`` itself, so that the layout under test is the real one:
``to_parquet`` files, ``save_to_disk`` folders (a ``Dataset`` and a ``DatasetDict``) and an Arrow IPC
file, with ``Image()`` and ``Audio()`` columns (``struct<bytes, path>``) and ``ClassLabel`` columns
(integers, their names in the schema's ``huggingface`` metadata). They are read by the sources, then
by the whole job with the tiny models of ``conftest``.

``datasets`` encodes audio from arrays or bytes only through ``torchcodec``, which is not a
dependency: the media columns are built as path strings and cast to ``Image()``/``Audio()``, which
encodes nothing. ``to_parquet`` then stores ``{"bytes": None, "path": <absolute path>}``;
``save_to_disk`` embeds the files' bytes and keeps their base names as paths.
"""

from __future__ import annotations

import json
import wave
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mmfeatures import schema
from mmfeatures.cli import main
from mmfeatures.errors import ErrorRow
from mmfeatures.modalities import MODALITIES as REGISTRY
from mmfeatures.records import map_columns, parse_column_map, parse_record
from mmfeatures.settings import default_runtime
from mmfeatures.sources import (
    Input,
    ManifestRow,
    ReadOptions,
    declared_column_types,
    find_inputs,
    read_input,
    read_manifest,
)
from pipelines.extract_features import run
from tests.source_rows import rows_only

N_RECORDS = 4
CLASSES = ["cat", "dog"]
LABELS = [0, 1, 1, 0]
TRAIN_ROWS = 3  # the DatasetDict's train split is rows 1-3 of the Parquet file, its test split row 4
COLUMNS = "image=img,audio=sound,text=sentence"
MODALITIES = ("text", "image", "audio")
SHARD = "data-00000-of-00001.arrow"  # the one Arrow file save_to_disk writes for a small dataset
MEDIA_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


# -- inputs, built by datasets -------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModuleType]:
    """``datasets``, offline, with its home and cache in a tmp folder rather than the user's."""
    home = tmp_path_factory.mktemp("hf_home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_DATASETS_OFFLINE", "1")
        patch.setenv("HF_HOME", str(home))
        patch.setenv("HF_DATASETS_CACHE", str(home / "datasets"))
        import datasets

        yield datasets


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``0.png``... and ``0.wav``...: a distinct noise image and a distinct tone per record."""
    folder = tmp_path_factory.mktemp("hf_media")
    rng = np.random.default_rng(0)
    for index in range(N_RECORDS):
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(folder / f"{index}.png")
        tone = 0.3 * np.sin(2 * np.pi * 220 * (index + 1) * np.arange(8000) / 16000)
        with wave.open(str(folder / f"{index}.wav"), "wb") as clip:
            clip.setnchannels(1)
            clip.setsampwidth(2)
            clip.setframerate(16000)
            clip.writeframes((tone * 32767).astype("<i2").tobytes())
    return folder


def _media_dataset(hf: ModuleType, media: Path, labels: list[int] = LABELS) -> Any:
    """Columns ``img`` (Image), ``sound`` (Audio), ``sentence`` and ``label`` (ClassLabel); the
    media paths are relative when ``media`` is."""
    features = hf.Features(
        {
            "img": hf.Value("string"),
            "sound": hf.Value("string"),
            "sentence": hf.Value("string"),
            "label": hf.ClassLabel(names=CLASSES),
        }
    )
    columns = {
        "img": [str(media / f"{i}.png") for i in range(len(labels))],
        "sound": [str(media / f"{i}.wav") for i in range(len(labels))],
        "sentence": [f"sentence number {i}" for i in range(len(labels))],
        "label": labels,
    }
    dataset = hf.Dataset.from_dict(columns, features=features)
    return dataset.cast_column("img", hf.Image()).cast_column("sound", hf.Audio())


@pytest.fixture(scope="module")
def parquet_file(hf: ModuleType, media: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("hf_parquet") / "data.parquet"
    _media_dataset(hf, media).to_parquet(str(path))
    return path


@pytest.fixture(scope="module")
def saved(hf: ModuleType, media: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("hf_saved") / "dataset"
    _media_dataset(hf, media).save_to_disk(str(folder))
    return folder


@pytest.fixture(scope="module")
def dataset_dict(hf: ModuleType, media: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("hf_dict") / "dataset"
    dataset = _media_dataset(hf, media)
    splits = {"train": dataset.select(range(TRAIN_ROWS)), "test": dataset.select(range(TRAIN_ROWS, N_RECORDS))}
    hf.DatasetDict(splits).save_to_disk(str(folder))
    return folder


# -- the sources ---------------------------------------------------------------------------------
def test_to_parquet_rows_name_their_class_and_reference_their_media_by_path(parquet_file: Path, media: Path) -> None:
    rows = rows_only(read_manifest(str(parquet_file)))
    assert [row.source for row in rows] == [f"{parquet_file}:{n}" for n in range(1, N_RECORDS + 1)]
    assert [row.data["label"] for row in rows] == [CLASSES[label] for label in LABELS]
    assert rows[1].data["img"] == {"bytes": None, "path": str(media / "1.png")}
    assert rows[1].data["sound"] == {"bytes": None, "path": str(media / "1.wav")}

    data = map_columns(rows[1].data, parse_column_map(COLUMNS))
    record = parse_record(data, source=rows[1].source, manifest_dir=str(parquet_file.parent))
    assert dict(record.payloads) == {
        "text": "sentence number 1",
        "image": str(media / "1.png"),
        "audio": str(media / "1.wav"),
    }
    assert record.id == rows[1].source and record.label == "dog" and not record.carried


def test_save_to_disk_rows_hold_their_media_bytes(saved: Path, media: Path) -> None:
    (source,) = find_inputs([str(saved)])
    assert source == Input(str(saved / SHARD), "arrow", name=f"{saved.name}/{SHARD}")
    rows = rows_only(read_input(source, ReadOptions()))
    assert [row.source for row in rows] == [f"{saved / SHARD}:{n}" for n in range(1, N_RECORDS + 1)]
    assert [row.data["label"] for row in rows] == [CLASSES[label] for label in LABELS]
    assert rows[2].data["img"] == {"bytes": (media / "2.png").read_bytes(), "path": "2.png"}

    data = map_columns(rows[2].data, parse_column_map(COLUMNS))
    record = parse_record(data, source=rows[2].source, manifest_dir=str(saved))
    assert record.payload("image") == (media / "2.png").read_bytes()
    assert record.payload("audio") == (media / "2.wav").read_bytes()


def test_a_dataset_dict_reads_each_split_and_names_it(dataset_dict: Path) -> None:
    """Each split's files, named under the folder the pattern names; ``ReadRecords`` fills each
    row's split from its input (the end-to-end test below checks that)."""
    inputs = find_inputs([str(dataset_dict)])
    assert inputs == [
        Input(str(dataset_dict / "train" / SHARD), "arrow", "train", f"{dataset_dict.name}/train/{SHARD}"),
        Input(str(dataset_dict / "test" / SHARD), "arrow", "test", f"{dataset_dict.name}/test/{SHARD}"),
    ]
    rows = [row for source in inputs for row in rows_only(read_input(source, ReadOptions()))]
    assert [row.data["sentence"] for row in rows] == [f"sentence number {i}" for i in range(N_RECORDS)]


def test_an_arrow_ipc_file_reads_as_the_stream_it_was_copied_from(saved: Path, tmp_path: Path) -> None:
    stream = Input(str(saved / SHARD), "arrow")
    table = pa.ipc.open_stream(stream.path).read_all()
    copy = tmp_path / "copy.arrow"
    with pa.ipc.new_file(str(copy), table.schema) as writer:
        writer.write_table(table, max_chunksize=3)  # two record batches
    assert copy.read_bytes()[:6] == b"ARROW1"

    read = rows_only(read_manifest(str(copy)))
    assert [row.data for row in read] == [row.data for row in rows_only(read_input(stream, ReadOptions()))]
    assert [row.source for row in read] == [f"{copy}:{n}" for n in range(1, N_RECORDS + 1)]
    assert declared_column_types(Input(str(copy), "arrow")) == declared_column_types(stream)


def test_class_label_minus_one_is_no_label_and_one_out_of_range_is_that_rows_error(
    hf: ModuleType, media: Path, tmp_path: Path
) -> None:
    unlabelled = tmp_path / "unlabelled.parquet"
    _media_dataset(hf, media, labels=[-1, 0, 1]).to_parquet(str(unlabelled))
    assert [row.data["label"] for row in rows_only(read_manifest(str(unlabelled)))] == [None, "cat", "dog"]

    # datasets refuses to write a label out of range; pyarrow keeps the metadata while replacing it
    table = pq.read_table(unlabelled)
    damaged = tmp_path / "damaged.parquet"
    pq.write_table(table.set_column(table.schema.get_field_index("label"), "label", pa.array([0, 2, 1])), damaged)
    first, error, third = read_manifest(str(damaged))
    assert isinstance(first, ManifestRow) and first.data["label"] == "cat"
    assert isinstance(third, ManifestRow) and third.data["label"] == "dog"
    assert isinstance(error, ErrorRow) and error.error_type == "invalid_label" and error.source == f"{damaged}:2"


def test_class_label_metadata_that_no_longer_fits_the_file_is_ignored(parquet_file: Path, tmp_path: Path) -> None:
    """pyarrow keeps a file's metadata when its columns are dropped or replaced: the ClassLabel it
    names may be gone, or hold the class names already."""
    dropped = tmp_path / "dropped.parquet"
    pq.write_table(pq.read_table(parquet_file, columns=["img", "sentence"]), dropped)
    assert b"ClassLabel" in pq.read_schema(dropped).metadata[b"huggingface"]
    assert all(set(row.data) == {"img", "sentence"} for row in rows_only(read_manifest(str(dropped))))
    assert set(declared_column_types(Input(str(dropped), "parquet")) or {}) == {"img", "sentence"}

    table = pq.read_table(parquet_file)
    named = tmp_path / "named.parquet"
    names = pa.array([CLASSES[label] for label in LABELS])
    pq.write_table(table.set_column(table.schema.get_field_index("label"), "label", names), named)
    assert [row.data["label"] for row in rows_only(read_manifest(str(named)))] == names.to_pylist()


def _batch_ends(path: Path) -> list[int]:
    """Where each record batch of an Arrow stream ends, in bytes."""
    stream = pa.BufferReader(path.read_bytes())
    ends = []
    with pytest.raises(EOFError):  # the end-of-stream marker
        while True:
            if pa.ipc.read_message(stream).type == "record batch":
                ends.append(stream.tell())
    return ends


@pytest.mark.parametrize("cut", ["within a batch", "between two batches"])
def test_a_truncated_arrow_file_keeps_the_rows_before_the_damage(hf: ModuleType, tmp_path: Path, cut: str) -> None:
    n = 3000  # save_to_disk writes batches of 1000 rows
    hf.Dataset.from_dict({"sentence": [f"s{i}" for i in range(n)]}).save_to_disk(str(tmp_path / "dataset"))
    path = tmp_path / "dataset" / SHARD
    ends = _batch_ends(path)
    assert len(ends) > 1
    size = ends[0] if cut == "between two batches" else (ends[0] + ends[1]) // 2
    path.write_bytes(path.read_bytes()[:size])

    *rows, error = read_manifest(str(path))
    assert 0 < len(rows) < n
    assert [row.data["sentence"] for row in rows_only(rows)] == [f"s{i}" for i in range(len(rows))]
    assert isinstance(error, ErrorRow) and error.error_type == "unreadable_manifest"
    assert error.source == f"{path}:{len(rows) + 1}"  # where the damage begins


def test_a_truncated_arrow_ipc_file_is_one_error_row(saved: Path, tmp_path: Path) -> None:
    """An IPC file's batches are found through its footer: cut off, none of them can be."""
    table = pa.ipc.open_stream(str(saved / SHARD)).read_all()
    path = tmp_path / "cut.arrow"
    with pa.ipc.new_file(str(path), table.schema) as writer:
        writer.write_table(table, max_chunksize=1)
    path.write_bytes(path.read_bytes()[:-100])
    (error,) = read_manifest(str(path))
    assert isinstance(error, ErrorRow) and error.error_type == "unreadable_manifest"
    assert declared_column_types(Input(str(path), "arrow")) is None


def test_damaged_offsets_in_an_arrow_file_are_an_error_row_not_a_crash(tmp_path: Path) -> None:
    """The Arrow reader takes buffers as they are: offsets that run backwards made ``to_pylist``
    raise SystemError, and offsets past the data crashed the process."""
    good = pa.array(["a", "b"])
    damaged = pa.Array.from_buffers(
        pa.string(), 2, [None, pa.py_buffer(np.array([0, 2, 1], np.int32).tobytes()), pa.py_buffer(b"ab")]
    )
    path = tmp_path / "damaged.arrow"
    with pa.ipc.new_stream(str(path), pa.schema([("sentence", pa.string())])) as writer:
        writer.write_batch(pa.record_batch([good], names=["sentence"]))
        writer.write_batch(pa.record_batch([damaged], names=["sentence"]))
    first, second, error = read_manifest(str(path))
    assert [row.data["sentence"] for row in rows_only([first, second])] == ["a", "b"]
    assert isinstance(error, ErrorRow) and error.error_type == "unreadable_manifest" and error.source == f"{path}:3"


def test_declared_column_types_give_class_labels_as_strings(parquet_file: Path, saved: Path) -> None:
    for source in (Input(str(parquet_file), "parquet"), Input(str(saved / SHARD), "arrow")):
        assert declared_column_types(source) == {
            "img": MEDIA_STRUCT,
            "sound": MEDIA_STRUCT,
            "sentence": pa.string(),
            "label": pa.string(),
        }


# -- the job -------------------------------------------------------------------------------------
def _features(out: Path) -> dict[str, dict[str, Any]]:
    return {row["id"]: row for row in schema.read_features(str(out / "features")).to_pylist()}


def _summary(out: Path) -> dict[str, Any]:
    return json.loads((out / "_run.json").read_text())


def _assert_all_embedded(out: Path, n: int) -> None:
    summary = _summary(out)
    assert summary["reconciles"] and all(summary["checks"].values())
    assert summary["records"]["read"] == summary["feature_rows"] == n and summary["error_rows"] == 0
    for modality in MODALITIES:
        assert summary["modalities"][modality] == {
            "present": n,
            "embedded": n,
            "shared": 0,
            "kept": 0,
            "failed": 0,
            "absent": 0,
            "runtime": REGISTRY[modality].runtime(default_runtime("cpu", "fp32")),
            "fallback": None,
        }


@pytest.fixture(scope="module")
def parquet_run(parquet_file: Path, tiny_model_options: list[str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("hf_run_parquet")
    run(["--input", str(parquet_file), "--output", str(out), "--columns", COLUMNS, *tiny_model_options])
    return out


def test_a_to_parquet_file_end_to_end(
    parquet_file: Path, parquet_run: Path, tiny_model_options: list[str], tmp_path: Path
) -> None:
    features = _features(parquet_run)
    ids = [f"{parquet_file.name}:{n}" for n in range(1, N_RECORDS + 1)]  # its name under the --input folder
    assert sorted(features) == sorted(ids)
    for record_id, label in zip(ids, LABELS, strict=True):
        row = features[record_id]
        assert row["label"] == CLASSES[label] and row["split"] is None and row["failed_modalities"] == []
        for modality in MODALITIES:
            vector = row[f"{modality}_embedding"]
            assert row[f"has_{modality}"] and vector is not None and np.all(np.isfinite(vector))
    table = schema.read_features(str(parquet_run / "features"))
    assert table.column_names == schema.field_names("features")  # every input column was mapped
    _assert_all_embedded(parquet_run, N_RECORDS)

    again = tmp_path / "again"
    run(["--input", str(parquet_file), "--output", str(again), "--columns", COLUMNS, *tiny_model_options])
    repeated = _features(again)
    assert sorted(repeated) == sorted(ids)
    for record_id in ids:
        assert repeated[record_id]["fused"] == features[record_id]["fused"]


def test_relative_media_paths_resolve_against_the_files_folder(
    hf: ModuleType,
    media: Path,
    parquet_file: Path,
    parquet_run: Path,
    tiny_model_options: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path = media / "relative.parquet"  # beside the media it names as 0.png, 0.wav...
    with monkeypatch.context() as patch:
        patch.chdir(media)  # where datasets looks for them, to size them
        _media_dataset(hf, Path(".")).to_parquet(str(path))
    assert rows_only(read_manifest(str(path)))[0].data["img"] == {"bytes": None, "path": "0.png"}
    run(["--input", str(path), "--output", str(tmp_path), "--columns", COLUMNS, *tiny_model_options])
    features = _features(tmp_path)
    from_parquet = _features(parquet_run)
    for n in range(1, N_RECORDS + 1):
        for modality in ("image", "audio"):
            embedding = f"{modality}_embedding"
            np.testing.assert_allclose(
                features[f"{path.name}:{n}"][embedding],
                from_parquet[f"{parquet_file.name}:{n}"][embedding],
                rtol=0,
                atol=1e-6,
            )
    _assert_all_embedded(tmp_path, N_RECORDS)


def test_a_saved_dataset_dict_folder_end_to_end(
    dataset_dict: Path, parquet_file: Path, parquet_run: Path, tiny_model_options: list[str], tmp_path: Path
) -> None:
    run(["--input", str(dataset_dict), "--output", str(tmp_path), "--columns", COLUMNS, *tiny_model_options])
    features = _features(tmp_path)
    from_parquet = _features(parquet_run)
    sizes = {"train": TRAIN_ROWS, "test": N_RECORDS - TRAIN_ROWS}
    offsets = {"train": 0, "test": TRAIN_ROWS}
    expected_ids = [f"{dataset_dict.name}/{split}/{SHARD}:{n}" for split in sizes for n in range(1, sizes[split] + 1)]
    assert sorted(features) == sorted(expected_ids)
    for split, size in sizes.items():
        for n in range(1, size + 1):
            row = features[f"{dataset_dict.name}/{split}/{SHARD}:{n}"]
            same = from_parquet[f"{parquet_file.name}:{offsets[split] + n}"]  # the same record, by position
            assert row["split"] == split and row["label"] == same["label"]
            for modality in MODALITIES:  # embedded bytes embed as the files they came from
                np.testing.assert_allclose(
                    row[f"{modality}_embedding"], same[f"{modality}_embedding"], rtol=0, atol=1e-6
                )
    _assert_all_embedded(tmp_path, N_RECORDS)


def test_a_column_the_mapping_displaces_is_carried(
    hf: ModuleType, tiny_model_options: list[str], tmp_path: Path
) -> None:
    features = hf.Features(
        {
            "id": hf.Value("string"),
            "text": hf.Value("string"),
            "caption": hf.Value("string"),
            "topic": hf.ClassLabel(names=["news", "sport"]),
        }
    )
    columns = {"id": ["a", "b"], "text": ["old a", "old b"], "caption": ["new a", "new b"], "topic": [1, -1]}
    path = tmp_path / "captions.parquet"
    hf.Dataset.from_dict(columns, features=features).to_parquet(str(path))
    out = tmp_path / "out"
    run(["--input", str(path), "--output", str(out), "--columns", "text=caption", *tiny_model_options])

    table = schema.read_features(str(out / "features"))
    declared = schema.field_names("features")
    assert table.column_names[len(declared) :] == ["manifest_text", "topic"]
    assert table.schema.field("topic").type == pa.string()  # a carried ClassLabel holds class names
    rows = {row["id"]: row for row in table.to_pylist()}
    assert {i: (r["manifest_text"], r["topic"]) for i, r in rows.items()} == {
        "a": ("old a", "sport"),
        "b": ("old b", None),
    }
    assert all(r["has_text"] and not r["has_image"] and not r["has_audio"] for r in rows.values())
    assert _summary(out)["reconciles"]


# -- the command line ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "columns, says",
    [
        ("bogus=x", "--columns: 'bogus' is not a field"),
        ("text", "--columns: 'text' is not FIELD=COLUMN"),
        ("text=a,text=b", "--columns: 'text' is mapped twice"),
        ("text=a,label=a", "--columns: one column fills two fields"),
    ],
)
def test_a_bad_column_map_stops_the_command_in_one_line(
    columns: str, says: str, parquet_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "out"
    assert main(["extract", "--input", str(parquet_file), "--output", str(output), "--columns", columns]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"mmfeatures extract: error: {says}")
    assert not output.exists()
