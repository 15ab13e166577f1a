"""The ``mmfeatures`` command: ``extract`` runs the feature job, ``sample`` builds a sample set,
``train`` trains fusion classifiers on a feature table, ``report`` writes a run's HTML report,
``feast`` writes and applies a Feast feature repository for a run's table and loads its online store.

``mmfeatures extract`` takes the same options as ``python -m pipelines.extract_features``, Beam's
own included (e.g. ``--runner``); run ``mmfeatures extract --help`` for the job's options.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from collections.abc import Callable
from typing import Any

from mmfeatures import outputs, storage
from mmfeatures.errors import ConfigurationError
from mmfeatures.redaction import install_log_redaction, redact


def _configure_logging() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("mmfeatures").setLevel(logging.INFO)
    install_log_redaction()  # other libraries log URLs too


def _print_summary(summary: dict[str, Any], output: str) -> None:
    records = summary["records"]
    print(
        f"records read {records['read']}: {records['with_features']} with features, "
        f"{records['without_features']} without (all modalities failed), {records['rejected']} rejected"
    )
    for name, counts in summary["modalities"].items():
        print(
            f"  {name:<6} present {counts['present']:>6}  embedded {counts['embedded']:>6} "
            f"(shared {counts['shared']:>6})  kept {counts['kept']:>6}  failed {counts['failed']:>6}  "
            f"absent {counts['absent']:>6}"
        )
        if counts["fallback"] is not None:
            print(
                f"  {name:<6} {counts['fallback']['embedded']} embedded on torch instead of "
                f"{counts['runtime']}: {counts['fallback']['reason']}"
            )
    changes = summary["incremental"]
    if changes is not None:
        print(
            f"rows of the previous table {changes['previous_rows']}: unchanged {changes['unchanged']}, "
            f"replaced {changes['replaced']}, dropped {changes['dropped']}, kept though absent "
            f"{changes['kept_absent']}; added {changes['added']}"
        )
    print(
        f"feature rows {summary['feature_rows']}, error rows {summary['error_rows']}, "
        f"counts reconcile: {summary['reconciles']}, {summary['wall_seconds']:.1f} s"
    )
    for error_type, count in summary["errors_by_type"].items():
        print(f"  error {error_type}: {count}")
    print(
        f"output: {storage.join(output, 'features')}, {storage.join(output, 'errors')}, "
        f"{storage.join(output, outputs.RUN_MANIFEST)}"
    )


def extract(argv: list[str]) -> int:
    from fsspec.core import url_to_fs

    from mmfeatures.options import parse_options

    try:
        options = parse_options(argv)  # ``--help`` ends here, before the models' libraries are imported
        from pipelines.extract_features import run_job

        job = run_job(options)
    except ConfigurationError as exc:
        print(f"mmfeatures extract: error: {exc}", file=sys.stderr)
        return 2
    fs, path = url_to_fs(job.path(outputs.RUN_MANIFEST))
    with fs.open(path, "r") as handle:
        _print_summary(json.load(handle), redact(job.output))
    return 0


SAMPLE_KINDS = {
    "basic": ("mmfeatures.sample", "build_sample_dataset"),  # every format, some broken files
    "avmnist": ("mmfeatures.avmnist", "build_avmnist"),  # the AV-MNIST-style benchmark set
}


def sample(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mmfeatures sample", description="Build an offline sample data set.")
    parser.add_argument("--out", required=True, help="Folder to write manifest.jsonl and media into.")
    parser.add_argument(
        "--kind",
        choices=SAMPLE_KINDS,
        default="basic",
        help="basic: a small set in every format, with some broken files; "
        "avmnist: the AV-MNIST-style classification benchmark.",
    )
    parser.add_argument("--n", type=int, default=60, help="Number of records.")
    parser.add_argument("--seed", type=int, default=0, help="Seed; the same seed gives the same set.")
    args = parser.parse_args(argv)
    module, function = SAMPLE_KINDS[args.kind]
    manifest = getattr(importlib.import_module(module), function)(args.out, n=args.n, seed=args.seed)
    print(f"sample data set: {manifest}")
    return 0


def _delegate(module: str) -> Callable[[list[str]], int]:
    """A command whose module has its own ``main(argv)``, imported only when it runs."""

    def command(argv: list[str]) -> int:
        return importlib.import_module(module).main(argv)

    return command


COMMANDS = {
    "extract": extract,
    "sample": sample,
    "train": _delegate("mmfeatures.train"),
    "report": _delegate("mmfeatures.report"),
    "feast": _delegate("mmfeatures.feast"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: mmfeatures {{{','.join(COMMANDS)}}} [options]  (mmfeatures COMMAND --help)", file=sys.stderr)
        return 2
    _configure_logging()
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
