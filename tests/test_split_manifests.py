"""A large JSONL, CSV or Parquet manifest is read in parts, by several workers, and gives exactly the
records, sources, ids and error rows of a read of the whole file."""

from __future__ import annotations

import csv
import dataclasses
import gzip
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.metrics.metric import MetricsFilter
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mmfeatures.counts import COUNTS_TAG
from mmfeatures.errors import ERRORS_TAG, ErrorRow
from mmfeatures.reading import ReadRecords
from mmfeatures.sources import Input, ReadOptions, cut_input, find_inputs, read_manifest, read_part

LIMIT = 300  # --max-bytes


def _write_jsonl(path: Path) -> bytes:
    """A few thousand lines: records with and without ids (those take ids from their line
    numbers), blank lines, malformed lines, lines over ``LIMIT``, ids repeated far apart, a
    byte-order mark and no line break at the end."""
    lines = []
    for number in range(1, 3001):
        if number % 97 == 0:
            lines.append("")
        elif number % 211 == 0:
            lines.append("{not json")
        elif number % 307 == 0:
            lines.append(json.dumps({"id": f"long{number}", "text": "x" * 2 * LIMIT}))
        elif number % 5 == 0:
            lines.append(json.dumps({"text": f"no id on line {number}"}))
        else:
            lines.append(json.dumps({"id": f"r{number % 1400}", "text": f"line {number}", "n": number}))
    data = ("\ufeff" + "\n".join(lines)).encode()
    path.write_bytes(data)
    return data


def _read(paths: list[str], options: ReadOptions, out: Path) -> tuple[dict[str, Any], int]:
    """What ``ReadRecords`` sends on (records, error rows, rows read in all), and how many parts it read."""

    def dump(items: list[Any], name: str) -> None:
        (out / name).write_text(json.dumps(sorted(items, key=json.dumps)))

    out.mkdir()
    p = beam.Pipeline(runner="FnApiRunner")
    read = p | ReadRecords(find_inputs(paths), options)
    summaries = {
        "records": read["records"]
        | "Records" >> beam.Map(lambda r: [r.id, r.source, r.payload("text"), sorted(r.carried.items())]),
        "errors": read[ERRORS_TAG]
        | "Errors"
        >> beam.Map(lambda e: [e["id"], e["modality"], e["stage"], e["error_type"], e["source"], e["message"]]),
        "rows": read[COUNTS_TAG] | "Rows" >> beam.Map(lambda c: c.rows_read),
    }
    for name, items in summaries.items():
        _ = items | f"Gather{name}" >> beam.combiners.ToList() | f"Dump{name}" >> beam.Map(dump, name)
    result = p.run()
    result.wait_until_finish()
    (parts,) = result.metrics().query(MetricsFilter().with_name("parts_read"))["counters"]
    found = {name: json.loads((out / name).read_text()) for name in summaries}
    return {**found, "rows": sum(found["rows"])}, parts.committed  # counted per part


def _same_rows(source: Input, options: ReadOptions) -> None:
    """The rows of ``source``'s parts, one after the other, are those of the whole file."""
    whole = list(read_manifest(source.path, options))
    parts = cut_input(source, options)
    assert len(parts) > 1
    assert [row for part in parts for row in read_part(part, options)] == whole


