"""The job end to end on S3: a real S3 API server (moto_server) on 127.0.0.1 holds a JSONL manifest
with its media and a WebDataset tar shard, and receives all three outputs (features/, errors/,
_run.json). s3fs reaches the server through fsspec's per-protocol defaults, so the job itself is
run unchanged, in-process, on ``s3://`` URLs."""

from __future__ import annotations

import json
import os
import posixpath
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import pyarrow.parquet as pq
import pytest

from mmfeatures import schema
from mmfeatures.sample import build_sample_dataset
from pipelines.extract_features import run
from tests.tar_shards import Member, build_tar
from tests.test_lease import check_lease

BUCKET = "features-test"
N_RECORDS = 12
N_SHARD = 3
DIMS = {"text": 384, "image": 1280, "audio": 384}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _moto_server() -> str:
    found = shutil.which("moto_server", path=os.path.dirname(sys.executable))
    if found is None:
        pytest.fail("moto_server is not installed: install requirements-test.txt (moto[server])")
    return found


def _wait_until_up(url: str, process: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"moto_server exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"moto_server did not answer on {url} within {timeout} s")


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[fsspec.AbstractFileSystem]:
    """moto_server on a free loopback port, a bucket on it, and s3fs pointed at it for this test."""
    import s3fs

    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [_moto_server(), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        _wait_until_up(f"{endpoint}/moto-api/", process)
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            monkeypatch.setenv(name, "testing")
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
            monkeypatch.delenv(name, raising=False)
        # fsspec's per-protocol defaults: every S3FileSystem the job makes in this process gets them.
        options = {"endpoint_url": endpoint, "key": "testing", "secret": "testing", "use_listings_cache": False}
        monkeypatch.setitem(fsspec.config.conf, "s3", options)
        s3fs.S3FileSystem.clear_instance_cache()
        fs = s3fs.S3FileSystem(**options)
        fs.mkdir(BUCKET)
        yield fs
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _shard_from(folder: Path, broken: dict[str, str]) -> tuple[bytes, list[str]]:
    """A tar shard of the first sample records that have all three modalities and none broken."""
    members: list[Member] = []
    keys: list[str] = []
    with open(folder / "manifest.jsonl") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    for row in rows:
        if row["id"] in broken or not all(row.get(m) for m in DIMS):
            continue
        key = f"shard/{len(keys):04d}"
        members.append(Member(f"{key}.txt", row["text"].encode()))
        for modality in ("image", "audio"):
            extension = posixpath.splitext(row[modality])[1]
            members.append(Member(f"{key}{extension}", (folder / row[modality]).read_bytes()))
        members.append(Member(f"{key}.cls", str(row["label"]).encode()))
        keys.append(key)
        if len(keys) == N_SHARD:
            break
    assert len(keys) == N_SHARD, "the sample set has too few complete records for the shard"
    return build_tar(members), keys


def _read_json(fs: fsspec.AbstractFileSystem, path: str) -> Any:
    with fs.open(path) as handle:
        return json.load(handle)


def test_job_on_s3_loopback(s3: fsspec.AbstractFileSystem, tmp_path: Path) -> None:
    folder = tmp_path / "sample"
    build_sample_dataset(str(folder), n=N_RECORDS, seed=3)
    broken: dict[str, str] = json.loads((folder / "expected_errors.json").read_text())
    shard, shard_keys = _shard_from(folder, broken)

    root = f"{BUCKET}/data"
    for local_root, _, files in os.walk(folder):
        for name in files:
            local = os.path.join(local_root, name)
            s3.put_file(local, f"{root}/{os.path.relpath(local, folder)}")
    s3.pipe_file(f"{root}/shard-000000.tar", shard)
    assert s3.exists(f"{root}/manifest.jsonl") and s3.exists(f"{root}/shard-000000.tar")

    url = f"s3://{BUCKET}"
    run(
        [
            "--input",
            f"{url}/data/manifest.jsonl",
            "--input",
            f"{url}/data/shard-000000.tar",
            "--output",
            f"{url}/out",
        ]
    )
    s3.invalidate_cache()
    total = N_RECORDS + N_SHARD

    summary = _read_json(s3, f"{BUCKET}/out/_run.json")
    assert summary["reconciles"] is True
    assert summary["records"]["read"] == total and summary["feature_rows"] == total
    assert summary["error_rows"] == len(broken)
    for modality in DIMS:
        assert summary["modalities"][modality]["embedded"] > 0

    table = schema.read_features(f"{url}/out/features")
    assert table.num_rows == total
    rows = {row["id"]: row for row in table.to_pylist()}
    assert len(rows) == total and set(shard_keys) <= set(rows)
    for name, dim in {**{f"{m}_embedding": d for m, d in DIMS.items()}, "fused": sum(DIMS.values())}.items():
        assert table.schema.field(name).type.list_size == dim
    for key in shard_keys:  # the shard's samples are complete: every modality embedded, and fused
        for modality, dim in DIMS.items():
            vector = rows[key][f"{modality}_embedding"]
            assert vector is not None and len(vector) == dim
        assert rows[key]["fused"] is not None and len(rows[key]["fused"]) == sum(DIMS.values())
    embedded = sum(rows[i][f"{m}_embedding"] is not None for i in rows for m in DIMS)
    assert embedded > 0
    assert not s3.exists(f"{BUCKET}/out/_staging")
    assert sorted(s3.ls(f"{BUCKET}/out/features")) == sorted(f"{BUCKET}/out/{p}" for p in _listed(summary, "features"))

    error_parts = s3.glob(f"{BUCKET}/out/errors/part-*.parquet")
    assert error_parts
    errors = [r for part in error_parts for r in pq.read_table(s3.open(part)).to_pylist()]
    assert {(e["id"], e["modality"]) for e in errors} == set(broken.items())
    assert all(e["source"].startswith("s3://") for e in errors)


def _listed(summary: dict[str, Any], table: str) -> list[str]:
    return [part["path"] for part in summary["tables"][table]["files"]]


def test_the_lease_on_s3_loopback(s3: fsspec.AbstractFileSystem, caplog: pytest.LogCaptureFixture) -> None:
    """The lease is created with If-None-Match on S3: one of runs racing for it wins."""
    check_lease(f"s3://{BUCKET}/leased", caplog)


def test_folders_on_s3_loopback(s3: fsspec.AbstractFileSystem, tmp_path: Path, tiny_model_options: list[str]) -> None:
    """A folder on S3 is a prefix, not a directory: a folder of media files and a Hugging Face
    ``save_to_disk`` DatasetDict are found and read there as on a local disk."""
    import datasets

    folder = tmp_path / "sample"
    build_sample_dataset(str(folder), n=N_RECORDS, seed=3)
    broken: dict[str, str] = json.loads((folder / "expected_errors.json").read_text())
    rows = [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]
    complete = [row for row in rows if row["id"] not in broken and all(row.get(m) for m in DIMS)][:4]
    for n, row in enumerate(complete):
        label = f"digit-{row['label']}"
        for modality in ("image", "audio"):
            s3.put_file(str(folder / row[modality]), f"{BUCKET}/photos/{label}/{n}{Path(row[modality]).suffix}")
        s3.pipe_file(f"{BUCKET}/photos/{label}/{n}.txt", row["text"].encode())
    splits = {
        name: datasets.Dataset.from_dict(
            {"caption": [row["text"] for row in part], "img": [str(folder / row["image"]) for row in part]}
        ).cast_column("img", datasets.Image())
        for name, part in (("train", complete[:3]), ("test", complete[3:]))
    }
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "ds"))
    s3.put(str(tmp_path / "ds"), f"{BUCKET}/ds", recursive=True)

    url = f"s3://{BUCKET}"
    run(["--input", f"{url}/photos/", "--output", f"{url}/out-photos", "--label-from-folder", *tiny_model_options])
    run(
        [
            "--input",
            f"{url}/ds",
            "--output",
            f"{url}/out-ds",
            "--columns",
            "text=caption,image=img",
            *tiny_model_options,
        ]
    )
    s3.invalidate_cache()

    photos = {row["id"]: row for row in schema.read_features(f"{url}/out-photos/features").to_pylist()}
    assert sorted(photos) == sorted(f"digit-{row['label']}/{n}" for n, row in enumerate(complete))
    for record_id, row in photos.items():
        assert row["label"] == record_id.split("/")[0] and row["failed_modalities"] == []
        assert row["has_text"] and row["has_image"] and row["has_audio"]
    assert _read_json(s3, f"{BUCKET}/out-photos/_run.json")["reconciles"] is True

    saved = schema.read_features(f"{url}/out-ds/features").to_pylist()
    assert sorted((row["split"], row["id"]) for row in saved) == sorted(
        [("train", f"ds/train/data-00000-of-00001.arrow:{n}") for n in (1, 2, 3)]
        + [("test", "ds/test/data-00000-of-00001.arrow:1")]
    )
    assert all(row["has_text"] and row["has_image"] and not row["has_audio"] for row in saved)
    assert _read_json(s3, f"{BUCKET}/out-ds/_run.json")["reconciles"] is True
