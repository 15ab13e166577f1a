"""Tests for mmfeatures.records.parse_record: every validation rule and its stable error code."""

import math
from typing import Any

import pytest

from mmfeatures.errors import Stage, ValidationError
from mmfeatures.records import MAX_NESTING, Record, map_columns, parse_column_map, parse_record

SOURCE = "/data/m.jsonl:7"
DIR = "/data"


def parse(row: dict[str, Any]) -> Record:
    return parse_record(row, source=SOURCE, manifest_dir=DIR)


def error_type(row: dict[str, Any]) -> str:
    with pytest.raises(ValidationError) as info:
        parse(row)
    assert info.value.stage == Stage.VALIDATE
    return info.value.error_type


def test_full_record():
    record = parse(
        {
            "id": "r1",
            "text": "hello",
            "image": "img/a.png",
            "audio": "gs://b/a.wav",
            "label": "cat",
            "split": "train",
        }
    )
    assert record == Record(
        id="r1",
        source=SOURCE,
        manifest_dir=DIR,
        payloads={"text": "hello", "image": "img/a.png", "audio": "gs://b/a.wav"},
        label="cat",
        split="train",
        carried={},
    )
    assert record.modalities() == ["text", "image", "audio"]
    assert record.payload("image") == "img/a.png"


@pytest.mark.parametrize(
    "row",
    [
        {"id": None, "text": "t"},
        {"id": "", "text": "t"},
        {"id": "   ", "text": "t"},
        {"id": float("nan"), "text": "t"},
    ],
)
def test_missing_or_empty_id(row):
    assert error_type(row) == "missing_id"


def test_a_row_without_an_id_column_is_named_by_its_source():
    assert parse({"text": "t"}).id == SOURCE


def test_a_derived_id_comes_from_where_the_row_lies():
    assert parse_record({"text": "t"}, source=SOURCE, manifest_dir=DIR, default_id="m.jsonl:7").id == "m.jsonl:7"


@pytest.mark.parametrize("column", ["ID", " id", "Id "])
def test_a_column_that_looks_like_an_id_is_no_reason_to_derive_one(column):
    """A spreadsheet's "ID" header: the user meant it, and a derived id would hide that."""
    with pytest.raises(ValidationError, match=f"--columns id={column}") as info:
        parse({column: "r1", "text": "t"})
    assert info.value.error_type == "missing_id"


def test_an_id_mapped_to_a_column_the_row_lacks_is_missing_not_derived():
    assert error_type(map_columns({"text": "t"}, {"id": "uid"})) == "missing_id"


def test_a_displaced_column_never_overwrites_a_column_of_the_row():
    row = {"caption": "new", "text": "old", "manifest_text": "older"}
    assert map_columns(row, {"text": "caption"}) == {
        "text": "new",
        "manifest_text": "old",  # the displaced text
        "manifest_manifest_text": "older",  # the row's own column, which would have collided
    }


@pytest.mark.parametrize(
    ("row", "carried"),
    [
        ({"fused": 1, "manifest_fused": 2}, {"manifest_fused": 1, "manifest_manifest_fused": 2}),
        (
            {"has_text": 1, "manifest_manifest_has_text": 2},
            {"manifest_has_text": 1, "manifest_manifest_manifest_has_text": 2},
        ),
        ({"manifest_speaker": "a", "speaker": "b"}, {"manifest_speaker": "a", "speaker": "b"}),
    ],
)
def test_carried_columns_never_collide_in_the_table(row, carried):
    """Mangling a name that would collide with the table's own column must not make it collide
    with another input column: every input column keeps its value, under a name of its own."""
    assert parse(map_columns({"id": "a", "text": "t", **row}, {})).carried == carried


def test_column_map_renames_and_carries_what_it_displaces():
    row = {"sentence": "hi", "text": "old", "img": "a.png", "uid": 7, "other": 1}
    mapped = map_columns(row, parse_column_map("text=sentence, image=img,id=uid"))
    assert mapped == {"text": "hi", "manifest_text": "old", "image": "a.png", "id": 7, "other": 1}
    record = parse(mapped)
    assert (record.id, record.payload("text"), record.payload("image")) == ("7", "hi", "a.png")
    assert record.carried == {"manifest_text": "old", "other": 1}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("txt=sentence", "'txt' is not a field"),
        ("text", "is not FIELD=COLUMN"),
        ("text=", "is not FIELD=COLUMN"),
        ("text=a,text=b", "mapped twice"),
        ("text=a,label=a", "one column fills two fields"),
    ],
)
def test_column_map_refuses_what_it_cannot_mean(text, message):
    with pytest.raises(ValueError, match=message):
        parse_column_map(text)


