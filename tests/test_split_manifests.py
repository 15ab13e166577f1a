"""A large JSONL, CSV or Parquet manifest is read in parts, by several workers, and gives exactly the
records, sources, ids and error rows of a read of the whole file."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.metrics.metric import MetricsFilter

from mmfeatures.counts import COUNTS_TAG
from mmfeatures.errors import ERRORS_TAG
from mmfeatures.reading import ReadRecords
from mmfeatures.sources import Input, ReadOptions, cut_input, find_inputs, read_manifest, read_part, text_files

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
    breaks ("\\n", "\\r\\n", a lone "\\r") and doubled quotes, rows with empty ids (error rows
    that name the line they end on), blank lines, rows with a field too many, rows over ``LIMIT``, ids
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
        elif number % 3 == 0:
            rows.append(f'{record_id},"row {number}\nits ""second""\r\nline\rand more",{number}')
        else:
            rows.append(f'{record_id},"row {number}, ""quoted""",{number}')
    data = ("\ufeff" + "\r\n".join(rows).replace(",", delimiter)).encode()
    path.write_bytes(data)
    return data


@pytest.mark.parametrize("scan_chunk", [7, 2**22])  # 7: rows, and "\\r\\n", across the scan's chunks
def test_csv_parts_cover_every_byte_once_and_start_on_a_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, scan_chunk: int
) -> None:
    monkeypatch.setattr(text_files, "_SCAN_CHUNK", scan_chunk)
    path = tmp_path / "m.csv"
    data = _write_csv(path)
    for part_bytes in (1, 1000, 4096, len(data) // 2):
        parts = cut_input(Input(str(path), "csv"), ReadOptions(part_bytes=part_bytes))
        assert len(parts) > 1 and [part.index for part in parts] == list(range(len(parts)))
        assert parts[0].start == 0 and parts[-1].stop == len(data)
        for part, after in zip(parts, parts[1:], strict=False):
            assert part.stop == after.start and part.stop is not None and part.stop - part.start >= part_bytes
            before = data[: after.start]
            assert before.endswith(b"\r\n") and before.count(b'"') % 2 == 0
            assert after.first == len(before.decode("utf-8-sig").splitlines()) + 1


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
    # A row with an empty id is an error row that names the line it ends on: the last, in the last part.
    last = len(data.decode("utf-8-sig").splitlines())
    assert [error[3] for error in whole["errors"] if error[4] == f"{path}:{last}"] == ["missing_id"]


def test_a_csv_file_with_another_delimiter_or_encoding_is_cut_as_it_is_read(tmp_path: Path) -> None:
    """The delimiter, sniffed or given, the encoding and the header's error are those of the file's
    start in every part; a file in UTF-16, whose quotes and line breaks are not single bytes, is one part."""
    path = tmp_path / "m.csv"
    _write_csv(path, ";")
    for delimiter in (None, ";"):
        _same_rows(
            Input(str(path), "csv"), ReadOptions(max_member_bytes=LIMIT, csv_delimiter=delimiter, part_bytes=1000)
        )
    path.write_bytes("id;text\r\n".encode("cp1252") + 'é1;"café\r\nau lait"\r\n'.encode("cp1252") * 200)
    _same_rows(Input(str(path), "csv"), ReadOptions(csv_encoding="cp1252", part_bytes=100))
    path.write_bytes(b"id,t\xe9xt\r\n" + b"a,b\r\n" * 200)  # a header not in UTF-8: one error row, from the first part
    _same_rows(Input(str(path), "csv"), ReadOptions(part_bytes=100))
    path.write_bytes(("id,text\r\n" + 'a,"two\r\nlines"\r\n' * 200).encode("utf-16"))
    for encoding in ("utf-16", "utf-32", "iso2022_jp", "utf-7"):
        (part,) = cut_input(Input(str(path), "csv"), ReadOptions(csv_encoding=encoding, part_bytes=1))
        assert (part.index, part.start, part.stop, part.first) == (0, 0, None, 1)


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
