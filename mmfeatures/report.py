"""``mmfeatures report``: one self-contained HTML page about one run's output.

A run's tables may sit in a bucket and be looked at by people with no notebook at hand, so the
report is a single static file: inline CSS, the plots embedded as PNG data URIs (and written beside
the page too, for slides and tickets), no JavaScript and no external resource; its Content Security
Policy forbids both, so it shows the same thing offline, attached to a ticket, years later.

Everything comes from what the run wrote: ``_run.json`` (counts, models, settings), the feature
table read part by part through its ``_manifest.json`` (so memory is bounded by one part however
large the table), and the error table; optionally a training run's ``metrics.json``. Every string
from those files is HTML-escaped; paths are redacted like everything else the job prints.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import math
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
from fsspec import AbstractFileSystem
from fsspec.core import url_to_fs

from mmfeatures import schema, storage
from mmfeatures.redaction import redact

SAMPLE_SIZE = 5000  # most points in one projection: enough to see structure, small enough to draw
SAMPLE_SEED = 0
EXAMPLES_PER_ERROR_TYPE = 3
MAX_MESSAGE_CHARS = 300
MAX_LEGEND_LABELS = 20  # past this a legend hides the plot; colours alone still show clusters
UMAP_MIN_POINTS = 16  # UMAP's neighbourhood graph needs more points than its 15 neighbours
METRICS_FILE = "metrics.json"
REQUIRED_METRICS = ("accuracy", "macro_f1")
OPTIONAL_METRICS = ("macro_recall",)
PER_CLASS_F1 = "per_class_f1"
TEST_RECORDS = "n"
ALL_MODALITIES_ACCURACY = "accuracy_all_modalities"  # our name for test_all_modalities.accuracy

FUSED = "fused"
# {"text": "text_embedding", "image": ..., "audio": ..., "fused": "fused"}, from the contract, so a
# new modality's column is reported without a change here.
EMBEDDING_COLUMNS: dict[str, str] = {
    f["modality"]: f["name"] for f in schema.load_contract("features")["fields"] if f["type"] == "embedding"
}
MODALITIES = tuple(name for name in EMBEDDING_COLUMNS if name != FUSED)

NO_LABEL_COLOUR = "#9e9e9e"
COUNT_COLOURS = {"embedded": "#2e7d32", "failed": "#c62828", "absent": "#bdbdbd"}
METRIC_COLOURS = {"accuracy": "#1565c0", "macro_recall": "#6a1b9a", "macro_f1": "#ef6c00"}
DPI = 100


class ReportError(Exception):
    """The report cannot be made: no run output at the path, or ``--train`` has no metrics file."""


class Html(str):
    """Markup that is safe as it is; every other value is escaped when it enters the page."""


def escape(value: Any) -> Html:
    return value if isinstance(value, Html) else Html(html.escape(display(value)))


def display(value: Any) -> str:
    """How a value from the run's files reads on the page."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, sort_keys=True)
    return str(value)


def percent(part: float, whole: float) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "—"


# -- reading the run ---------------------------------------------------------------------------
def _read_json(path: str) -> Any | None:
    """A JSON file's content, or None where there is no such file."""
    fs, fs_path = url_to_fs(path)
    try:
        return json.loads(fs.cat_file(fs_path))
    except FileNotFoundError:
        return None
    except ValueError as exc:  # not JSON, or not UTF-8
        raise ReportError(f"{redact(path)} is not JSON: {exc}") from None


@dataclass(frozen=True)
class CommittedTable:
    """The parts a table's ``_manifest.json`` lists: the table, whatever else lies in the folder."""

    fs: AbstractFileSystem
    parts: list[str]
    rows: int

    @classmethod
    def open(cls, directory: str) -> "CommittedTable | None":
        """The committed table under ``directory``, or None when none was ever committed."""
        fs, root = url_to_fs(directory)
        try:
            manifest = json.loads(fs.cat_file(f"{root.rstrip('/')}/{schema.MANIFEST}"))
        except FileNotFoundError:
            return None
        files = manifest.get("files", [])
        return cls(fs, [f"{root.rstrip('/')}/{f['path']}" for f in files], sum(f.get("rows", 0) for f in files))

    def read_parts(self) -> Iterator[pa.Table]:
        """One part at a time, embeddings as ``fixed_size_list``: memory stays that of one part."""
        for part in self.parts:
            yield schema.read_features(part, filesystem=self.fs)