@pytest.mark.parametrize(
    ("value", "payload"),
    [
        ({"bytes": b"\x89PNG", "path": "a.png"}, b"\x89PNG"),  # save_to_disk: the bytes win
        ({"bytes": None, "path": "/data/a.png"}, "/data/a.png"),  # to_parquet of files: the path
        ({"bytes": b"", "path": "rel/a.png"}, "rel/a.png"),
    ],
)
def test_hugging_face_media_struct_is_its_bytes_else_its_path(value, payload):
    assert parse({"id": "a", "image": value}).payload("image") == payload


def test_an_empty_hugging_face_media_struct_is_an_absent_modality():
    record = parse({"id": "a", "text": "t", "audio": {"bytes": None, "path": None}})
    assert record.modalities() == ["text"]


@pytest.mark.parametrize(
    ("modality", "value"),
    [("image", {"bytes": b"x", "array": [1]}), ("text", {"bytes": b"x", "path": None}), ("audio", {"path": 3})],
)
def test_other_objects_for_a_modality_fail_that_modality(modality, value):
    record = parse({"id": "a", "label": "l", modality: value, **({"text": "t"} if modality != "text" else {})})
    (error,) = record.rejected
    assert (error.modality, error.error_type) == (modality, "wrong_type")


def _nested(depth: int, leaf: Any = 1, as_object: bool = False) -> Any:
    value = leaf
    for _ in range(depth):
        value = {"a": value} if as_object else [value]
    return value


@pytest.mark.parametrize("as_object", [False, True])
def test_a_carried_value_nested_up_to_the_limit_is_kept_and_deeper_is_an_error_row(as_object):
    kept = parse({"id": "a", "text": "t", "tree": _nested(MAX_NESTING, as_object=as_object)})
    assert kept.carried["tree"] == _nested(MAX_NESTING, as_object=as_object)
    for depth in (MAX_NESTING + 1, 150, 100_000):  # 150 levels is what Arrow cannot read back
        row = {"id": "a", "text": "t", "tree": _nested(depth, as_object=as_object)}
        with pytest.raises(ValidationError, match=f"nested deeper than {MAX_NESTING} levels") as info:
            parse(row)
        assert info.value.error_type == "value_too_deep"


def test_a_lone_surrogate_deep_in_a_carried_value_is_an_error_row():
    assert error_type({"id": "a", "text": "t", "tree": _nested(10, leaf={"k": "\ud800"})}) == "invalid_utf8"
    assert error_type({"id": "a", "text": "t", "tree": {"\ud800": 1}}) == "invalid_utf8"


def test_int_id_becomes_string():
    record = parse({"id": 42, "text": "t"})
    assert record.id == "42"
    assert isinstance(record.id, str)


@pytest.mark.parametrize("value", [1.0, 3.5, True, False, ["a"], {"a": 1}])
def test_id_of_wrong_type(value):
    assert error_type({"id": value, "text": "t"}) == "wrong_type"


@pytest.mark.parametrize("value", [5, 1.5, True, ["x"], {"x": 1}])
def test_non_string_split_is_wrong_type(value):
    assert error_type({"id": "a", "text": "keep", "split": value}) == "wrong_type"


@pytest.mark.parametrize("column", ["image", "audio"])
@pytest.mark.parametrize("value", [5, 1.5, True, ["x"], {"x": 1}])
def test_a_wrong_typed_modality_fails_alone(column, value):
    record = parse({"id": "a", "text": "keep", column: value})
    assert record.payloads == {"text": "keep"}
    (rejected,) = record.rejected
    assert (rejected.id, rejected.modality, rejected.stage, rejected.error_type) == (
        "a",
        column,
        Stage.VALIDATE,
        "wrong_type",
    )
    assert rejected.source == SOURCE and "must be a string" in rejected.message


