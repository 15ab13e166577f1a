"""A folder given as ``--input``: which rule reads it (a ``save_to_disk`` dataset, a folder of
manifests, a folder of media files), and a folder of media files grouped into records, on local
disk and on memory://; then the whole job on a media folder."""

from __future__ import annotations

import dataclasses
import json
import os
import posixpath
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import apache_beam as beam
import cv2
import datasets
import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile
from apache_beam.testing.util import assert_that, equal_to
from fsspec.core import url_to_fs

from mmfeatures import schema, storage
from mmfeatures.errors import ErrorRow, FetchError, Stage
from mmfeatures.job import Job
from mmfeatures.modalities import MODALITIES
from mmfeatures.options import parse_options
from mmfeatures.reading import ReadRecords
from mmfeatures.records import parse_record
from mmfeatures.settings import default_runtime
from mmfeatures.sources import Input, ManifestRow, ReadOptions, find_inputs, read_input
from mmfeatures.sources.base import MEDIA_FOLDER
from pipelines.extract_features import run
from tests.source_rows import rows_only, split


class Tree:
    """A folder on some file system, written file by file."""

    def __init__(self, url: str) -> None:
        self.url = url

    def write(self, relative: str, data: bytes = b"x") -> str:
        location = f"{self.url}/{relative}"
        fs, path = url_to_fs(location)
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
        fs.pipe_file(path, data)
        return location

    def files(self, names: dict[str, bytes] | list[str]) -> Tree:
        for name in names:
            self.write(name, names[name] if isinstance(names, dict) else b"x")
        return self