@dataclass
class EmbeddingDigest:
    """One embedding column, reduced to what the page shows."""

    norms: list[np.ndarray] = field(default_factory=list)
    sample: list[np.ndarray] = field(default_factory=list)
    sample_labels: list[str | None] = field(default_factory=list)

    def all_norms(self) -> np.ndarray:
        return np.concatenate(self.norms) if self.norms else np.zeros(0, np.float32)

    def sample_vectors(self) -> np.ndarray:
        return np.concatenate(self.sample) if self.sample else np.zeros((0, 0), np.float32)


@dataclass
class FeatureDigest:
    """The feature table reduced part by part: norms of every vector, a seeded sample of records
    (the same records in every modality, so their projections can be compared), and how many rows
    have each subset of modalities embedded."""

    rows: int = 0
    embeddings: dict[str, EmbeddingDigest] = field(
        default_factory=lambda: {name: EmbeddingDigest() for name in EMBEDDING_COLUMNS}
    )
    subsets: Counter[tuple[str, ...]] = field(default_factory=Counter)

    def add_part(self, part: pa.Table, sampled_rows: np.ndarray) -> None:
        """Fold in one part; ``sampled_rows`` are the sampled positions within it."""
        labels = part.column("label").to_pylist() if "label" in part.column_names else [None] * part.num_rows
        for modality, column in EMBEDDING_COLUMNS.items():
            if column in part.column_names:
                self._add_vectors(modality, part.column(column).combine_chunks(), sampled_rows, labels)
        self._add_subsets(part)
        self.rows += part.num_rows

    def _add_vectors(self, modality: str, column: pa.Array, sampled_rows: np.ndarray, labels: list[str | None]) -> None:
        present = np.asarray(column.is_valid(), dtype=bool)
        dim = column.type.list_size
        vectors = np.asarray(column.filter(pa.array(present)).flatten(), dtype=np.float32).reshape(-1, dim)
        digest = self.embeddings[modality]
        digest.norms.append(np.linalg.norm(vectors, axis=1))
        sampled_present = sampled_rows[present[sampled_rows]]
        digest.sample.append(vectors[(np.cumsum(present) - 1)[sampled_present]])
        digest.sample_labels.extend(labels[row] for row in sampled_present)

    def _add_subsets(self, part: pa.Table) -> None:
        codes = np.zeros(part.num_rows, np.int64)
        for bit, modality in enumerate(MODALITIES):
            if f"has_{modality}" in part.column_names:
                codes |= np.asarray(part.column(f"has_{modality}"), dtype=np.int64) << bit
        for code, count in enumerate(np.bincount(codes, minlength=1 << len(MODALITIES))):
            if count:
                self.subsets[tuple(m for bit, m in enumerate(MODALITIES) if code >> bit & 1)] += int(count)


def digest_features(
    table: CommittedTable | None, sample_size: int = SAMPLE_SIZE, seed: int = SAMPLE_SEED
) -> FeatureDigest:
    digest = FeatureDigest()
    if table is None:
        return digest
    sampled = np.sort(np.random.default_rng(seed).choice(table.rows, min(sample_size, table.rows), replace=False))
    for part in table.read_parts():
        start, end = digest.rows, digest.rows + part.num_rows
        digest.add_part(part, sampled[(sampled >= start) & (sampled < end)] - start)
    return digest


@dataclass
class ErrorType:
    """The error rows of one ``error_type``: how many, where they arose, and the first few."""

    rows: int = 0
    stages: Counter[str] = field(default_factory=Counter)
    modalities: Counter[str] = field(default_factory=Counter)
    examples: list[dict[str, Any]] = field(default_factory=list)


def digest_errors(table: CommittedTable | None) -> dict[str, ErrorType]:
    """Error rows grouped by type, most frequent first, keeping only a few examples of each."""
    groups: dict[str, ErrorType] = {}
    for part in table.read_parts() if table else ():
        for row in part.to_pylist():
            group = groups.setdefault(row.get("error_type") or "unknown", ErrorType())
            group.rows += 1
            group.stages[row.get("stage") or "—"] += 1
            group.modalities[row.get("modality") or "record"] += 1
            if len(group.examples) < EXAMPLES_PER_ERROR_TYPE:
                group.examples.append(row)
    return dict(sorted(groups.items(), key=lambda item: (-item[1].rows, item[0])))


