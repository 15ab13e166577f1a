"""``mmfeatures report``: the page made from a real run of the job (and from tables written here for
the edge cases), checked as parsed HTML, as files, and as a real headless Chromium renders it."""

from __future__ import annotations

import base64
import datetime
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pytest

from mmfeatures import report, schema
from mmfeatures.column_types import rows_to_table
from mmfeatures.report import build_report, digest_features, main
from mmfeatures.sample import build_sample_dataset
from pipelines.extract_features import run
from tests.committed_tables import commit_tables
from tests.devtools import Chromium, DevTools, find_chromium, visit

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DATA_PNG = "data:image/png;base64,"
SECTIONS = ["records", "modalities", "coverage", "errors", "norms", "projections", "models"]
PLOTS_PER_RUN = {"modality-counts", "coverage-subsets"} | {
    f"{kind}-{name}" for kind in ("norms", "projection") for name in ("text", "image", "audio", "fused")
}
# The shape ``mmfeatures train`` writes: per method, scores on the test split and on its records
# that have every modality; other top-level keys are the run's settings.
METRICS = {
    "classes": ["0", "1"],
    "methods": {
        "early_fusion": {
            "test": {
                "n": 8,
                "accuracy": 0.9,
                "macro_recall": 0.88,
                "macro_f1": 0.87,
                "per_class_f1": {"0": 1.0, "1": 0.75},
            },
            "test_all_modalities": {"n": 6, "accuracy": 1.0},
        },
        "unimodal:text": {
            "test": {
                "n": 8,
                "accuracy": 0.7,
                "macro_recall": 0.69,
                "macro_f1": 0.68,
                "per_class_f1": {"0": 0.8, "1": None},
            }
        },
        "unimodal:image": {"test": {"n": 8, "accuracy": 0.6, "macro_recall": 0.58, "macro_f1": 0.55}},
        "unimodal:audio": {"test": {"n": 0, "accuracy": None, "macro_f1": None}},  # nothing to score: ignored
    },
}
HOSTILE = '<script>alert("x")</script><img src=x onerror=alert(1)> & "quoted"'
DIMS = {"text": 4, "image": 6, "audio": 3, "fused": 13}


# -- the parsed page ---------------------------------------------------------------------------
@dataclass
class Section:
    headings: list[str] = field(default_factory=list)
    tables: list[list[list[str]]] = field(default_factory=list)
    images: list[dict[str, str]] = field(default_factory=list)
    text: str = ""

    def table_with(self, header: str) -> list[list[str]]:
        """The first table whose header row holds ``header``, header row included."""
        return next(t for t in self.tables if header in t[0])

    def rows_by_first_cell(self, header: str) -> dict[str, list[str]]:
        return {row[0]: row[1:] for row in self.table_with(header)[1:]}


class Page(HTMLParser):
    """The report as sections (by id) of headings, tables of cell texts, images and text."""

    def __init__(self, markup: str):
        super().__init__()
        self.sections: dict[str, Section] = {}
        self.tags: list[str] = []
        self.images: list[dict[str, str]] = []
        self._section: Section | None = None
        self._cell: list[str] | None = None
        self._heading: list[str] | None = None
        self.feed(markup)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        values = {name: value or "" for name, value in attrs}
        if tag == "section":
            self._section = self.sections.setdefault(values["id"], Section())
        elif tag == "img":
            self.images.append(values)
            if self._section:
                self._section.images.append(values)
        elif tag == "table" and self._section:
            self._section.tables.append([])
        elif tag == "tr" and self._section:
            self._section.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag in ("h2", "h3"):
            self._heading = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self._section:
            self._section.tables[-1][-1].append("".join(self._cell))
            self._cell = None
        elif tag in ("h2", "h3") and self._heading is not None and self._section:
            self._section.headings.append("".join(self._heading))
            self._heading = None
        elif tag == "section":
            self._section = None

    def handle_data(self, data: str) -> None:
        for collector in (self._cell, self._heading):
            if collector is not None:
                collector.append(data)
        if self._section:
            self._section.text += data


