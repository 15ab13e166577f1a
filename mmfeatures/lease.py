"""Which run is writing an output folder: a lease, so that two runs never write one ``--output``.

A lease is a file ``OUTPUT/_lease/<number>.json`` that is only ever created where none exists:
by a hard link on a local disk, with ``If-None-Match: *`` on S3 and ``ifGenerationMatch=0`` on
GCS. Of two runs racing for the next number exactly one creates it, so the highest number is
the live lease. Its holder renews it (pushes its expiry on) from a thread of the launcher; a run
that is killed stops renewing, and once its lease has expired the next run takes the next number,
with a warning. A lease file is only ever rewritten before it expires, so every run that reads
an expired one agrees it is free. The commit step confirms that the highest lease is still its
run's before it publishes anything (``confirm``): a run whose lease was taken over fails instead
of overwriting the new holder's tables, and one whose lease expired untaken takes it again under
the next number, by the same exclusive create.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import os
import posixpath
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from fsspec import AbstractFileSystem
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from mmfeatures.errors import ConfigurationError
from mmfeatures.outputs import recover, write_atomically
from mmfeatures.redaction import redact

_LOG = logging.getLogger(__name__)

LEASE_FOLDER = "_lease"
DEFAULT_LEASE_SECONDS = 120


class LeaseLost(RuntimeError):
    """Another run took this run's output over (its lease had expired): the run must not commit."""


