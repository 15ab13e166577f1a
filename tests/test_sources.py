"""Tests for mmfeatures.sources: JSONL, CSV (plain and gzipped) and Parquet manifests and tar
shards, from real files and memory://."""

import csv
import gzip
import json
import random
import string
import tarfile
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmfeatures.errors import ErrorRow, Stage
from mmfeatures.records import parse_record
from mmfeatures.sources import Input, ManifestRow, ReadOptions, declared_column_types, manifest_format, read_manifest
from tests.source_rows import rows_only, split
from tests.tar_shards import Member, build_tar

# -- JSONL -------------------------------------------------------------------------------------


def test_jsonl_good_lines_blank_lines_and_bad_lines(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(
        '{"id": "a", "text": "hello"}\n'  # 1
        "\n"  # 2 blank
        "   \t\n"  # 3 whitespace only
        '{"id": "b", "text": \n'  # 4 malformed JSON
        "[1, 2, 3]\n"  # 5 not an object
        '"just a string"\n'  # 6 not an object
        '{"id": "c", "image": "x.png", "extra": 7}\n'  # 7
        '{"id": "d"}'  # 8, no trailing newline
    )
    rows, errors = split(list(read_manifest(str(path))))

    assert [(r.data, r.source) for r in rows] == [
        ({"id": "a", "text": "hello"}, f"{path}:1"),
        ({"id": "c", "image": "x.png", "extra": 7}, f"{path}:7"),
        ({"id": "d"}, f"{path}:8"),
    ]
    assert [(e.source, e.error_type) for e in errors] == [
        (f"{path}:4", "malformed_json"),
        (f"{path}:5", "malformed_json"),
        (f"{path}:6", "malformed_json"),
    ]
    for error in errors:
        assert error.stage == Stage.READ
        assert error.id is None and error.modality is None
        assert error.message


def test_jsonl_order_is_file_order(tmp_path):
    path = tmp_path / "m.ndjson"
    path.write_text("".join(f'{{"id": "r{i}"}}\n' for i in range(50)))
    rows, errors = split(list(read_manifest(str(path))))
    assert errors == []
    assert [r.data["id"] for r in rows] == [f"r{i}" for i in range(50)]
    assert [r.source for r in rows] == [f"{path}:{i + 1}" for i in range(50)]


@pytest.mark.parametrize("name", ["m.jsonl", "m.jsonl.gz"])
def test_jsonl_from_memory_url(name):
    url = f"memory://sources-{uuid.uuid4().hex}/{name}"
    data = b'{"id": "a", "text": "t"}\n\nnot json\n{"id": 2}\n'
    with fsspec.open(url, "wb") as handle:
        handle.write(gzip.compress(data) if name.endswith(".gz") else data)
    rows, errors = split(list(read_manifest(url)))
    assert [(r.data, r.source) for r in rows] == [
        ({"id": "a", "text": "t"}, f"{url}:1"),
        ({"id": 2}, f"{url}:4"),
    ]
    assert [(e.source, e.error_type) for e in errors] == [(f"{url}:3", "malformed_json")]


@pytest.mark.parametrize("name", ["m.jsonl", "m.jsonl.gz", "m.csv", "m.csv.gz"])
def test_a_line_over_the_limit_is_an_error_row_and_the_next_line_is_read(tmp_path, name):
    """The limit counts a line with its line break: a line of exactly the limit is read."""
    if ".csv" in name:
        content = "id,text\na,ttt\nb," + "x" * 100 + "\nc,t\n"
        lines = ["id,text", "a,ttt"]
    else:
        content = '{"id":"a","text":"t"}\n{"id":"b","text":"' + "x" * 100 + '"}\n{"id":"c","text":"t"}\n'
        lines = ['{"id":"a","text":"t"}']
    limit = max(map(len, lines)) + 1
    path = tmp_path / name
    path.write_bytes(gzip.compress(content.encode()) if name.endswith(".gz") else content.encode())
    rows, errors = split(list(read_manifest(str(path), ReadOptions(max_member_bytes=limit))))
    assert [row.data["id"] for row in rows] == ["a", "c"]
    (error,) = errors
    line = len(lines) + 1
    assert (error.id, error.stage, error.error_type, error.source) == (
        None,
        Stage.READ,
        "line_too_long",
        f"{path}:{line}",
    )
    assert str(limit) in error.message
    assert rows[-1].source == f"{path}:{line + 1}"


def test_a_line_over_the_limit_inside_a_quoted_csv_field_loses_only_its_record(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text('id,text\na,"two\nlines"\nb,"starts\n' + "x" * 100 + '\nends"\nc,t\n')
    rows, errors = split(list(read_manifest(str(path), ReadOptions(max_member_bytes=20))))
    assert [(row.data, row.source) for row in rows] == [
        ({"id": "a", "text": "two\nlines"}, f"{path}:3"),
        ({"id": "c", "text": "t"}, f"{path}:7"),
    ]
    # the record's rest reads as a row of its own, which the header does not fit
    assert [(error.error_type, error.source) for error in errors] == [
        ("line_too_long", f"{path}:5"),
        ("malformed_csv", f"{path}:6"),
    ]


def test_a_csv_header_over_the_limit_is_one_error_row_for_the_file(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("id," + "x" * 100 + "\na,b\n")
    (error,) = read_manifest(str(path), ReadOptions(max_member_bytes=50))
    assert isinstance(error, ErrorRow) and (error.error_type, error.source) == ("line_too_long", f"{path}:1")


# -- CSV ---------------------------------------------------------------------------------------


def test_csv_empty_cells_are_none_and_bad_rows_are_errors(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text(
        "id,text,image,label\n"  # line 1: header
        "a,hello,,3\n"  # 2
        "b,,img.png,\n"  # 3
        "c,too,many,fields,here\n"  # 4
        "d,too few\n"  # 5
        '"e","quoted, comma",,x\n'  # 6
    )
    rows, errors = split(list(read_manifest(str(path))))
    assert [(r.data, r.source) for r in rows] == [
        ({"id": "a", "text": "hello", "image": None, "label": "3"}, f"{path}:2"),
        ({"id": "b", "text": None, "image": "img.png", "label": None}, f"{path}:3"),
        ({"id": "e", "text": "quoted, comma", "image": None, "label": "x"}, f"{path}:6"),
    ]
    assert [(e.source, e.error_type, e.stage) for e in errors] == [
        (f"{path}:4", "malformed_csv", Stage.READ),
        (f"{path}:5", "malformed_csv", Stage.READ),
    ]


@pytest.mark.parametrize("name", ["m.CSV", "m.csv.gz"])
def test_csv_from_memory_url(name):
    url = f"memory://sources-{uuid.uuid4().hex}/{name}"
    data = b"id,text\nx,one\ny,\n"
    with fsspec.open(url, "wb") as handle:
        handle.write(gzip.compress(data) if name.endswith(".gz") else data)
    rows, errors = split(list(read_manifest(url)))
    assert errors == []
    assert [(r.data, r.source) for r in rows] == [
        ({"id": "x", "text": "one"}, f"{url}:2"),
        ({"id": "y", "text": None}, f"{url}:3"),
    ]


def test_utf8_byte_order_mark_is_not_part_of_the_data(tmp_path):
    """Spreadsheet tools write UTF-8 CSV with a BOM; it must not rename the first column."""
    csv_path = tmp_path / "bom.csv"
    csv_path.write_bytes("\ufeffid,text\na,h\u00e9llo\n".encode("utf-8"))
    jsonl_path = tmp_path / "bom.jsonl"
    jsonl_path.write_bytes('\ufeff{"id": "a", "text": "t"}\n{"id": "b", "text": "\ufeff"}\n'.encode("utf-8"))
    assert [r.data for r in rows_only(read_manifest(str(csv_path)))] == [{"id": "a", "text": "h\u00e9llo"}]
    # only a leading BOM is dropped; the same character inside the data stays
    assert [r.data for r in rows_only(read_manifest(str(jsonl_path)))] == [
        {"id": "a", "text": "t"},
        {"id": "b", "text": "\ufeff"},
    ]


def write_csv(path: Path, rows: list[list[str]], *, encoding: str = "utf-8", mode: str = "w", **fmt: Any) -> None:
    """Rows as Python's csv module writes them (a spreadsheet's "\\r\\n", quotes where needed)."""
    with open(path, mode, encoding=encoding, newline="") as handle:
        csv.writer(handle, **fmt).writerows(rows)


def test_csv_saved_as_cp1252_refuses_each_row_that_is_not_utf8(tmp_path):
    """Excel's "CSV" on Windows is cp1252: each row holding such bytes is an error row, no row is
    read with replacement characters, and the UTF-8 rows around it are read."""
    path = tmp_path / "excel.csv"
    write_csv(
        path, [["id", "text"], ["a", "plain"], ["b", "caf\u00e9"], ["c", "na\u00efve"], ["d", "ok"]], encoding="cp1252"
    )
    rows, errors = split(list(read_manifest(str(path))))
    assert [(r.data, r.source) for r in rows] == [
        ({"id": "a", "text": "plain"}, f"{path}:2"),
        ({"id": "d", "text": "ok"}, f"{path}:5"),
    ]
    assert [(e.source, e.error_type, e.stage, e.id) for e in errors] == [
        (f"{path}:3", "invalid_utf8", Stage.READ, None),
        (f"{path}:4", "invalid_utf8", Stage.READ, None),
    ]
    assert "column 2" in errors[0].message and "0xe9" in errors[0].message
    assert "0xef" in errors[1].message


def test_csv_not_utf8_keeps_the_bom_and_multi_line_fields_working(tmp_path):
    path = tmp_path / "mixed.csv"
    write_csv(path, [["id", "text"], ["a", "line one\nline two"], ["b", "h\u00e9llo"]], encoding="utf-8-sig")
    write_csv(path, [["c", "caf\u00e9\nsecond line"], ["d", "after"]], encoding="cp1252", mode="a")
    rows, errors = split(list(read_manifest(str(path))))
    assert [(r.data, r.source) for r in rows] == [
        ({"id": "a", "text": "line one\nline two"}, f"{path}:3"),  # a multi-line row's source is its last line
        ({"id": "b", "text": "h\u00e9llo"}, f"{path}:4"),
        ({"id": "d", "text": "after"}, f"{path}:7"),
    ]
    assert [(e.source, e.error_type) for e in errors] == [(f"{path}:6", "invalid_utf8")]


def test_csv_header_not_utf8_is_one_error_row_for_the_file(tmp_path):
    path = tmp_path / "header.csv"
    write_csv(path, [["id", "cat\u00e9gorie"], ["a", "x"], ["b", "y"]], encoding="cp1252")
    (error,) = read_manifest(str(path))
    assert isinstance(error, ErrorRow)
    assert (error.id, error.stage, error.error_type, error.source) == (None, Stage.READ, "invalid_utf8", f"{path}:1")
    assert "header" in error.message and "0xe9" in error.message


def test_csv_encoding_named_reads_a_cp1252_file_and_refuses_rows_not_in_it(tmp_path):
    """--csv-encoding cp1252: the Excel file's accents read as they are; a byte cp1252 leaves
    undefined (0x81) is an error row of its own, named after the encoding."""
    path = tmp_path / "excel.csv"
    write_csv(path, [["id", "cat\u00e9gorie"], ["a", "caf\u00e9"], ["b", "na\u00efve"]], encoding="cp1252")
    with open(path, "ab") as handle:
        handle.write(b"c,bad \x81 byte\r\nd,ok\r\n")
    rows, errors = split(list(read_manifest(str(path), ReadOptions(csv_encoding="cp1252"))))
    assert [r.data for r in rows] == [
        {"id": "a", "cat\u00e9gorie": "caf\u00e9"},
        {"id": "b", "cat\u00e9gorie": "na\u00efve"},
        {"id": "d", "cat\u00e9gorie": "ok"},
    ]
    assert [(e.source, e.error_type) for e in errors] == [(f"{path}:4", "invalid_utf8")]
    assert "not valid cp1252" in errors[0].message and "0x81" in errors[0].message


def test_csv_delimiter_named_is_used_as_given(tmp_path):
    """A header with one column and ";" rows: nothing to sniff, so the user names the delimiter."""
    path = tmp_path / "m.csv"
    path.write_text("id;text\na;one, two\n")
    assert [r.data for r in rows_only(read_manifest(str(path), ReadOptions(csv_delimiter=";")))] == [
        {"id": "a", "text": "one, two"}
    ]
    (error,) = read_manifest(str(path), ReadOptions(csv_delimiter=","))  # as named, even when wrong
    assert isinstance(error, ErrorRow) and error.error_type == "malformed_csv"


@pytest.mark.parametrize("delimiter", [";", "\t", "|"])
def test_csv_delimiter_is_sniffed_from_the_header(tmp_path, delimiter):
    """European spreadsheets write ";" (their decimal comma stays inside a cell)."""
    path = tmp_path / "m.csv"
    write_csv(path, [["id", "text", "score"], ["a", "one, two", "3,5"], ["b", "", "1,25"]], delimiter=delimiter)
    assert [(r.data, r.source) for r in rows_only(read_manifest(str(path)))] == [
        ({"id": "a", "text": "one, two", "score": "3,5"}, f"{path}:2"),
        ({"id": "b", "text": None, "score": "1,25"}, f"{path}:3"),
    ]


def test_csv_quoted_semicolon_header_is_sniffed(tmp_path):
    path = tmp_path / "m.csv"
    write_csv(path, [["id", "text"], ["a", "x,y"]], delimiter=";", quoting=csv.QUOTE_ALL)
    assert [r.data for r in rows_only(read_manifest(str(path)))] == [{"id": "a", "text": "x,y"}]


@pytest.mark.parametrize("header", [["id", "text"], ["id", "notes; more"], ["id"]])
def test_comma_csv_holding_semicolons_stays_comma_separated(tmp_path, header):
    """Semicolons in the text, even in a column name, do not make a comma file ";"-separated; a
    single column, where the header has no delimiter to sniff, reads as ","."""
    path = tmp_path / "m.csv"
    values = ["a;b", "x; y; z"][: len(header)]
    write_csv(path, [header, values])
    assert [r.data for r in rows_only(read_manifest(str(path)))] == [dict(zip(header, values, strict=True))]


def test_csv_blank_rows_are_skipped(tmp_path):
    """Spreadsheets append rows of empty cells (",,"), and files end in empty lines: neither is a row."""
    path = tmp_path / "m.csv"
    write_csv(path, [["id", "text", "label"], ["a", "t", ""], ["", "", ""], [], ["b", "", "3"], ["", "", ""], [""], []])
    with open(path, "a") as handle:
        handle.write(",,\n\n")
    assert [(r.data, r.source) for r in rows_only(read_manifest(str(path)))] == [
        ({"id": "a", "text": "t", "label": None}, f"{path}:2"),
        ({"id": "b", "text": None, "label": "3"}, f"{path}:5"),
    ]
    # a row with any cell filled is a row: without an id it is the validator's missing_id
    write_csv(path, [["", "orphan", ""]], mode="a")
    assert rows_only(read_manifest(str(path)))[-1].data == {"id": None, "text": "orphan", "label": None}


def test_csv_header_the_sniffer_would_take_minutes_over_is_read_quickly(tmp_path):
    """The sniffer's regular expressions are quadratic in their sample: only the header's start is sniffed."""
    path = tmp_path / "m.csv"
    path.write_bytes(b"id;text" + b';"a' * 70_000 + b"\nb;c\n")
    (error,) = read_manifest(str(path))
    assert isinstance(error, ErrorRow) and (error.error_type, error.source) == ("malformed_csv", f"{path}:2")


# -- gzipped JSONL and CSV ---------------------------------------------------------------------

# Manifests holding every case their readers tell apart: a leading BOM, blank lines, bad rows, bytes
# that are not UTF-8; the CSV is ";"-separated, with a blank row.
JSONL_CASES = (
    '\ufeff{"id": "a", "text": "t"}\n\n   \nnot json\n{"id": "b", "text": "\ufeff"}\n'.encode()
    + b'{"id": "c", "text": "\xff"}\n[1]\n{"id": "d"}'
)
CSV_CASES = "\ufeffid;text\na;h\u00e9llo\nb;too;many\nc;\n;\n".encode() + b"d;caf\xe9\ne;x\n"


def long_manifest(name: str) -> bytes:
    """400 good rows of random text, which gzip cannot shrink much: half of the compressed stream
    still holds many of them."""
    rng = random.Random(0)
    texts = ["".join(rng.choices(string.ascii_lowercase, k=60)) for _ in range(400)]
    if ".csv" in name:
        return ("id,text\n" + "".join(f"r{i},{text}\n" for i, text in enumerate(texts))).encode()
    return "".join(json.dumps({"id": f"r{i}", "text": text}) + "\n" for i, text in enumerate(texts)).encode()


def relative(items: Iterable[ManifestRow | ErrorRow], path: Path) -> list[tuple[object, ...]]:
    """What a read gave, each source without the file's path: reads of two files compare equal."""
    return [
        (item.data, item.source.removeprefix(str(path)))
        if isinstance(item, ManifestRow)
        else (item.error_type, item.message, (item.source or "").removeprefix(str(path)))
        for item in items
    ]


@pytest.mark.parametrize(
    "name, content",
    [("m.jsonl", JSONL_CASES), ("m.ndjson", JSONL_CASES), ("m.json", JSONL_CASES), ("m.csv", CSV_CASES)],
)
def test_a_gzipped_manifest_reads_as_the_same_manifest_uncompressed(tmp_path, name, content):
    plain, gzipped = tmp_path / name, tmp_path / f"{name}.gz"
    plain.write_bytes(content)
    gzipped.write_bytes(gzip.compress(content))
    expected = list(read_manifest(str(plain)))
    rows, errors = split(expected)
    assert rows and errors  # the cases above give both
    assert relative(list(read_manifest(str(gzipped))), gzipped) == relative(expected, plain)


@pytest.mark.parametrize("name", ["m.jsonl.gz", "m.csv.gz"])
@pytest.mark.parametrize("damage", ["truncated", "bad checksum"])
def test_a_damaged_gzip_stream_keeps_the_rows_before_and_ends_in_one_error_row(tmp_path, name, damage):
    content = long_manifest(name)
    whole = gzip.compress(content)
    if damage == "truncated":
        data = whole[: len(whole) // 2]
    else:  # the trailer's CRC-32: every row inflates, the check at the end fails
        data = whole[:-8] + bytes(byte ^ 0xFF for byte in whole[-8:-4]) + whole[-4:]
    path = tmp_path / name
    path.write_bytes(data)
    plain = tmp_path / name.removesuffix(".gz")
    plain.write_bytes(content)
    everything = relative(rows_only(read_manifest(str(plain))), plain)

    *items, error = read_manifest(str(path))
    rows = rows_only(items)
    assert relative(rows, path) == everything[: len(rows)]
    assert 0 < len(rows) < len(everything) if damage == "truncated" else len(rows) == len(everything)
    assert isinstance(error, ErrorRow)
    assert (error.id, error.modality, error.stage, error.error_type) == (None, None, Stage.READ, "unreadable_manifest")
    last_line = int(rows[-1].source.rsplit(":", 1)[1])
    assert error.message.endswith(f"; the lines after line {last_line} are lost")
    assert error.source == f"{path}:{last_line + 1}"  # the first line lost


@pytest.mark.parametrize("name, content", [("m.jsonl.gz", b'{"id": "a"}\n'), ("m.csv.gz", b"id\na\n")])
def test_a_file_named_gz_that_is_not_gzip_is_one_error_row(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    (error,) = read_manifest(str(path))
    assert isinstance(error, ErrorRow)
    assert (error.id, error.error_type, error.source) == (None, "unreadable_manifest", f"{path}:1")
    assert error.message.startswith("the gzip stream cannot be read: ")


# -- Parquet -----------------------------------------------------------------------------------


def test_parquet_rows_and_sources(tmp_path):
    path = tmp_path / "m.parquet"
    table = pa.table(
        {
            "id": ["a", "b", None],
            "text": ["t1", None, "t3"],
            "score": [1.5, 2.5, float("nan")],
        }
    )
    pq.write_table(table, path, row_group_size=2)  # rows span two row groups
    rows, errors = split(list(read_manifest(str(path))))
    assert errors == []
    assert [r.source for r in rows] == [f"{path}:1", f"{path}:2", f"{path}:3"]
    assert [r.data["id"] for r in rows] == ["a", "b", None]
    assert [r.data["text"] for r in rows] == ["t1", None, "t3"]
    assert rows[0].data["score"] == 1.5
    assert rows[2].data["score"] != rows[2].data["score"]  # NaN is kept as NaN


def test_parquet_from_memory_url():
    url = f"memory://sources-{uuid.uuid4().hex}/m.pq"
    with fsspec.open(url, "wb") as handle:
        pq.write_table(pa.table({"id": ["a", "b"], "n": [1, 2]}), handle)
    rows, errors = split(list(read_manifest(url)))
    assert errors == []
    assert [(r.data, r.source) for r in rows] == [
        ({"id": "a", "n": 1}, f"{url}:1"),
        ({"id": "b", "n": 2}, f"{url}:2"),
    ]


@pytest.mark.parametrize("name", ["m.parquet", "m.arrow"])
def test_a_cell_over_the_limit_is_its_rows_error_row_with_the_rows_id(tmp_path, name):
    path = tmp_path / name
    table = pa.table({"id": ["a", "b", "c", "d"], "image": [b"x" * 30, b"y" * 200, b"z" * 30, b"w" * 60]})
    if name.endswith(".parquet"):
        pq.write_table(table, path)
    else:
        with pa.ipc.new_stream(str(path), table.schema) as writer:
            writer.write_table(table)
    rows, errors = split(list(read_manifest(str(path), ReadOptions(max_member_bytes=100))))
    assert [(row.data["id"], row.source) for row in rows] == [
        ("a", f"{path}:1"),
        ("c", f"{path}:3"),
        ("d", f"{path}:4"),
    ]
    (error,) = errors
    assert (error.id, error.stage, error.error_type, error.source) == ("b", Stage.READ, "cell_too_large", f"{path}:2")
    assert "column 'image'" in error.message and "100-byte limit" in error.message


def test_parquet_rows_are_made_in_chunks_of_at_most_the_limit(tmp_path):
    """Any number of rows under the limit are read, each once, in order, whatever their sizes."""
    sizes = [1, 40, 3, 90, 0, 100, 7, 55, 55, 2] * 30
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"id": [str(i) for i in range(len(sizes))], "blob": [b"b" * n for n in sizes]}), path)
    rows = rows_only(read_manifest(str(path), ReadOptions(max_member_bytes=120)))
    assert [(row.data["id"], len(row.data["blob"])) for row in rows] == [(str(i), n) for i, n in enumerate(sizes)]


def test_a_parquet_row_python_cannot_hold_is_an_error_row_with_its_id_as_text(tmp_path):
    """A timestamp past year 9999 as the id itself: Python cannot hold it, Arrow writes it."""
    path = tmp_path / "m.parquet"
    ids = pa.array([0, 10**15], pa.timestamp("s"))
    pq.write_table(pa.table({"id": ids, "text": ["t", "u"]}), path)
    rows, errors = split(list(read_manifest(str(path))))
    assert [row.source for row in rows] == [f"{path}:1"]
    (error,) = errors
    assert (error.error_type, error.source) == ("malformed_row", f"{path}:2")
    assert error.id is not None and "1000000000000000" in error.id


# -- format ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, kind",
    [
        ("a.jsonl", "jsonl"),
        ("a.JSON", "jsonl"),
        ("a.ndjson", "jsonl"),
        ("dir/a.csv", "csv"),
        ("gs://b/a.parquet", "parquet"),
        ("a.PQ", "parquet"),
        ("s.tar", "tar"),
        ("gs://b/s-0001.tar.gz", "tar"),
        ("s.TGZ", "tar"),
        ("a.jsonl.gz", "jsonl"),
        ("gs://b/a.NDJSON.GZ", "jsonl"),
        ("a.json.gz", "jsonl"),
        ("memory://b/a.csv.gz", "csv"),
        ("data-00000-of-00001.arrow", "arrow"),
    ],
)
def test_manifest_format(path, kind):
    assert manifest_format(path) == kind


@pytest.mark.parametrize("name", ["m.txt", "m.tsv", "m", "m.gz", "m.jsonl.bz2", "m.parquet.gz"])
def test_unknown_extension_is_value_error(tmp_path, name):
    path = tmp_path / name
    path.write_text('{"id": "a"}\n')
    with pytest.raises(ValueError, match="cannot tell the format") as raised:
        list(read_manifest(str(path)))
    assert ".jsonl.gz" in str(raised.value) and ".csv.gz" in str(raised.value)  # it lists what would do


def test_jsonl_line_that_is_not_utf8_is_an_error_row_and_the_rest_is_read(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_bytes(b'{"id": "a", "text": "fine"}\n{"id": "b", "text": "\xff\xfe bad"}\n{"id": "c", "text": "ok"}\n')
    items = list(read_manifest(str(path)))
    assert [i.data["id"] for i in items if isinstance(i, ManifestRow)] == ["a", "c"]
    (error,) = [i for i in items if isinstance(i, ErrorRow)]
    assert error.error_type == "invalid_utf8" and (error.source or "").endswith("m.jsonl:2")


def test_declared_column_types_only_for_parquet(tmp_path):
    pq.write_table(pa.table({"id": ["a"], "n": pa.array([1], pa.int16())}), tmp_path / "m.parquet")
    (tmp_path / "m.jsonl").write_text('{"id": "a"}\n')
    assert declared_column_types(Input(str(tmp_path / "m.parquet"), "parquet")) == {"id": pa.string(), "n": pa.int16()}
    assert declared_column_types(Input(str(tmp_path / "m.jsonl"), "jsonl")) is None


# -- tar shards --------------------------------------------------------------------------------


def read_tar(
    tmp_path: Path,
    members: list[Member],
    *,
    name: str = "shard.tar",
    compression: Literal["", "gz"] = "",
    max_member_bytes: int | None = None,
) -> tuple[str, tuple[list[ManifestRow], list[ErrorRow]]]:
    path = tmp_path / name
    path.write_bytes(build_tar(members, compression))
    return str(path), split(list(read_manifest(str(path), ReadOptions(max_member_bytes=max_member_bytes))))


@pytest.mark.parametrize("name, compression", [("shard.tar", ""), ("shard.tar.gz", "gz"), ("shard.tgz", "gz")])
def test_tar_members_sharing_a_key_are_one_sample(tmp_path, name, compression):
    path, (rows, errors) = read_tar(
        tmp_path,
        [
            Member("part/0001.txt", b"a cat"),
            Member("part/0001.JPG", b"jpeg bytes"),
            Member("part/0001.cls", b" 3\n"),
            Member("part/0001.json", b'{"split": "train", "score": 0.5}'),
            Member("v1.2/", type=tarfile.DIRTYPE),  # a folder entry: no data, not a sample
            Member("v1.2/0002.wav", b"wave bytes"),  # the key ends at the first dot of the file name
        ],
        name=name,
        compression=compression,
    )
    assert errors == []
    assert [(r.data, r.source, dict(r.rejected)) for r in rows] == [
        (
            {"id": "part/0001", "text": b"a cat", "image": b"jpeg bytes", "label": "3", "split": "train", "score": 0.5},
            f"{path}:part/0001",
            {},
        ),
        ({"id": "v1.2/0002", "audio": b"wave bytes"}, f"{path}:v1.2/0002", {}),
    ]


@pytest.mark.parametrize(
    "member, reason",
    [
        (Member("/etc/cron.d/0001.txt", b"x"), "absolute paths"),
        (Member("../../0001.txt", b"x"), "'..'"),
        (Member("a/../../0001.txt", b"x"), "'..'"),
        (Member("..\\0001.txt", b"x"), "'..'"),
        (Member("C:/0001.txt", b"x"), "absolute paths"),
        (Member("0001.txt", type=tarfile.SYMTYPE, linkname="/etc/passwd"), "links"),
        (Member("0001.txt", type=tarfile.LNKTYPE, linkname="other.txt"), "links"),
        (Member("0001.txt", type=tarfile.CHRTYPE), "devices"),
        (Member("0001.txt", type=tarfile.BLKTYPE), "devices"),
        (Member("0001.txt", type=tarfile.FIFOTYPE), "FIFOs"),
        (Member("../outside/", type=tarfile.DIRTYPE), "'..'"),
    ],
)
def test_hostile_tar_members_are_refused_and_the_rest_is_read(tmp_path, member, reason):
    path, (rows, errors) = read_tar(tmp_path, [Member("0000.txt", b"before"), member, Member("0002.txt", b"after")])
    assert [r.data["id"] for r in rows] == ["0000", "0002"]
    (error,) = errors
    assert (error.id, error.modality, error.stage, error.error_type) == (None, None, Stage.READ, "unsafe_tar_member")
    assert (
        reason in error.message and error.source == f"{path}:{member.name.rstrip('/')}"
    )  # tarfile drops a folder's slash


def test_tar_member_problems_are_error_rows(tmp_path):
    path, (rows, errors) = read_tar(
        tmp_path,
        [
            Member("a.txt", b"kept"),
            Member("a.npy", b"\x93NUMPY"),  # skipped member, its sample goes on
            Member("b.txt", b"one"),
            Member("b.text", b"two"),  # two texts
            Member("c.txt", b"x"),
            Member("c.json", b'{"text": "clash"}'),  # JSON gives text again
            Member("d.txt", b"x"),
            Member("d.json", b"{broken"),
            Member("e.txt", b"x"),
            Member("e.json", b"[1, 2]"),
            Member("f.txt", b"x"),
            Member("f.cls", b"\xff\xfe"),
            Member("g.jpg", b"x" * 100),
            Member("g.txt", b"small"),  # over the cap: the image fails alone
            Member("h.txt", b"x"),
            Member("h.json", b'{"pad": "' + b"y" * 100 + b'"}'),  # over the cap: all of h
        ],
        max_member_bytes=64,
    )
    assert [(r.data, dict(r.rejected).keys()) for r in rows] == [
        ({"id": "a", "text": b"kept"}, set()),
        ({"id": "g", "text": b"small"}, {"image"}),
    ]
    assert rows[1].rejected["image"].error_type == "file_too_large"
    assert [(e.id, e.error_type, e.source) for e in errors] == [
        ("a", "unsupported_member", f"{path}:a.npy"),
        ("b", "conflicting_member", f"{path}:b"),
        ("c", "conflicting_member", f"{path}:c"),
        ("d", "malformed_json", f"{path}:d"),
        ("e", "malformed_json", f"{path}:e"),
        ("f", "invalid_utf8", f"{path}:f"),
        ("h", "file_too_large", f"{path}:h"),
    ]
    assert all(e.stage == Stage.READ and e.modality is None for e in errors)


def test_a_tar_sample_takes_one_json_member(tmp_path):
    """Each column holds one value, so a sample holds one member per column at most: a second
    ".json" member, even with other keys, is a conflict, and is never read."""
    members = [Member("s.txt", b"words"), Member("s.json", b'{"a": 1}'), Member("s.json", b'{"b": 2}')]
    path, (rows, errors) = read_tar(tmp_path, members)
    assert rows == []
    assert [(error.id, error.error_type, error.source) for error in errors] == [
        ("s", "conflicting_member", f"{path}:s")
    ]


def test_tar_sample_of_only_unsupported_members_is_their_error_rows_alone(tmp_path):
    """A stray file (a README beside the samples) is one error row, not also a record with no modality."""
    path, (rows, errors) = read_tar(tmp_path, [Member("a.txt", b"x"), Member("README.md", b"# notes")])
    assert [row.data for row in rows] == [{"id": "a", "text": b"x"}]
    assert [(error.id, error.error_type) for error in errors] == [("README", "unsupported_member")]


@pytest.mark.parametrize("cls, label", [(b"3", 3), (b"3", 3.0), (b" 3\n", "3"), (b"cat", "cat")])
def test_tar_cls_and_json_label_that_agree_are_one_label(tmp_path, cls, label):
    """A ".cls" member and the ".json" member's "label" that the job stores as one string (labels are
    kept as strings: JSON's 3 is "3") are not a conflict, whichever comes first."""
    as_json = Member("s.json", json.dumps({"label": label, "split": "train"}).encode())
    for members in ([Member("s.cls", cls), as_json], [as_json, Member("s.cls", cls)]):
        _, (rows, errors) = read_tar(tmp_path, [Member("s.txt", b"words"), *members])
        assert errors == []
        (row,) = rows
        record = parse_record(row.data, source=row.source, manifest_dir=str(tmp_path))
        assert (record.id, record.label, record.split) == ("s", cls.decode().strip(), "train")


@pytest.mark.parametrize("label", [4, "dog", "3.0", [3], None])
def test_tar_cls_and_json_label_that_differ_are_a_conflict(tmp_path, label):
    path, (rows, errors) = read_tar(
        tmp_path,
        [Member("s.txt", b"words"), Member("s.cls", b"3"), Member("s.json", json.dumps({"label": label}).encode())],
    )
    assert rows == []
    assert [(e.id, e.error_type, e.source) for e in errors] == [("s", "conflicting_member", f"{path}:s")]


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_damaged_tar_keeps_what_came_before_and_says_what_is_lost(tmp_path, damage):
    whole = build_tar([Member("a.txt", b"first"), Member("b.txt", b"x" * 5000), Member("c.txt", b"last")])
    data = whole[:2000] if damage == "truncated" else b"not a tar at all" * 100
    path = tmp_path / "shard.tar"
    path.write_bytes(data)
    rows, errors = split(list(read_manifest(str(path))))
    (error,) = errors
    assert error.error_type == "unreadable_manifest"
    if damage == "truncated":  # the row names the sample lost, as its row would have
        assert [r.data["id"] for r in rows] == ["a"]
        assert (error.id, error.source) == ("b", f"{path}:b") and "'b' and any after it are lost" in error.message
    else:  # no sample read: the row names the offset in the tar stream where reading failed
        assert rows == [] and (error.id, error.source) == (None, f"{path}@0")


def test_empty_tar_has_no_rows(tmp_path):
    assert read_tar(tmp_path, [])[1] == ([], [])


def test_tar_from_memory_url():
    url = f"memory://shards-{uuid.uuid4().hex}/s.tar"
    with fsspec.open(url, "wb") as handle:
        handle.write(build_tar([Member("x.txt", b"hi")]))
    rows, errors = split(list(read_manifest(url)))
    assert errors == [] and [(r.data, r.source) for r in rows] == [({"id": "x", "text": b"hi"}, f"{url}:x")]


def test_parquet_timestamp_in_an_unknown_time_zone_is_an_error_row_per_row(tmp_path):
    """A zone no time-zone database knows (a damaged or foreign file): the rows holding such a
    value are error rows, and the read goes on."""
    times = pa.array([0, None], pa.timestamp("us", tz="Mars/Olympus_Mons"))
    pq.write_table(pa.table({"id": ["a", "b"], "text": ["x", "y"], "when": times}), tmp_path / "m.parquet")
    rows, errors = split(list(read_manifest(str(tmp_path / "m.parquet"))))
    assert [row.data["id"] for row in rows] == ["b"]
    assert [(error.id, error.source, error.error_type) for error in errors] == [
        ("a", f"{tmp_path / 'm.parquet'}:1", "malformed_row")
    ]
    assert "Mars/Olympus_Mons" in errors[0].message
