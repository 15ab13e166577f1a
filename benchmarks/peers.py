"""The job against Daft and Ray Data doing the same work, on the same inputs, weights and preprocessing.

    .venv/bin/python -m benchmarks.peers            # 1,000 images, 2,000 texts, 300 clips
    .venv/bin/python -m benchmarks.peers --quick    # a smoke test of the benchmark itself

For each modality it runs ``mmfeatures extract`` and the peer programs (``benchmarks/peer_programs``:
the same work written as a user writes it in each engine) on N and 2N records of the generated
inputs (``benchmarks/inputs.py``). Each run is a process of its own (the peers on the job's
interpreter with .peers-env on PYTHONPATH, made by ``scripts/setup_peers_env.sh``), timed from start
to exit; its peak memory is the PSS of its whole process tree (Ray and Daft start processes of
their own), sampled every 0.2 s. Reported per engine:

- the marginal rate N / (T(2N) - T(N)): what one more record costs, start-up cancelled out;
- the first-run time T(N), start-up included, and the peak PSS of the 2N run.

The peers run in two readings: ``stock`` (the model as a user loads it, in plain PyTorch) and
``job-model`` (the job's own model runtime, so that the job/peer ratio measures the engine apart
from the model); see ``benchmarks/peer_programs/models.py``. Each peer is tried in the set-ups a
user would try on the cores at hand (one model instance with a thread per core; one
single-threaded instance per core, each a process of its own) and the best is kept. A rate is
reported only where the engine's vectors match the job's for the same ids (cosine at least
``MIN_COSINE``). The job runs untimed on a few records first, so that its ONNX export is cached
before any run is timed, as on any machine that ran it once.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from benchmarks.inputs import InputSet, build_input_set
from benchmarks.peer_programs.models import PEER_MODALITIES, READINGS, SETUPS
from benchmarks.throughput import add_run_arguments, write_results

REPO = Path(__file__).resolve().parent.parent
PEERS_ENV = REPO / ".peers-env"
SETUP_SCRIPT = REPO / "scripts" / "setup_peers_env.sh"
ENGINES = ("daft", "ray")
RECORDS = {"image": 1000, "text": 2000, "audio": 300}
QUICK_RECORDS = {"image": 40, "text": 80, "audio": 8}
COUNT_FLAGS = {"image": "images", "text": "texts", "audio": "clips"}
WARM_UP_RECORDS = 4
MIN_COSINE = 0.999
SAMPLE_SECONDS = 0.2
# The peers' own telemetry off: nothing may leave the machine at run time.
PEER_ENVIRONMENT = {"DO_NOT_TRACK": "1", "DAFT_ANALYTICS_ENABLED": "0", "RAY_USAGE_STATS_ENABLED": "0"}


# -- one run, measured ---------------------------------------------------------------------------
@dataclass
class Run:
    """One process's wall time from start to exit, and its tree's peak PSS."""

    records: int
    output: str  # the folder it wrote
    seconds: float
    peak_pss_mb: float
    returncode: int
    log: str


def _stat(pid: str) -> tuple[int, int] | None:
    """(parent, session) of a process; None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # the name, in parentheses, may hold spaces
    return int(fields[1]), int(fields[3])


def _tree(root: int, known: set[int]) -> set[int]:
    """The processes of ``root``'s session, ``root``'s descendants and those of processes seen in its
    tree before (a daemon that left it when its parent exited)."""
    stats = {int(pid): stat for pid in os.listdir("/proc") if pid.isdigit() and (stat := _stat(pid)) is not None}
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in stats.items():
        children.setdefault(parent, []).append(pid)
    members = {pid for pid, (_, session) in stats.items() if session == root} | ({root} | known) & stats.keys()
    pending = list(members)
    while pending:
        for child in children.get(pending.pop(), []):
            if child not in members:
                members.add(child)
                pending.append(child)
    return members


