"""What an incremental rerun costs against the first run, on a folder of images.

    .venv/bin/python -m benchmarks.incremental              # 4,000 images (docs/throughput.md)
    .venv/bin/python -m benchmarks.incremental --quick      # a smoke test

The goal: a rerun over unchanged input takes at most a fifth of the first run's time. It takes the
throughput benchmark's images (``benchmarks/inputs.py``, kept between runs), copies them to a scratch
folder, and runs the job as a user's scheduled run would, ``mmfeatures extract --input MANIFEST
--output OUT --incremental`` with the default models, each run a process of its own:

1. first: into an empty OUT, so every image is embedded;
2. rerun: the same manifest again, so every row is kept and nothing is embedded;
3. changed rerun: 1% of the images overwritten with other generated JPEGs and 1% new records
   appended, in a new manifest, so only those are embedded.

A scheduler sees the whole command, start-up included, so that is the time compared; the job's own
``wall_seconds`` (``_run.json``) is shown beside it. Each run's ``_run.json`` must hold the counts
that its inputs imply, and the vectors of each row a rerun kept must equal the first run's bit for
bit (those of a replaced row must differ): otherwise it stops, as a fast rerun that kept the wrong
rows would mean nothing. Each run's peak memory is its process's (``wait4``). It prints a table
and writes JSON (``--json``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.inputs import InputSet
from benchmarks.throughput import Settings, add_run_arguments, build_inputs, log_path, processor_name, write_results
from mmfeatures.host import available_cores
from mmfeatures.schema import read_features

MODALITY = "image"
VECTORS = (f"{MODALITY}_embedding", "fused")  # the columns a row kept must hold unchanged
RECORDS = 4000
QUICK_RECORDS = 24
CHANGED_SHARE = 100  # one record in this many is replaced, and as many again are appended
GOAL = 0.2  # a rerun over unchanged input: at most this share of the first run's time
_LOADED = re.compile(r"loaded (\w+) model")  # the job's log line as a model's weights load


@dataclass(frozen=True)
class Expected:
    """What one run's ``_run.json`` must say: rows by fate, and images embedded and kept."""

    previous_rows: int
    unchanged: int
    added: int
    replaced: int
    embedded: int
    dropped: int = 0
    kept_absent: int = 0

    @property
    def kept(self) -> int:
        return self.unchanged


@dataclass
class Run:
    """One ``mmfeatures extract`` process and what its ``_run.json`` says."""

    name: str
    records: int
    wall_seconds: float  # the whole command, start-up included
    job_seconds: float  # ``_run.json``'s wall_seconds
    cpu_seconds: float  # user and system, the process's and its children's: less swayed by other work
    peak_rss_mb: float
    load_average: float  # the machine's, over the run's last minute: other work slows the run
    embedded: int
    kept: int
    incremental: dict[str, Any]
    reconciles: bool
    identical: int = 0  # rows kept whose vectors equal the first run's bit for bit
    models_loaded: list[str] = field(default_factory=list)  # from the log: whose weights were loaded
    log: str = ""

    @property
    def records_per_second(self) -> float:
        return self.records / self.wall_seconds


def run_job(name: str, manifest: Path, output: Path, records: int, settings: Settings, expected: Expected) -> Run:
    """``mmfeatures extract`` in a process of its own, timed from start to exit; its ``_run.json``
    checked against ``expected``."""
    log = log_path(settings, f"incremental-{name.replace(' ', '-')}")
    argv = [sys.executable, "-m", "mmfeatures.cli", "extract", *settings.job_argv(manifest, output)]
    with open(log, "wb") as handle:
        start = time.perf_counter()
        process = subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)  # this process's own peak memory, unlike RUSAGE_CHILDREN's
        seconds = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"the {name} run exited {process.returncode} (log: {log})")
    summary = json.loads((output / "_run.json").read_text())
    counts = summary["modalities"][MODALITY]
    run = Run(
        name=name,
        records=records,
        wall_seconds=seconds,
        job_seconds=summary["wall_seconds"],
        cpu_seconds=usage.ru_utime + usage.ru_stime,
        peak_rss_mb=usage.ru_maxrss / 1024,
        load_average=os.getloadavg()[0],
        embedded=counts["embedded"],
        kept=counts["kept"],
        incremental=summary["incremental"],
        reconciles=summary["reconciles"],
        models_loaded=sorted(set(_LOADED.findall(log.read_text(errors="replace")))),
        log=str(log),
    )
    fates = ("previous_rows", "unchanged", "added", "replaced", "dropped", "kept_absent")
    found = Expected(**{key: run.incremental[key] for key in fates}, embedded=run.embedded)
    if found != expected or run.kept != expected.kept or not run.reconciles:
        raise RuntimeError(
            f"the {name} run: {found}, {run.kept} kept, reconciles {run.reconciles}; expected {expected} (log: {log})"
        )
    return run


