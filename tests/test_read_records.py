"""Tests for mmfeatures.transforms.ReadRecords in a real Beam pipeline, plus the count helpers."""

import gzip
import os
import re
from pathlib import Path
from typing import Any

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.pvalue import TaggedOutput
from apache_beam.testing.util import assert_that, equal_to

from mmfeatures.content import SERVED_TAG, SHARES_TAG
from mmfeatures.counts import COUNTS_TAG, ModalityCounts, RunCounts, sum_counts
from mmfeatures.errors import ERRORS_TAG, Stage
from mmfeatures.reading import (
    _READ_TAG,
    _REPLACING_TAG,
    KEPT_TAG,
    ReadRecords,
    _holds,
    _Positions,
    _ReadAgain,
    fingerprint,
)
from mmfeatures.records import Record
from mmfeatures.sources import Input, Part, ReadOptions, find_inputs
from tests.tar_shards import Member, build_tar


def write_manifests(tmp_path):
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text(
        '{"id": "j1", "image": "img/1.png", "label": 3}\n'  # 1
        '{"id": "dup", "text": "from jsonl", "score": 1}\n'  # 2: first "dup" (file order wins
        #    over its later row) -> kept
        "\n"  # 3: blank, not a row
        "{not json\n"  # 4: malformed_json
        '{"id": "j2"}\n'  # 5: no_modality
        '{"id": "j3", "text": "x"}\n'  # 6: "j3" twice in the same file
        '{"id": "j3", "text": "y"}\n'  # 7: duplicate of line 6
        '{"id": 4.5, "text": "z"}\n'  # 8: wrong_type
        '{"id": "j4", "text": "ok", "image": 7}\n'  # 9: image wrong_type, text kept
        '{"id": "j4", "text": "again", "audio": 7}\n'  # 10: duplicate: its audio never counts
    )
    csv = tmp_path / "b.csv"
    csv.write_text(
        "id,text,audio,split\n"  # 1: header
        "dup,from csv,,test\n"  # 2: duplicate of a.jsonl:2
        "c1,,sound/1.wav,train\n"  # 3
        "c2,a,b,c,d\n"  # 4: malformed_csv
        ",orphan text,,\n"  # 5: missing_id
    )
    return str(jsonl), str(csv)


def test_read_records(tmp_path):
    jsonl, csv = write_manifests(tmp_path)
    with beam.Pipeline(runner="FnApiRunner") as p:
        out = p | ReadRecords(find_inputs([jsonl, csv]))
        summaries = out["records"] | "Summarise" >> beam.Map(
            lambda r: (
                r.id,
                r.source,
                r.payload("text"),
                r.payload("image"),
                r.payload("audio"),
                r.label,
                r.split,
                dict(r.carried),
                r.manifest_dir,
            )
        )
        assert_that(
            summaries,
            equal_to(
                [
                    ("dup", f"{jsonl}:2", "from jsonl", None, None, None, None, {"score": 1}, str(tmp_path)),
                    ("j1", f"{jsonl}:1", None, "img/1.png", None, "3", None, {}, str(tmp_path)),
                    ("j3", f"{jsonl}:6", "x", None, None, None, None, {}, str(tmp_path)),
                    ("j4", f"{jsonl}:9", "ok", None, None, None, None, {}, str(tmp_path)),
                    ("c1", f"{csv}:3", None, None, "sound/1.wav", None, "train", {}, str(tmp_path)),
                ]
            ),
            label="Records",
        )
        errors = out[ERRORS_TAG] | "ErrorKeys" >> beam.Map(
            lambda e: (e["id"], e["modality"], e["stage"], e["error_type"], e["source"])
        )
        assert_that(
            errors,
            equal_to(
                [
                    (None, None, Stage.READ, "malformed_json", f"{jsonl}:4"),
                    ("j2", None, Stage.VALIDATE, "no_modality", f"{jsonl}:5"),
                    ("4.5", None, Stage.VALIDATE, "wrong_type", f"{jsonl}:8"),
                    ("j3", None, Stage.VALIDATE, "duplicate_id", f"{jsonl}:7"),
                    ("j4", "image", Stage.VALIDATE, "wrong_type", f"{jsonl}:9"),
                    ("j4", None, Stage.VALIDATE, "duplicate_id", f"{jsonl}:10"),
                    ("dup", None, Stage.VALIDATE, "duplicate_id", f"{csv}:2"),
                    (None, None, Stage.READ, "malformed_csv", f"{csv}:4"),
                    (None, None, Stage.VALIDATE, "missing_id", f"{csv}:5"),
                ]
            ),
            label="Errors",
        )
        assert_that(
            out[ERRORS_TAG]
            | "Messages" >> beam.Filter(lambda e: e["error_type"] == "duplicate_id")
            | "Message" >> beam.Map(lambda e: e["message"]),
            equal_to(
                [
                    f"id 'j3' first appears at {jsonl}:6",
                    f"id 'j4' first appears at {jsonl}:9",
                    f"id 'dup' first appears at {jsonl}:2",
                ]
            ),
            label="DuplicateMessages",
        )
        # 9 non-blank lines in a.jsonl, 4 data rows in b.csv
        assert_that(out[COUNTS_TAG], equal_to([RunCounts(rows_read=9), RunCounts(rows_read=4)]), label="RowsRead")


