"""Throughput of the feature job, per modality, against its ceilings and two baselines, in one run.

    .venv/bin/python -m benchmarks.throughput            # the full run (docs/throughput.md: its duration)
    .venv/bin/python -m benchmarks.throughput --quick    # a smoke test
    benchmarks/gpu.sh                                    # the same on one NVIDIA GPU, in bf16

For each modality it builds realistic inputs (``benchmarks/inputs.py``) and measures records per
second of:

1. prepare: decode + preprocess alone (reading the local files), one single-threaded process per core;
2. model: the forward passes alone, over the job's own batches already prepared, collated and on
   the device, with the job's batch sizes, precision and threads, once for each runtime the
   modality runs on (``--runtimes``: torch, and ONNX Runtime on the model's export);
3. job: ``mmfeatures extract`` end to end on a manifest of that modality alone;
4. stock: Beam's RunInference with its PyTorch keyed-tensor handler and default batching, fed the
   same prepared inputs (decoded and preprocessed in the pipeline, padded to the longest input of
   the set so that they stack);
5. naive: a loop that reads, prepares and embeds one record at a time, over the first eighth of
   the records (a loop's rate does not depend on how many records there are).

The ceiling that 1 and 2 imply, for each runtime: on a CPU both stages share the cores, so
1/(1/r1 + 1/r2); on a GPU the slower of the two. The job (on its own ``--runtime``) is held to
the faster runtime's. Steps 1 and 2 each run in two halves, over the first half of the records
before the job and over the second half after it (in mirror order: 1, 2, job, 2, 1), and count as
one: on a shared machine the speed drifts over the minutes a modality takes, and bracketing the job
this way weighs a steady drift on the ceiling as on the job, rather than on one side of their
ratio. Each measurement runs in a process of its own, forked from this one after the heavy
imports, so its peak memory (ru_maxrss, plus its worker processes') is its own and one step's
garbage never weighs on the next; its output goes to a log file beside the results.
Then the scaling run: the job on N and 10 x N records of one modality, to show that wall time grows
with the input and memory does not. It prints the tables and writes JSON (``--json``).

``--scale`` runs the scale case alone: the job on 2,000, 20,000 and 60,000 records of text and of
images (``--scale-records``), each run's records, seconds and peak memory, and the ratio of the
largest run's peak memory to the smallest's, which the batch and look-ahead settings should bound
whatever the record count.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import platform
import resource
import shutil
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import apache_beam as beam
import cv2
import torch
from apache_beam.ml.inference.base import RunInference
from apache_beam.ml.inference.pytorch_inference import PytorchModelHandlerKeyedTensor

import pipelines.extract_features  # noqa: F401 - imported before any step is forked, like the rest
from benchmarks.inputs import MODALITIES, InputSet, build_input_set
from mmfeatures import cli, storage
from mmfeatures.host import available_cores, settle_worker_process
from mmfeatures.inference.batching import CostBatcher, Keyed
from mmfeatures.inference.handler import EmbeddingModelHandler
from mmfeatures.job import Job
from mmfeatures.modalities import MODALITIES as REGISTRY
from mmfeatures.modalities.base import Encoder, Prepared, Preprocessor, Window
from mmfeatures.options import parse_options
from mmfeatures.records import Record
from mmfeatures.settings import device_type

STEPS = ("prepare", "model", "job", "stock", "naive")
CEILING_STEPS = ("prepare", "model")  # run in two halves, one each side of the job
STEP_TITLES = {
    "prepare": "1 decode+preprocess",
    "model": "2 model forward",
    "job": "3 job end to end",
    "stock": "4 stock RunInference",
    "naive": "5 naive loop",
}
# The model runtimes whose forward passes are measured side by side, each where the modality runs
# on it: each gives a ceiling, and the job is held to the faster.
RUNTIMES = ("torch", "onnx")
# Records per device type: enough for the job's fixed costs (resolving the run, building the
# pipeline, loading the model) to weigh little, and few enough for a whole run to fit a working
# session on a small machine.
RECORDS = {
    "cpu": {"text": 6000, "image": 4000, "audio": 1000},
    "cuda": {"text": 40000, "image": 10000, "audio": 4000},
}
QUICK_RECORDS = {"text": 16, "image": 8, "audio": 4}
SCALING_RECORDS = {"cpu": 200, "cuda": 1000}
NAIVE_SHARE = 8  # the naive loop runs over the first 1/NAIVE_SHARE of the records
QUICK_SCALING_RECORDS = 4
SCALING_FACTOR = 10
SCALING_ROWS_PER_FILE = 100
SCALE_RECORDS = (2000, 20_000, 60_000)
SCALE_MODALITIES = ("text", "image")
TARGETS: dict[
    str, dict[str, tuple[str, float | dict[str, float]]]
] = {  # (figure, at least or at most, bound): the targets for each device type
    "cpu": {
        "job / ceiling": (">=", 0.85),
        "job / naive": (">=", 3.0),
        "job / stock": (">=", {"text": 1.3, "image": 1.0, "audio": 1.0}),
        "wall time ratio": ("<=", 11.0),
        "peak memory ratio": ("<=", 1.25),
        "scale: peak memory ratio": ("<=", 1.15),
    },
    "cuda": {"job / ceiling": (">=", 0.8)},
}


@dataclass(frozen=True)
class Settings:
    """What every step of one benchmark run shares."""

    device: str
    precision: str
    job_options: tuple[str, ...]  # more `mmfeatures extract` options, passed through
    workdir: Path
    runtimes: tuple[str, ...] = RUNTIMES  # whose model step is measured

    def job_argv(self, manifest: Path, output: Path) -> list[str]:
        return [
            "--input",
            str(manifest),
            "--output",
            str(output),
            "--device",
            self.device,
            "--precision",
            self.precision,
            *self.job_options,
        ]

    def job(self, inputs: InputSet, runtime: str | None = None) -> Job:
        """The job `mmfeatures extract` would run on these inputs (on ``runtime``, where given:
        ONNX Runtime in fp32, the one precision it runs), for its batch sizes and threads."""
        argv = self.job_argv(inputs.manifest, self.workdir / "unused")
        if runtime is not None:
            argv += ["--runtime", runtime, *(["--precision", "fp32"] if runtime == "onnx" else [])]
        return Job.from_options(parse_options(argv))

    def steps(self, modality: str) -> list[str]:
        """The steps measured for ``modality``: the model step once per runtime it runs on
        (``model torch``, ``model onnx``)."""
        models = [f"model {runtime}" for runtime in self.runtimes if runtime in REGISTRY[modality].runtimes]
        return ["prepare", *models, "job", "stock", "naive"]


@dataclass
class Measured:
    """One step's result. ``worker_processes``: processes the step started beside its own, each
    counted at the largest one's peak."""

    records: int
    seconds: float
    worker_processes: int = 0
    peak_rss_mb: float = 0.0
    peak_gpu_mb: float | None = None
    load_average: float = 0.0  # the machine's, over the last minute of the step: other work skews it
    notes: dict[str, Any] = field(default_factory=dict)
    parts: list[Measured] = field(default_factory=list)  # the halves of a bracketing step

    @property
    def records_per_second(self) -> float:
        return self.records / self.seconds

    @classmethod
    def combined(cls, parts: list[Measured]) -> Measured:
        """One step measured in parts, as if in one go: their records over their seconds, and the
        highest peaks. Each part, with its notes, stays in ``parts``."""
        if len(parts) == 1:
            return parts[0]
        gpu = [part.peak_gpu_mb for part in parts if part.peak_gpu_mb is not None]
        seconds = sum(part.seconds for part in parts)
        return cls(
            records=sum(part.records for part in parts),
            seconds=seconds,
            worker_processes=max(part.worker_processes for part in parts),
            peak_rss_mb=max(part.peak_rss_mb for part in parts),
            peak_gpu_mb=max(gpu) if gpu else None,
            load_average=sum(part.load_average * part.seconds for part in parts) / seconds,
            parts=parts,
        )