def table_vectors(output: Path) -> dict[str, np.ndarray]:
    """Each row's ``VECTORS`` side by side, as raw bits by id: equal bits, bit-identical vectors."""
    table = read_features(str(output / "features"), columns=["id", *VECTORS])
    blocks = []
    for name in VECTORS:
        column = table.column(name).combine_chunks()
        if column.null_count:
            raise RuntimeError(f"{column.null_count} rows at {output} lack {name}")
        blocks.append(column.flatten().to_numpy().view(np.uint32).reshape(len(column), -1))
    return dict(zip(table.column("id").to_pylist(), np.hstack(blocks), strict=True))


def check_vectors(run: Run, first: dict[str, np.ndarray], now: dict[str, np.ndarray], replaced: set[str]) -> None:
    """Sets ``run.identical``; stops unless each row kept holds the first run's vectors bit for bit
    and each replaced row other vectors."""
    kept = [record_id for record_id in first if record_id not in replaced]
    run.identical = sum(np.array_equal(first[record_id], now[record_id]) for record_id in kept)
    unchanged = [record_id for record_id in replaced if np.array_equal(first[record_id], now[record_id])]
    if run.identical != len(kept) or unchanged:
        raise RuntimeError(
            f"the {run.name} run: {len(kept) - run.identical} kept rows whose vectors differ from the first "
            f"run's, {len(unchanged)} replaced rows whose vectors do not (log: {run.log})"
        )


@dataclass(frozen=True)
class ScratchSet:
    """A copy of the set's first ``records`` images, which the changed rerun changes (the set under
    WORKDIR/inputs is never written), beside the set's next ``2 * changed`` images: the bytes that replace
    images, and the records appended."""

    inputs: InputSet
    folder: Path
    records: int
    changed: int

    @classmethod
    def copied(cls, inputs: InputSet, records: int, changed: int, folder: Path) -> ScratchSet:
        """The copy, with the first run's manifest."""
        scratch = cls(inputs, folder, records, changed)
        shutil.rmtree(folder, ignore_errors=True)
        (folder / MODALITY).mkdir(parents=True)
        for row in scratch._rows(0, records):
            scratch._copy(row, row)
        _write_manifest(scratch.manifest, scratch._rows(0, records))
        return scratch

    @property
    def manifest(self) -> Path:
        return self.folder / "manifest-first.jsonl"

    def change(self) -> tuple[Path, set[str]]:
        """Every ``CHANGED_SHARE``-th of the first ``changed * CHANGED_SHARE`` images overwritten with
        other bytes, and ``changed`` new records appended: the changed manifest, and the ids whose
        images changed."""
        kept = self._rows(0, self.records)
        replacing = self._rows(self.records, self.records + self.changed)
        appended = self._rows(self.records + self.changed, self.records + 2 * self.changed)
        targets = kept[: self.changed * CHANGED_SHARE : CHANGED_SHARE]
        for row, target in zip(replacing, targets, strict=True):
            self._copy(row, target)
        for row in appended:
            self._copy(row, row)
        manifest = _write_manifest(self.folder / "manifest-changed.jsonl", kept + appended)
        return manifest, {target["id"] for target in targets}

    def _rows(self, start: int, stop: int) -> list[dict[str, Any]]:
        rows = self.inputs.rows()[start:stop]
        assert len(rows) == stop - start, "the set holds the images that the change uses"
        return rows

    def _copy(self, source: dict[str, Any], target: dict[str, Any]) -> None:
        """``source``'s image from the set, as ``target``'s image in the copy."""
        shutil.copyfile(self.inputs.folder / source[MODALITY], self.folder / target[MODALITY])