def _pss_kb(pid: int) -> int:
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return 0


def run_measured(argv: list[str], env: dict[str, str], output: Path, records: int, timeout: float) -> Run:
    """Run ``argv`` (which writes to ``output``) in a session of its own, its log beside ``output``,
    sampling its tree's PSS until it exits (or is killed at ``timeout``); whatever of its tree
    outlives it is ended then."""
    log = output.with_name(f"{output.name}.log")
    log.parent.mkdir(parents=True, exist_ok=True)
    known: set[int] = set()
    peak_kb = 0
    with open(log, "w") as written:
        started = time.perf_counter()
        process = subprocess.Popen(
            argv, cwd=REPO, env=env, stdout=written, stderr=subprocess.STDOUT, start_new_session=True
        )
        while True:
            try:
                returncode = process.wait(timeout=SAMPLE_SECONDS)
                break
            except subprocess.TimeoutExpired:
                known |= _tree(process.pid, known)
                peak_kb = max(peak_kb, sum(_pss_kb(pid) for pid in known))
                if time.perf_counter() - started > timeout:
                    process.kill()
        seconds = time.perf_counter() - started
    for pid in _tree(process.pid, known) - {process.pid}:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return Run(records, str(output), seconds, peak_kb / 1024, returncode, str(log))


# -- what runs -----------------------------------------------------------------------------------
@dataclass
class Measured:
    """One engine's runs on N and 2N records of one modality, in one reading and set-up."""

    modality: str
    engine: str
    reading: str  # "job" for the job itself
    setup: str
    runs: list[Run] = field(default_factory=list)
    min_cosine: float | None = None
    failure: str | None = None

    @property
    def marginal_rate(self) -> float | None:
        """N / (T(2N) - T(N)) in records per second, where the vectors check and T(2N) > T(N)."""
        if self.failure is not None or len(self.runs) != 2:
            return None
        first, second = self.runs
        extra = second.seconds - first.seconds
        return (second.records - first.records) / extra if extra > 0 else None

    @property
    def first_run_seconds(self) -> float | None:
        return self.runs[0].seconds if self.runs else None

    @property
    def peak_pss_mb(self) -> float | None:
        return max(run.peak_pss_mb for run in self.runs) if self.runs else None


def job_argv(manifest: Path, output: Path) -> list[str]:
    return [sys.executable, "-m", "mmfeatures.cli", "extract", "--input", str(manifest), "--output", str(output)]


def peer_argv(item: Measured, manifest: Path, output: Path, cores: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        f"benchmarks.peer_programs.{item.engine}_peer",
        "--modality",
        item.modality,
        "--manifest",
        str(manifest),
        "--output",
        str(output),
        "--reading",
        item.reading,
        "--setup",
        item.setup,
        "--cores",
        str(cores),
    ]