def test_read_records_file_order_decides_duplicates(tmp_path):
    """The same two files in the other order: now the CSV row is the first "dup"."""
    jsonl, csv = write_manifests(tmp_path)
    with beam.Pipeline(runner="FnApiRunner") as p:
        out = p | ReadRecords(find_inputs([csv, jsonl]))
        kept = (
            out["records"]
            | "Dup" >> beam.Filter(lambda r: r.id == "dup")
            | "Source" >> beam.Map(lambda r: (r.source, r.payload("text")))
        )
        assert_that(kept, equal_to([(f"{csv}:2", "from csv")]), label="Kept")
        dropped = (
            out[ERRORS_TAG]
            | "DupErrors" >> beam.Filter(lambda e: e["id"] == "dup")
            | "ErrorSource" >> beam.Map(lambda e: (e["error_type"], e["source"]))
        )
        assert_that(dropped, equal_to([("duplicate_id", f"{jsonl}:2")]), label="Dropped")
        assert_that(out[COUNTS_TAG], equal_to([RunCounts(rows_read=9), RunCounts(rows_read=4)]), label="RowsRead")


def test_sum_counts():
    assert sum_counts([]) == RunCounts()
    parts = [
        RunCounts(rows_read=1, modalities={"text": ModalityCounts(present=1, embedded=1)}),
        RunCounts(rows_read=3, errors_by_type={"read/x": 1}),
        RunCounts(modalities={"text": ModalityCounts(present=1, failed=1)}, errors_by_type={"read/x": 2}),
    ]
    assert sum_counts(parts) == RunCounts(
        rows_read=4,
        modalities={"text": ModalityCounts(present=2, embedded=1, failed=1)},
        errors_by_type={"read/x": 3},
    )
    assert parts[0] == RunCounts(rows_read=1, modalities={"text": ModalityCounts(present=1, embedded=1)})


def test_error_counts():
    read: dict[str, object] = {
        "id": None,
        "modality": None,
        "stage": "read",
        "error_type": "malformed_json",
        "message": "m",
        "source": "s",
    }
    validate = dict(read, stage="validate", error_type="missing_id")
    fetch = dict(read, id="x", modality="image", stage="fetch", error_type="missing_file")
    one_modality = dict(read, id="x", modality="image", stage="validate", error_type="wrong_type")
    of_error = RunCounts.of_error
    assert of_error(read) == RunCounts(error_rows=1, rejected_rows=1, errors_by_type={"read/malformed_json": 1})
    assert of_error(validate) == RunCounts(error_rows=1, rejected_rows=1, errors_by_type={"validate/missing_id": 1})
    assert of_error(one_modality) == RunCounts(error_rows=1, rejected_rows=0, errors_by_type={"validate/wrong_type": 1})
    assert of_error(fetch) == RunCounts(error_rows=1, rejected_rows=0, errors_by_type={"fetch/missing_file": 1})
    assert sum_counts(map(of_error, [read, fetch, fetch, validate])) == RunCounts(
        error_rows=4,
        rejected_rows=2,
        errors_by_type={"read/malformed_json": 1, "fetch/missing_file": 2, "validate/missing_id": 1},
    )


def test_a_file_that_lacks_a_mapped_column_is_one_error_row(tmp_path):
    """``--columns label=topic`` on a CSV without "topic": every row would have a null label
    nobody asked for, so the file is one error row instead; a file that has it is read."""
    (tmp_path / "without.csv").write_text("id,sentence\na,one\nb,two\n")
    (tmp_path / "with.csv").write_text("id,sentence,topic\nc,three,sport\n")
    inputs = find_inputs([str(tmp_path / "without.csv"), str(tmp_path / "with.csv")])
    options = ReadOptions(columns={"text": "sentence", "label": "topic"})
    with beam.Pipeline(runner="FnApiRunner") as p:
        out = p | ReadRecords(inputs, options)
        kept = out["records"] | "Kept" >> beam.Map(lambda r: (r.id, r.payload("text"), r.label))
        assert_that(kept, equal_to([("c", "three", "sport")]), label="Kept")
        errors = out[ERRORS_TAG] | "Errors" >> beam.Map(lambda e: (e["id"], e["error_type"], e["source"]))
        assert_that(errors, equal_to([(None, "unmapped_column", str(tmp_path / "without.csv"))]), label="Errors")
        read = out[COUNTS_TAG] | "Read" >> beam.Map(lambda c: c.rows_read)
        assert_that(read, equal_to([1, 1]), label="RowsRead")  # the file's error row stands for it


