"""The job reads manifests and media from, and writes its tables to, object storage through fsspec:
an in-memory filesystem, and a real GCS API server (gcp-storage-emulator) on 127.0.0.1."""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Iterator

import fsspec
import pytest

from mmfeatures.sample import build_sample_dataset
from pipelines.extract_features import run


@pytest.fixture(scope="module")
def small_sample(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, str]]:
    folder = tmp_path_factory.mktemp("sample")
    build_sample_dataset(str(folder), n=20, seed=3)
    with open(folder / "expected_errors.json") as handle:
        return str(folder), json.load(handle)


def _run_and_check(fs: fsspec.AbstractFileSystem, root: str, broken: dict[str, str]) -> None:
    """Run the job on ``root``/manifest.jsonl (media referenced relatively) into ``root``/out."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    url = f"{protocol}://{root}"
    run(["--input", f"{url}/manifest.jsonl", "--output", f"{url}/out"])

    with fs.open(f"{root}/out/_run.json") as handle:
        summary = json.load(handle)
    assert summary["reconciles"]
    assert summary["records"]["read"] == 20 and summary["feature_rows"] == 20
    assert summary["error_rows"] == len(broken)
    assert summary["modalities"]["image"]["embedded"] > 0 and summary["modalities"]["audio"]["embedded"] > 0

    import pyarrow.parquet as pq

    parts = sorted(fs.glob(f"{root}/out/features/part-*.parquet"))
    rows = sum(pq.ParquetFile(fs.open(part)).metadata.num_rows for part in parts)
    assert rows == 20
    assert not fs.exists(f"{root}/out/_staging")
    error_parts = fs.glob(f"{root}/out/errors/part-*.parquet")
    errors = [r for part in error_parts for r in pq.read_table(fs.open(part)).to_pylist()]
    assert {(e["id"], e["modality"]) for e in errors} == set(broken.items())
    assert all(e["source"].startswith(f"{protocol}://") for e in errors)


def test_memory_filesystem(small_sample: tuple[str, dict[str, str]]) -> None:
    folder, broken = small_sample
    fs = fsspec.filesystem("memory")
    fs.put(folder, "/sample", recursive=True)
    try:
        _run_and_check(fs, "/sample", broken)
    finally:
        fs.rm("/sample", recursive=True)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def gcs(monkeypatch: pytest.MonkeyPatch) -> Iterator[fsspec.AbstractFileSystem]:
    """A GCS API server on loopback, and gcsfs pointed at it with anonymous credentials."""
    from gcp_storage_emulator.server import create_server

    port = _free_port()
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket="features-test")
    threading.Thread(target=server.start, daemon=True).start()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    monkeypatch.setenv("FSSPEC_GCS_TOKEN", "anon")  # fsspec's per-protocol default options
    monkeypatch.setenv("FSSPEC_GCS_USE_LISTINGS_CACHE", "false")
    import gcsfs

    gcsfs.GCSFileSystem.clear_instance_cache()
    yield gcsfs.GCSFileSystem(token="anon", use_listings_cache=False)
    gcsfs.GCSFileSystem.clear_instance_cache()
    server.stop()


def test_gcs_on_loopback(small_sample: tuple[str, dict[str, str]], gcs) -> None:
    folder, broken = small_sample
    for local_root, _, files in os.walk(folder):
        for name in files:
            local = os.path.join(local_root, name)
            gcs.put_file(local, f"features-test/sample/{os.path.relpath(local, folder)}")
    _run_and_check(gcs, "features-test/sample", broken)
