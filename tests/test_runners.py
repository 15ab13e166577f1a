"""The job on Beam's runners that run it the way a cluster does, each against the in-process
runner's tables: Beam's portable job service with a LOOPBACK worker and with an EXTERNAL pool of
worker processes (how Flink and Spark run Python), and the local runner's worker processes.

These are the runners' own code paths: every stage pickled, no globals shared between workers,
the models loaded in each worker. Every run goes through the job's real entry point
(``python -m mmfeatures.cli extract``) in a process of its own, so that a hang fails the test at
its timeout instead of blocking the suite, and every server is stopped with its workers.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from mmfeatures import schema
from mmfeatures.sample import build_sample_dataset
from tests.jobs import feature_rows, write_manifest

REPO = Path(__file__).resolve().parents[1]
JOB_TIMEOUT_S = 240  # one run of the sample: 10 to 30 s on two busy cores, start-up included
SERVER_START_S = 60
TIME_COLUMNS = ("event_timestamp", "created_timestamp")  # when the run started: differs between runs
VECTOR_COLUMNS = ("text_embedding", "image_embedding", "audio_embedding", "fused")
# What _run.json must count alike on every runner (its timing, run id and file layout may differ).
COUNTED = ("records", "feature_rows", "error_rows", "errors_by_type", "modalities", "incremental", "checks")
SAME_RUN_SETTINGS = ("models", "fusion", "fingerprint", "inputs")
# What Beam 2.77 logs once for each worker it starts: the worker pool for each one a runner asks
# for, and a worker process of the local runner as it starts (it has no such folder locally).
POOL_STARTED_A_WORKER = "Starting worker with command"
WORKER_PROCESS_STARTED = "No semi_persistent_directory found"
# The error rows the sample makes, as validated, fetched and decoded.
EXPECTED_ERRORS = ("decode/corrupt_image", "fetch/missing_file", "validate/duplicate_id", "validate/no_modality")
# One torch thread per worker on every runner: two workers on a 2-core machine, not two times two.
COMMON_OPTIONS = ("--torch_threads", "1")


def _environment() -> dict[str, str]:
    """This interpreter's folder first on PATH: Beam's worker pool starts its workers with the first
    ``python`` there, and one without the job's packages hangs the job without a word."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["HF_HUB_OFFLINE"] = "1"  # the models are local folders; nothing is to be fetched
    return env