# -- a real run --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real job on a 24-record sample set: two broken files among them."""
    folder = tmp_path_factory.mktemp("report_run")
    manifest = build_sample_dataset(str(folder / "data"), n=24, seed=1)
    run([f"--input={manifest}", f"--output={folder / 'out'}"])
    return folder / "out"


@pytest.fixture(scope="module")
def train_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("train")
    (folder / "metrics.json").write_text(json.dumps(METRICS))
    return folder


@pytest.fixture(scope="module")
def real_report(real_run: Path, train_dir: Path) -> Path:
    assert main([str(real_run), "--train", str(train_dir)]) == 0
    return real_run / "report.html"


@pytest.fixture(scope="module")
def page(real_report: Path) -> Page:
    return Page(real_report.read_text("utf-8"))


@pytest.fixture(scope="module")
def run_summary(real_run: Path) -> dict[str, Any]:
    return json.loads((real_run / "_run.json").read_text())


def test_every_section_is_there_in_order(page: Page) -> None:
    assert list(page.sections) == [*SECTIONS, "training"]


def test_record_and_modality_counts_are_those_of_run_json(page: Page, run_summary: dict[str, Any]) -> None:
    records = page.sections["records"].rows_by_first_cell("records")
    for key, value in run_summary["records"].items():
        assert records[key.replace("_", " ")] == [str(value)]
    assert records["error rows"] == [str(run_summary["error_rows"])]
    assert "the counts reconcile" in page.sections["records"].text

    modalities = page.sections["modalities"].rows_by_first_cell("present")
    assert set(modalities) == {"text", "image", "audio"}
    for name, counts in run_summary["modalities"].items():
        shown = ("present", "embedded", "shared", "kept", "failed", "absent")
        assert modalities[name][: len(shown)] == [str(counts[k]) for k in shown]


def test_coverage_counts_the_feature_rows_modalities(page: Page, real_run: Path) -> None:
    features = schema.read_features(str(real_run / "features")).to_pylist()
    coverage = page.sections["coverage"]
    per_modality = coverage.rows_by_first_cell("rows with an embedding")
    for name in ("text", "image", "audio"):
        assert per_modality[name][0] == str(sum(row[f"has_{name}"] for row in features))
    subsets = coverage.rows_by_first_cell("modalities")
    assert sum(int(rows) for rows, _ in subsets.values()) == len(features)
    every_modality = sum(all(row[f"has_{m}"] for m in ("text", "image", "audio")) for row in features)
    assert subsets["text + image + audio"][0] == str(every_modality)


def test_errors_are_grouped_by_type_with_their_rows(page: Page, real_run: Path) -> None:
    error_rows = schema.read_features(str(real_run / "errors")).to_pylist()
    assert error_rows, "the sample set holds broken files"
    errors = page.sections["errors"]
    overview = errors.rows_by_first_cell("error type")
    for error_type in {row["error_type"] for row in error_rows}:
        of_type = [row for row in error_rows if row["error_type"] == error_type]
        assert overview[error_type][0] == str(len(of_type))
        assert any(h.startswith(error_type) for h in errors.headings)
    example_ids = {row[0] for table in errors.tables if table[0][0] == "id" for row in table[1:]}
    assert example_ids == {row["id"] for row in error_rows}
    assert all(row["source"] in errors.text for row in error_rows)


def test_models_and_settings_come_from_run_json(page: Page, run_summary: dict[str, Any]) -> None:
    models = page.sections["models"]
    overview = models.rows_by_first_cell("weights sha256")
    for name, model in run_summary["models"].items():
        assert overview[name] == [model["model_id"], model["weights_sha256"], str(model["dimension"])]
        assert f"{name} preprocessing" in models.headings
    settings = {row[0]: row[1] for table in models.tables if table[0] == ["setting", "value"] for row in table[1:]}
    assert settings["method"] == run_summary["fusion"]["method"]
    assert settings["micro_batch_size"] == str(run_summary["options"]["micro_batch_size"])