# -- the five measurements (each runs in a forked process) ---------------------------------------
def _preprocessor(name: str) -> Preprocessor:
    return REGISTRY[name].preprocessor()


def _payload_references(inputs: InputSet, part: slice = slice(None)) -> list[str]:
    """Inline texts, or the media files' paths, of the records in ``part``: what each step starts from."""
    return [
        row[inputs.modality] if inputs.modality == "text" else str(inputs.folder / row[inputs.modality])
        for row in inputs.rows()[part]
    ]


def _read(preprocessor: Preprocessor, reference: str) -> bytes | str:
    return reference if preprocessor.inline else storage.read_bytes(reference, preprocessor.limits.max_bytes)


def _prepare(preprocessor: Preprocessor, reference: str) -> list[Window]:
    return preprocessor.preprocess(preprocessor.decode(_read(preprocessor, reference)))


def _prepare_all(name: str, references: list[str]) -> list[list[Window]]:
    """Every record's windows, prepared in a thread per core: set-up that the clock does not see."""
    preprocessor = _preprocessor(name)
    with ThreadPoolExecutor(available_cores(), initializer=torch.set_num_threads, initargs=(1,)) as pool:
        return list(pool.map(lambda reference: _prepare(preprocessor, reference), references))


_worker_preprocessor: Preprocessor | None = None


