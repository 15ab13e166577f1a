"""A run killed part-way leaves no partial table behind, and a rerun completes it without duplicates."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from mmfeatures.sample import build_sample_dataset

N = 24


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> str:
    return build_sample_dataset(str(tmp_path_factory.mktemp("sample")), n=N, seed=5)


def _start(manifest: str, output: str) -> subprocess.Popen:
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
    return pq.read_table(table_dir, columns=["id"]).column("id").to_pylist()


def test_killed_while_writing_then_rerun(manifest: str, tmp_path) -> None:
    output = str(tmp_path / "out")
    # A complete earlier run: the table a killed rerun must not damage.
    assert _start(manifest, output).wait(timeout=300) == 0
    complete = _feature_ids(output)
    assert complete is not None
    before = sorted(complete)
    assert len(before) == N

    process = _start(manifest, output)
    staging = os.path.join(output, "_staging", "features")
    deadline = time.monotonic() + 300
    while not os.path.exists(staging) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()

    after = _feature_ids(output)
    # The old table or the new one, whole; a table folder is never half written.
    assert after is None or sorted(after) == before

    assert _start(manifest, output).wait(timeout=300) == 0
    rerun = _feature_ids(output)
    assert rerun is not None
    assert sorted(rerun) == before and len(set(rerun)) == len(rerun)
    assert not os.path.exists(os.path.join(output, "_staging"))
