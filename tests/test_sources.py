"""Tests for mmfeatures.sources: JSONL, CSV and Parquet manifests from real files and memory://."""

import uuid

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmfeatures.errors import ErrorRow, Stage
from mmfeatures.sources import ManifestRow, manifest_format, read_manifest


def split(items):
    rows = [item for item in items if isinstance(item, ManifestRow)]
    errors = [item for item in items if isinstance(item, ErrorRow)]
    assert len(rows) + len(errors) == len(items)
    return rows, errors


# -- JSONL -------------------------------------------------------------------------------------


def test_jsonl_good_lines_blank_lines_and_bad_lines(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(
        '{"id": "a", "text": "hello"}\n'       # 1
        "\n"                                    # 2 blank
        "   \t\n"                               # 3 whitespace only
        '{"id": "b", "text": \n'                # 4 malformed JSON
        '[1, 2, 3]\n'                           # 5 not an object
        '"just a string"\n'                     # 6 not an object
        '{"id": "c", "image": "x.png", "extra": 7}\n'  # 7
        '{"id": "d"}'                           # 8, no trailing newline
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


def test_jsonl_from_memory_url():
    url = f"memory://sources-{uuid.uuid4().hex}/m.jsonl"
    with fsspec.open(url, "wb") as handle:
        handle.write(b'{"id": "a", "text": "t"}\n\nnot json\n{"id": 2}\n')
    rows, errors = split(list(read_manifest(url)))
    assert [(r.data, r.source) for r in rows] == [
        ({"id": "a", "text": "t"}, f"{url}:1"),
        ({"id": 2}, f"{url}:4"),
    ]
    assert [(e.source, e.error_type) for e in errors] == [(f"{url}:3", "malformed_json")]


# -- CSV ---------------------------------------------------------------------------------------


def test_csv_empty_cells_are_none_and_bad_rows_are_errors(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text(
        "id,text,image,label\n"      # line 1: header
        "a,hello,,3\n"               # 2
        "b,,img.png,\n"              # 3
        "c,too,many,fields,here\n"   # 4
        "d,too few\n"                # 5
        '"e","quoted, comma",,x\n'   # 6
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


def test_csv_from_memory_url():
    url = f"memory://sources-{uuid.uuid4().hex}/m.CSV"
    with fsspec.open(url, "wb") as handle:
        handle.write(b"id,text\nx,one\ny,\n")
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
    assert [r.data for r in read_manifest(str(csv_path))] == [{"id": "a", "text": "h\u00e9llo"}]
    # only a leading BOM is dropped; the same character inside the data stays
    assert [r.data for r in read_manifest(str(jsonl_path))] == [
        {"id": "a", "text": "t"}, {"id": "b", "text": "\ufeff"},
    ]


# -- Parquet -----------------------------------------------------------------------------------


def test_parquet_rows_and_sources(tmp_path):
    path = tmp_path / "m.parquet"
    table = pa.table({
        "id": ["a", "b", None],
        "text": ["t1", None, "t3"],
        "score": [1.5, 2.5, float("nan")],
    })
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


# -- format ------------------------------------------------------------------------------------


@pytest.mark.parametrize("path, kind", [
    ("a.jsonl", "jsonl"), ("a.JSON", "jsonl"), ("a.ndjson", "jsonl"),
    ("dir/a.csv", "csv"), ("gs://b/a.parquet", "parquet"), ("a.PQ", "parquet"),
])
def test_manifest_format(path, kind):
    assert manifest_format(path) == kind


@pytest.mark.parametrize("name", ["m.txt", "m.tsv", "m", "m.jsonl.gz"])
def test_unknown_extension_is_value_error(tmp_path, name):
    path = tmp_path / name
    path.write_text('{"id": "a"}\n')
    with pytest.raises(ValueError, match="manifest format"):
        list(read_manifest(str(path)))


def test_jsonl_line_that_is_not_utf8_is_an_error_row_and_the_rest_is_read(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_bytes(b'{"id": "a", "text": "fine"}\n{"id": "b", "text": "\xff\xfe bad"}\n{"id": "c", "text": "ok"}\n')
    items = list(read_manifest(str(path)))
    assert [i.data["id"] for i in items if isinstance(i, ManifestRow)] == ["a", "c"]
    (error,) = [i for i in items if isinstance(i, ErrorRow)]
    assert error.error_type == "invalid_utf8" and error.source.endswith("m.jsonl:2")


def test_declared_column_types_only_for_parquet(tmp_path):
    from mmfeatures.sources import declared_column_types

    pq.write_table(pa.table({"id": ["a"], "n": pa.array([1], pa.int16())}), tmp_path / "m.parquet")
    (tmp_path / "m.jsonl").write_text('{"id": "a"}\n')
    assert declared_column_types(str(tmp_path / "m.parquet")) == {"id": pa.string(), "n": pa.int16()}
    assert declared_column_types(str(tmp_path / "m.jsonl")) is None