def test_jsonl_parts_cover_every_byte_once_and_start_on_a_line(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    data = _write_jsonl(path)
    for part_bytes in (1, 1000, 4096, len(data) // 2):
        parts = cut_input(Input(str(path), "jsonl"), ReadOptions(part_bytes=part_bytes))
        assert [part.index for part in parts] == list(range(len(parts)))
        assert parts[0].start == 0 and parts[-1].stop == len(data)
        for part, after in zip(parts, parts[1:], strict=False):
            assert part.stop == after.start and part.stop is not None and part.stop - part.start >= part_bytes
            assert data[after.start - 1 : after.start] == b"\n"
        assert all(part.first == data[: part.start].count(b"\n") + 1 for part in parts)
    # A file that ends with a line break has no empty part after it.
    path.write_bytes(b'{"id": "a"}\n' * 10)
    assert [
        (part.start, part.stop, part.first) for part in cut_input(Input(str(path), "jsonl"), ReadOptions(part_bytes=60))
    ] == [
        (0, 60, 1),
        (60, 120, 6),
    ]


def test_the_parts_of_a_jsonl_file_read_as_the_whole_file(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    _write_jsonl(path)
    for part_bytes in (1, 1000, 50_000):
        _same_rows(Input(str(path), "jsonl"), ReadOptions(max_member_bytes=LIMIT, part_bytes=part_bytes))


def test_gzip_arrow_and_small_files_are_one_part(tmp_path: Path) -> None:
    """A gzip stream cannot be read from its middle."""
    (tmp_path / "m.csv.gz").write_bytes(gzip.compress(b'id,text\na,"two\nlines"\n' * 100))
    (tmp_path / "m.jsonl.gz").write_bytes(gzip.compress(b'{"id": "a"}\n' * 1000))
    table = pa.table({"id": [f"r{i}" for i in range(1000)]})
    with pa.ipc.new_file(tmp_path / "m.arrow", table.schema) as writer:
        for batch in table.to_batches(max_chunksize=10):
            writer.write_batch(batch)
    pq.write_table(pa.table({"id": ["a", "b"]}), tmp_path / "small.parquet", row_group_size=1)
    (tmp_path / "small.jsonl").write_text('{"id": "a"}\n{"id": "b"}\n')
    cases = [("m.csv.gz", 1), ("m.jsonl.gz", 1), ("m.arrow", 1), ("small.parquet", 2**20), ("small.jsonl", 2**20)]
    for name, part_bytes in cases:
        source = Input(str(tmp_path / name), name.split(".")[1])
        (part,) = cut_input(source, ReadOptions(part_bytes=part_bytes))
        assert (part.index, part.start, part.stop, part.first) == (0, 0, None, 1)


def test_a_split_jsonl_file_gives_the_records_and_error_rows_of_the_whole_file(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    data = _write_jsonl(path)
    other = tmp_path / "other.jsonl"  # an input after it: its "r1" is a duplicate, its ids' first use
    other.write_text('{"id": "r1", "text": "again"}\n{"id": "o1", "text": "other"}\n')
    paths = [str(path), str(other)]
    whole, whole_parts = _read(paths, ReadOptions(max_member_bytes=LIMIT), tmp_path / "whole")
    split, split_parts = _read(
        paths, ReadOptions(max_member_bytes=LIMIT, part_bytes=len(data) // 7), tmp_path / "split"
    )
    assert (whole_parts, split_parts) == (2, 8)
    assert split == whole
    error_types = {error[3] for error in whole["errors"]}
    assert error_types == {"malformed_json", "line_too_long", "duplicate_id"}
    # "r1" is first on line 1 of m.jsonl: later lines, in other parts and the other input, are duplicates.
    assert [r for r in whole["records"] if r[0] == "r1"][0][1] == f"{path}:1"
    duplicates = sorted(error[4] for error in whole["errors"] if error[0] == "r1")
    assert duplicates == sorted([f"{path}:1401", f"{path}:2801", f"{other}:1"])
    # A record without an id takes its line's number: line 2995 is in the last part.
    assert [r[0] for r in whole["records"] if r[1] == f"{path}:2995"] == ["m.jsonl:2995"]


def _write_csv(path: Path, delimiter: str = ",") -> bytes:
    """A few thousand rows ending in "\\r\\n" after a byte-order mark: quoted fields holding line
    breaks ("\\n", "\\r\\n", a lone "\\r") and doubled quotes, stray quotes inside unquoted fields
    (``5" screen``, which the reader keeps as they are), rows with empty ids (error rows that name
    the line they end on), blank lines, rows with a field too many, rows over ``LIMIT``, ids
    repeated far apart, and no line break at the end."""
    rows = ["id,text,n"]
    for number in range(1, 2501):
        record_id = "" if number % 5 == 0 else f"c{number % 1100}"
        if number % 97 == 0:
            rows.append("")
        elif number % 211 == 0:
            rows.append(f"c{number},one,field,too many")
        elif number % 307 == 0:
            rows.append(f'{record_id},"{"x" * 2 * LIMIT} ""long"""')
        elif number % 401 == 0:
            rows.append(f'{record_id},5" screen,{number}')
        elif number % 3 == 0:
            rows.append(f'{record_id},"row {number}\nits ""second""\r\nline\rand more",{number}')
        else:
            rows.append(f'{record_id},"row {number}, ""quoted""",{number}')
    data = ("\ufeff" + "\r\n".join(rows).replace(",", delimiter)).encode()
    path.write_bytes(data)
    return data


def _row_ends(data: bytes) -> dict[int, int]:
    """Where Python's csv reader ends each row of UTF-8 ``data`` read whole, in bytes, and the
    lines read by then."""
    ends: dict[int, int] = {}
    offset = lines = 0

    def each_line() -> Iterator[str]:
        nonlocal offset, lines
        for line in io.StringIO(data.decode(), newline=""):
            offset, lines = offset + len(line.encode()), lines + 1
            yield line

    for _ in csv.reader(each_line()):
        ends[offset] = lines
    return ends


def test_csv_parts_cover_every_byte_once_and_start_on_a_row(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    data = _write_csv(path)
    ends = _row_ends(data)
    for part_bytes in (1, 1000, 4096, len(data) // 2):
        parts = cut_input(Input(str(path), "csv"), ReadOptions(part_bytes=part_bytes))
        assert len(parts) > 1 and [part.index for part in parts] == list(range(len(parts)))
        assert parts[0].start == 0 and parts[-1].stop == len(data)
        for part, after in zip(parts, parts[1:], strict=False):
            assert part.stop == after.start and part.stop is not None and part.stop - part.start >= part_bytes
            assert after.first == ends[after.start] + 1


def test_the_parts_of_a_csv_file_read_as_the_whole_file(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    _write_csv(path)
    for part_bytes in (1, 1000, 50_000):
        _same_rows(Input(str(path), "csv"), ReadOptions(max_member_bytes=LIMIT, part_bytes=part_bytes))


def test_a_split_csv_file_gives_the_records_and_error_rows_of_the_whole_file(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    data = _write_csv(path)
    whole, whole_parts = _read([str(path)], ReadOptions(max_member_bytes=LIMIT), tmp_path / "whole")
    split, split_parts = _read(
        [str(path)], ReadOptions(max_member_bytes=LIMIT, part_bytes=len(data) // 7), tmp_path / "split"
    )
    assert (whole_parts, split_parts) == (1, 7)
    assert split == whole
    assert {error[3] for error in whole["errors"]} == {"malformed_csv", "line_too_long", "duplicate_id", "missing_id"}
    # A row's source is the line it ends on: row 3 spans lines 4 to 7 (the header is line 1).
    assert [r[2] for r in whole["records"] if r[1] == f"{path}:7"] == ['row 3\nits "second"\r\nline\rand more']
    assert [r[2] for r in whole["records"] if r[0] == "c401"] == ['5" screen']
    # A row with an empty id is an error row that names the line it ends on: the last, in the last part.
    last = len(data.decode("utf-8-sig").splitlines())
    assert [error[3] for error in whole["errors"] if error[4] == f"{path}:{last}"] == ["missing_id"]


def test_a_csv_file_with_another_delimiter_or_encoding_is_cut_as_it_is_read(tmp_path: Path) -> None:
    """The delimiter, sniffed or given, and the encoding are those of the file's start in every part."""
    path = tmp_path / "m.csv"
    _write_csv(path, ";")
    for delimiter in (None, ";"):
        _same_rows(
            Input(str(path), "csv"), ReadOptions(max_member_bytes=LIMIT, csv_delimiter=delimiter, part_bytes=1000)
        )
    path.write_bytes("id;text\r\n".encode("cp1252") + 'é1;"café\r\nau lait"\r\n'.encode("cp1252") * 200)
    _same_rows(Input(str(path), "csv"), ReadOptions(csv_encoding="cp1252", part_bytes=100))


def _field_over_csv_limit() -> str:
    """A quoted field over ``csv.field_size_limit()``: the reader raises on its first line and goes
    on with the next one, in the middle of the field, as with a row of its own."""
    return 'a,"' + "x" * (csv.field_size_limit() + 1) + '\n"more,b\nc,d\n'


# Files whose parts must read as the whole file: (bytes, options, the error types of a whole read).
_TRICKY_CSVS: dict[str, tuple[bytes, ReadOptions, set[str]]] = {
    "quoted line breaks and doubled quotes, CRLF, BOM": (
        ("\ufeffid,text,n\r\n" + 'a,"two\nlines, ""quoted""",1\r\nb,"crlf\r\nin it",2\r\nc,"lone\rcr",3\r\n' * 6)
        .rstrip("\r\n")
        .encode(),
        ReadOptions(),
        set(),
    ),
    "stray quotes in unquoted fields": (
        ('id,text\na,5" screen\nb,"multi\nline"\nc,a"b"c\nd,"ab"cd\ne,"x""y" z\nf,3"\n' * 6).encode(),
        ReadOptions(),
        set(),
    ),
    "LF, CRLF and a lone CR ending rows, no line break at the end": (
        ("id,text\r\n" + 'a,1\nb,"2\r\n2"\r\nc,3\rd,4\r\n' * 6 + 'e,"last\nrow"').encode(),
        ReadOptions(),
        set(),
    ),
    "a sniffed semicolon": (
        ("id;text;n\n" + 'a;"x;y";1\nb;"multi\nline; here";2\n' * 6).encode(),
        ReadOptions(),
        set(),
    ),
    "a tab given": (
        ("id\ttext\n" + 'a\t"x\ty"\nb\t"multi\nline"\n' * 6).encode(),
        ReadOptions(csv_delimiter="\t"),
        set(),
    ),
    "latin-1": (
        ("id,text\r\n" + 'é1,"café\r\nau lait"\r\nß2,"ÿ\x80\x9f"\r\n' * 6).encode("latin-1"),
        ReadOptions(csv_encoding="latin-1"),
        set(),
    ),
    "cp1252 with a byte it does not have": (
        b"id,text\r\n" + b'a,"caf\xe9\r\nx"\r\nb,bad \x81 byte\r\n' * 6,
        ReadOptions(csv_encoding="cp1252"),
        {"invalid_utf8"},
    ),
    "bytes that are not UTF-8": (
        b"id,text\n" + b'a,"ok\nok"\nb,bad \xff byte\nc,"\xe2\x82"\n' * 6,
        ReadOptions(),
        {"invalid_utf8"},
    ),
    "blank lines and blank rows": (
        ("id,text,n\n\n" + 'a,"x\n\ny",1\n\n,,\n \nb,y,2\n' * 6).encode(),
        ReadOptions(),
        {"malformed_csv"},
    ),
    "field counts that do not match, a NUL byte": (
        ("id,text\n" + 'a,b,c\nb,"nul\x00 byte"\nc\n,x\n' * 6).encode(),
        ReadOptions(),
        {"malformed_csv"},
    ),
    "a field over the csv module's limit": (
        ("id,text\n" + _field_over_csv_limit() * 3).encode(),
        ReadOptions(),
        {"malformed_csv"},
    ),
    "a line over --max-bytes inside a quoted field": (
        ("id,text\n" + ('a,"short\n' + "y" * 30 + '\n",after\nc,d\n') * 6).encode(),
        ReadOptions(max_member_bytes=20),
        {"line_too_long", "malformed_csv"},
    ),
    "a quote never closed": (
        ("id,text\n" + "a,b\n" * 20 + 'z,"never closed\nmore\nlines').encode(),
        ReadOptions(),
        set(),
    ),
    "UTF-16-LE": (
        ("id,text\r\n" + 'a,"two\r\nlines ü"\r\n' * 6).encode("utf-16-le"),
        ReadOptions(csv_encoding="utf-16-le"),
        set(),
    ),
    "UTF-7": (
        ("id,text\r\n" + 'a,"zwei\r\nZeilen ü"\r\n' * 6).encode("utf-7"),
        ReadOptions(csv_encoding="utf-7"),
        set(),
    ),
}


@pytest.mark.parametrize("name", list(_TRICKY_CSVS))
def test_a_tricky_csv_file_reads_in_parts_as_whole(tmp_path: Path, name: str) -> None:
    data, options, error_types = _TRICKY_CSVS[name]
    path = tmp_path / "m.csv"
    path.write_bytes(data)
    whole = list(read_manifest(str(path), options))
    assert {row.error_type for row in whole if isinstance(row, ErrorRow)} == error_types
    for part_bytes in (1, 7, 50):
        _same_rows(Input(str(path), "csv"), dataclasses.replace(options, part_bytes=part_bytes))


def test_split_tricky_csv_files_give_the_records_and_error_rows_of_whole_ones(tmp_path: Path) -> None:
    """Ids taken from the rows' lines, duplicates across parts and files: those read with the
    default options, in one run."""
    paths = []
    for number, (data, options, _) in enumerate(_TRICKY_CSVS.values()):
        if options == ReadOptions():
            paths.append(str(tmp_path / f"m{number}.csv"))
            Path(paths[-1]).write_bytes(data)
    whole, whole_parts = _read(paths, ReadOptions(), tmp_path / "whole")
    split, split_parts = _read(paths, ReadOptions(part_bytes=7), tmp_path / "split")
    assert whole_parts == len(paths) < split_parts
    assert split == whole
    assert {"duplicate_id", "missing_id", "malformed_csv"} <= {error[3] for error in whole["errors"]}


def test_a_csv_file_that_cannot_be_cut_at_its_rows_is_one_part(tmp_path: Path) -> None:
    """An encoding whose fresh decoder has a state of its own (UTF-16 and UTF-32 with their
    byte-order marks, ISO-2022), a header a whole read stops at, and rows that all end in a lone
    "\\r", which the text stream holds back."""
    rows = "id,text\r\n" + 'a,"two\r\nlines"\r\n' * 50
    cases = [
        (rows.encode("utf-16"), ReadOptions(csv_encoding="utf-16")),
        (rows.encode("utf-32"), ReadOptions(csv_encoding="utf-32")),
        (rows.encode("iso2022_jp"), ReadOptions(csv_encoding="iso2022_jp")),
        (b"id,t\xe9xt\r\n" + b"a,b\r\n" * 50, ReadOptions()),  # not UTF-8: one error row
        (b"id,text," + b"x" * 50 + b"\r\n" + b"a,b\r\n" * 50, ReadOptions(max_member_bytes=20)),
        (rows.replace("\r\n", "\r").encode(), ReadOptions()),
    ]
    path = tmp_path / "m.csv"
    for data, options in cases:
        path.write_bytes(data)
        (part,) = cut_input(Input(str(path), "csv"), dataclasses.replace(options, part_bytes=1))
        assert (part.index, part.start, part.stop, part.first) == (0, 0, None, 1)
        assert list(read_part(part, options)) == list(read_manifest(str(path), options))


_CSV_FIELDS = st.text(st.sampled_from('ab,;"\r\n é\x00'), max_size=8)


@st.composite
def _csv_files(draw: st.DrawFn) -> bytes:
    """A header, then rows of fields quoted as a writer quotes them or written as they are (stray
    quotes, delimiters and line breaks in them), each ended by a line break or not."""
    lines = ["\ufeffid,text\n" if draw(st.booleans()) else "id,text\n"]
    for fields in draw(st.lists(st.lists(st.tuples(st.booleans(), _CSV_FIELDS), min_size=1, max_size=3), max_size=20)):
        cells = ['"' + text.replace('"', '""') + '"' if quoted else text for quoted, text in fields]
        lines.append(",".join(cells) + draw(st.sampled_from(["\n", "\r\n", "\r", ""])))
    return "".join(lines).encode()


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=_csv_files(), part_bytes=st.integers(1, 40), limit=st.sampled_from([None, 10, 20]))
def test_any_csv_file_reads_in_parts_as_whole(tmp_path: Path, data: bytes, part_bytes: int, limit: int | None) -> None:
    path = tmp_path / "m.csv"
    path.write_bytes(data)
    options = ReadOptions(max_member_bytes=limit, part_bytes=part_bytes)
    parts = cut_input(Input(str(path), "csv"), options)
    assert parts[0].start == 0 and all(part.stop == after.start for part, after in zip(parts, parts[1:], strict=False))
    assert [row for part in parts for row in read_part(part, options)] == list(read_manifest(str(path), options))


def _write_parquet(path: Path) -> pa.Table:
    """Several row groups, with rows with null ids (error rows that name their row numbers), ids
    repeated across row groups and cells over ``LIMIT``."""
    rows = 500
    table = pa.table(
        {
            "id": [None if i % 7 == 0 else f"p{i % 230}" for i in range(rows)],
            "text": ["y" * 2 * LIMIT if i % 101 == 0 else f"row {i + 1}" for i in range(rows)],
        }
    )
    pq.write_table(table, path, row_group_size=60)
    return table


def test_the_parts_of_a_parquet_file_are_ranges_of_its_row_groups(tmp_path: Path) -> None:
    path = tmp_path / "m.parquet"
    _write_parquet(path)
    metadata = pq.ParquetFile(path).metadata
    group_bytes = metadata.row_group(0).total_byte_size
    for part_bytes in (1, 2 * group_bytes):
        parts = cut_input(Input(str(path), "parquet"), ReadOptions(part_bytes=part_bytes))
        assert parts[0].start == 0 and parts[-1].stop == metadata.num_row_groups
        assert all(part.stop == after.start for part, after in zip(parts, parts[1:], strict=False))
        rows_before = [sum(metadata.row_group(g).num_rows for g in range(part.start)) for part in parts]
        assert [part.first for part in parts] == [rows + 1 for rows in rows_before]
        _same_rows(Input(str(path), "parquet"), ReadOptions(max_member_bytes=LIMIT, part_bytes=part_bytes))
    assert len(cut_input(Input(str(path), "parquet"), ReadOptions(part_bytes=1))) == metadata.num_row_groups == 9


def test_a_split_parquet_file_gives_the_records_and_error_rows_of_the_whole_file(tmp_path: Path) -> None:
    path = tmp_path / "m.parquet"
    _write_parquet(path)
    whole, whole_parts = _read([str(path)], ReadOptions(max_member_bytes=LIMIT), tmp_path / "whole")
    split, split_parts = _read([str(path)], ReadOptions(max_member_bytes=LIMIT, part_bytes=1), tmp_path / "split")
    assert (whole_parts, split_parts) == (1, 9)
    assert split == whole
    assert {error[3] for error in whole["errors"]} == {"cell_too_large", "duplicate_id", "missing_id"}
    assert whole["rows"] == 500