@pytest.fixture(params=["local", "memory"])
def tree(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Tree]:
    if request.param == "local":
        yield Tree(str(tmp_path / "data"))
        return
    url = f"memory://folders-{uuid.uuid4().hex}"
    yield Tree(url)
    fs, path = url_to_fs(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def found_at(patterns: list[str]) -> list[Input]:
    """``find_inputs`` without the inputs' names, which tests of their own check."""
    return [dataclasses.replace(found, name=None) for found in find_inputs(patterns)]


def read_folder(url: str, **options: Any) -> list[ManifestRow | ErrorRow]:
    """Everything read from ``url``, which the folder rule must find to be a media folder."""
    assert found_at([url]) == [Input(url, MEDIA_FOLDER)]
    return list(read_input(Input(url, MEDIA_FOLDER), ReadOptions(**options)))


def by_id(rows: list[ManifestRow]) -> dict[str, dict]:
    return {row.data["id"]: row.data for row in rows}


# -- grouping ----------------------------------------------------------------------------------


def test_files_sharing_a_stem_are_one_record(tree: Tree) -> None:
    url = tree.url
    tree.files(
        {
            "a/123.jpg": b"jpeg",
            "a/123.txt": b"a cat on a mat\n",
            "a/123.wav": b"riff",
            "a/b/c/7.PNG": b"png",  # nested folders; an extension in any case
            "a/b/c/7.json": json.dumps({"speaker": "ann", "split": "val", "score": 2.5}).encode(),
            "a/b/c/7.cls": b" 3\n",
            "top.text": b"at the top",
        }
    )
    items = read_folder(url)
    rows, errors = split(items)
    assert errors == []
    assert [(row.data, row.source) for row in rows] == [
        (
            {"id": "a/123", "image": f"{url}/a/123.jpg", "text": b"a cat on a mat\n", "audio": f"{url}/a/123.wav"},
            f"{url}:a/123",
        ),
        (
            {
                "id": "a/b/c/7",
                "image": f"{url}/a/b/c/7.PNG",
                "label": "3",
                "speaker": "ann",
                "split": "val",
                "score": 2.5,
            },
            f"{url}:a/b/c/7",
        ),
        ({"id": "top", "text": b"at the top"}, f"{url}:top"),
    ]
    assert all(row.rejected == {} for row in rows)

    first = parse_record(rows[0].data, source=rows[0].source, manifest_dir=storage.parent(url))
    assert first.id == "a/123" and first.label is None
    assert first.payloads == {"image": f"{url}/a/123.jpg", "text": b"a cat on a mat\n", "audio": f"{url}/a/123.wav"}
    second = parse_record(rows[1].data, source=rows[1].source, manifest_dir=storage.parent(url))
    assert (second.label, second.split, second.carried) == ("3", "val", {"speaker": "ann", "score": 2.5})


def test_records_come_in_key_order(tree: Tree) -> None:
    names = ["b/2.txt", "10.txt", "a/9.txt", "9.txt", "a/10.txt", "a.txt", "b/1.txt", "a/9.jpg"]
    tree.files(names)
    rows, errors = split(read_folder(tree.url))
    assert errors == []
    assert [row.data["id"] for row in rows] == ["10", "9", "a", "a/10", "a/9", "b/1", "b/2"]


def test_a_sidecar_that_is_not_a_json_object_fails_its_record_only(tree: Tree) -> None:
    tree.files({"1.jpg": b"x", "1.json": b"[1, 2]", "2.jpg": b"x", "2.json": b"{not json", "3.jpg": b"x"})
    rows, errors = split(read_folder(tree.url))
    assert [row.data["id"] for row in rows] == ["3"]
    assert [(e.id, e.error_type, e.source) for e in errors] == [
        ("1", "malformed_json", f"{tree.url}:1"),
        ("2", "malformed_json", f"{tree.url}:2"),
    ]


# -- labels from folders -----------------------------------------------------------------------


def test_a_files_top_folder_is_its_label(tree: Tree) -> None:
    tree.files(
        {
            "cat/1.jpg": b"x",
            "dog/2.jpg": b"x",
            "cat/deep/er/3.jpg": b"x",  # the top folder, as ImageFolder reads a class's subfolders
            "4.jpg": b"x",  # at the top level: no folder, no label
            "cat/5.jpg": b"x",
            "cat/5.cls": b"cat\n",  # agrees with its folder
            "dog/6.jpg": b"x",
            "dog/6.json": b'{"label": "dog", "speaker": "bo"}',  # agrees too
            "dog/7.jpg": b"x",
            "dog/7.cls": b"cat",  # disagrees: the record fails
            "8.jpg": b"x",
            "8.cls": b"bird",  # no folder: the .cls is the label
        }
    )
    rows, errors = split(read_folder(tree.url, label_from_folder=True))
    labels = {row.data["id"]: row.data.get("label") for row in rows}
    assert labels == {
        "4": None,
        "8": "bird",
        "cat/1": "cat",
        "cat/5": "cat",
        "cat/deep/er/3": "cat",
        "dog/2": "dog",
        "dog/6": "dog",
    }
    assert "label" not in by_id(rows)["4"]
    assert [(e.id, e.modality, e.error_type, e.source) for e in errors] == [
        ("dog/7", None, "conflicting_member", f"{tree.url}:dog/7")
    ]

    plain = by_id(split(read_folder(tree.url))[0])  # without the option: only .cls and .json labels
    assert {key: row.get("label") for key, row in plain.items()} == {
        "4": None,
        "8": "bird",
        "cat/1": None,
        "cat/5": "cat",
        "cat/deep/er/3": None,
        "dog/2": None,
        "dog/6": "dog",
        "dog/7": "cat",
    }


# -- skipped, unsupported and oversized files --------------------------------------------------


def test_dot_names_are_skipped_at_every_level_and_underscores_are_media_too(tree: Tree) -> None:
    """A camera's "_DSC0001.JPG" is a photo, not a writer's marker; a "_SUCCESS" among photos
    is an error row of its own, never a silent skip."""
    tree.files(
        [
            "1.jpg",
            ".DS_Store",
            "_SUCCESS",
            ".git/x",
            ".git/objects/ab/cd.txt",
            "_tmp/2.jpg",
            "a/.hidden.txt",
            "a/_DSC0003.JPG",
            "a/.cache/4.jpg",
            "a/5.txt",
        ]
    )
    rows, errors = split(read_folder(tree.url))
    assert [(item.data["id"], sorted(item.data)) for item in rows] == [
        ("1", ["id", "image"]),
        ("_tmp/2", ["id", "image"]),
        ("a/5", ["id", "text"]),
        ("a/_DSC0003", ["id", "image"]),
    ]
    assert [(error.id, error.error_type) for error in errors] == [("_SUCCESS", "unsupported_member")]


def test_a_media_files_key_is_its_path_up_to_the_last_dot(tree: Tree) -> None:
    tree.files(["2023.05.01.jpg", "2023.05.01.txt", "a/IMG.0002.PNG"])
    assert [(item.data["id"], sorted(item.data)) for item in rows_only(read_folder(tree.url))] == [
        ("2023.05.01", ["id", "image", "text"]),
        ("a/IMG.0002", ["id", "image"]),
    ]


def test_a_text_file_that_cannot_be_read_fails_its_text_only(tree: Tree, monkeypatch: pytest.MonkeyPatch) -> None:
    """Deleted after the listing, or a storage fault: an error for that modality, never a traceback."""
    tree.files(["a.jpg", "a.txt", "b.txt"])
    fs, root = url_to_fs(tree.url)
    read_bytes = storage.read_bytes

    def deleted_just_before(location: str, max_bytes: int | None = None) -> bytes:
        if location.endswith("a.txt"):
            fs.rm(f"{root}/a.txt")
        return read_bytes(location, max_bytes)

    monkeypatch.setattr(storage, "read_bytes", deleted_just_before)
    (a, b) = rows_only(read_folder(tree.url))
    assert a.data == {"id": "a", "image": storage.join(tree.url, "a.jpg")} and b.data["text"] == b"x"
    assert [(column, error.error_type) for column, error in a.rejected.items()] == [("text", "missing_file")]


def test_unsupported_files_are_error_rows_of_their_own(tree: Tree) -> None:
    tree.files(["a/1.jpg", "a/1.txt", "a/1.pdf", "a/1.seg.png", "README.md", "b/2"])
    items = read_folder(tree.url)
    rows, errors = split(items)
    assert [(row.data["id"], sorted(row.data)) for row in rows] == [
        ("a/1", ["id", "image", "text"]),
        ("a/1.seg", ["id", "image"]),  # a folder's key ends at the last dot, unlike a tar's
    ]
    assert [(e.id, e.modality, e.stage, e.error_type, e.source) for e in errors] == [
        ("README", None, Stage.READ, "unsupported_member", f"{tree.url}:README.md"),
        ("a/1", None, Stage.READ, "unsupported_member", f"{tree.url}:a/1.pdf"),
        ("b/2", None, Stage.READ, "unsupported_member", f"{tree.url}:b/2"),
    ]
    assert "no column takes .pdf files" in errors[1].message
    assert "no column takes files without an extension" in errors[2].message
    # A stray file alone is its error row only, not also a record with no modality.
    assert len(items) == 5


def test_an_oversized_text_file_fails_its_text_only(tree: Tree) -> None:
    tree.files(
        {
            "1.jpg": b"x" * 500,  # referenced, not read here: its size is checked when it is embedded
            "1.txt": b"y" * 11,
            "1.wav": b"z" * 500,
            "2.txt": b"y" * 10,  # at the limit
            "3.jpg": b"x",
            "3.cls": b"c" * 11,  # a label cannot fail alone: the record does
        }
    )
    rows, errors = split(read_folder(tree.url, max_member_bytes=10))
    assert [(e.id, e.modality, e.error_type, e.source) for e in errors] == [
        ("3", None, "file_too_large", f"{tree.url}:3")
    ]
    first, second = rows
    assert first.data == {"id": "1", "image": f"{tree.url}/1.jpg", "audio": f"{tree.url}/1.wav"}
    assert list(first.rejected) == ["text"] and first.rejected["text"].error_type == "file_too_large"
    assert second.data == {"id": "2", "text": b"y" * 10} and second.rejected == {}

    record = parse_record(first.data, source=first.source, manifest_dir=tree.url, rejected=first.rejected)
    assert sorted(record.payloads) == ["audio", "image"]
    assert [(e.id, e.modality, e.error_type) for e in record.rejected] == [("1", "text", "file_too_large")]


# -- the folder rule ---------------------------------------------------------------------------


def test_a_save_to_disk_dataset_is_read_as_its_arrow_files(tree: Tree) -> None:
    url = f"{tree.url}/ds"
    datasets.Dataset.from_dict({"id": [f"r{i}" for i in range(6)], "text": list("abcdef")}).save_to_disk(
        url, num_shards=3
    )
    tree.write("ds/.DS_Store")
    found = found_at([url])
    assert found == [Input(f"{url}/data-0000{i}-of-00003.arrow", "arrow") for i in range(3)]
    rows = rows_only(row for source in found for row in read_input(source, ReadOptions()))
    assert [row.data for row in rows] == [{"id": f"r{i}", "text": t} for i, t in enumerate("abcdef")]


def test_a_dataset_dicts_splits_fill_split(tree: Tree) -> None:
    url = f"{tree.url}/dd"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": ["a", "b"]}),
            "test": datasets.Dataset.from_dict({"text": ["c", "d"], "split": [None, "holdout"]}),
        }
    ).save_to_disk(url)
    found = found_at([url])
    assert found == [
        Input(f"{url}/train/data-00000-of-00001.arrow", "arrow", "train"),
        Input(f"{url}/test/data-00000-of-00001.arrow", "arrow", "test"),
    ]
    with beam.Pipeline(runner="FnApiRunner") as pipeline:
        records = pipeline | ReadRecords(find_inputs([url]))
        splits = records["records"] | beam.Map(lambda record: (record.payload("text"), record.split))
        assert_that(splits, equal_to([("a", "train"), ("b", "train"), ("c", "test"), ("d", "holdout")]))
    assert found_at([f"{url}/test"]) == [Input(f"{url}/test/data-00000-of-00001.arrow", "arrow")]


