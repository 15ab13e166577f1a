"""Peak memory of the reading stage on hostile inputs, one case per input kind: each runs the job's
``ReadRecords`` through Beam's in-process runner in a fresh interpreter, and the growth of its
peak resident memory over what is resident after the imports must stay under a bound computed
from ``--max-bytes`` (``LIMIT``), never from the size of the input.

The bound, ``bound(unit)``: reading decodes one unit at a time, a line, a tar member or a cell of
at most ``LIMIT`` bytes (a Parquet row group: pyarrow decodes one whole, a cell over the limit
included, before it can be measured), and holds it in a few forms at once (the raw or compressed
bytes and the decoded text, the Arrow data with its dictionary and its builder's spare room, the
Python value, the record that carries it), in each of the two passes over an input, which the
allocators keep for reuse: ``COPIES`` units. ``SLACK`` is what the interpreter, Beam and the
allocators add to a run over a small input. The records the later stages hold are theirs: here
one consumer, that drops each record as it comes.
"""

from __future__ import annotations

import gzip
import io
import json
import resource
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

LIMIT = 8 * 2**20  # --max-bytes of every case
COPIES = 8
SLACK = 24 * 2**20
HUGE = 32 * LIMIT  # a line longer than the bound several times over
_CHUNK = 2**20
_ADDRESS_SPACE = 6 * 2**30  # a child that runs away fails instead of taking the machine's memory

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/clear_refs").exists(), reason="measures memory through Linux's /proc"
)


def bound(unit: int = LIMIT) -> int:
    return COPIES * unit + SLACK


# Runs the reading stage over one input and prints its peak memory growth, the ids of its records
# and its error rows. A matcher prints what it is given: the pipeline runs in this process.
_CHILD = """
import json, sys
import apache_beam as beam
from apache_beam.testing.util import assert_that
from mmfeatures.reading import ReadRecords
from mmfeatures.sources import ReadOptions, find_inputs

def status(field):  # bytes; from /proc: ru_maxrss starts at the parent's peak, copied by fork
    with open("/proc/self/status") as lines:
        return next(int(line.split()[1]) * 1024 for line in lines if line.startswith(field + ":"))

def show(label):
    return lambda found: print(json.dumps({label: sorted(found)}))

inputs = find_inputs([sys.argv[1]])
with open("/proc/self/clear_refs", "w") as clear:
    clear.write("5")  # the peak (VmHWM) starts again from what is resident now
baseline = status("VmRSS")
with beam.Pipeline(runner="FnApiRunner") as pipeline:  # as the job reads on this runner: not spread
    read = pipeline | ReadRecords(inputs, ReadOptions(max_member_bytes=int(sys.argv[2])), spread=False)
    assert_that(read["records"] | "Ids" >> beam.Map(lambda record: record.id), show("records"), label="Records")
    errors = read["errors"] | "Kinds" >> beam.Map(lambda row: (row["error_type"], row["id"], row["source"]))
    assert_that(errors, show("errors"), label="Errors")
print(json.dumps({"growth": status("VmHWM") - baseline}))
"""


def _limit_address_space() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (_ADDRESS_SPACE, _ADDRESS_SPACE))


def read_in_child(path: Path) -> dict[str, Any]:
    """The reading stage's peak memory growth over ``path`` (``growth``, bytes), its records' ids
    (``records``) and its error rows as [error_type, id, source] (``errors``)."""
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, str(path), str(LIMIT)],
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=_limit_address_space,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    found: dict[str, Any] = {}
    for line in done.stdout.splitlines():
        if line.startswith("{"):
            found.update(json.loads(line))
    print(f"{path.name}: peak memory grew {found['growth'] / 2**20:.0f} MiB")
    return found


def _filler(size: int) -> Iterator[bytes]:
    """``size`` bytes of "x" in chunks, so that building a huge line holds only a chunk of it."""
    for start in range(0, size, _CHUNK):
        yield b"x" * min(_CHUNK, size - start)


def _write_with_huge_line(path: Path, before: bytes, after: bytes) -> None:
    """``before``, ``HUGE`` bytes of "x", then ``after``: a file with one huge line, gzipped for
    a name ending in ".gz"."""
    opener: Any = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as out:
        out.write(before)
        for chunk in _filler(HUGE):
            out.write(chunk)
        out.write(after)


@pytest.mark.parametrize("name", ["m.jsonl", "m.jsonl.gz"])
def test_a_huge_jsonl_line_is_an_error_row_and_never_held_whole(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    _write_with_huge_line(path, b'{"id": "a", "text": "t"}\n{"id": "x", "text": "', b'"}\n{"id": "b", "text": "t"}\n')
    found = read_in_child(path)
    assert found["records"] == ["a", "b"]
    assert found["errors"] == [["line_too_long", None, f"{path}:2"]]
    assert found["growth"] < bound()


def test_a_huge_csv_line_is_an_error_row_and_never_held_whole(tmp_path: Path) -> None:
    """A line with no delimiter: csv's field size limit only applies once the line is read."""
    path = tmp_path / "m.csv"
    _write_with_huge_line(path, b"id,text\na,t\n", b"\nb,t\n")
    found = read_in_child(path)
    assert found["records"] == ["a", "b"]
    assert found["errors"] == [["line_too_long", None, f"{path}:3"]]
    assert found["growth"] < bound()


def test_parquet_cells_are_read_in_batches_of_about_the_limit(tmp_path: Path) -> None:
    """32 cells of half the limit and one of twice the limit, compressed to almost nothing, in
    row groups of two rows: a batch of them all would hold 18 times the limit, and as many bytes
    again as Python values. The largest row group, the one with the cell over the limit, is the
    unit the bound counts."""
    cells = [bytes(LIMIT // 2)] * 32 + [bytes(2 * LIMIT)]
    table = pa.table({"id": [f"r{i}" for i in range(len(cells))], "image": pa.array(cells, pa.binary())})
    path = tmp_path / "m.parquet"
    pq.write_table(table, path, compression="zstd", row_group_size=2)
    del table, cells
    found = read_in_child(path)
    assert found["records"] == sorted(f"r{i}" for i in range(32))
    assert found["errors"] == [["cell_too_large", "r32", f"{path}:33"]]
    assert found["growth"] < bound(2 * LIMIT)


def test_a_small_tar_gz_of_large_members_is_not_held_whole(tmp_path: Path) -> None:
    """Forty members of zeros, each under the limit, in a shard of under 1% of their size: records
    that carried them through a shuffle would all be held at once, each in several copies."""
    path = tmp_path / "bomb.tar.gz"
    size = LIMIT * 5 // 8
    with tarfile.open(path, "w:gz") as archive:
        for index in range(40):
            info = tarfile.TarInfo(f"{index:04d}.jpg")
            info.size = size
            archive.addfile(info, io.BytesIO(bytes(size)))
    assert path.stat().st_size < 40 * size // 100
    found = read_in_child(path)
    assert found["records"] == [f"{index:04d}" for index in range(40)]
    assert found["errors"] == []
    assert found["growth"] < bound()
