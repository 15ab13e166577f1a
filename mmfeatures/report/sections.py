"""The page's sections, each from the part of the run it is about; a section with nothing to show
says why in a note instead."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from mmfeatures.records import MODALITY_COLUMNS
from mmfeatures.redaction import redact, redact_all
from mmfeatures.report.data import (
    ALL_MODALITIES_ACCURACY,
    METRICS_FILE,
    OPTIONAL_METRICS,
    PER_CLASS_F1,
    SAMPLE_SIZE,
    TEST_RECORDS,
    ErrorType,
    FeatureDigest,
    TrainMetrics,
)
from mmfeatures.report.markup import Html, Section, card, escape, grid, key_values, note, percent, section, table
from mmfeatures.report.plots import (
    Plots,
    label_colours,
    metrics_figure,
    modality_counts_figure,
    natural_key,
    norms_figure,
    projection_figure,
    projections,
    subsets_figure,
)

MAX_MESSAGE_CHARS = 300


def records_section(summary: Mapping[str, Any]) -> Section:
    records = summary.get("records")
    if not records:
        return section("records", "Records", note("No record counts in _run.json."))
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
            c.get("shared", 0),
            c.get("kept", 0),
            c.get("failed"),
            c.get("absent"),
            percent(c.get("present", 0), accepted),
            percent(c.get("embedded", 0) + c.get("kept", 0), c.get("present", 0)),
        ]
        for name, c in modalities.items()
    ]
    # shared: of those embedded, given another record's vector for the same content; kept: an
    # incremental run kept the record's previous row. Summaries of earlier releases have neither.
    headers = [
        "modality",
        "present",
        "embedded",
        "shared",
        "kept",
        "failed",
        "absent",
        "present / accepted",
        "with a vector / present",
    ]
    alt = "Records per modality: embedded, kept, failed and absent"
    figure = plots.embed("modality-counts", modality_counts_figure(modalities), alt)
    return section("modalities", "Modalities", table(headers, rows), figure)


def coverage_section(features: FeatureDigest, plots: Plots) -> Section:
    if not features.rows:
        return section("coverage", "Coverage", note("The feature table has no rows."))
    embedded = {m: sum(n for subset, n in features.subsets.items() if m in subset) for m in MODALITY_COLUMNS}
    per_modality = [[m, embedded[m], percent(embedded[m], features.rows)] for m in MODALITY_COLUMNS]
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


def errors_section(errors: Mapping[str, ErrorType]) -> Section:
    if not errors:
        return section("errors", "Errors", note("No error rows."))
    overview = table(
        ["error type", "rows", "stages", "modalities"],
        [[name, g.rows, ", ".join(g.stages), ", ".join(g.modalities)] for name, g in errors.items()],
    )
    examples = [
        Html(
            f"<h3>{escape(name)} <small>({len(group.examples)} of {group.rows} rows shown)</small></h3>"
            + table(["id", "modality", "stage", "message", "source"], [_error_cells(row) for row in group.examples])
        )
        for name, group in errors.items()
    ]
    return section("errors", "Errors", overview, *examples)


def _error_cells(row: Mapping[str, Any]) -> list[Any]:
    """The job redacts messages and sources already; again here, for tables written otherwise."""
    message = redact(row.get("message") or "")
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[: MAX_MESSAGE_CHARS - 1] + "…"
    return [row.get("id"), row.get("modality") or "record", row.get("stage"), message, redact_all(row.get("source"))]


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
        return section("models", "Models and settings", note("No models or settings recorded in _run.json."))
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
        classes = sorted({label for f1s in per_class.values() for label in f1s}, key=natural_key)
        rows = [[name, *(f1s.get(label) for label in classes)] for name, f1s in per_class.items()]
        parts += [Html("<h3>F1 per class</h3>"), table(["method", *classes], rows)]
    return section("training", "Training", *parts)