def test_a_folder_of_manifests_is_its_top_level_manifests(tree: Tree) -> None:
    tree.files(["b.csv", "a.jsonl", "images/1.jpg", "images/1.txt", "README.md", "_SUCCESS", ".a.jsonl"])
    assert found_at([tree.url]) == [Input(f"{tree.url}/a.jsonl", "jsonl"), Input(f"{tree.url}/b.csv", "csv")]


def test_a_folder_of_shards_is_its_shards(tree: Tree) -> None:
    tree.files(["part-1.tar", "part-0.tar"])
    assert found_at([tree.url]) == [Input(f"{tree.url}/part-0.tar", "tar"), Input(f"{tree.url}/part-1.tar", "tar")]


@pytest.mark.parametrize(
    "names",
    [
        ["1.jpg", "1.txt", "2.wav"],
        ["cat/1.jpg", "dog/2.jpg"],  # ImageFolder: the top level holds only class folders
        ["1.jpg", "1.json"],  # the .json is a sidecar, not a manifest
        ["a.jsonl", "1.txt"],  # a media file beside a manifest: a media folder (the manifest unsupported)
        ["README.md", "cat/1.jpg"],
    ],
)
def test_a_folder_of_media_is_one_input(tree: Tree, names: list[str]) -> None:
    tree.files(names)
    assert found_at([tree.url]) == [Input(tree.url, MEDIA_FOLDER)]
    assert found_at([tree.url + "/"]) == [Input(tree.url, MEDIA_FOLDER)]


