"""The throughput benchmark's smoke test, through ``benchmarks/gpu.sh --device cpu`` as a machine
without a GPU runs it: ``--quick`` runs every measurement of every modality on a few records of each
(real models, real generated files), prints the table and writes the JSON. The incremental
benchmark's ``--quick`` runs its three jobs on a few images, each checked as the full run checks it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks.throughput import RUNTIMES, STEP_TITLES, Measured, _run_order
from mmfeatures.modalities import MODALITIES as REGISTRY

REPOSITORY = Path(__file__).resolve().parent.parent
MODALITIES = ("text", "image", "audio")


def test_quick_benchmark_prints_the_table_and_writes_every_figure(tmp_path: Path) -> None:
    results = tmp_path / "results.json"
    run = subprocess.run(
        ["benchmarks/gpu.sh", "--device", "cpu", "--quick", "--workdir", str(tmp_path), "--json", str(results)],
        cwd=REPOSITORY,
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr

    for modality in MODALITIES:
        assert f"\n{modality}: " in run.stdout
    for title in STEP_TITLES.values():
        assert run.stdout.count(title) >= len(MODALITIES)
    runtimes = {modality: [r for r in RUNTIMES if r in REGISTRY[modality].runtimes] for modality in MODALITIES}
    for runtime in RUNTIMES:
        ceilings = sum(runtime in names for names in runtimes.values())
        assert run.stdout.count(f"ceiling, {runtime}, 1/(1/r1 + 1/r2)") == ceilings
    halves = sum(1 + len(names) for names in runtimes.values())  # prepare, and the model on each runtime
    assert run.stdout.count("(halves before and after the job: ") == halves
    assert "wall time ratio" in run.stdout and "peak memory ratio" in run.stdout

    report = json.loads(results.read_text())
    assert (report["settings"]["device"], report["settings"]["precision"]) == ("cpu", "fp32")
    assert set(report["modalities"]) == set(MODALITIES)
    for modality, figures in report["modalities"].items():
        models = [f"model {runtime}" for runtime in runtimes[modality]]
        assert list(figures["records_per_second"]) == ["prepare", *models, "job", "stock", "naive"], modality
        assert all(rate > 0 for rate in figures["records_per_second"].values()), modality
        assert all(step["peak_rss_mb"] > 0 for step in figures["steps"].values()), modality
        ceiling = figures["ceiling"]
        assert set(ceiling["by_runtime"]) == set(runtimes[modality]) and ceiling["records_per_second"] > 0
        assert ceiling["records_per_second"] == max(ceiling["by_runtime"].values())
        assert ceiling["by_runtime"][ceiling["runtime"]] == ceiling["records_per_second"]
        for step in ["prepare", *models]:  # measured in two halves, one each side of the job
            parts = figures["steps"][step]["parts"]
            assert len(parts) == 2 and sum(part["records"] for part in parts) == figures["records"], (modality, step)
        assert set(figures["ratios"]) == {"job / ceiling", "job / naive", "job / stock"}
    (scaling,) = report["scaling"]
    assert scaling["records"][1] == 10 * scaling["records"][0]
    assert scaling["wall_time_ratio"] > 0 and scaling["peak_memory_ratio"] > 0


def test_the_scale_case_runs_the_job_on_each_count_of_text_and_images(tmp_path: Path) -> None:
    results = tmp_path / "scale.json"
    argv = ["--scale", "--scale-records", "6,3", "--workdir", str(tmp_path), "--json", str(results)]
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.throughput", *argv],
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("scale: peak memory ratio") == 2
    report = json.loads(results.read_text())
    assert report["modalities"] == {}
    assert [(scale["modality"], scale["records"]) for scale in report["scaling"]] == [
        ("text", [3, 6]),
        ("image", [3, 6]),
    ]
    for scale in report["scaling"]:
        runs = scale["runs"]
        assert [runs[count]["records"] for count in ("3", "6")] == [3, 6]
        assert scale["peak_memory_ratio"] == runs["6"]["peak_rss_mb"] / runs["3"]["peak_rss_mb"]


def test_the_ceiling_steps_run_in_halves_either_side_of_the_job() -> None:
    steps = ["prepare", "model torch", "model onnx", "job", "stock", "naive"]
    ceiling_steps = steps[:3]
    order = _run_order(11, steps)
    job = order.index(("job", None))
    for step in ceiling_steps:
        assert [part for name, part in order[:job] if name == step] == [slice(0, 5)]
        assert [part for name, part in order[job:] if name == step] == [slice(5, 11)]
    ceilings = [name for name, _ in order if name in ceiling_steps]
    assert ceilings == [*ceiling_steps, *reversed(ceiling_steps)]  # mirrored: each as far from the job
    assert sorted(name for name, _ in order) == sorted([*steps, *ceiling_steps])
    assert _run_order(1, ["prepare", "model torch", "job", "stock", "naive"]) == [
        ("prepare", slice(0, 1)),
        ("model torch", slice(0, 1)),
        ("job", None),
        ("stock", None),
        ("naive", None),
    ]


def test_a_step_in_parts_counts_as_one_run_over_all_its_records() -> None:
    first = Measured(10, 1.0, worker_processes=2, peak_rss_mb=100.0, load_average=1.0)
    second = Measured(30, 3.0, worker_processes=2, peak_rss_mb=200.0, load_average=2.0, notes={"batches": 3})
    both = Measured.combined([first, second])
    assert (both.records, both.seconds, both.records_per_second) == (40, 4.0, 10.0)
    assert (both.peak_rss_mb, both.worker_processes, both.peak_gpu_mb) == (200.0, 2, None)
    assert both.load_average == (1.0 * 1.0 + 2.0 * 3.0) / 4.0
    assert both.parts == [first, second]
    assert Measured.combined([first]) is first
    on_gpu = Measured(5, 1.0, peak_gpu_mb=300.0)
    assert Measured.combined([first, on_gpu]).peak_gpu_mb == 300.0


def test_quick_incremental_benchmark_checks_each_run_and_writes_the_ratios(tmp_path: Path) -> None:
    results = tmp_path / "results.json"
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.incremental", "--quick", "--workdir", str(tmp_path), "--json", str(results)],
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr

    report = json.loads(results.read_text())
    records, changed = report["records"], report["changed_records"]
    assert records >= 24 and changed >= 1
    expected = {  # embedded, unchanged, added, replaced, rows whose vectors equal the first run's
        "first": (records, 0, records, 0, 0),
        "rerun": (0, records, 0, 0, records),
        "changed rerun": (2 * changed, records - changed, changed, changed, records - changed),
    }
    for name, counts in expected.items():
        figures = report["runs"][name]
        changes = figures["incremental"]
        found = (figures["embedded"], changes["unchanged"], changes["added"], changes["replaced"], figures["identical"])
        assert found == counts, name
        (row,) = [line for line in run.stdout.splitlines() if line.startswith(f"  {name:<15} ")]
        assert tuple(int(value) for value in row[17:].split()[5:10]) == counts, name  # the printed row
        assert figures["reconciles"] and figures["wall_seconds"] > 0 and figures["peak_rss_mb"] > 0, name
    assert report["runs"]["rerun"]["models_loaded"] == []  # nothing to embed: no weights loaded
    assert report["runs"]["first"]["models_loaded"] == ["image"]
    assert all(ratio > 0 for ratio in report["ratios"].values())
    assert "  rerun / first " in run.stdout and report["goal"]["rerun / first"] in run.stdout
    assert "  changed rerun / first " in run.stdout