def peer_environment() -> dict[str, str]:
    """The job's environment with .peers-env (and this checkout, for the peer programs, which Ray's
    and Daft's worker processes import) on PYTHONPATH."""
    path = os.pathsep.join([str(PEERS_ENV), str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    return {**os.environ, **PEER_ENVIRONMENT, "PYTHONPATH": path}


def setup_name(item: Measured, cores: int, job_runtime: str) -> str:
    if item.engine == "job":
        return f"defaults ({job_runtime})"
    if item.setup == "threads":
        return f"1 model x {cores} threads"
    return f"{cores} models x 1 thread"


# -- vectors -------------------------------------------------------------------------------------
def read_vectors(folder: Path, column: str) -> dict[str, np.ndarray]:
    """id -> vector from every Parquet file under ``folder``."""
    vectors: dict[str, np.ndarray] = {}
    for path in sorted(folder.rglob("*.parquet")):
        table = pq.read_table(path, columns=["id", column])
        embeddings = table.column(column).combine_chunks()
        values = np.asarray(embeddings.flatten(), dtype=np.float32).reshape(len(table), -1)
        vectors.update(zip(table.column("id").to_pylist(), values, strict=True))
    return vectors


def min_cosine(reference: dict[str, np.ndarray], vectors: dict[str, np.ndarray], ids: list[str]) -> float:
    """The least cosine between ``vectors`` and ``reference`` over ``ids``; -1 where one is missing."""
    if any(record_id not in vectors or record_id not in reference for record_id in ids):
        return -1.0
    given = np.stack([vectors[record_id] for record_id in ids])
    expected = np.stack([reference[record_id] for record_id in ids])
    norms = np.linalg.norm(given, axis=1) * np.linalg.norm(expected, axis=1)
    return float(((given * expected).sum(axis=1) / np.maximum(norms, 1e-12)).min())


def check_vectors(item: Measured, inputs: list[InputSet], reference: dict[str, np.ndarray]) -> None:
    """Record the least cosine of ``item``'s runs to the job's vectors; a failure where it is too low."""
    column = "embedding" if item.engine != "job" else f"{item.modality}_embedding"
    cosines = []
    for run, input_set in zip(item.runs, inputs, strict=True):
        folder = Path(run.output) if item.engine != "job" else Path(run.output) / "features"
        cosines.append(min_cosine(reference, read_vectors(folder, column), [row["id"] for row in input_set.rows()]))
    item.min_cosine = min(cosines)
    if item.min_cosine < MIN_COSINE:
        item.failure = f"vectors differ from the job's: least cosine {item.min_cosine:.6f} < {MIN_COSINE}"


# -- the benchmark -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    modalities: list[str]
    engines: list[str]
    readings: list[str]
    setups: list[str]
    counts: dict[str, int]
    seed: int
    workdir: Path
    timeout: float
    cores: int


def run_modality(modality: str, plan: Plan) -> tuple[list[Measured], str]:
    """Every engine's runs on N and 2N records of ``modality``, checked against the job's vectors;
    and the job's runtime for it, as its run recorded."""
    folder = plan.workdir / "inputs" / f"{modality}-seed{plan.seed}"
    count = plan.counts[modality]
    inputs = [build_input_set(modality, folder, n, plan.seed) for n in (count, 2 * count)]
    warm_up = build_input_set(modality, folder, min(WARM_UP_RECORDS, count), plan.seed)
    _read_media(inputs[1])
    runs = plan.workdir / "peers" / modality
    shutil.rmtree(runs, ignore_errors=True)
    print(f"{modality}: the job on {warm_up.count} records first, untimed (its ONNX export cached)", flush=True)
    _report(run_measured(job_argv(warm_up.manifest, runs / "warm-up"), dict(os.environ), runs / "warm-up", 0, 1e9))

    job = Measured(modality, "job", "job", "defaults")
    peers = [
        Measured(modality, engine, reading, setup)
        for engine in plan.engines
        for reading in plan.readings
        for setup in plan.setups
    ]
    for item in [job, *peers]:
        for input_set in inputs:
            output = runs / f"{item.engine}-{item.reading}-{item.setup}-{input_set.count}"
            if item.engine == "job":
                argv, env = job_argv(input_set.manifest, output), dict(os.environ)
            else:
                argv, env = peer_argv(item, input_set.manifest, output, plan.cores), peer_environment()
            run = _report(run_measured(argv, env, output, input_set.count, plan.timeout))
            item.runs.append(run)
            if run.returncode != 0:
                item.failure = f"exit status {run.returncode}: see {run.log}"
                break

    if job.failure is not None:
        for item in peers:
            item.failure = item.failure or "unchecked: the job failed"
        return [job, *peers], "failed"
    reference = read_vectors(Path(job.runs[-1].output) / "features", f"{modality}_embedding")
    for item in [job, *peers]:
        if item.failure is None:
            check_vectors(item, inputs, reference)
    return [job, *peers], _job_runtime(Path(job.runs[-1].output), modality)


def _report(run: Run) -> Run:
    status = "" if run.returncode == 0 else f"  FAILED (exit status {run.returncode}): {run.log}"
    print(f"  {Path(run.output).name:<36} {run.seconds:8.1f} s  {run.peak_pss_mb:8.0f} MB{status}", flush=True)
    return run


def _read_media(input_set: InputSet) -> None:
    """Read every media file once, so that no engine pays for the first read from disk."""
    if input_set.modality != "text":
        for row in input_set.rows():
            (input_set.folder / row[input_set.modality]).read_bytes()


def _job_runtime(output: Path, modality: str) -> str:
    """The runner and the runtime the job's run recorded for ``modality``."""
    summary = json.loads((output / "_run.json").read_text())
    return f"{summary['options']['runner']}, {summary['modalities'][modality]['runtime']}"


def best(items: list[Measured], engine: str, reading: str) -> Measured | None:
    """The set-up of ``engine`` in ``reading`` with the highest marginal rate (any, where none has one)."""
    tried = [item for item in items if item.engine == engine and item.reading == reading]
    return max(tried, key=lambda item: item.marginal_rate or 0.0, default=None)


def format_tables(results: dict[str, tuple[list[Measured], str]], plan: Plan) -> str:
    lines = []
    header = (
        f"{'engine':<6} {'set-up':<34} {'rate /s':>9} {'T(N) s':>8} {'peak PSS MB':>12} {'job/peer':>9} {'min cos':>9}"
    )
    for modality, (items, job_runtime) in results.items():
        job = items[0]
        for reading in plan.readings:
            count = plan.counts[modality]
            lines += ["", f"{modality}, {reading} reading (N = {count}, 2N = {2 * count})", header]
            rows = [job, *filter(None, (best(items, engine, reading) for engine in plan.engines))]
            for item in rows:
                rate, job_rate = item.marginal_rate, job.marginal_rate
                ratio = f"{job_rate / rate:9.2f}" if rate and job_rate else f"{'-':>9}"
                lines.append(
                    f"{item.engine:<6} {setup_name(item, plan.cores, job_runtime):<34} "
                    f"{_number(rate, 9, 1)} {_number(item.first_run_seconds, 8, 1)} "
                    f"{_number(item.peak_pss_mb, 12, 0)} {ratio} {_number(item.min_cosine, 9, 6)}"
                )
            others = [item for item in items if item.engine != "job" and item.reading == reading and item not in rows]
            if others:
                tried = ", ".join(
                    f"{item.engine} {item.setup} {_number(item.marginal_rate, 0, 1)}/s" for item in others
                )
                lines.append(f"  also tried: {tried}")
            shown = [item for item in items if item.reading in (reading, "job")]
            lines += [f"  {item.engine} {item.setup}: {item.failure}" for item in shown if item.failure]
            if any(item.marginal_rate is None and item.failure is None for item in shown):
                lines.append("  rate -: T(2N) was not above T(N), too few records to time; give more")
    return "\n".join(lines)


def _number(value: float | None, width: int, decimals: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:{width}.{decimals}f}"


def machine() -> dict[str, Any]:
    model = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"cores": len(os.sched_getaffinity(0)), "cpu": model, "python": platform.python_version()}


def versions() -> dict[str, str | None]:
    """The engines' and runtimes' versions, read from their metadata (nothing imported): the peers'
    from .peers-env, the others from this interpreter's."""
    found: dict[str, str | None] = {}
    for name in (*ENGINES, "torch", "onnxruntime"):
        path = [str(PEERS_ENV)] if name in ENGINES else sys.path
        dist = next(iter(importlib.metadata.distributions(name=name, path=path)), None)
        found[name] = dist.version if dist else None
    return found


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.peers",
        allow_abbrev=False,
        description="The job's marginal rate, first-run time and peak memory against Daft and Ray Data "
        "doing the same work, per modality.",
    )
    parser.add_argument("--quick", action="store_true", help="Tiny sizes: a smoke test of the benchmark itself.")
    for modality in PEER_MODALITIES:
        parser.add_argument(
            f"--{COUNT_FLAGS[modality]}",
            type=int,
            default=None,
            help=f"N for {modality} (default {RECORDS[modality]}; {QUICK_RECORDS[modality]} with --quick).",
        )
    parser.add_argument(
        "--modalities", default=",".join(PEER_MODALITIES), help="Comma-separated (default: %(default)s)."
    )
    parser.add_argument("--engines", default=",".join(ENGINES), help="Peers, comma-separated (default: %(default)s).")
    parser.add_argument("--readings", default=",".join(READINGS), help="Comma-separated (default: %(default)s).")
    parser.add_argument("--setups", default=",".join(SETUPS), help="Comma-separated (default: %(default)s).")
    parser.add_argument(
        "--timeout", type=float, default=3600.0, help="Seconds one run may take (default: %(default)s)."
    )
    add_run_arguments(parser, "peers.json")
    return parser