def test_a_sidecar_beside_its_image_is_read_as_columns(tree: Tree) -> None:
    tree.files({"1.jpg": b"x", "1.json": b'{"caption_lang": "en"}'})
    (row,) = rows_only(read_folder(tree.url))
    assert row.data == {"id": "1", "image": f"{tree.url}/1.jpg", "caption_lang": "en"}


def test_a_glob_never_matches_a_folder(tree: Tree) -> None:
    tree.files(["m.jsonl", "sub/1.jpg", "media.jsonl/1.jpg"])  # a folder named like a manifest
    manifest = (url_to_fs(f"{tree.url}/m.jsonl")[1], "jsonl")
    for pattern in ("*", "*.jsonl"):  # memory:// globs spell the file "memory:///...": compare paths
        assert [(url_to_fs(i.path)[1], i.format) for i in find_inputs([f"{tree.url}/{pattern}"])] == [manifest]
    with pytest.raises(FileNotFoundError, match="matches no file"):
        find_inputs([f"{tree.url}/s*"])


def test_a_named_folder_that_does_not_exist_fails(tree: Tree) -> None:
    tree.files(["1.jpg"])
    with pytest.raises(FileNotFoundError, match="matches no file"):
        find_inputs([f"{tree.url}/missing"])
    with pytest.raises(FileNotFoundError):
        find_inputs([f"{tree.url}/missing/"])


