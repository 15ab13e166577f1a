"""The whole page: the run read, its sections made, and the HTML around them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fsspec.core import url_to_fs

from mmfeatures import outputs
from mmfeatures.redaction import redact
from mmfeatures.report.data import (
    SAMPLE_SEED,
    ReportError,
    digest_errors,
    digest_features,
    read_train_metrics,
)
from mmfeatures.report.markup import Section, display, escape
from mmfeatures.report.plots import Plot, Plots
from mmfeatures.report.sections import (
    coverage_section,
    errors_section,
    modalities_section,
    models_section,
    norms_section,
    projections_section,
    records_section,
    training_section,
)

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
    fs, root = url_to_fs(output)
    try:
        summary = outputs.run_manifest(fs, root.rstrip("/"))  # read once: both tables of one commit
    except ValueError as exc:
        raise ReportError(f"{redact(output)}: {exc}") from None
    if summary is None:
        raise ReportError(f"no run output in {redact(output)} (no _run.json: no run committed there)")
    tables = outputs.tables_of(summary, fs, root.rstrip("/"))
    features, errors = tables.get("features"), tables.get("errors")
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
    return Report(render_page(output, summary, sections), plots.plots)


def render_page(output: str, summary: Mapping[str, Any], sections: Sequence[Section]) -> str:
    """The HTML document: a header of facts about the run, a link to each section, the sections."""
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
