"""The lease on an output folder: a second run is refused while the first holds it, a killed run's
lease expires and can be taken over, and of runs racing for it exactly one wins. The same checks
run on S3 through the loopback server (``tests/test_s3.py``)."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from fsspec.core import url_to_fs

from mmfeatures import lease
from mmfeatures.errors import ConfigurationError
from mmfeatures.lease import Lease, LeaseLost, held


def new_run() -> str:
    return f"run-{uuid.uuid4().hex}"


def race(output: str, runners: int = 6) -> list[Lease]:
    """``runners`` threads taking the lease at the same moment; the leases they got (each other
    one refused with a ``ConfigurationError``)."""
    start = threading.Barrier(runners)
    won: list[Lease] = []
    refused: list[BaseException] = []

    def take() -> None:
        start.wait()
        try:
            won.append(Lease.take(output, new_run(), seconds=30))
        except BaseException as exc:  # noqa: BLE001 - every loser must be refused, in the one way
            refused.append(exc)

    threads = [threading.Thread(target=take) for _ in range(runners)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(isinstance(exc, ConfigurationError) for exc in refused), refused
    return won


def check_lease(output: str, caplog: pytest.LogCaptureFixture) -> None:
    """Every promise of the lease, on the storage ``output`` lives on."""
    first = Lease.take(output, new_run(), seconds=30)
    fs, root = url_to_fs(output)
    with pytest.raises(FileExistsError):  # the store itself refuses to create a lease file twice
        lease._create_exclusively(fs, f"{root.rstrip('/')}/_lease/{first.number}.json", b"{}")
    with pytest.raises(ConfigurationError, match=f"in use by run {first.run}.*wait for that run to end"):
        Lease.take(output, new_run())
    first.confirm()  # renewing keeps it
    first.release()
    second = Lease.take(output, new_run(), seconds=1)  # released: taken at once, no warning
    assert second.number == first.number + 1 and "taking over" not in caplog.text

    time.sleep(1.2)  # the holder stopped renewing (killed): its lease expires
    with caplog.at_level(logging.WARNING, logger="mmfeatures.lease"):
        third = Lease.take(output, new_run(), seconds=1)
    assert f"from run {second.run}, whose lease expired" in caplog.text
    with pytest.raises(LeaseLost, match=f"lost its lease .* to run {third.run}"):
        second.confirm()  # the run that was taken over cannot commit
    time.sleep(1.2)
    again = third.confirm()  # expired, but no run took it: taken again under the next number
    assert again.number == third.number + 1 and again.run == third.run

    time.sleep(1.2)
    winners = race(output)  # an expired lease, taken over by runs starting together
    assert len(winners) == 1
    winners[0].release()


def test_the_lease_on_a_local_disk(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    check_lease(str(tmp_path / "out"), caplog)
    assert len(race(str(tmp_path / "fresh"))) == 1  # a folder no run has used


def test_a_held_lease_is_renewed_while_the_run_lasts_and_released_at_its_end(tmp_path: Path) -> None:
    output = str(tmp_path / "out")
    with held(output, new_run(), seconds=0.6) as lease:
        time.sleep(1.5)  # more than twice its length: only renewal keeps it
        with pytest.raises(ConfigurationError, match="in use"):
            Lease.take(output, new_run())
        lease.confirm()
    Lease.take(output, new_run()).release()  # released at the end: the next run need not wait


def test_a_killed_run_keeps_its_lease_until_it_expires(tmp_path: Path) -> None:
    """A process killed with SIGKILL runs no cleanup: its lease stays until it expires."""
    output = str(tmp_path / "out")
    script = textwrap.dedent(
        f"""
        import os, signal
        from mmfeatures.lease import Lease
        Lease.take({output!r}, "run-{uuid.uuid4().hex}", seconds=2)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    assert subprocess.run([sys.executable, "-c", script]).returncode == -9
    with pytest.raises(ConfigurationError, match="if it was killed, for its lease to expire"):
        Lease.take(output, new_run())
    time.sleep(2.2)
    Lease.take(output, new_run()).release()


def test_a_second_run_on_the_same_output_is_refused_in_one_line(
    tmp_path: Path, capsys: Any, tiny_model_options: list[str]
) -> None:
    from pipelines.extract_features import main

    output = tmp_path / "out"
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"id": "a", "text": "hello"}\n')
    other = Lease.take(str(output), new_run())
    assert main(["--input", str(manifest), "--output", str(output), *tiny_model_options]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert f"is in use by run {other.run}" in line
    assert sorted(p.name for p in output.iterdir()) == ["_lease"]  # nothing staged, nothing written
    other.release()
    assert main(["--input", str(manifest), "--output", str(output), *tiny_model_options]) == 0
    assert sorted(p.name for p in output.iterdir()) == ["_lease", "_run.json", "errors", "features"]
