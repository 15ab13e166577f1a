"""The ``mmfeatures report`` command: the page and its PNGs written where asked."""

from __future__ import annotations

import argparse
import os
import sys

from fsspec.core import url_to_fs

from mmfeatures import storage
from mmfeatures.redaction import redact
from mmfeatures.report.data import METRICS_FILE, ReportError
from mmfeatures.report.page import Report, build_report


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
    """Exit status 0 with the report written, 2 where there is no run output or no metrics file."""
    parser = argparse.ArgumentParser(
        prog="mmfeatures report",
        description="Write a self-contained HTML report (with its PNG plots) about one run's output.",
    )
    parser.add_argument("output", metavar="OUTPUT", help="The run's output folder, local or fsspec URL.")
    parser.add_argument(
        "--train", metavar="DIR", help=f"A training run's folder: its {METRICS_FILE} adds fusion versus each modality."
    )
    parser.add_argument(
        "--out", metavar="PATH", help="The page (default OUTPUT/report.html); its PNGs go to PATH's stem + _files/."
    )
    args = parser.parse_args(argv)
    out = args.out or storage.join(args.output, "report.html")
    try:
        report = build_report(args.output, args.train)
    except ReportError as exc:
        print(f"mmfeatures report: error: {exc}", file=sys.stderr)
        return 2
    write_report(report, out)
    print(f"report: {redact(out)} ({len(report.plots)} plots in {redact(files_folder(out))})")
    return 0