def test_records_with_media_bytes_are_read_again_after_the_duplicates_are_settled(tmp_path):
    """Tar members reach the records of the second pass, for the records that won only; a kept
    record's rejected modality is one error row, a duplicate's none."""
    first, second = tmp_path / "a.tar", tmp_path / "b.tar.gz"
    first.write_bytes(build_tar([Member("s1.jpg", b"one"), Member("s1.txt", b"words"), Member("s2.wav", b"w" * 50)]))
    second.write_bytes(
        build_tar([Member("s1.jpg", b"other"), Member("s1.wav", b"w" * 50), Member("s3.txt", b"more")], "gz")
    )
    with beam.Pipeline(runner="FnApiRunner") as p:
        out = p | ReadRecords(find_inputs([str(first), str(second)]), ReadOptions(max_member_bytes=10))
        kept = out["records"] | "Kept" >> beam.Map(lambda r: (r.id, dict(r.payloads), r.source))
        assert_that(
            kept,
            equal_to(
                [
                    ("s1", {"image": b"one", "text": b"words"}, f"{first}:s1"),
                    ("s2", {}, f"{first}:s2"),
                    ("s3", {"text": b"more"}, f"{second}:s3"),
                ]
            ),
            label="Kept",
        )
        errors = out[ERRORS_TAG] | "Errors" >> beam.Map(
            lambda e: (e["id"], e["modality"], e["error_type"], e["source"])
        )
        assert_that(
            errors,
            equal_to(
                [
                    ("s2", "audio", "file_too_large", f"{first}:s2"),
                    ("s1", None, "duplicate_id", f"{second}:s1"),
                ]
            ),
            label="Errors",
        )
        assert_that(out[COUNTS_TAG], equal_to([RunCounts(rows_read=2), RunCounts(rows_read=2)]), label="RowsRead")


def _positions(*positions: int) -> np.ndarray:
    combine = _Positions()
    bits = combine.create_accumulator()
    for position in positions:
        bits = combine.add_input(bits, position)
    return bits


def test_positions_merge_as_one_bitmap() -> None:
    combine = _Positions()
    merged = combine.merge_accumulators([_positions(3, 700), _positions(), _positions(9, 3)])
    assert [p for p in range(800) if _holds([merged], p)] == [3, 9, 700]
    assert not _holds([], 3) and merged.nbytes < 200


def test_a_file_that_changed_between_the_two_passes_is_an_error_row(tmp_path):
    """A file rewritten while the job ran: the records the second pass no longer finds are never
    silently missing, and where the file is not what the first pass read, none of its records is
    sent, since its places no longer say which are duplicates."""
    path = tmp_path / "m.jsonl"
    path.write_text('{"id": "a", "text": "t"}\n{"id": "b", "text": "t"}\n')
    source = Input(str(path), "jsonl")
    first = fingerprint(source)
    part = Part(source)
    read_again = _ReadAgain(ReadOptions())
    # The third record was to embed its text for record "c" of another input too.
    shares = [(2, "text", (("c", "other.jsonl:1"),))]

    def second_pass(records: int) -> list:
        parts: dict[str, list[Any]] = {
            _READ_TAG: [(part, records, first)],
            "dropped": [_positions(1)],
            KEPT_TAG: [],
            _REPLACING_TAG: [],
        }
        return list(read_again.process(((0, 0), {**parts, SHARES_TAG: shares, SERVED_TAG: []})))

    out = second_pass(3)
    assert [item.id for item in out if isinstance(item, Record)] == ["a"]
    error, copy = [item.value for item in out if isinstance(item, TaggedOutput)]
    assert (error["id"], error["error_type"], error["source"]) == (None, "input_changed", str(path))
    assert "2 records were to be sent, not 1" in error["message"]
    assert (copy["id"], copy["modality"], copy["error_type"], copy["source"]) == (
        "c",
        "text",
        "input_changed",
        "other.jsonl:1",
    )

    path.write_text('{"id": "b", "text": "t"}\n{"id": "a", "text": "t"}\n')  # as many records, moved
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    error, copy = [item.value for item in second_pass(2)]
    assert error["error_type"] == "input_changed" and "none of its 2 records is sent" in error["message"]
    assert copy["id"] == "c"