def _prepare_worker_start(name: str, ready: Any) -> None:
    """A prepare-ceiling worker: single-threaded, set up, then waiting for the others."""
    global _worker_preprocessor
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    settle_worker_process()  # as the job's workers do
    _worker_preprocessor = _preprocessor(name)
    ready.wait()


def _prepare_in_worker(references: list[str]) -> int:
    """A group of records prepared as the job prepares them: each read and decoded, then all
    preprocessed in one call (``Preprocessor.preprocess_batch``)."""
    preprocessor = _worker_preprocessor
    assert preprocessor is not None
    raws = [preprocessor.decode(_read(preprocessor, reference)) for reference in references]
    return sum(Prepared(windows).cost for windows in preprocessor.preprocess_batch(raws))


def measure_prepare(inputs: InputSet, settings: Settings, part: slice = slice(None)) -> Measured:
    """1: decode + preprocess alone, in one single-threaded process per core, over the records in ``part``."""
    references = _payload_references(inputs, part)
    size = REGISTRY[inputs.modality].preprocessor.preprocess_batch_size
    groups = [references[start : start + size] for start in range(0, len(references), size)]
    workers = available_cores()
    context = multiprocessing.get_context("fork")
    ready = context.Barrier(workers + 1)
    with context.Pool(workers, _prepare_worker_start, (inputs.modality, ready)) as pool:
        ready.wait()
        start = time.perf_counter()
        pool.map(_prepare_in_worker, groups, chunksize=max(1, len(groups) // (8 * workers)))
        seconds = time.perf_counter() - start
    return Measured(len(references), seconds, worker_processes=workers)


def measure_model(inputs: InputSet, settings: Settings, part: slice = slice(None), runtime: str = "torch") -> Measured:
    """2: the job's forward passes alone on ``runtime``, over the records in ``part``: its batches,
    micro-batches, precision and threads, with every input already prepared, collated and on the
    device before the clock starts (and, on ONNX Runtime, the model exported)."""
    job = settings.job(inputs, runtime)
    preprocessor, inference = job.preprocessors[inputs.modality], job.settings[inputs.modality]
    handler = EmbeddingModelHandler(REGISTRY[inputs.modality], preprocessor, inference)
    embedder = handler.load_model()
    batcher = CostBatcher(preprocessor, inference)
    windows_per_record = _prepare_all(inputs.modality, _payload_references(inputs, part))
    records: list[Keyed] = [
        (Record(str(index), source="", manifest_dir=""), Prepared(windows))
        for index, windows in enumerate(windows_per_record)
    ]
    batches = [batch for item in records for batch in batcher.add(item)] + list(batcher.flush())
    batch_count = len(batches)
    passes = [
        tensors
        for batch in batches
        for _, tensors in embedder.micro_batches(
            [window for _, prepared in batch if prepared is not None for window in prepared.windows]
        )
    ]
    record_count, windows = len(windows_per_record), sum(len(w) for w in windows_per_record)
    del windows_per_record, records, batches  # only the collated tensors stay (on a GPU, only there)
    encoder, model_runtime = embedder.encoder, embedder.runtime
    # The first pass sets up the kernels (or exports); the job pays that once too.
    model_runtime.forward(encoder, passes[0])
    _synchronize(settings.device)
    start = time.perf_counter()
    for _ in embedder.forward_passes(passes):
        pass
    _synchronize(settings.device)
    seconds = time.perf_counter() - start
    rows = len(passes) * inference.micro_batch_size
    notes = {
        "batches": batch_count,
        "forward_passes": len(passes),
        "padding_rows": rows - windows,
        "lanes": model_runtime.lanes,
        "micro_batch_size": inference.micro_batch_size,
        "max_batch_cost": inference.max_batch_cost,
    }
    return Measured(record_count, seconds, notes=notes)


def measure_job(inputs: InputSet, settings: Settings) -> Measured:
    """3: `mmfeatures extract` on a manifest of this modality alone, end to end."""
    output = settings.workdir / "outputs" / f"{inputs.modality}-{inputs.count}"
    shutil.rmtree(output, ignore_errors=True)
    start = time.perf_counter()
    status = cli.main(["extract", *settings.job_argv(inputs.manifest, output)])
    seconds = time.perf_counter() - start
    summary = json.loads((output / "_run.json").read_text())
    embedded = summary["modalities"][inputs.modality]["embedded"]
    if status != 0 or embedded != inputs.count:
        raise RuntimeError(f"the job exited {status} and embedded {embedded} of {inputs.count} records")
    return Measured(inputs.count, seconds, notes={"runtime": summary["modalities"][inputs.modality]["runtime"]})


def _load_encoder(name: str) -> Encoder[torch.Tensor]:
    return REGISTRY[name].load_encoder(_preprocessor(name), "cpu")


class StockEncoder(torch.nn.Module):
    """The modality's encoder behind the plain ``forward(**tensors)`` that Beam's handler calls."""

    def __init__(self, modality_name: str):
        super().__init__()
        self.encoder = _load_encoder(modality_name)
        model = getattr(self.encoder, "model", None)  # the torch module a torch encoder runs
        assert isinstance(model, torch.nn.Module), f"{modality_name}'s encoder holds no torch module"
        self.model = model  # registered, so that the state dict holds its weights

    def forward(self, **tensors: torch.Tensor) -> torch.Tensor:
        return self.encoder.forward(tensors)


class _StockExample(beam.DoFn):
    """A reference to the keyed tensors of one example: prepared and collated as the job does."""

    def __init__(self, modality_name: str, pad_to: int):
        self.modality_name = modality_name
        self.pad_to = pad_to

    def setup(self) -> None:
        self.preprocessor = _preprocessor(self.modality_name)
        self.encoder = _load_encoder(self.modality_name)  # for its collate

    def process(self, reference: str) -> Iterator[dict[str, torch.Tensor]]:
        (window,) = _prepare(self.preprocessor, reference)  # every benchmark input fits one window
        yield {name: torch.from_numpy(array)[0] for name, array in self.encoder.collate([window], self.pad_to).items()}


def measure_stock(inputs: InputSet, settings: Settings) -> Measured:
    """4: Beam's RunInference with its PyTorch keyed-tensor handler and its default batching."""
    preprocessor = _preprocessor(inputs.modality)
    references = _payload_references(inputs)
    # Fixed shapes are what stacking needs: pad to the longest input of the set, the least any
    # fixed-shape batching must pad (images all have one size already).
    (first,) = _prepare(preprocessor, references[0])
    pad_to = 0
    if preprocessor.padded_length(first):
        prepared = _prepare_all(inputs.modality, references)
        pad_to = max(value.shape[-1] for windows in prepared for window in windows for value in window.values())
    weights = settings.workdir / f"stock-{inputs.modality}.pt"
    torch.save(StockEncoder(inputs.modality).state_dict(), weights)
    handler = PytorchModelHandlerKeyedTensor(
        state_dict_path=str(weights),
        model_class=StockEncoder,
        model_params={"modality_name": inputs.modality},
        device="GPU" if device_type(settings.device) == "cuda" else "CPU",
    )
    start = time.perf_counter()
    with beam.Pipeline(runner="FnApiRunner") as pipeline:
        counted = (
            pipeline
            | beam.Create(references)
            | beam.ParDo(_StockExample(inputs.modality, pad_to))
            | RunInference(handler)
            | beam.combiners.Count.Globally()
        )
        counted | beam.Map(_expect_count, len(references))
    return Measured(len(references), time.perf_counter() - start, notes={"padded_to": pad_to})


def _expect_count(count: int, expected: int) -> None:
    if count != expected:
        raise RuntimeError(f"stock RunInference gave {count} predictions for {expected} records")


def measure_naive(inputs: InputSet, settings: Settings) -> Measured:
    """5: one record at a time: read, prepare, embed each window, pool."""
    preprocessor = _preprocessor(inputs.modality)
    encoder = REGISTRY[inputs.modality].load_encoder(preprocessor, settings.device)
    references = _payload_references(inputs)[: -(-inputs.count // NAIVE_SHARE)]
    start = time.perf_counter()
    with torch.inference_mode():
        for reference in references:
            vectors = [
                encoder.forward(
                    {name: torch.from_numpy(array).to(settings.device) for name, array in encoder.collate([w]).items()}
                )
                for w in _prepare(preprocessor, reference)
            ]
            torch.cat(vectors).mean(dim=0).cpu()
    return Measured(len(references), time.perf_counter() - start)


MEASUREMENTS: dict[str, Callable[..., Measured]] = {  # (inputs, settings), and a part for the ceilings
    "prepare": measure_prepare,
    "model": measure_model,
    "job": measure_job,
    "stock": measure_stock,
    "naive": measure_naive,
}


def _synchronize(device: str) -> None:
    if device_type(device) == "cuda":
        torch.cuda.synchronize()


# -- running each step in a process of its own ---------------------------------------------------
def _in_child(function: Callable[..., Any], log: Path, *args: Any) -> Any:
    """``function(*args)`` in a forked process writing its output to ``log``; its result back."""
    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(sender, log, function, args))
    process.start()
    sender.close()
    try:
        ok, result = receiver.recv()
    except EOFError:
        ok, result = False, f"the process died (exit code {process.exitcode})"
    process.join()
    if not ok:
        raise RuntimeError(f"{function.__name__} failed: {result}\n(log: {log})")
    return result


def _child(sender: Any, log: Path, function: Callable[..., Any], args: tuple[Any, ...]) -> None:
    descriptor = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(descriptor, 1)
    os.dup2(descriptor, 2)
    try:
        result = function(*args)
        if isinstance(result, Measured):
            own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * result.worker_processes
            result.peak_rss_mb = (own + workers) / 1024
            result.load_average = os.getloadavg()[0]
            if torch.cuda.is_initialized():
                result.peak_gpu_mb = torch.cuda.max_memory_allocated() / 2**20
        sender.send((True, result))
    except BaseException as exc:  # noqa: BLE001 - reported by the parent, with the log's path
        traceback.print_exc()
        sender.send((False, f"{type(exc).__name__}: {exc}"))
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


# -- the run -------------------------------------------------------------------------------------
@dataclass
class ModalityReport:
    modality: str
    records: int
    inputs: str
    steps: dict[str, Measured]
    ceiling_rule: str

    @property
    def rates(self) -> dict[str, float]:
        return {step: measured.records_per_second for step, measured in self.steps.items()}

    @property
    def ceilings(self) -> dict[str, float]:
        """The ceiling that preparing and each runtime's model step imply, by runtime."""
        prepare = self.rates["prepare"]
        return {
            step.split()[1]: min(prepare, model) if self.ceiling_rule == "slower" else 1 / (1 / prepare + 1 / model)
            for step, model in self.rates.items()
            if step.startswith("model ")
        }

    @property
    def faster_runtime(self) -> str:
        return max(self.ceilings, key=self.ceilings.__getitem__)

    @property
    def ceiling(self) -> float:
        """The faster runtime's ceiling: the one the job is held to."""
        return self.ceilings[self.faster_runtime]

    @property
    def ratios(self) -> dict[str, float]:
        job = self.rates["job"]
        return {
            "job / ceiling": job / self.ceiling,
            "job / naive": job / self.rates["naive"],
            "job / stock": job / self.rates["stock"],
        }


def _verdict(device: str, figure: str, value: float, modality: str | None = None) -> str:
    """'pass (>= 0.85)', 'FAIL (>= 0.85)', or '' where the issue sets no target."""
    target = TARGETS[device_type(device)].get(figure)
    if target is None:
        return ""
    direction, bounds = target
    if isinstance(bounds, dict):
        assert modality is not None, f"{figure}'s target is per modality"
        bound = bounds[modality]
    else:
        bound = bounds
    met = value >= bound if direction == ">=" else value <= bound
    return f"{'pass' if met else 'FAIL'} ({direction} {bound:g})"


def build_inputs(settings: Settings, modality: str, count: int, seed: int, log_name: str) -> InputSet:
    """``count`` records of ``modality``, built (or found kept) in a child process."""
    folder = _inputs_folder(settings, modality, seed)
    return _in_child(build_input_set, log_path(settings, log_name), modality, folder, count, seed)


def step_title(step: str) -> str:
    """``2 model forward, onnx`` for ``model onnx``: a step's title, with its runtime."""
    kind, _, runtime = step.partition(" ")
    return f"{STEP_TITLES[kind]}, {runtime}" if runtime else STEP_TITLES[kind]


def run_modality(modality: str, count: int, settings: Settings, seed: int) -> ModalityReport:
    inputs = build_inputs(settings, modality, count, seed, f"inputs-{modality}")
    steps = settings.steps(modality)
    parts: dict[str, list[Measured]] = {step: [] for step in steps}
    for step, part in _run_order(count, steps):
        title = step_title(step)
        what = title if part is None else f"{title}, records {part.start} to {part.stop}"
        print(f"  {modality}: {what} ...", flush=True)
        name = "-".join([*step.split(), modality, *([str(part.start)] if part is not None else [])])
        kind, _, runtime = step.partition(" ")
        args = (inputs, settings) if part is None else (inputs, settings, part, *([runtime] if runtime else []))
        parts[step].append(_in_child(MEASUREMENTS[kind], log_path(settings, name), *args))
    measured = {step: Measured.combined(parts[step]) for step in steps}
    rule = "slower" if device_type(settings.device) == "cuda" else "combined"
    return ModalityReport(modality, count, inputs.source, measured, rule)


def _run_order(count: int, steps: list[str]) -> list[tuple[str, slice | None]]:
    """The ``steps`` of one modality in the order they run: the ceilings' first halves, the job,
    the ceilings' second halves in mirror order, so that each step's halves lie as far from the
    job (see the module docstring), then the baselines."""
    halves = [slice(0, count // 2), slice(count // 2, count)] if count > 1 else [slice(0, count)]
    ceilings = [step for step in steps if step.split()[0] in CEILING_STEPS]
    return [
        *((step, halves[0]) for step in ceilings),
        ("job", None),
        *((step, half) for half in halves[1:] for step in reversed(ceilings)),
        *((step, None) for step in steps if step not in ceilings and step != "job"),
    ]


def run_scaling(modality: str, counts: list[int], settings: Settings, seed: int, case: str) -> dict[str, Any]:
    """The job on each of ``counts`` records of ``modality``, smallest first; the largest run's
    wall time and peak memory over the smallest's. Every run must fill the feature sink's buffer
    of one file's rows (``--rows_per_file``) for the ratio to show how memory grows with the
    input rather than how full that buffer got."""
    runs = {}
    for records in sorted(counts):
        print(f"  {case}: the job on {records} {modality} records ...", flush=True)
        inputs = build_inputs(settings, modality, records, seed, f"inputs-{case}-{modality}-{records}")
        runs[records] = _in_child(measure_job, log_path(settings, f"{case}-{modality}-{records}"), inputs, settings)
    small, large = runs[min(counts)], runs[max(counts)]
    return {
        "case": case,
        "modality": modality,
        "records": sorted(counts),
        "runs": {str(records): asdict(measured) for records, measured in runs.items()},
        "wall_time_ratio": large.seconds / small.seconds,
        "peak_memory_ratio": large.peak_rss_mb / small.peak_rss_mb,
    }


def _ratio_figures(scaling: dict[str, Any]) -> dict[str, float]:
    """The figures of a scaling run that have targets, by target name."""
    if scaling["case"] == "scale":
        return {"scale: peak memory ratio": scaling["peak_memory_ratio"]}
    return {"wall time ratio": scaling["wall_time_ratio"], "peak memory ratio": scaling["peak_memory_ratio"]}


def _inputs_folder(settings: Settings, modality: str, seed: int) -> Path:
    return settings.workdir / "inputs" / f"{modality}-seed{seed}"


def log_path(settings: Settings, name: str) -> Path:
    folder = settings.workdir / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{name}.log"


# -- the report ----------------------------------------------------------------------------------
def format_report(reports: list[ModalityReport], scalings: list[dict[str, Any]], settings: Settings) -> str:
    lines = []
    for report in reports:
        lines += [
            "",
            f"{report.modality}: {report.records} records ({report.inputs}), {settings.device}, {settings.precision}",
            f"  {'step':<28} {'records/s':>10} {'seconds':>9} {'peak MB':>9} {'load':>6}",
        ]
        for step, measured in report.steps.items():
            gpu = f"  (GPU {measured.peak_gpu_mb:.0f} MB)" if measured.peak_gpu_mb is not None else ""
            halves = ""
            if measured.parts:
                rates = ", ".join(f"{part.records_per_second:.1f}" for part in measured.parts)
                halves = f"  (halves before and after the job: {rates})"
            lines.append(
                f"  {step_title(step):<28} {measured.records_per_second:>10.1f} "
                f"{measured.seconds:>9.2f} {measured.peak_rss_mb:>9.0f} {measured.load_average:>6.1f}{gpu}{halves}"
            )
        rule = "slower of 1 and 2" if report.ceiling_rule == "slower" else "1/(1/r1 + 1/r2)"
        for runtime, ceiling in report.ceilings.items():
            lines.append(f"  {f'ceiling, {runtime}, {rule}':<28} {ceiling:>10.1f}")
        lines.append(f"  {'job runs on':<28} {report.steps['job'].notes.get('runtime', '?'):>10}")
        for figure, value in report.ratios.items():
            verdict = _verdict(settings.device, figure, value, report.modality)
            named = f"{figure} ({report.faster_runtime})" if figure == "job / ceiling" else figure
            lines.append(f"  {named:<28} {value:>10.2f}   {verdict}")
    for scaling in scalings:
        lines += [
            "",
            f"{scaling['case']}: the job on {scaling['modality']} records",
            f"  {'records':>10} {'seconds':>9} {'records/s':>10} {'peak MB':>9} {'load':>6}",
        ]
        for records, run in scaling["runs"].items():
            lines.append(
                f"  {records:>10} {run['seconds']:>9.1f} {int(records) / run['seconds']:>10.1f} "
                f"{run['peak_rss_mb']:>9.0f} {run['load_average']:>6.1f}"
            )
        for figure, value in _ratio_figures(scaling).items():
            lines.append(f"  {figure:<26} {value:>6.2f}   {_verdict(settings.device, figure, value)}")
    return "\n".join(lines)


def report_json(
    reports: list[ModalityReport], scalings: list[dict[str, Any]], settings: Settings, started: float, quick: bool
) -> dict[str, Any]:
    modalities = {}
    for report in reports:
        modalities[report.modality] = {
            "records": report.records,
            "inputs": report.inputs,
            "records_per_second": report.rates,
            "steps": {step: asdict(measured) for step, measured in report.steps.items()},
            "ceiling": {
                "records_per_second": report.ceiling,
                "runtime": report.faster_runtime,
                "by_runtime": report.ceilings,
                "rule": report.ceiling_rule,
            },
            "ratios": report.ratios,
            "targets": {
                figure: _verdict(settings.device, figure, value, report.modality)
                for figure, value in report.ratios.items()
            },
        }
    for scaling in scalings:
        scaling["targets"] = {
            figure: _verdict(settings.device, figure, value) for figure, value in _ratio_figures(scaling).items()
        }
    return {
        "machine": {
            "cores": available_cores(),
            "processor": processor_name(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "beam": beam.__version__,
            "load_average_at_end": os.getloadavg(),
        },
        "settings": {
            "device": settings.device,
            "precision": settings.precision,
            "job_options": list(settings.job_options),
            "quick": quick,
        },
        "wall_seconds": time.perf_counter() - started,
        "modalities": modalities,
        "scaling": scalings,
    }


def processor_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


# -- command line --------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    # No abbreviations: an option this parser does not know goes to the job whole (--runtime is
    # not --runtimes).
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.throughput",
        allow_abbrev=False,
        description="Records per second of the feature job per modality, against its ceilings "
        "(decode+preprocess alone, the model alone), stock Beam RunInference and a naive loop.",
        epilog="Any other option is passed to `mmfeatures extract` (e.g. --micro-batch-size 16).",
    )
    parser.add_argument("--quick", action="store_true", help="Tiny sizes: a smoke test of the benchmark itself.")
    parser.add_argument("--device", default="cpu", help="cpu or cuda.")
    parser.add_argument("--precision", default=None, help="fp32, bf16 or fp16 (default: bf16 on cuda, fp32 on cpu).")
    parser.add_argument("--modalities", default=",".join(MODALITIES), help="Comma-separated (default: all three).")
    parser.add_argument(
        "--runtimes",
        default=",".join(RUNTIMES),
        help="The model runtimes whose forward passes are measured, each where a modality runs on it "
        "(default: %(default)s); the job runs on its own --runtime.",
    )
    for modality in MODALITIES:
        parser.add_argument(
            f"--{modality}-records",
            type=int,
            default=None,
            help=f"{modality} records (default: {RECORDS['cpu'][modality]} on cpu, "
            f"{RECORDS['cuda'][modality]} on cuda).",
        )
    parser.add_argument(
        "--scaling-modality",
        default="image",
        choices=MODALITIES + ("none",),
        help="The modality of the N and 10 x N scaling run ('none' skips it).",
    )
    parser.add_argument(
        "--scaling-records",
        type=int,
        default=None,
        help=f"N of the scaling run (default: {SCALING_RECORDS['cpu']} on cpu).",
    )
    parser.add_argument(
        "--scale",
        action="store_true",
        help="Run the scale case alone: the job on --scale-records text and image records, its peak memory.",
    )
    parser.add_argument(
        "--scale-records",
        default=",".join(map(str, SCALE_RECORDS)),
        help="Comma-separated record counts of the scale case (default: %(default)s).",
    )
    add_run_arguments(parser, "throughput.json")
    return parser


def add_run_arguments(parser: argparse.ArgumentParser, results: str) -> None:
    """The options every benchmark takes: the seed of its generated inputs, its working folder and
    where its results go."""
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path("out/benchmarks"),
        help="Inputs (kept for the next run, shared between the benchmarks), job outputs and logs.",
    )
    parser.add_argument(
        "--json", type=Path, default=None, help=f"Where to write the results (default: WORKDIR/{results})."
    )


def write_results(path: Path, results: dict[str, Any]) -> None:
    """A benchmark's results as JSON at ``path``, said on the last line it prints."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=str))
    took = f" ({results['wall_seconds']:.0f} s)" if "wall_seconds" in results else ""
    print(f"\nresults: {path}{took}")


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    args, job_options = _parser().parse_known_args(argv)
    kind = device_type(args.device)
    precision = args.precision or ("bf16" if kind == "cuda" else "fp32")
    runtimes = tuple(runtime.strip() for runtime in args.runtimes.split(",") if runtime.strip())
    if not runtimes or set(runtimes) - set(RUNTIMES):
        raise SystemExit(f"--runtimes: a comma-separated list of {', '.join(RUNTIMES)}, not {args.runtimes!r}")
    settings = Settings(args.device, precision, tuple(job_options), args.workdir.resolve(), runtimes)
    settings.workdir.mkdir(parents=True, exist_ok=True)
    modalities = [m.strip() for m in args.modalities.split(",") if m.strip()]
    unknown = set(modalities) - set(MODALITIES)
    if unknown:
        raise SystemExit(f"unknown modalities: {sorted(unknown)}")
    sizes = QUICK_RECORDS if args.quick else RECORDS[kind]
    print(f"benchmark on {available_cores()} cores, {args.device}, {precision}; logs in {settings.workdir / 'logs'}")
    reports, scalings = [], []
    if args.scale:
        counts = [int(count) for count in args.scale_records.split(",")]
        scalings = [run_scaling(modality, counts, settings, args.seed, "scale") for modality in SCALE_MODALITIES]
    else:
        for modality in modalities:
            count = getattr(args, f"{modality}_records") or sizes[modality]
            reports.append(run_modality(modality, count, settings, args.seed))
        if args.scaling_modality != "none":
            count = args.scaling_records or (QUICK_SCALING_RECORDS if args.quick else SCALING_RECORDS[kind])
            rows_per_file = ("--rows_per_file", str(SCALING_ROWS_PER_FILE))
            scaling_settings = replace(settings, job_options=(*settings.job_options, *rows_per_file))
            counts = [count, SCALING_FACTOR * count]
            scalings = [run_scaling(args.scaling_modality, counts, scaling_settings, args.seed, "scaling")]
    print(format_report(reports, scalings, settings))
    results = report_json(reports, scalings, settings, started, args.quick)
    write_results(args.json or settings.workdir / ("scale.json" if args.scale else "throughput.json"), results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