def test_a_hugging_face_hub_snapshot_is_read_as_its_data_files(tmp_path: Path) -> None:
    """README.md + data/*.parquet: nothing to read at the top, no media below, so the Parquet files."""
    snapshot = tmp_path / "snapshot"
    (snapshot / "data").mkdir(parents=True)
    (snapshot / "README.md").write_text("# a dataset card")
    (snapshot / ".gitattributes").write_text("*.parquet filter=lfs")
    for name in ("test-00000-of-00001.parquet", "train-00000-of-00001.parquet"):
        pq.write_table(pa.table({"text": ["a"]}), snapshot / "data" / name)
    assert found_at([str(snapshot)]) == [
        Input(str(snapshot / "data" / "test-00000-of-00001.parquet"), "parquet"),
        Input(str(snapshot / "data" / "train-00000-of-00001.parquet"), "parquet"),
    ]
    (snapshot / "data" / "cover.jpg").write_bytes(b"")  # a media file below: a media folder after all
    assert found_at([str(snapshot)]) == [Input(str(snapshot), MEDIA_FOLDER)]


def test_a_folder_with_nothing_to_read_fails_before_any_work(tmp_path: Path) -> None:
    """As a glob that matches nothing does: a scheduled run must not quietly read zero records."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "hidden").mkdir()
    (tmp_path / "hidden" / ".DS_Store").write_bytes(b"")
    for name in ("empty", "hidden"):
        with pytest.raises(FileNotFoundError, match="holds nothing to read"):
            find_inputs([str(tmp_path / name)])


# -- --allowed-roots ---------------------------------------------------------------------------


def test_a_media_folder_is_its_own_allowed_root(tmp_path: Path, tiny_model_options: list[str]) -> None:
    folder = Tree(str(tmp_path / "photos")).files(["cat/1.jpg"]).url
    Tree(str(tmp_path / "photos-secret")).files(["x.jpg"])
    Tree(str(tmp_path)).files(["outside.jpg"])
    argv = ["--input", folder, "--output", str(tmp_path / "out"), "--allowed-roots", "inputs", *tiny_model_options]
    policy = Job.from_options(parse_options(argv)).location_policy
    assert policy.roots == (os.path.realpath(folder),)
    policy.check(f"{folder}/cat/1.jpg")
    for refused in (f"{tmp_path}/photos-secret/x.jpg", f"{tmp_path}/outside.jpg", f"{folder}/../outside.jpg"):
        with pytest.raises(FetchError) as raised:
            policy.check(refused)
        assert raised.value.error_type == "location_not_allowed"


# -- the whole job -----------------------------------------------------------------------------


def _png(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    assert cv2.imwrite(str(path), pixels)


def _wav(path: Path, hz: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(16000) / 16000
    soundfile.write(str(path), (0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32), 16000)


def test_the_job_embeds_a_media_folder(tmp_path: Path, tiny_model_options: list[str]) -> None:
    folder = tmp_path / "media"
    _png(folder / "cat" / "1.png", 1)
    (folder / "cat" / "1.txt").write_text("a small cat")
    _png(folder / "cat" / "2.png", 2)
    _wav(folder / "cat" / "2.wav", 440)
    _png(folder / "dog" / "3.png", 3)
    _wav(folder / "dog" / "3.wav", 220)
    (folder / "dog" / "3.txt").write_text("a barking dog")
    (folder / "dog" / "3.md").write_text("notes")  # unsupported beside a record
    (folder / "dog" / "4.txt").write_text("only words")
    (folder / "dog" / "4.cls").write_text("dog")  # agrees with its folder
    (folder / "dog" / "4.json").write_text('{"speaker": "rex"}')  # a sidecar's column is carried
    _wav(folder / "5.wav", 330)  # at the top level: no label
    (folder / "LICENSE").write_text("all rights")  # unsupported, alone
    (folder / ".DS_Store").write_bytes(b"\0")
    (folder / "_SUCCESS").write_bytes(b"")  # among media files, a file like any other: unsupported
    out = tmp_path / "out"

    job = run(
        [
            "--input",
            str(folder),
            "--output",
            str(out),
            "--label-from-folder",
            "--allowed-roots",
            "inputs",
            *tiny_model_options,
        ]
    )

    assert job.inputs == [Input(str(folder), MEDIA_FOLDER, name=folder.name)]
    features = {row["id"]: row for row in schema.read_features(str(out / "features")).to_pylist()}
    assert {key: row["label"] for key, row in features.items()} == {
        "5": None,
        "cat/1": "cat",
        "cat/2": "cat",
        "dog/3": "dog",
        "dog/4": "dog",
    }
    held = {
        "5": {"audio"},
        "cat/1": {"image", "text"},
        "cat/2": {"image", "audio"},
        "dog/3": {"image", "audio", "text"},
        "dog/4": {"text"},
    }
    with open(out / "_run.json") as handle:
        summary = json.load(handle)
    dims = {name: summary["models"][name]["dimension"] for name in ("text", "image", "audio")}
    for key, row in features.items():
        for modality, dim in dims.items():
            vector = row[f"{modality}_embedding"]
            assert row[f"has_{modality}"] == (modality in held[key]), (key, modality)
            assert (vector is not None) == (modality in held[key]), (key, modality)
            if vector is not None:
                assert len(vector) == dim and np.all(np.isfinite(vector))
        assert row["failed_modalities"] == [] and len(row["fused"]) == sum(dims.values())
        assert row["speaker"] == ("rex" if key == "dog/4" else None)

    assert summary["reconciles"] and all(summary["checks"].values())
    assert summary["records"] == {"read": 8, "rejected": 3, "accepted": 5, "with_features": 5, "without_features": 0}
    assert (summary["feature_rows"], summary["error_rows"]) == (5, 3)
    assert summary["errors_by_type"] == {"read/unsupported_member": 3}
    for modality in dims:
        present = sum(modality in modalities for modalities in held.values())
        assert summary["modalities"][modality] == {
            "present": present,
            "embedded": present,
            "shared": 0,
            "kept": 0,
            "failed": 0,
            "absent": 5 - present,
            "runtime": MODALITIES[modality].runtime(default_runtime("cpu", "fp32")),
            "fallback": None,
        }
    assert summary["inputs"] == [str(folder)]

    errors = schema.read_features(str(out / "errors")).to_pylist()
    assert sorted((e["id"], e["modality"], e["error_type"], e["source"]) for e in errors) == [
        ("LICENSE", None, "unsupported_member", f"{folder}:LICENSE"),
        ("_SUCCESS", None, "unsupported_member", f"{folder}:_SUCCESS"),
        ("dog/3", None, "unsupported_member", f"{folder}:dog/3.md"),
    ]


def test_memory_folder_records_reference_memory_urls() -> None:
    """The image a record names is the URL of the file it came from, so a worker reads it there."""
    url = f"memory://folders-{uuid.uuid4().hex}"
    Tree(url).files({"cat/1.png": b"png bytes"})
    (row,) = rows_only(read_folder(url, label_from_folder=True))
    assert row.data == {"id": "cat/1", "label": "cat", "image": f"{url}/cat/1.png"}
    with fsspec.open(row.data["image"], "rb") as handle:
        assert handle.read() == b"png bytes"
    fs, path = url_to_fs(url)
    fs.rm(path, recursive=True)