def _spawn(module_and_arguments: Sequence[str], log: Path) -> subprocess.Popen[bytes]:
    """``python -m`` a module in a process group of its own (so that it can be stopped with every
    worker it starts), its output to ``log``."""
    with open(log, "wb") as handle:
        return subprocess.Popen(
            [sys.executable, "-m", *module_and_arguments],
            stdin=subprocess.DEVNULL,
            stdout=handle,
            stderr=handle,
            cwd=REPO,
            env=_environment(),
            start_new_session=True,
        )


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _stop(process: subprocess.Popen[bytes]) -> None:
    """End ``process`` and everything it started (its own process group): politely, then not.
    The group is killed even once its leader has exited, since workers may outlive it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=10)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=10)


def _tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


class Server:
    """A Beam service in a process group of its own, on a port of 127.0.0.1, with its output in a
    log file; it is ready once the port accepts connections."""

    def __init__(self, name: str, arguments: list[str], port: int, folder: Path) -> None:
        self.name, self.port = name, port
        self.log = folder / f"{name}.log"
        self.process = _spawn(arguments, self.log)
        try:
            self._wait_until_listening()
        except BaseException:
            self.stop()
            raise

    def _wait_until_listening(self) -> None:
        deadline = time.monotonic() + SERVER_START_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"{self.name} exited with {self.process.returncode} before listening:\n{_tail(self.log)}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.2)
        pytest.fail(
            f"{self.name} did not listen on 127.0.0.1:{self.port} within {SERVER_START_S} s:\n{_tail(self.log)}"
        )

    def stop(self) -> None:
        _stop(self.process)


def _log(output: Path) -> Path:
    """Where the run writing ``output`` logs (its stdout and stderr)."""
    return output.parent / f"{output.name}.log"


def _lines(log: Path, text: str) -> list[str]:
    return [line for line in log.read_text(errors="replace").splitlines() if text in line]


def _logs(log: Path, servers: Sequence[Server]) -> str:
    parts = [f"\n--- the run:\n{_tail(log)}"] + [f"\n--- {server.name}:\n{_tail(server.log)}" for server in servers]
    return "".join(parts)


def _run_job(
    manifest: str, output: Path, model_options: list[str], *runner: str, servers: Sequence[Server] = ()
) -> dict[str, Any]:
    """``mmfeatures extract`` with ``runner``'s options, in a process of its own; its ``_run.json``.
    A run that fails or outlasts ``JOB_TIMEOUT_S`` fails the test with the end of its output and
    of the ``servers``' (a worker that cannot start says why only in its pool's log)."""
    log, described = _log(output), " ".join(runner) or "the default runner"
    command = ["mmfeatures.cli", "extract", "--input", manifest, "--output", str(output)]
    process = _spawn([*command, *model_options, *COMMON_OPTIONS, *runner], log)
    try:
        process.wait(timeout=JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the run with {described} did not end within {JOB_TIMEOUT_S} s{_logs(log, servers)}")
    finally:
        _stop(process)
    assert process.returncode == 0, f"the run with {described} exited with {process.returncode}{_logs(log, servers)}"
    return json.loads((output / "_run.json").read_text())


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Twelve sample records (every modality and format, one broken image), and rows that take the
    job's other paths: a duplicate id, a missing file, content another record holds, no modality."""
    folder = tmp_path_factory.mktemp("sample")
    with open(build_sample_dataset(str(folder), n=12, seed=0)) as handle:
        rows = [json.loads(line) for line in handle]
    rows += [
        {"id": "rec-0001", "text": "the same id again"},
        {"id": "missing-image", "text": "its photo is gone", "image": "images/nowhere.png"},
        {"id": "shares-content", "text": rows[0]["text"], "image": rows[0]["image"], "label": 9},
        {"id": "nothing-to-embed", "label": 3},
    ]
    return write_manifest(folder, rows)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def baseline(manifest: str, tiny_model_options: list[str], runs: Path) -> Path:
    """The run on the in-process runner (the job's default), once for the module."""
    output = runs / "in-process"
    summary = _run_job(manifest, output, tiny_model_options)
    assert summary["options"]["runner"] == "FnApiRunner" and summary["reconciles"]
    assert set(summary["errors_by_type"]) == set(EXPECTED_ERRORS)  # every path the sample is to take, taken
    assert summary["modalities"]["image"]["shared"] == summary["modalities"]["text"]["shared"] == 1
    return output


@pytest.fixture(scope="module")
def job_service(runs: Path) -> Iterator[Server]:
    """Beam's Python job service, which runs a portable job on an FnApiRunner of its own."""
    port = _free_port()
    server = Server(
        "job-service", ["apache_beam.runners.portability.local_job_service_main", "--port", str(port)], port, runs
    )
    yield server
    server.stop()


@pytest.fixture()
def pool_job_service(tmp_path: Path) -> Iterator[Server]:
    """Beam's job service that asks the worker pool for ``--direct_num_workers`` workers, as Flink
    and Spark ask for one per slot (``tests/beam_job_service.py``: Beam's own asks for one)."""
    port = _free_port()
    server = Server("pool-job-service", ["tests.beam_job_service", "--port", str(port)], port, tmp_path)
    yield server
    server.stop()


@pytest.fixture()
def worker_pool(tmp_path: Path) -> Iterator[Server]:
    """Beam's worker pool, which starts each worker the runner asks for as a ``python`` process of
    its own (killed with the pool: they share its process group)."""
    port = _free_port()
    server = Server(
        "worker-pool", ["apache_beam.runners.worker.worker_pool_main", f"--service_port={port}"], port, tmp_path
    )
    yield server
    server.stop()


def _errors(output: Path) -> list[tuple[Any, ...]]:
    rows = pq.read_table(output / "errors").to_pylist()
    return sorted(((row["id"], row["modality"], row["error_type"]) for row in rows), key=repr)