def test_training_metrics_compare_fusion_with_each_modality(page: Page) -> None:
    training = page.sections["training"]
    metrics = training.table_with("accuracy")
    assert metrics[0] == ["method", "accuracy", "macro_recall", "macro_f1", "n", "accuracy_all_modalities"]
    assert metrics[1:] == [
        ["early_fusion", "0.9", "0.88", "0.87", "8", "1"],
        ["unimodal:text", "0.7", "0.69", "0.68", "8", "—"],
        ["unimodal:image", "0.6", "0.58", "0.55", "8", "—"],
    ]
    assert training.headings[-1] == "F1 per class"
    assert training.tables[-1] == [["method", "0", "1"], ["early_fusion", "1", "0.75"], ["unimodal:text", "0.8", "—"]]
    assert "Ignored entries without accuracy and macro_f1: unimodal:audio." in training.text
    assert [image["alt"] for image in training.images] == [
        "Accuracy and macro F1 of the fused classifier and the unimodal ones"
    ]


def test_plots_are_embedded_and_written_beside_the_page(page: Page, real_report: Path) -> None:
    written = {path.stem: path.read_bytes() for path in (real_report.parent / "report_files").glob("*.png")}
    assert set(written) == PLOTS_PER_RUN | {"train-metrics"}
    embedded = [base64.b64decode(image["src"].removeprefix(DATA_PNG)) for image in page.images]
    assert all(image["src"].startswith(DATA_PNG) and image["alt"] for image in page.images)
    assert sorted(embedded) == sorted(written.values())
    assert all(png.startswith(PNG_SIGNATURE) for png in embedded)


def test_the_page_is_self_contained(real_report: Path, page: Page) -> None:
    markup = real_report.read_text("utf-8")
    assert "script" not in page.tags and "link" not in page.tags
    assert "http://" not in markup and "https://" not in markup
    assert 'http-equiv="Content-Security-Policy"' in markup


def test_the_same_output_gives_the_same_report(real_run: Path, train_dir: Path, real_report: Path) -> None:
    again = build_report(str(real_run), str(train_dir))
    assert again.html == real_report.read_text("utf-8")


# -- tables written here for the edge cases ----------------------------------------------------
def _vector(dim: int, first: float) -> np.ndarray:
    vector = np.zeros(dim, np.float32)
    vector[0] = first
    return vector


def feature_row(
    index: int, modalities: tuple[str, ...] = ("text", "image", "audio"), label: str | None = "0"
) -> dict[str, Any]:
    """Row ``index``: each of its embeddings is (index + 1, 0, ...), so its norm is index + 1."""
    row: dict[str, Any] = {
        "id": f"r{index}",
        "label": label,
        "split": "train",
        "failed_modalities": [],
        "event_timestamp": datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc),
        "created_timestamp": datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc),
        "content_hash": None,
        "fused": _vector(DIMS["fused"], index + 1),
    }
    for name in ("text", "image", "audio"):
        row[f"has_{name}"] = name in modalities
        row[f"{name}_embedding"] = _vector(DIMS[name], index + 1) if name in modalities else None
    return row


def error_row(**values: Any) -> dict[str, Any]:
    return {
        "id": "r0",
        "modality": "image",
        "stage": "decode",
        "error_type": "corrupt_image",
        "message": "not an image",
        "source": "images/r0.png",
        **values,
    }


def write_run(
    folder: Path, features: list[list[dict[str, Any]]], errors: list[dict[str, Any]], summary: dict | None = None
) -> Path:
    """A run's output folder as a run commits it: the feature table in the given parts, the error
    table, and _run.json holding ``summary`` and listing them."""
    tables = {
        "features": [rows_to_table(rows, schema.features_schema(DIMS)) for rows in features],
        "errors": [rows_to_table(errors, schema.errors_schema())],
    }
    commit_tables(str(folder), tables, summary)
    return folder


