"""Tests for mmfeatures.transforms.ReadRecords in a real Beam pipeline, plus the count helpers."""

import apache_beam as beam
from apache_beam.testing.util import assert_that, equal_to

from mmfeatures.counts import COUNTS_TAG, ModalityCounts, RunCounts, sum_counts
from mmfeatures.errors import ERRORS_TAG, Stage
from mmfeatures.reading import ReadRecords
from mmfeatures.sources import ReadOptions, find_inputs


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