def _metadata(output: Path) -> dict[str, Any]:
    """The feature table's run metadata."""
    return schema.read_run_metadata(schema.read_features(str(output / "features")).schema)


def assert_same_tables(output: Path, baseline: Path, runner: str) -> None:
    """The run at ``output`` wrote the baseline's tables: the same feature rows by id (vectors
    within 1e-6, the time columns left out), the same errors, and a ``_run.json`` that reconciles
    with the same counts."""
    expected, got = feature_rows(str(baseline)), feature_rows(str(output))
    assert sorted(got) == sorted(expected)
    for record_id, row in expected.items():
        other = got[record_id]
        assert other.keys() == row.keys()
        for column, value in row.items():
            if column in TIME_COLUMNS:
                continue
            if column in VECTOR_COLUMNS and value is not None:
                assert other[column] is not None, (record_id, column)
                np.testing.assert_allclose(other[column], value, atol=1e-6, rtol=0, err_msg=f"{record_id} {column}")
            else:
                assert other[column] == value, (record_id, column)
    assert schema.read_features(str(output / "features")).schema.equals(
        schema.read_features(str(baseline / "features")).schema, check_metadata=False
    )
    assert _metadata(output) == _metadata(baseline)
    assert _errors(output) == _errors(baseline)

    summary, reference = (json.loads((folder / "_run.json").read_text()) for folder in (output, baseline))
    assert summary["reconciles"] and all(summary["checks"].values())
    assert {key: summary[key] for key in COUNTED} == {key: reference[key] for key in COUNTED}
    assert {key: summary[key] for key in SAME_RUN_SETTINGS} == {key: reference[key] for key in SAME_RUN_SETTINGS}
    assert summary["options"] == {**reference["options"], "runner": runner, "output": str(output)}


def test_the_portable_runner_with_a_loopback_worker_writes_the_in_process_tables(
    manifest: str, tiny_model_options: list[str], baseline: Path, job_service: Server, runs: Path
) -> None:
    """The job service runs the stages over the Fn API in a worker inside the launcher: every
    stage reaches it pickled, and the commit confirms the lease from there."""
    output = runs / "portable-loopback"
    runner = ["--runner=PortableRunner", f"--job_endpoint=localhost:{job_service.port}", "--environment_type=LOOPBACK"]
    _run_job(manifest, output, tiny_model_options, *runner, servers=[job_service])
    assert_same_tables(output, baseline, "PortableRunner")


def test_the_portable_runner_with_an_external_pool_of_two_workers_writes_the_in_process_tables(
    manifest: str,
    tiny_model_options: list[str],
    baseline: Path,
    pool_job_service: Server,
    worker_pool: Server,
    runs: Path,
) -> None:
    """Two worker processes of the pool's own, as Flink and Spark run Python: neither shares
    anything with the launcher or with the other but what the runner sends them, and each loads
    the models for the records it is given."""
    output = runs / "portable-external"
    runner = [
        "--runner=PortableRunner",
        f"--job_endpoint=localhost:{pool_job_service.port}",
        "--environment_type=EXTERNAL",
        f"--environment_config=localhost:{worker_pool.port}",
        "--direct_num_workers=2",
    ]
    _run_job(manifest, output, tiny_model_options, *runner, servers=[pool_job_service, worker_pool])
    assert_same_tables(output, baseline, "PortableRunner")
    started = _lines(worker_pool.log, POOL_STARTED_A_WORKER)
    assert len(started) == 2, f"the pool started {len(started)} workers, not 2:\n{_tail(worker_pool.log)}"


def test_the_local_runner_with_two_worker_processes_writes_the_in_process_tables(
    manifest: str, tiny_model_options: list[str], baseline: Path, runs: Path
) -> None:
    """The job's default runner, with its stages in two worker processes of its own."""
    output = runs / "multi-process"
    _run_job(manifest, output, tiny_model_options, "--direct_num_workers=2", "--direct_running_mode=multi_processing")
    assert_same_tables(output, baseline, "FnApiRunner")
    started = _lines(_log(output), WORKER_PROCESS_STARTED)
    assert len(started) == 2, f"{len(started)} worker processes ran the job, not 2:\n{_tail(_log(output))}"
