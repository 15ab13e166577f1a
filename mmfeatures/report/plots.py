"""The page's matplotlib figures, rendered to PNG with Agg and no pyplot state, so that making a
report changes no global figure or backend."""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from sklearn.decomposition import PCA

from mmfeatures.report.data import OPTIONAL_METRICS, is_number
from mmfeatures.report.markup import Html, escape

DPI = 100
MAX_LEGEND_LABELS = 20  # past this a legend hides the plot; colours alone still show clusters
UMAP_MIN_POINTS = 16  # UMAP's neighbourhood graph needs more points than its 15 neighbours
NO_LABEL_COLOUR = "#9e9e9e"
COUNT_COLOURS = {"embedded": "#2e7d32", "kept": "#81c784", "failed": "#c62828", "absent": "#bdbdbd"}
METRIC_COLOURS = {"accuracy": "#1565c0", "macro_recall": "#6a1b9a", "macro_f1": "#ef6c00"}


@dataclass(frozen=True)
class Plot:
    name: str  # file name stem under the report's ``_files`` folder
    png: bytes


class Plots:
    """Renders figures to PNG and keeps them, to be written beside the page as well."""

    def __init__(self) -> None:
        self.plots: list[Plot] = []

    def embed(self, name: str, figure: Figure, alt: str) -> Html:
        """The figure as an inline PNG with ``alt`` as its caption; kept under ``name``."""
        buffer = io.BytesIO()
        FigureCanvasAgg(figure).print_png(buffer, metadata={"Software": None})  # bytes free of the matplotlib version
        width, height = (figure.get_size_inches() * DPI).round().astype(int)
        self.plots.append(Plot(name, buffer.getvalue()))
        source = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
        return Html(
            f'<figure><img src="{source}" alt="{escape(alt)}" width="{width}" height="{height}">'
            f"<figcaption>{escape(alt)}</figcaption></figure>"
        )


def new_figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def plot_text(text: str, limit: int = 40) -> str:
    """Text from the run's files as matplotlib shows it literally: ``$`` would start mathtext."""
    text = text if len(text) <= limit else text[: limit - 1] + "…"
    return text.replace("$", r"\$")


def label_colours(labels: Sequence[str | None]) -> dict[str | None, str]:
    """One colour per label, the same in every plot; labels in natural order (digits as numbers)."""
    names = sorted({label for label in labels if label is not None}, key=natural_key)
    palette = colormaps["tab10" if len(names) <= 10 else "tab20" if len(names) <= 20 else "turbo"]
    spread = [palette(i if len(names) <= 20 else i / max(len(names) - 1, 1)) for i in range(len(names))]
    colours: dict[str | None, str] = {name: to_hex(colour) for name, colour in zip(names, spread, strict=True)}
    colours[None] = NO_LABEL_COLOUR
    return colours


def natural_key(label: str) -> tuple[int, float, str]:
    """Numbers by value ("2" before "10"), then everything else as text."""
    try:
        number = float(label)
    except ValueError:
        return (1, 0.0, label)
    return (0, number, label) if math.isfinite(number) else (1, 0.0, label)


def modality_counts_figure(modalities: Mapping[str, Mapping[str, int]]) -> Figure:
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


def subsets_figure(subsets: Mapping[str, int]) -> Figure:
    figure = new_figure(6.5, 0.6 + 0.35 * len(subsets))
    axes = figure.add_subplot()
    axes.barh(list(subsets), list(subsets.values()), color="#1565c0")
    axes.invert_yaxis()
    axes.set_xlabel("feature rows")
    return figure


def norms_figure(modality: str, norms: np.ndarray) -> Figure:
    figure = new_figure(5.5, 3.0)
    axes = figure.add_subplot()
    axes.hist(norms, bins=max(1, min(50, int(math.sqrt(len(norms))))), color="#455a64")
    axes.set_xlabel(f"L2 norm of {modality} vectors")
    axes.set_ylabel("vectors")
    return figure


def projections(vectors: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """2-D views of the vectors: PCA always, UMAP as well when it is installed and there are
    enough points for its neighbourhood graph."""
    with np.errstate(divide="ignore", invalid="ignore"):  # identical points: zero variance
        views = {"PCA": PCA(n_components=2, random_state=seed).fit_transform(vectors)}
    try:
        import umap  # optional (umap-learn), and slow to import: only when there is something to project
    except ImportError:
        return views
    if len(vectors) >= UMAP_MIN_POINTS:
        views["UMAP"] = umap.UMAP(n_components=2, random_state=seed, n_jobs=1).fit_transform(vectors)
    return views


def projection_figure(
    views: Mapping[str, np.ndarray], labels: Sequence[str | None], colours: Mapping[str | None, str]
) -> Figure:
    """The views side by side, each record coloured by its label, one legend for all."""
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


def metrics_figure(methods: Mapping[str, Mapping[str, Any]]) -> Figure:
    """Grouped bars, one group per method: fusion and the unimodal baselines side by side."""
    candidates = ("accuracy", *OPTIONAL_METRICS, "macro_f1")
    metrics = [metric for metric in candidates if all(is_number(m.get(metric)) for m in methods.values())]
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