def _write_manifest(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def run_benchmark(records: int, settings: Settings, seed: int) -> list[Run]:
    """The three runs, in order, over one output folder."""
    changed = changed_records(records)
    print(f"building or finding {records + 2 * changed} images ...", flush=True)
    inputs = build_inputs(settings, MODALITY, records + 2 * changed, seed, "inputs-incremental")
    scratch = ScratchSet.copied(inputs, records, changed, settings.workdir / "incremental" / "inputs")
    output = settings.workdir / "incremental" / "output"
    shutil.rmtree(output, ignore_errors=True)
    print(f"  first: {records} images into an empty folder ...", flush=True)
    first = run_job("first", scratch.manifest, output, records, settings, Expected(0, 0, records, 0, records))
    vectors = table_vectors(output)
    print(f"  rerun: the same {records} images ...", flush=True)
    rerun = run_job("rerun", scratch.manifest, output, records, settings, Expected(records, records, 0, 0, 0))
    check_vectors(rerun, vectors, table_vectors(output), set())
    print(f"  changed rerun: {changed} images replaced, {changed} appended ...", flush=True)
    manifest, replaced = scratch.change()
    expected = Expected(records, records - changed, changed, changed, 2 * changed)
    changed_run = run_job("changed rerun", manifest, output, records + changed, settings, expected)
    check_vectors(changed_run, vectors, table_vectors(output), replaced)
    return [first, rerun, changed_run]


def changed_records(records: int) -> int:
    """The images that the changed rerun replaces, and the records it appends (each)."""
    return max(1, records // CHANGED_SHARE)


def ratios(runs: list[Run]) -> dict[str, float]:
    """Each rerun's time over the first run's: the whole command's, the job's own, and CPU time."""
    first, rerun, changed = runs
    return {
        "rerun / first": rerun.wall_seconds / first.wall_seconds,
        "changed rerun / first": changed.wall_seconds / first.wall_seconds,
        "rerun / first, job's own": rerun.job_seconds / first.job_seconds,
        "changed rerun / first, job's own": changed.job_seconds / first.job_seconds,
        "rerun / first, CPU time": rerun.cpu_seconds / first.cpu_seconds,
        "changed rerun / first, CPU time": changed.cpu_seconds / first.cpu_seconds,
    }


def verdict(ratio: float) -> str:
    return f"{'pass' if ratio <= GOAL else 'FAIL'} (<= {GOAL:g})"


def format_report(runs: list[Run], settings: Settings) -> str:
    first = runs[0]
    lines = [
        "",
        f"incremental reruns: {first.records} images, {settings.device}, {settings.precision}, "
        f"{available_cores()} cores; each run `mmfeatures extract --incremental` in a process of its own",
        f"  {'run':<15} {'records':>7} {'wall s':>8} {'records/s':>9} {'job s':>7} {'CPU s':>7} {'embedded':>8} "
        f"{'unchanged':>9} {'added':>5} {'replaced':>8} {'identical':>9} {'peak MB':>7} {'load':>4}  models loaded",
    ]
    for run in runs:
        changes = run.incremental
        lines.append(
            f"  {run.name:<15} {run.records:>7} {run.wall_seconds:>8.2f} {run.records_per_second:>9.1f} "
            f"{run.job_seconds:>7.2f} {run.cpu_seconds:>7.2f} {run.embedded:>8} {changes['unchanged']:>9} "
            f"{changes['added']:>5} {changes['replaced']:>8} {run.identical:>9} {run.peak_rss_mb:>7.0f} "
            f"{run.load_average:>4.1f}  {', '.join(run.models_loaded) or '-'}"
        )
    for figure, value in ratios(runs).items():
        lines.append(f"  {figure:<33} {value:>6.3f}   {verdict(value) if figure == 'rerun / first' else ''}".rstrip())
    return "\n".join(lines)


def report_json(runs: list[Run], settings: Settings, started: float, quick: bool) -> dict[str, Any]:
    figures = ratios(runs)
    return {
        "machine": {"cores": available_cores(), "processor": processor_name()},
        "settings": {
            "device": settings.device,
            "precision": settings.precision,
            "job_options": list(settings.job_options),
            "quick": quick,
        },
        "records": runs[0].records,
        "changed_records": changed_records(runs[0].records),
        "runs": {run.name: {**asdict(run), "records_per_second": run.records_per_second} for run in runs},
        "ratios": figures,
        "goal": {"rerun / first": verdict(figures["rerun / first"])},
        "wall_seconds": time.perf_counter() - started,
    }


def _parser() -> argparse.ArgumentParser:
    # No abbreviations: an option this parser does not know goes to the job whole.
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.incremental",
        allow_abbrev=False,
        description="The time of an incremental rerun over unchanged images, and over 1%% changed and "
        "1%% added, against the first run's.",
        epilog="Any other option is passed to `mmfeatures extract`.",
    )
    parser.add_argument("--count", type=int, default=None, help=f"Images (default: {RECORDS}).")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_RECORDS} images: a smoke test.")
    add_run_arguments(parser, "incremental.json")
    return parser


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    args, job_options = _parser().parse_known_args(argv)
    records = args.count or (QUICK_RECORDS if args.quick else RECORDS)
    settings = Settings("cpu", "fp32", ("--incremental", *job_options), args.workdir.resolve())
    settings.workdir.mkdir(parents=True, exist_ok=True)
    runs = run_benchmark(records, settings, args.seed)
    print(format_report(runs, settings))
    results = report_json(runs, settings, started, args.quick)
    write_results(args.json or settings.workdir / "incremental.json", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
