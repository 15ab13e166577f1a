"""Content that several records share (the same photo under two ids, the same caption) is embedded
once, and each record still gets its own row, or its own error row."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from apache_beam.pvalue import TaggedOutput

from mmfeatures import content
from mmfeatures.content import SERVED_TAG, SHARES_TAG, Sharing, _share, for_copies
from mmfeatures.errors import ErrorRow, Stage
from mmfeatures.records import Record
from tests.jobs import extract, feature_rows, png, write_manifest


def test_the_first_record_by_place_embeds_for_the_others() -> None:
    members = [
        (((1, 0), 0), "b", "two.jsonl:1"),
        (((0, 1), 0), "d", "one.jsonl:900"),  # the second part of one.jsonl
        (((0, 0), 5), "a", "one.jsonl:6"),
        (((0, 0), 9), "c", "one.jsonl:10"),
    ]
    out = [(item.tag, item.value) for item in _share((("image", "d1"), members)) if isinstance(item, TaggedOutput)]
    assert out == [
        (SHARES_TAG, ((0, 0), (5, "image", (("c", "one.jsonl:10"), ("d", "one.jsonl:900"), ("b", "two.jsonl:1"))))),
        (SERVED_TAG, ((0, 0), (9, "image"))),
        (SERVED_TAG, ((0, 1), (0, "image"))),
        (SERVED_TAG, ((1, 0), (0, "image"))),
    ]
    assert list(_share((("image", "d2"), [(((0, 0), 1), "z", "one.jsonl:2")]))) == []  # content of one record


def test_content_that_very_many_records_share_is_embedded_once_per_thousand(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(content, "MOST_COPIES", 2)
    members = [(((0, 0), i), f"r{i}", f"m:{i + 1}") for i in range(7)]
    out = list(_share((("text", "d"), members)))
    assert [item.value for item in out if item.tag == SHARES_TAG] == [
        ((0, 0), (0, "text", (("r1", "m:2"), ("r2", "m:3")))),
        ((0, 0), (3, "text", (("r4", "m:5"), ("r5", "m:6")))),
    ]  # and r6, first of a group of its own, embeds for itself alone
    assert [item.value for item in out if item.tag == SERVED_TAG] == [((0, 0), (i, "text")) for i in (1, 2, 4, 5)]


def test_sharing_marks_records_and_accounts_for_copies_whose_record_was_not_sent() -> None:
    sharing = Sharing([(0, "image", (("c", "x:1"),)), (4, "text", (("d", "y:1"),))], [(2, "text")])
    record = Record("a", "m:1", "/m", {"image": "a.png"})
    marked = sharing.mark(record, 0)
    assert marked.copies == {"image": (("c", "x:1"),)} and marked.embedded_elsewhere == frozenset()
    assert sharing.mark(record, 2).embedded_elsewhere == {"text"}
    assert sharing.mark(record, 3) is record  # shares nothing
    (unsent,) = sharing.unsent("m.jsonl")  # the record at 4 never came: its copy "d" would be lost
    assert (unsent.id, unsent.modality, unsent.error_type, unsent.source) == ("d", "text", "input_changed", "y:1")


def test_a_failure_is_each_copys_own_error_row() -> None:
    row = ErrorRow("a", "image", Stage.DECODE, "undecodable", "not an image", "/m/a.png")
    (copy,) = for_copies(row, (("b", "/m/b.png"),))
    assert (copy.id, copy.modality, copy.stage, copy.error_type, copy.source) == (
        "b",
        "image",
        Stage.DECODE,
        "undecodable",
        "/m/b.png",
    )
    assert copy.message == "not an image (its image is that of record a)"


@pytest.fixture()
def shared_corpus(tmp_path: Path) -> tuple[str, list[dict[str, Any]]]:
    """a's photo is b's (another file, the same bytes) and c's (the same file); a and b share a
    caption; e and f share the same broken bytes."""
    media = tmp_path / "media"
    media.mkdir()
    for name, data in {"a": png(1), "b": png(1), "d": png(2), "e": b"not an image", "f": b"not an image"}.items():
        (media / f"{name}.png").write_bytes(data)
    rows = [
        {"id": "a", "image": str(media / "a.png"), "text": "the same words"},
        {"id": "b", "image": str(media / "b.png"), "text": "the same words"},
        {"id": "c", "image": str(media / "a.png")},
        {"id": "d", "image": str(media / "d.png"), "text": "other words"},
        {"id": "e", "image": str(media / "e.png"), "text": "e's own words"},
        {"id": "f", "image": str(media / "f.png")},
    ]
    return write_manifest(tmp_path, rows), rows


def test_shared_content_is_embedded_once_for_every_record(
    shared_corpus: tuple[str, list[dict[str, Any]]], tiny_model_options: list[str], tmp_path: Path
) -> None:
    manifest, _ = shared_corpus
    output = str(tmp_path / "out")
    summary = extract(manifest, output, tiny_model_options)
    assert summary["reconciles"], summary["checks"]
    image, text = summary["modalities"]["image"], summary["modalities"]["text"]
    assert (image["present"], image["embedded"], image["shared"], image["failed"]) == (6, 4, 2, 2)
    assert (text["present"], text["embedded"], text["shared"], text["failed"]) == (4, 4, 1, 0)

    rows = feature_rows(output)
    assert sorted(rows) == ["a", "b", "c", "d", "e"]  # f had only its broken image
    for copy in ("b", "c"):
        assert np.array_equal(rows[copy]["image_embedding"], rows["a"]["image_embedding"])
    assert np.array_equal(rows["b"]["text_embedding"], rows["a"]["text_embedding"])
    assert rows["b"]["content_hash"] == rows["a"]["content_hash"]  # the same bytes, the same hash
    assert not np.array_equal(rows["d"]["image_embedding"], rows["a"]["image_embedding"])

    errors = {row["id"]: row for row in pq.read_table(f"{output}/errors").to_pylist()}
    assert sorted(errors) == ["e", "f"]
    assert errors["e"]["source"].endswith("e.png")  # the file that failed
    assert (errors["f"]["source"], errors["f"]["error_type"]) == (f"{manifest}:6", errors["e"]["error_type"])
    assert errors["f"]["message"] == f"{errors['e']['message']} (its image is that of record e)"


def test_vectors_shared_are_those_each_record_gets_alone(
    shared_corpus: tuple[str, list[dict[str, Any]]], tiny_model_options: list[str], tmp_path: Path
) -> None:
    """b and c, run each in a job of its own, get the vectors they took from a."""
    manifest, rows = shared_corpus
    together = feature_rows(_run(manifest, tiny_model_options, tmp_path / "together"))
    for alone in ("b", "c"):
        folder = tmp_path / alone
        folder.mkdir()
        single = write_manifest(folder, [row for row in rows if row["id"] == alone])
        (row,) = feature_rows(_run(single, tiny_model_options, folder / "out")).values()
        for column in ("image_embedding", "text_embedding", "fused"):
            assert np.array_equal(row[column], together[alone][column]), column


def _run(manifest: str, options: list[str], output: Path) -> str:
    extract(manifest, str(output), options)
    return str(output)