def test_a_record_whose_every_modality_is_wrong_typed_is_kept_to_count_its_failures():
    record = parse({"id": "a", "text": 5, "image": ["x"]})
    assert record.payloads == {}
    assert [(row.modality, row.error_type) for row in record.rejected] == [
        ("text", "wrong_type"),
        ("image", "wrong_type"),
    ]


def test_modalities_refused_by_the_reader_fail_alone():
    from mmfeatures.errors import FetchError

    too_large = FetchError("too big", error_type="file_too_large")
    record = parse_record(
        {"id": "a", "text": b"hi", "image": None}, source=SOURCE, manifest_dir=DIR, rejected={"image": too_large}
    )
    assert record.payloads == {"text": b"hi"}
    assert [(row.modality, row.stage, row.error_type) for row in record.rejected] == [
        ("image", Stage.FETCH, "file_too_large")
    ]


def test_bytes_are_content_and_without_content_keeps_which_modalities_are_present():
    record = parse({"id": "a", "text": "t", "image": bytearray(b"\x89PNG"), "audio": b"RIFF"})
    assert record.payloads == {"text": "t", "image": b"\x89PNG", "audio": b"RIFF"}
    light = record.without_content()
    assert light.payloads == {"text": "t", "image": b"", "audio": b""}
    assert light.modalities() == ["text", "image", "audio"]


def test_no_modality():
    assert error_type({"id": "a", "label": "x", "split": "train", "other": 1}) == "no_modality"
    assert error_type({"id": "a", "text": None, "image": None, "audio": None}) == "no_modality"


def test_label_int_becomes_string_and_float_label_rejected():
    assert parse({"id": "a", "text": "t", "label": 3}).label == "3"
    assert parse({"id": "a", "text": "t", "label": 0}).label == "0"
    assert error_type({"id": "a", "text": "t", "label": True}) == "wrong_type"


def test_unknown_columns_are_carried():
    row = {"id": "a", "text": "t", "label": 1, "score": 0.5, "tags": ["x", "y"], "meta": {"k": None}}
    record = parse(row)
    assert dict(record.carried) == {"score": 0.5, "tags": ["x", "y"], "meta": {"k": None}}
    for reserved in ("id", "text", "image", "audio", "label", "split"):
        assert reserved not in record.carried


@pytest.mark.parametrize("blank", ["", " ", "\t\n"])
def test_whitespace_only_media_paths_are_absent(blank):
    record = parse({"id": "a", "text": "t", "image": blank, "audio": blank})
    assert record.payload("image") is None and record.payload("audio") is None
    assert record.modalities() == ["text"]
    assert error_type({"id": "a", "image": blank}) == "no_modality"


def test_nan_values_are_absent():
    nan = math.nan
    record = parse({"id": "a", "text": nan, "image": "x.png", "audio": nan, "label": nan, "split": nan})
    assert (record.payload("text"), record.payload("audio"), record.label, record.split) == (None, None, None, None)
    assert record.modalities() == ["image"]
    assert error_type({"id": "a", "text": nan, "image": nan, "audio": nan}) == "no_modality"


def test_modalities_keep_a_fixed_order():
    assert parse({"audio": "a.wav", "id": "x", "text": "t"}).modalities() == ["text", "audio"]


@pytest.mark.parametrize(
    "row",
    [
        {"id": "a\ud800", "text": "t"},
        {"id": "a", "text": "t", "label": "\udcff"},
        {"id": "a", "text": "t", "note": {"k": ["ok", "\ud800"]}},
        {"id": "a", "text": "t", "\ud800": 1},
    ],
)
def test_text_that_is_not_valid_unicode_is_refused_before_the_writers_see_it(row):
    assert error_type(row) == "invalid_utf8"


def test_error_rows_escape_what_is_not_valid_unicode():
    from mmfeatures.errors import ErrorRow

    row = ErrorRow("a\ud800", None, Stage.VALIDATE, "invalid_utf8", "bad \udcff", "m.tar:\udcff.txt")
    assert (row.id, row.message, row.source) == ("a\\ud800", "bad \\udcff", "m.tar:\\udcff.txt")
