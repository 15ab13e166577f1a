"""``mmfeatures report``: one self-contained HTML page about one run's output.

A run's tables may sit in a bucket and be looked at by people with no notebook at hand, so the
report is a single static file: inline CSS, the plots embedded as PNG data URIs (and written beside
the page too, for slides and tickets), no JavaScript and no external resource; its Content Security
Policy forbids both, so it shows the same thing offline, attached to a ticket, years later.

Everything comes from what the run wrote: ``_run.json`` (counts, models, settings), the feature
and error tables read part by part (so memory is bounded by one part however large the table),
and optionally a training run's
``metrics.json``. Every string from those files is HTML-escaped; paths are redacted like everything
else the job prints.

The modules, each using only those before it: ``markup`` (escaping and HTML blocks), ``data``
(reading and digesting the run's files), ``plots`` (the figures), ``sections`` (the page's
sections), ``page`` (the whole page) and ``command`` (the command line, writing the files).
"""

from mmfeatures.report.command import main, write_report
from mmfeatures.report.data import ReportError, digest_features, read_train_metrics
from mmfeatures.report.page import Report, build_report
from mmfeatures.report.plots import label_colours

__all__ = [
    "Report",
    "ReportError",
    "build_report",
    "digest_features",
    "label_colours",
    "main",
    "read_train_metrics",
    "write_report",
]
