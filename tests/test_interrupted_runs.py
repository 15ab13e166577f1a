"""A run killed part-way (a full run or an incremental one) leaves no partial table behind; its
lease keeps the next run off the output until it expires, and that run then removes what the
killed one staged and completes the tables without duplicates."""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from mmfeatures import schema
from mmfeatures.sample import build_sample_dataset

N = 24
LEASE_SECONDS = 10


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> str:
    return build_sample_dataset(str(tmp_path_factory.mktemp("sample")), n=N, seed=5)


def _start(manifest: str, output: str, *options: str) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "pipelines.extract_features",
        "--input",
        manifest,
        "--output",
        output,
        "--rows_per_file",
        "3",
        "--lease_seconds",
        str(LEASE_SECONDS),
        *options,
    ]
    return subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )


def _feature_ids(output: str) -> list[str] | None:
    table_dir = os.path.join(output, "features")
    if not os.path.exists(table_dir):
        return None
    ids = schema.read_features(table_dir, columns=["id"]).column("id").to_pylist()
    assert pq.read_table(table_dir, columns=["id"]).column("id").to_pylist() == ids  # a plain reader agrees
    return ids


@pytest.mark.parametrize("options", [(), ("--incremental",)], ids=["full", "incremental"])
def test_killed_while_writing_then_rerun(options: tuple[str, ...], manifest: str, tmp_path) -> None:
    output = str(tmp_path / "out")
    # A complete earlier run: the table a killed rerun must not damage.
    assert _start(manifest, output, *options).wait(timeout=300) == 0
    complete = _feature_ids(output)
    assert complete is not None
    before = sorted(complete)
    assert len(before) == N

    process = _start(manifest, output, *options)
    staged = os.path.join(output, "_staging", "run-*", "features", "*.parquet")
    deadline = time.monotonic() + 300
    while not glob.glob(staged) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    process.wait()
    assert glob.glob(staged), "the run was not killed while writing"

    after = _feature_ids(output)
    # The old table or the new one, whole; a table folder is never half written.
    assert after is None or sorted(after) == before

    time.sleep(max(0.0, killed + LEASE_SECONDS + 1 - time.monotonic()))  # until the killed run's lease expires
    assert _start(manifest, output, *options).wait(timeout=300) == 0
    rerun = _feature_ids(output)
    assert rerun is not None
    assert sorted(rerun) == before and len(set(rerun)) == len(rerun)
    assert not os.path.exists(os.path.join(output, "_staging"))