def test_hostile_strings_are_escaped_everywhere(tmp_path: Path) -> None:
    labels = [HOSTILE, r"$\frac{", "<b>"]
    rows = [feature_row(i, label=labels[i % 3]) for i in range(6)]
    errors = [error_row(id=HOSTILE, message=HOSTILE, source=HOSTILE, error_type=HOSTILE)]
    summary = {
        "models": {"text": {"model_id": HOSTILE, "preprocessing": {HOSTILE: HOSTILE}}},
        "options": {"input": [HOSTILE]},
    }
    output = write_run(tmp_path, [rows], errors, summary)
    assert main([str(output)]) == 0
    markup = (output / "report.html").read_text("utf-8")
    parsed = Page(markup)
    assert "script" not in parsed.tags and all(image["src"].startswith(DATA_PNG) for image in parsed.images)
    assert HOSTILE not in markup and "<b>" not in markup
    assert markup.count("&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;") >= 5
    assert HOSTILE in parsed.sections["errors"].text  # escaped once, so it reads as written


def test_empty_tables_give_a_page_of_notes(tmp_path: Path) -> None:
    nothing = {"present": 0, "embedded": 0, "failed": 0, "absent": 0}
    summary = {"records": {"read": 0, "accepted": 0}, "modalities": {m: nothing for m in ("text", "image", "audio")}}
    output = write_run(tmp_path, [[]], [], summary)
    result = build_report(str(output))
    parsed = Page(result.html)
    assert "The feature table has no rows." in parsed.sections["coverage"].text
    assert "No error rows." in parsed.sections["errors"].text
    assert all(f"No {m} vectors." in parsed.sections["norms"].text for m in ("text", "image", "audio", "fused"))
    assert [plot.name for plot in result.plots] == ["modality-counts"]


def test_a_modality_without_vectors_and_records_without_labels(tmp_path: Path) -> None:
    rows = [feature_row(i, ("text", "image"), label=None) for i in range(5)]
    output = write_run(tmp_path, [rows], [])
    parsed = Page(build_report(str(output)).html)
    assert "No record counts in _run.json." in parsed.sections["records"].text
    assert "No audio vectors." in parsed.sections["norms"].text
    assert "Fewer than 2 audio vectors: nothing to project." in parsed.sections["projections"].text
    assert "the records have no labels" in parsed.sections["projections"].text
    assert {image["alt"] for image in parsed.sections["projections"].images} == {
        "2-D projection of 5 text vectors",
        "2-D projection of 5 image vectors",
        "2-D projection of 5 fused vectors",
    }


def test_the_sample_spans_the_parts_and_keeps_labels_with_their_vectors(tmp_path: Path) -> None:
    rows = [feature_row(i, ("text",) if i % 2 == 0 else ("image",), label=str(i)) for i in range(30)]
    write_run(tmp_path, [rows[:7], rows[7:8], rows[8:]], [])
    digest = digest_features(schema.committed_table(str(tmp_path / "features")), sample_size=10, seed=3)
    assert digest.rows == 30
    assert sorted(digest.embeddings["fused"].all_norms()) == pytest.approx(list(range(1, 31)))
    for name in ("text", "image", "fused"):
        embedding = digest.embeddings[name]
        firsts = embedding.sample_vectors()[:, 0]
        assert firsts.tolist() == [row + 1 for row in row_numbers(embedding.sample_labels)]
    assert len(digest.embeddings["fused"].sample_labels) == 10
    sampled = set(row_numbers(digest.embeddings["fused"].sample_labels))
    assert set(row_numbers(digest.embeddings["text"].sample_labels)) == {row for row in sampled if row % 2 == 0}
    assert max(sampled) >= 8, "rows after the first parts are sampled too"


def row_numbers(labels: list[str | None]) -> list[int]:
    """The row numbers that the labels of ``feature_row(i, label=str(i))`` rows are."""
    numbers = [int(label) for label in labels if label is not None]
    assert len(numbers) == len(labels), "every sampled row keeps its label"
    return numbers


def test_every_label_keeps_one_colour_in_natural_order() -> None:
    labels = [str(n) for n in range(25, 0, -1)] + ["cat", None, "7"]
    colours = report.label_colours(labels)
    assert list(colours) == [*(str(n) for n in range(1, 26)), "cat", None]
    assert len(set(colours.values())) == len(colours)