def _create_exclusively(fs: AbstractFileSystem, path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` unless a file is there already (``FileExistsError``), in one
    step that readers never see half done."""
    if isinstance(fs, LocalFileSystem):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        written = f"{path}.{uuid.uuid4().hex}.tmp"
        with open(written, "xb") as handle:
            handle.write(data)
        try:
            os.link(written, path)  # fails if ``path`` exists: the file appears whole, or not at all
        finally:
            os.unlink(written)
    else:
        fs.pipe_file(path, data, mode="create")


def _numbered(fs: AbstractFileSystem, folder: str) -> list[tuple[int, str]]:
    """The lease files in ``folder``, by number, as the store lists them now (not from a
    listing cached earlier in this process, which would hide another run's newer lease)."""
    fs.invalidate_cache(folder)
    try:
        names = [posixpath.basename(path) for path in fs.ls(folder, detail=False)]
    except FileNotFoundError:
        return []
    stems = [name.removesuffix(".json") for name in names if name.endswith(".json")]
    return sorted((int(stem), f"{folder}/{stem}.json") for stem in stems if stem.isdigit())


def _when(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Lease:
    """Run ``run``'s lease on ``output``, number ``number``; plain data, so the commit step on a
    worker can ``confirm`` it."""

    output: str
    run: str
    number: int
    seconds: float

    @property
    def _where(self) -> tuple[AbstractFileSystem, str]:
        fs, root = url_to_fs(self.output)
        return fs, f"{root.rstrip('/')}/{LEASE_FOLDER}"

    def _content(self, released: bool = False) -> bytes:
        expires = time.time() + (0 if released else self.seconds)
        holder = {"run": self.run, "host": socket.gethostname(), "pid": os.getpid()}
        return json.dumps({**holder, "expires": expires, "released": released}).encode()

    @classmethod
    def take(cls, output: str, run: str, seconds: float = DEFAULT_LEASE_SECONDS) -> Lease:
        """Take the lease on ``output`` for ``run``; ``ConfigurationError`` while another run holds it."""
        fs, folder = cls(output, run, 0, seconds)._where
        for _ in range(3):  # a run that wins the race for a number is the holder a later look finds
            leases = _numbered(fs, folder)
            try:
                holder = json.loads(fs.cat_file(leases[-1][1])) if leases else None
            except FileNotFoundError:  # deleted by a run that has just taken the next number
                continue
            if holder is not None and not holder["released"]:
                if holder["expires"] > time.time():
                    raise ConfigurationError(
                        redact(
                            f"--output {output} is in use by run {holder['run']} (host {holder['host']}, "
                            f"pid {holder['pid']}), whose lease runs until {_when(holder['expires'])}; "
                            "wait for that run to end, or, if it was killed, for its lease to expire"
                        )
                    )
                _LOG.warning(
                    "taking over %s from run %s, whose lease expired at %s (the run was killed or lost)",
                    redact(output),
                    holder["run"],
                    _when(holder["expires"]),
                )
            lease = cls(output, run, leases[-1][0] + 1 if leases else 1, seconds)
            if lease._create(fs, folder, leases):
                return lease
        raise ConfigurationError(redact(f"--output {output} was taken by another run starting at the same time"))

    def _create(self, fs: AbstractFileSystem, folder: str, older: list[tuple[int, str]]) -> bool:
        """Create this lease's file where none exists, then delete the ``older`` ones; False where
        another run created it first."""
        try:
            _create_exclusively(fs, f"{folder}/{self.number}.json", self._content())
        except FileExistsError:
            return False
        for _, path in older:
            with contextlib.suppress(FileNotFoundError):  # another run's clean-up got there first
                fs.rm_file(path)
        return True

    def confirm(self) -> Lease:
        """Renew the lease, and return it; ``LeaseLost`` if another run has taken the output over.
        A lease that expired (its launcher stopped renewing) but that no run has taken is taken
        again under the next number, by the same exclusive create a new run uses: of it and a run
        taking it over, exactly one wins. A lease file is only ever rewritten before it expires."""
        fs, folder = self._where
        leases = _numbered(fs, folder)
        try:
            holder: dict[str, Any] = json.loads(fs.cat_file(leases[-1][1])) if leases else {"run": "none"}
        except FileNotFoundError:
            holder = {"run": "another"}
        if holder["run"] != self.run:
            raise LeaseLost(f"run {self.run} lost its lease on {redact(self.output)} to run {holder['run']}")
        mine = dataclasses.replace(self, number=leases[-1][0])
        if not holder["released"] and holder["expires"] > time.time():
            write_atomically(fs, f"{folder}/{mine.number}.json", mine._content(), folder)
            return mine
        again = dataclasses.replace(mine, number=mine.number + 1)
        if not again._create(fs, folder, leases):
            raise LeaseLost(f"run {self.run} lost its expired lease on {redact(self.output)} to another run")
        return again

    def release(self) -> None:
        """Mark the lease released, so the next run need not wait for it to expire; its number
        stays, so the numbers only ever grow."""
        fs, folder = self._where
        leases = _numbered(fs, folder)
        if leases and leases[-1][0] == self.number:
            write_atomically(fs, f"{folder}/{self.number}.json", self._content(released=True), folder)


@contextlib.contextmanager
def held(output: str, run: str, seconds: float = DEFAULT_LEASE_SECONDS) -> Iterator[Lease]:
    """Hold the lease on ``output`` for the block, renewing it every third of its length."""
    lease = Lease.take(output, run, seconds)
    stop = threading.Event()

    def renew() -> None:
        renewed = lease
        while not stop.wait(seconds / 3):
            try:
                renewed = renewed.confirm()
            except LeaseLost as exc:
                _LOG.error("%s: the run will fail at its commit", exc)
                return
            except OSError as exc:  # a storage fault: the next renewal may get through
                _LOG.warning("could not renew the lease on %s: %s", redact(output), redact(str(exc)))

    renewer = threading.Thread(target=renew, name="lease-renewer", daemon=True)
    renewer.start()
    try:
        yield lease
    finally:
        stop.set()
        renewer.join()
        with contextlib.suppress(OSError, LeaseLost):
            lease.confirm().release()


@contextlib.contextmanager
def output_for_run(output: str, run: str, seconds: float = DEFAULT_LEASE_SECONDS) -> Iterator[Lease]:
    """Hold ``output`` for run ``run`` for the block: its lease taken (``held``), then what runs
    killed there left cleaned up (``recover``). If the block fails, the run undoes its own commit
    and removes its staging, so the previous run's outputs stay as they were; a run that has
    lost the lease leaves that to the run that took the output over."""
    with held(output, run, seconds) as lease:
        recover(output)
        try:
            yield lease
        except BaseException:
            with contextlib.suppress(LeaseLost):
                lease.confirm()
                recover(output, run)
            raise