def _write_every_kind(tmp_path: Path, limit: int) -> list[str]:
    """One input of each kind, each with the errors it can have: bad lines, ids of other types
    than strings, cells and members over ``limit``, hostile members, damage at the end."""
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_bytes(
        b'{"id": "a", "text": "t"}\n'
        b"{not json\n"
        b'{"id": "\xff"}\n'
        b'{"id": "long", "text": "' + b"x" * limit + b'"}\n'
        b'{"id": 4.5, "text": "t"}\n'
        b'{"id": {"k": 1}, "text": "t"}\n'
        b'{"id": true, "text": "t"}\n'
        b'{"id": null, "text": "t"}\n'
        b'{"id": "a", "text": "again"}\n'
        b'{"id": "n"}\n'
        b'{"id": "i", "text": "t", "image": 7}\n'
    )
    damaged_gz = tmp_path / "d.jsonl.gz"
    lines = b"".join(b'{"id": "g%d", "text": "%s"}\n' % (i, b"y" * 50) for i in range(200))
    damaged_gz.write_bytes(gzip.compress(lines)[:100])
    csv = tmp_path / "m.csv"
    csv.write_text("id,text\nc1,t\nc2,t,extra\nc3," + "x" * limit + "\n,t\n")
    times = tmp_path / "times.parquet"
    pq.write_table(pa.table({"id": pa.array([0, 10**15], pa.timestamp("s")), "text": ["t", "t"]}), times)
    cells = tmp_path / "cells.parquet"
    odd = pa.array([0, 10**15, 0], pa.timestamp("s"))
    pq.write_table(pa.table({"id": ["p1", "p2", "p3"], "text": ["t", "t", "x" * 2 * limit], "when": odd}), cells)
    arrow = tmp_path / "m.arrow"
    table = pa.table({"id": ["r1", "r2", "r3"], "image": [b"i", b"i" * 2 * limit, b"i"]})
    with pa.ipc.new_stream(str(arrow), table.schema) as writer:
        writer.write_table(table, max_chunksize=1)
    arrow.write_bytes(arrow.read_bytes()[:-20])
    shard = tmp_path / "s.tar.gz"
    members = [
        Member("t1.txt", b"t"),
        Member("t1.npy", b"n"),
        Member("../t2.txt", b"t"),
        Member("t3.jpg", b"j" * 2 * limit),
        Member("t3.txt", b"t"),
        Member("t4.txt", b"t" * 1000),
    ]
    whole = build_tar(members)
    shard.write_bytes(gzip.compress(whole[: whole.index(b"t" * 1000) + 500]))  # cut within the last member
    folder = tmp_path / "media"
    folder.mkdir()
    (folder / "k.txt").write_text("t")
    (folder / "k.xyz").write_text("?")
    return [str(path) for path in (jsonl, damaged_gz, csv, times, cells, arrow, shard, folder)]


def test_every_error_row_names_its_record_or_its_place(tmp_path):
    """An error row of a record carries the record's id, as text whatever its type; a row with no
    record behind it names its file and the line, row, member or offset where it was."""
    inputs = _write_every_kind(tmp_path, 100)
    with beam.Pipeline(runner="FnApiRunner") as p:
        out = p | ReadRecords(find_inputs(inputs), ReadOptions(max_member_bytes=100))
        errors = out[ERRORS_TAG] | "Errors" >> beam.Map(lambda e: (e["id"], e["error_type"], e["source"]))

        def check(found: list[tuple[str | None, str, str]]) -> None:
            places = [re.compile(re.escape(path.rstrip("/")) + r"(:.+|@\d+)") for path in inputs]
            unnamed = [error for error in found if error[0] is None and not any(p.fullmatch(error[2]) for p in places)]
            assert unnamed == []
            assert {error_type for _, error_type, _ in found} >= {
                "malformed_json",
                "invalid_utf8",
                "line_too_long",
                "wrong_type",
                "missing_id",
                "duplicate_id",
                "no_modality",
                "malformed_csv",
                "malformed_row",
                "cell_too_large",
                "unreadable_manifest",
                "unsupported_member",
                "unsafe_tar_member",
                "file_too_large",
            }
            ids = {error[0] for error in found}
            assert {"4.5", "{'k': 1}", "True", "1970-01-01 00:00:00", "p2", "r2", "t3", "k"} <= ids
            assert any("1000000000000000" in (found_id or "") for found_id in ids)  # a timestamp Python cannot hold

        assert_that(errors, check)