def test_train_metrics_may_be_a_flat_mapping_of_methods(tmp_path: Path) -> None:
    flat = {"fused": {"accuracy": 1, "macro_f1": 0.5}, "text": {"accuracy": "high"}, "seed": 0}
    (tmp_path / "metrics.json").write_text(json.dumps(flat))
    metrics = report.read_train_metrics(str(tmp_path))
    assert metrics.methods == {"fused": {"accuracy": 1, "macro_f1": 0.5}} and metrics.ignored == ["text"]


def test_train_metrics_that_are_not_json_are_an_error(tmp_path: Path) -> None:
    (tmp_path / "metrics.json").write_text("{not json")
    with pytest.raises(report.ReportError, match="is not JSON"):
        report.read_train_metrics(str(tmp_path))


def test_a_fsspec_url_in_and_out(tmp_path: Path) -> None:
    write_run(tmp_path / "local", [[feature_row(i) for i in range(3)]], [error_row()])
    memory = fsspec.filesystem("memory")
    memory.put(str(tmp_path / "local"), "/report-run", recursive=True)
    try:
        assert main(["memory://report-run", "--out", "memory://pages/run.html"]) == 0
        assert memory.cat_file("/pages/run.html").startswith(b"<!DOCTYPE html>")
        plots = {Path(path).name for path in memory.ls("/pages/run_files", detail=False)}
        assert {"norms-fused.png", "projection-text.png"} <= plots
    finally:
        for folder in ("/report-run", "/pages"):
            memory.rm(folder, recursive=True)


def test_no_run_output_or_no_metrics_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path / "nothing")]) == 2
    assert "no run output" in capsys.readouterr().err
    output = write_run(tmp_path / "run", [[feature_row(0)]], [])
    assert main([str(output), "--train", str(tmp_path)]) == 2
    assert "no metrics.json" in capsys.readouterr().err
    assert not (output / "report.html").exists()


# -- in a real browser -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def devtools(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevTools]:
    binary = find_chromium()
    if binary is None:
        pytest.skip("no chromium binary on PATH (apt-get install chromium)")
    browser = Chromium(binary, tmp_path_factory.mktemp("chromium-profile"))
    try:
        connection = DevTools(browser.websocket_url)
        try:
            yield connection
        finally:
            connection.close()
    finally:
        browser.close()


def test_the_report_renders_in_chromium_without_errors(devtools: DevTools, real_report: Path) -> None:
    seen = visit(devtools, real_report.as_uri())
    assert seen.problems == []
    assert seen.title == "mmfeatures run report"
    assert len(seen.images) == len(PLOTS_PER_RUN) + 1
    for image in seen.images:
        assert image["complete"] and image["naturalWidth"] > 0 and image["naturalHeight"] > 0, image
        assert image["scheme"] == "data", image
    assert {url.split(":")[0] for url in seen.requested_urls} <= {"file", "data"}


def test_hostile_strings_stay_text_in_chromium(devtools: DevTools, tmp_path: Path) -> None:
    rows = [feature_row(i, label=HOSTILE) for i in range(3)]
    output = write_run(tmp_path, [rows], [error_row(message=HOSTILE, source=HOSTILE)])
    assert main([str(output)]) == 0
    seen = visit(devtools, (output / "report.html").as_uri())
    assert seen.problems == [] and seen.dialogs == []
    assert all(i["complete"] and i["naturalWidth"] > 0 for i in seen.images)


def test_the_browser_check_sees_broken_pages(devtools: DevTools, tmp_path: Path) -> None:
    """The harness itself: a page with a broken image, a console error and an exception."""
    broken = tmp_path / "broken.html"
    broken.write_text(
        f'<!DOCTYPE html><title>broken</title><img alt="bad" src="{DATA_PNG}AAAA">'
        '<script>console.error("boom"); throw new Error("bang")</script>'
    )
    seen = visit(devtools, broken.as_uri())
    assert seen.console_errors == ["boom"]
    assert any("bang" in text for text in seen.exceptions)
    assert [(i["alt"], i["naturalWidth"]) for i in seen.images] == [("bad", 0)]
