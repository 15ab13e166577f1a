"""The throughput benchmark's smoke test, through ``benchmarks/gpu.sh --device cpu`` as a machine
without a GPU runs it: ``--quick`` runs every measurement of every modality on a few records of each
(real models, real generated files), prints the table and writes the JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks.throughput import STEP_TITLES, STEPS

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
    assert run.stdout.count("ceiling, 1/(1/r1 + 1/r2)") == len(MODALITIES)
    assert "wall time ratio" in run.stdout and "peak memory ratio" in run.stdout

    report = json.loads(results.read_text())
    assert (report["settings"]["device"], report["settings"]["precision"]) == ("cpu", "fp32")
    assert set(report["modalities"]) == set(MODALITIES)
    for modality, figures in report["modalities"].items():
        assert set(figures["records_per_second"]) == set(STEPS), modality
        assert all(rate > 0 for rate in figures["records_per_second"].values()), modality
        assert all(step["peak_rss_mb"] > 0 for step in figures["steps"].values()), modality
        assert figures["ceiling"]["records_per_second"] > 0
        assert set(figures["ratios"]) == {"job / ceiling", "job / naive", "job / stock"}
    scaling = report["scaling"]
    assert scaling["records"][1] == 10 * scaling["records"][0]
    assert scaling["wall_time_ratio"] > 0 and scaling["peak_memory_ratio"] > 0