@dataclass(frozen=True)
class TrainMetrics:
    """The usable methods of a ``metrics.json`` as flat score mappings, and the names of entries
    that lacked scores."""

    methods: dict[str, dict[str, Any]]
    ignored: list[str]


def read_train_metrics(train_dir: str) -> TrainMetrics:
    """``TRAIN_DIR/metrics.json``, read defensively. The methods are a mapping of method name to
    entry, under ``"methods"`` (or at the top level); an entry's scores are the entry itself or its
    ``"test"`` mapping, and count when ``accuracy`` and ``macro_f1`` are finite numbers. Shown where
    present: ``macro_recall``, ``n`` (test records), ``per_class_f1`` (class -> F1) and the
    entry's ``test_all_modalities.accuracy``. Anything else in the file is left alone."""
    content = _read_json(storage.join(train_dir, METRICS_FILE))
    if content is None:
        raise ReportError(f"no {METRICS_FILE} in {redact(train_dir)}")
    candidates = content.get("methods", content) if isinstance(content, dict) else {}
    entries = {
        str(name): entry
        for name, entry in (candidates.items() if isinstance(candidates, dict) else ())
        if isinstance(entry, dict)
    }
    methods = {name: scores for name, entry in entries.items() if (scores := _method_scores(entry)) is not None}
    return TrainMetrics(methods, [name for name in entries if name not in methods])


def _method_scores(entry: Mapping[str, Any]) -> dict[str, Any] | None:
    for scores in (entry, entry.get("test")):
        if isinstance(scores, dict) and all(_is_number(scores.get(key)) for key in REQUIRED_METRICS):
            complete = entry.get("test_all_modalities")
            if isinstance(complete, dict) and _is_number(complete.get("accuracy")):
                return {**scores, ALL_MODALITIES_ACCURACY: complete["accuracy"]}
            return scores
    return None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# -- plots -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plot:
    name: str  # file name stem under the report's ``_files`` folder
    png: bytes


class Plots:
    """Renders matplotlib figures to PNG (Agg, no pyplot state) and keeps them for writing out."""

    def __init__(self) -> None:
        self.plots: list[Plot] = []

    def embed(self, name: str, figure: Any, alt: str) -> Html:
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        buffer = io.BytesIO()
        FigureCanvasAgg(figure).print_png(buffer, metadata={"Software": None})
        width, height = (figure.get_size_inches() * DPI).round().astype(int)
        self.plots.append(Plot(name, buffer.getvalue()))
        source = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
        return Html(
            f'<figure><img src="{source}" alt="{escape(alt)}" width="{width}" height="{height}">'
            f"<figcaption>{escape(alt)}</figcaption></figure>"
        )


def new_figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def plot_text(text: str, limit: int = 40) -> str:
    """Text from the run's files as matplotlib shows it literally: ``$`` would start mathtext."""
    text = text if len(text) <= limit else text[: limit - 1] + "…"
    return text.replace("$", r"\$")


def label_colours(labels: Sequence[str | None]) -> dict[str | None, str]:
    """One colour per label, the same in every plot; labels in natural order (digits as numbers)."""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    names = sorted({label for label in labels if label is not None}, key=_natural_key)
    palette = colormaps["tab10" if len(names) <= 10 else "tab20" if len(names) <= 20 else "turbo"]
    spread = [palette(i if len(names) <= 20 else i / max(len(names) - 1, 1)) for i in range(len(names))]
    colours: dict[str | None, str] = {name: to_hex(colour) for name, colour in zip(names, spread)}
    colours[None] = NO_LABEL_COLOUR
    return colours


def _natural_key(label: str) -> tuple[int, float, str]:
    """Numbers by value ("2" before "10"), then everything else as text."""
    try:
        number = float(label)
    except ValueError:
        return (1, 0.0, label)
    return (0, number, label) if math.isfinite(number) else (1, 0.0, label)


def modality_counts_figure(modalities: Mapping[str, Mapping[str, int]]) -> Any:
    figure = new_figure(6.5, 0.6 + 0.5 * len(modalities))
    axes = figure.add_subplot()
    names = list(modalities)
    left = np.zeros(len(names))
    for kind, colour in COUNT_COLOURS.items():
        values = np.array([modalities[name].get(kind, 0) for name in names], dtype=float)
        axes.barh(names, values, left=left, color=colour, label=kind)
        left += values
    axes.invert_yaxis()
    axes.set_xlabel("records")
    figure.legend(loc="outside right upper", fontsize="small")
    return figure