def _choices(parser: argparse.ArgumentParser, flag: str, given: str, allowed: tuple[str, ...]) -> list[str]:
    chosen = [part.strip() for part in given.split(",") if part.strip()]
    if not chosen or set(chosen) - set(allowed) or len(set(chosen)) != len(chosen):
        parser.error(f"--{flag}: a comma-separated list of distinct {', '.join(allowed)}, not {given!r}")
    return chosen


def parse_plan(argv: list[str] | None) -> tuple[Plan, Path]:
    parser = _parser()
    args = parser.parse_args(argv)
    counts = {}
    for modality in PEER_MODALITIES:
        given = getattr(args, COUNT_FLAGS[modality])
        if given is not None and given < 1:
            parser.error(f"--{COUNT_FLAGS[modality]} must be at least 1, not {given}")
        counts[modality] = given or (QUICK_RECORDS if args.quick else RECORDS)[modality]
    if args.timeout <= 0:
        parser.error(f"--timeout must be positive, not {args.timeout}")
    workdir = args.workdir.resolve()
    plan = Plan(
        modalities=_choices(parser, "modalities", args.modalities, PEER_MODALITIES),
        engines=_choices(parser, "engines", args.engines, ENGINES),
        readings=_choices(parser, "readings", args.readings, READINGS),
        setups=_choices(parser, "setups", args.setups, SETUPS),
        counts=counts,
        seed=args.seed,
        workdir=workdir,
        timeout=args.timeout,
        cores=len(os.sched_getaffinity(0)),
    )
    return plan, args.json or workdir / "peers.json"


def main(argv: list[str] | None = None) -> int:
    plan, json_path = parse_plan(argv)
    subprocess.run(["bash", str(SETUP_SCRIPT)], check=True)
    subprocess.run([sys.executable, "-c", "import daft, ray.data"], check=True, env=peer_environment())  # .pyc written
    about = {"machine": machine(), "versions": versions()}
    print(
        f"{about['machine']['cores']} cores, {about['machine']['cpu']}; "
        + ", ".join(f"{name} {version}" for name, version in about["versions"].items()),
        flush=True,
    )
    results = {modality: run_modality(modality, plan) for modality in plan.modalities}
    print(format_tables(results, plan))
    report = {
        **about,
        "counts": {modality: plan.counts[modality] for modality in plan.modalities},
        "min_cosine": MIN_COSINE,
        "results": [
            {
                **asdict(item),
                "setup_name": setup_name(item, plan.cores, job_runtime),
                "marginal_rate": item.marginal_rate,
                "first_run_seconds": item.first_run_seconds,
                "peak_pss_mb": item.peak_pss_mb,
                "best": item.engine == "job" or best(items, item.engine, item.reading) is item,
            }
            for items, job_runtime in results.values()
            for item in items
        ],
    }
    write_results(json_path, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