def subsets_figure(subsets: Mapping[str, int]) -> Any:
    figure = new_figure(6.5, 0.6 + 0.35 * len(subsets))
    axes = figure.add_subplot()
    axes.barh(list(subsets), list(subsets.values()), color="#1565c0")
    axes.invert_yaxis()
    axes.set_xlabel("feature rows")
    return figure


def norms_figure(modality: str, norms: np.ndarray) -> Any:
    figure = new_figure(5.5, 3.0)
    axes = figure.add_subplot()
    axes.hist(norms, bins=max(1, min(50, int(math.sqrt(len(norms))))), color="#455a64")
    axes.set_xlabel(f"L2 norm of {modality} vectors")
    axes.set_ylabel("vectors")
    return figure


def projections(vectors: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """2-D views of the vectors: PCA always, UMAP as well when it is installed and there are
    enough points for its neighbourhood graph."""
    from sklearn.decomposition import PCA

    with np.errstate(divide="ignore", invalid="ignore"):  # identical points: zero variance
        views = {"PCA": PCA(n_components=2, random_state=seed).fit_transform(vectors)}
    try:
        import umap
    except ImportError:
        return views
    if len(vectors) >= UMAP_MIN_POINTS:
        views["UMAP"] = umap.UMAP(n_components=2, random_state=seed, n_jobs=1).fit_transform(vectors)
    return views


def projection_figure(
    views: Mapping[str, np.ndarray], labels: Sequence[str | None], colours: Mapping[str | None, str]
) -> Any:
    figure = new_figure(4.8 * len(views) + 1.6, 4.2)
    present = set(labels)
    shown = [label for label in colours if label in present]
    for index, (method, points) in enumerate(views.items(), start=1):
        axes = figure.add_subplot(1, len(views), index)
        for label in shown:
            mask = np.array([value == label for value in labels])
            name = "(no label)" if label is None else plot_text(label)
            axes.scatter(points[mask, 0], points[mask, 1], s=10, color=colours[label], label=name, alpha=0.8)
        axes.set_title(method)
        axes.set_xticks([])
        axes.set_yticks([])
    if len(shown) <= MAX_LEGEND_LABELS:
        figure.legend(*axes.get_legend_handles_labels(), loc="outside right upper", fontsize="small", title="label")
    return figure


def metrics_figure(methods: Mapping[str, Mapping[str, Any]]) -> Any:
    """Grouped bars, one group per method: fusion and the unimodal baselines side by side."""
    candidates = ("accuracy", *OPTIONAL_METRICS, "macro_f1")
    metrics = [metric for metric in candidates if all(_is_number(m.get(metric)) for m in methods.values())]
    figure = new_figure(max(6.0, 1.2 * len(methods) + 3.0), 3.8)
    axes = figure.add_subplot()
    width = 0.8 / len(metrics)
    positions = np.arange(len(methods))
    for index, metric in enumerate(metrics):
        values = [float(m[metric]) for m in methods.values()]
        offsets = positions + (index - (len(metrics) - 1) / 2) * width
        bars = axes.bar(offsets, values, width, label=metric, color=METRIC_COLOURS[metric])
        axes.bar_label(bars, fmt="%.2f", fontsize="x-small")
    axes.set_xticks(positions, [plot_text(name, 24) for name in methods], rotation=20, ha="right")
    axes.set_ylim(0, 1.1 * max(1.0, *(float(m[metric]) for m in methods.values() for metric in metrics)))
    figure.legend(loc="outside right upper", fontsize="small")
    return figure


# -- page sections -----------------------------------------------------------------------------
NUMBER = re.compile(r"[-+]?[\d.,]+%?|—")


def table(headers: Sequence[Any], rows: Sequence[Sequence[Any]], align_numbers: bool = True) -> Html:
    """An HTML table; cells that read as numbers are right-aligned, so that columns compare."""
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(_cell(value, align_numbers) for value in row) + "</tr>" for row in rows)
    return Html(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")


def _cell(value: Any, align_numbers: bool) -> str:
    text = escape(value)
    return f'<td class="num">{text}</td>' if align_numbers and NUMBER.fullmatch(text) else f"<td>{text}</td>"


def key_values(mapping: Mapping[str, Any]) -> Html:
    """Settings of mixed types, all left-aligned: a column of them does not compare."""
    return table(["setting", "value"], [[key, value] for key, value in sorted(mapping.items())], align_numbers=False)


def card(title: str, *parts: Html) -> Html:
    return Html(f'<div class="card"><h3>{escape(title)}</h3>{"".join(parts)}</div>')


def grid(cards: Sequence[Html]) -> Html:
    return Html(f'<div class="grid">{"".join(cards)}</div>')


def note(text: str) -> Html:
    return Html(f'<p class="note">{escape(text)}</p>')


@dataclass(frozen=True)
class Section:
    anchor: str
    title: str
    body: Html

    def render(self) -> str:
        return f'<section id="{self.anchor}"><h2>{escape(self.title)}</h2>{self.body}</section>'


def section(anchor: str, title: str, *parts: Html) -> Section:
    return Section(anchor, title, Html("".join(parts)))


def records_section(summary: Mapping[str, Any]) -> Section:
    if not summary:
        return section("records", "Records", note("No _run.json: the run did not finish, so there are no counts."))
    records = summary.get("records", {})
    rows = [[key.replace("_", " "), value] for key, value in records.items()]
    rows += [[key.replace("_", " "), summary.get(key)] for key in ("feature_rows", "feature_files", "error_rows")]
    checks = [[key.replace("_", " "), value] for key, value in summary.get("checks", {}).items()]
    verdict = "the counts reconcile" if summary.get("reconciles") else "the counts do NOT reconcile"
    return section(
        "records",
        "Records",
        table(["", "records"], rows),
        Html(f'<p class="{"ok" if summary.get("reconciles") else "bad"}">{escape(verdict)}</p>'),
        table(["check", "holds"], checks) if checks else Html(""),
    )


def modalities_section(summary: Mapping[str, Any], plots: Plots) -> Section:
    modalities = summary.get("modalities") or {}
    if not modalities:
        return section("modalities", "Modalities", note("No per-modality counts in _run.json."))
    accepted = summary.get("records", {}).get("accepted", 0)
    rows = [
        [
            name,
            c.get("present"),
            c.get("embedded"),
            c.get("failed"),
            c.get("absent"),
            percent(c.get("present", 0), accepted),
            percent(c.get("embedded", 0), c.get("present", 0)),
        ]
        for name, c in modalities.items()
    ]
    headers = ["modality", "present", "embedded", "failed", "absent", "present / accepted", "embedded / present"]
    alt = "Records per modality: embedded, failed and absent"
    figure = plots.embed("modality-counts", modality_counts_figure(modalities), alt)
    return section("modalities", "Modalities", table(headers, rows), figure)


def coverage_section(features: FeatureDigest, plots: Plots) -> Section:
    if not features.rows:
        return section("coverage", "Coverage", note("The feature table has no rows."))
    embedded = {m: sum(n for subset, n in features.subsets.items() if m in subset) for m in MODALITIES}
    per_modality = [[m, embedded[m], percent(embedded[m], features.rows)] for m in MODALITIES]
    named = {" + ".join(subset) or "(none)": n for subset, n in features.subsets.most_common()}
    subset_rows = [[name, n, percent(n, features.rows)] for name, n in named.items()]
    alt = "Feature rows by the set of modalities embedded together"
    return section(
        "coverage",
        "Coverage",
        note(f"Of the {features.rows} feature rows; the modality table above counts inputs over all accepted records."),
        table(["modality", "rows with an embedding", "fraction"], per_modality),
        Html("<h3>Modalities embedded together</h3>"),
        table(["modalities", "rows", "fraction"], subset_rows),
        plots.embed("coverage-subsets", subsets_figure(named), alt),
    )


def errors_section(errors: dict[str, ErrorType]) -> Section:
    if not errors:
        return section("errors", "Errors", note("No error rows."))
    overview = table(
        ["error type", "rows", "stages", "modalities"],
        [[name, g.rows, ", ".join(g.stages), ", ".join(g.modalities)] for name, g in errors.items()],
    )
    examples = [
        Html(f"<h3>{escape(name)} <small>({len(group.examples)} of {group.rows} rows shown)</small></h3>")
        + table(["id", "modality", "stage", "message", "source"], [_error_cells(row) for row in group.examples])
        for name, group in errors.items()
    ]
    return section("errors", "Errors", overview, *examples)


def _error_cells(row: Mapping[str, Any]) -> list[Any]:
    """The job redacts messages and sources already; again here, for tables written otherwise."""
    message = redact(row.get("message") or "")
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[: MAX_MESSAGE_CHARS - 1] + "…"
    return [row.get("id"), row.get("modality") or "record", row.get("stage"), message, redact(row.get("source"))]


def norms_section(features: FeatureDigest, plots: Plots) -> Section:
    cards = []
    for modality, digest in features.embeddings.items():
        norms = digest.all_norms()
        if not len(norms):
            cards.append(card(modality, note(f"No {modality} vectors.")))
            continue
        stats = f"{len(norms)} vectors; min {norms.min():.4g}, median {np.median(norms):.4g}, max {norms.max():.4g}"
        figure = plots.embed(f"norms-{modality}", norms_figure(modality, norms), f"L2 norms of the {modality} vectors")
        cards.append(card(modality, note(stats), figure))
    return section("norms", "Embedding norms", grid(cards))


def projections_section(features: FeatureDigest, plots: Plots, seed: int) -> Section:
    labels = [label for digest in features.embeddings.values() for label in digest.sample_labels]
    colours = label_colours(labels)
    has_labels = len(colours) > 1
    explanation = note(
        f"A seeded sample of at most {SAMPLE_SIZE} records, the same in every modality; "
        + ("coloured by label." if has_labels else "the records have no labels.")
    )
    cards = []
    for modality, digest in features.embeddings.items():
        vectors = digest.sample_vectors()
        if len(vectors) < 2:
            cards.append(card(modality, note(f"Fewer than 2 {modality} vectors: nothing to project.")))
            continue
        figure = projection_figure(projections(vectors, seed), digest.sample_labels, colours)
        alt = f"2-D projection of {len(vectors)} {modality} vectors"
        cards.append(card(modality, plots.embed(f"projection-{modality}", figure, alt)))
    return section("projections", "Projections", explanation, grid(cards))


def models_section(summary: Mapping[str, Any]) -> Section:
    models = summary.get("models") or {}
    if not models and not summary.get("fusion"):
        return section("models", "Models and settings", note("No models or settings recorded (no _run.json)."))
    overview = table(
        ["modality", "model", "weights sha256", "dimension"],
        [[name, m.get("model_id"), m.get("weights_sha256"), m.get("dimension")] for name, m in models.items()],
    )
    settings = [card(f"{name} preprocessing", key_values(m.get("preprocessing") or {})) for name, m in models.items()]
    settings += [card(name, key_values(summary.get(name) or {})) for name in ("fusion", "options")]
    inputs = table(["manifest"], [[path] for path in summary.get("inputs") or []])
    return section("models", "Models and settings", overview, grid(settings), card("inputs", inputs))


def training_section(metrics: TrainMetrics, plots: Plots) -> Section:
    ignored = Html("")
    if metrics.ignored:
        ignored = note(f"Ignored entries without accuracy and macro_f1: {', '.join(metrics.ignored)}.")
    if not metrics.methods:
        nothing = note(f"{METRICS_FILE} holds no method with accuracy and macro_f1.")
        return section("training", "Training", nothing, ignored)
    extra = [c for c in (TEST_RECORDS, ALL_MODALITIES_ACCURACY) if any(c in m for m in metrics.methods.values())]
    columns = ["accuracy", *OPTIONAL_METRICS, "macro_f1", *extra]
    rows = [[name, *(scores.get(column) for column in columns)] for name, scores in metrics.methods.items()]
    overview = table(["method", *columns], rows)
    alt = "Accuracy and macro F1 of the fused classifier and the unimodal ones"
    parts = [overview, plots.embed("train-metrics", metrics_figure(metrics.methods), alt), ignored]
    per_class = {
        name: {str(label): f1 for label, f1 in scores[PER_CLASS_F1].items()}
        for name, scores in metrics.methods.items()
        if isinstance(scores.get(PER_CLASS_F1), dict)
    }
    if per_class:
        classes = sorted({label for f1s in per_class.values() for label in f1s}, key=_natural_key)
        rows = [[name, *(f1s.get(label) for label in classes)] for name, f1s in per_class.items()]
        parts += [Html("<h3>F1 per class</h3>"), table(["method", *classes], rows)]
    return section("training", "Training", *parts)


STYLE = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#212121;background:#fafafa}
header{background:#263238;color:#fff;padding:1.2em 2em}header h1{margin:0 0 .3em;font-size:1.5em}
header p{margin:.1em 0;opacity:.9;word-break:break-all}
nav{padding:.6em 2em;background:#eceff1;position:sticky;top:0}nav a{margin-right:1.2em;color:#37474f}
main{padding:0 2em 3em;max-width:1200px}section{margin-top:2em;scroll-margin-top:3em}
h2{border-bottom:2px solid #cfd8dc;padding-bottom:.2em}
table{border-collapse:collapse;margin:.6em 0;background:#fff}
th,td{border:1px solid #cfd8dc;padding:.3em .6em;text-align:left;vertical-align:top}th{background:#eceff1}
td{max-width:40em;overflow-wrap:anywhere}td.num{text-align:right}
figure{margin:.6em 0}figcaption{font-size:.85em;color:#607d8b}img{max-width:100%;height:auto;background:#fff}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(540px,1fr));gap:0 1.5em}
.note{color:#546e7a}.ok{color:#2e7d32;font-weight:600}.bad{color:#c62828;font-weight:600}
"""

# The page may load nothing but its own inline style and data-URI images, and run no script.
CONTENT_POLICY = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


@dataclass(frozen=True)
class Report:
    html: str
    plots: list[Plot]


def build_report(output: str, train_dir: str | None = None, seed: int = SAMPLE_SEED) -> Report:
    """The report of the run under ``output`` (a local folder or fsspec URL)."""
    summary = _read_json(storage.join(output, "_run.json"))
    features = CommittedTable.open(storage.join(output, "features"))
    errors = CommittedTable.open(storage.join(output, "errors"))
    if summary is None and features is None and errors is None:
        raise ReportError(f"no run output in {redact(output)} (no _run.json, features/ or errors/)")
    summary = summary if isinstance(summary, dict) else {}
    metrics = read_train_metrics(train_dir) if train_dir else None
    plots = Plots()
    digest = digest_features(features, seed=seed)
    sections = [
        records_section(summary),
        modalities_section(summary, plots),
        coverage_section(digest, plots),
        errors_section(digest_errors(errors)),
        norms_section(digest, plots),
        projections_section(digest, plots, seed),
        models_section(summary),
        *([training_section(metrics, plots)] if metrics else []),
    ]
    return Report(page(output, summary, sections), plots.plots)


def page(output: str, summary: Mapping[str, Any], sections: Sequence[Section]) -> str:
    recorded = (("started", "started", ""), ("wall time", "wall_seconds", " s"), ("mmfeatures", "package_version", ""))
    facts = [f"output {redact(output)}"]
    facts += [f"{name} {display(summary[key])}{unit}" for name, key, unit in recorded if key in summary]
    links = "".join(f'<a href="#{s.anchor}">{escape(s.title)}</a>' for s in sections)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CONTENT_POLICY}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>mmfeatures run report</title><style>{STYLE}</style></head><body>"
        f"<header><h1>mmfeatures run report</h1>{''.join(f'<p>{escape(fact)}</p>' for fact in facts)}</header>"
        f"<nav>{links}</nav><main>{''.join(s.render() for s in sections)}</main></body></html>\n"
    )


def files_folder(out: str) -> str:
    """Where the PNGs go: ``report.html`` -> ``report_files/``, beside the page."""
    return os.path.splitext(out)[0] + "_files"


def write_report(report: Report, out: str) -> None:
    """Write the page and its PNGs through fsspec (a local path or any URL)."""
    fs, page_path = url_to_fs(out)
    _, folder = url_to_fs(files_folder(out))
    fs.makedirs(folder, exist_ok=True)
    for plot in report.plots:
        fs.pipe_file(f"{folder}/{plot.name}.png", plot.png)
    fs.pipe_file(page_path, report.html.encode("utf-8"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mmfeatures report",
        description="Write a self-contained HTML report (with its PNG plots) about one run's output.",
    )
    parser.add_argument("output", metavar="OUTPUT", help="The run's output folder, local or fsspec URL.")
    parser.add_argument(
        "--train", metavar="DIR", help="A training run's folder: its metrics.json adds fusion versus each modality."
    )
    parser.add_argument(
        "--out", metavar="PATH", help="The page (default OUTPUT/report.html); its PNGs go to PATH's stem + _files/."
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    out = args.out or storage.join(args.output, "report.html")
    try:
        report = build_report(args.output, args.train)
    except ReportError as exc:
        print(f"mmfeatures report: error: {exc}", file=sys.stderr)
        return 2
    write_report(report, out)
    print(f"report: {redact(out)} ({len(report.plots)} plots in {redact(files_folder(out))})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
