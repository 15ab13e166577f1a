"""The job installed, not checked out: the wheel is built as the worker image's wheel stage builds
it (from the files that stage receives), installed into a fresh virtual environment by
scripts/install_worker.sh (the script the image runs), and run as ``mmfeatures sample`` and
``mmfeatures extract`` from a folder outside the repository, with no PYTHONPATH: what a worker
that gets ``--setup_file`` or the image sees. Schemas and models must come from the environment.

Slow: the install (torch and the pinned requirements, about 2.5 GB in 60,000 files) takes about
three minutes on a two-core machine.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import mmfeatures
from tests.test_worker_image import INSTALL_SCRIPT, copy_stage_sources, wheel_stage_command

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
INSTALL_TIMEOUT_S = 1500  # two to four minutes here; pip's index and downloads may be slower elsewhere
JOB_TIMEOUT_S = 600
SAMPLE_RECORDS = 20  # the smallest sample that has both a broken image and a broken audio file
MODALITIES = ("text", "image", "audio")


@dataclass(frozen=True)
class Installed:
    venv: Path
    workdir: Path  # outside the repository: where the commands run
    env: dict[str, str]

    @property
    def python(self) -> str:
        return str(self.venv / "bin" / "python")

    @property
    def command(self) -> str:
        return str(self.venv / "bin" / "mmfeatures")


def _run(argv: list[str], cwd: Path, env: dict[str, str] | None, timeout: float) -> str:
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (
        f"{' '.join(argv)} exited {proc.returncode}\n"
        f"--- stdout\n{proc.stdout[-5000:]}\n--- stderr\n{proc.stderr[-5000:]}"
    )
    return proc.stdout


def _outside_environment(venv: Path) -> dict[str, str]:
    """This process's environment without anything that points Python at the checkout, and with
    the new environment first on PATH, as in an activated virtual environment or the image."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON") and k != "VIRTUAL_ENV"}
    env["PATH"] = os.pathsep.join([str(venv / "bin"), env.get("PATH", "")])
    return env


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    root = tmp_path_factory.mktemp("installed")
    assert REPO not in root.parents, "the test needs a temporary folder outside the repository"
    source, dist, venv, workdir = (root / name for name in ("src", "dist", "venv", "work"))
    workdir.mkdir()

    copy_stage_sources("wheel", source)
    command = wheel_stage_command()  # python -m pip wheel --no-deps --wheel-dir /dist .
    command = [sys.executable, *command[1:]]
    command[command.index("--wheel-dir") + 1] = str(dist)
    _run(command, source, None, timeout=300)
    wheels = sorted(dist.glob("mmfeatures-*.whl"))
    assert [w.name for w in wheels] == [f"mmfeatures-{mmfeatures.__version__}-py3-none-any.whl"]

    _run([sys.executable, "-m", "venv", str(venv)], workdir, None, timeout=120)
    env = _outside_environment(venv)
    _run(
        ["bash", str(REPO / INSTALL_SCRIPT), str(wheels[0])],
        workdir,
        {**env, "PYTHON": str(venv / "bin" / "python")},
        timeout=INSTALL_TIMEOUT_S,
    )
    yield Installed(venv, workdir, env)
    # 2.5 GB in about 60,000 files, which takes minutes to remove on a slow disk: removed in the
    # background while the other tests run, rather than by pytest at the start of a later session.
    subprocess.Popen(
        ["rm", "-rf", str(venv)], start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


LOCATIONS = """
import importlib.metadata, importlib.resources, json, sysconfig
import mmfeatures, pipelines.extract_features, schemas
from mmfeatures.encoders.weights import resolve_model
from mmfeatures.modalities import MODALITIES
print(json.dumps({
    "site_packages": sysconfig.get_paths()["purelib"],
    "version": importlib.metadata.version("mmfeatures"),
    "modules": [mmfeatures.__file__, pipelines.extract_features.__file__, schemas.__file__],
    "contract": str(importlib.resources.files("schemas.v1").joinpath("features.json")),
    "models": [resolve_model("default", m.preprocessor.default_model).directory for m in MODALITIES.values()],
}))
"""


def test_the_package_its_schemas_and_models_come_from_the_environment(installed: Installed) -> None:
    found = json.loads(_run([installed.python, "-c", LOCATIONS], installed.workdir, installed.env, timeout=120))
    site_packages = Path(found["site_packages"])
    assert installed.venv in site_packages.parents
    assert found["version"] == mmfeatures.__version__
    for path in [*found["modules"], found["contract"], *found["models"]]:
        assert site_packages in Path(path).parents, f"{path} is not inside the new environment"
    assert Path(found["contract"]).read_bytes() == (REPO / "schemas" / "v1" / "features.json").read_bytes()
    assert (installed.venv / "bin" / "mmfeatures").is_file()


def _read_parts(output: Path, table: dict[str, Any]) -> pa.Table:
    """A table's files as the run manifest lists them, each holding the rows it says."""
    parts = []
    for part in table["files"]:
        data = pq.read_table(output / part["path"])
        assert data.num_rows == part["rows"], part["path"]
        parts.append(data)
    assert parts, "the run manifest lists no files"
    return pa.concat_tables(parts)


def test_sample_and_extract_with_the_installed_command(installed: Installed) -> None:
    env = {**installed.env, "HF_HUB_OFFLINE": "1"}  # a worker downloads nothing: the models are installed
    run = installed.workdir
    _run([installed.command, "sample", "--out", "sample", "--n", str(SAMPLE_RECORDS)], run, env, JOB_TIMEOUT_S)
    printed = _run(
        [installed.command, "extract", "--input", "sample/manifest.jsonl", "--output", "out"], run, env, JOB_TIMEOUT_S
    )
    assert "counts reconcile: True" in printed

    summary = json.loads((run / "out" / "_run.json").read_text())
    assert summary["reconciles"] is True and all(summary["checks"].values()), summary["checks"]
    assert summary["package_version"] == mmfeatures.__version__
    records = summary["records"]
    manifest = [json.loads(line) for line in (run / "sample" / "manifest.jsonl").read_text().splitlines()]
    assert records["read"] == records["accepted"] == len(manifest) == SAMPLE_RECORDS
    assert records["with_features"] + records["without_features"] == records["accepted"]

    features = _read_parts(run / "out", summary["tables"]["features"])
    assert features.num_rows == records["with_features"] == summary["feature_rows"]
    contract = json.loads((REPO / "schemas" / "v1" / "features.json").read_text())["fields"]
    names = [field["name"] for field in contract]
    assert features.column_names[: len(names)] == names  # carried manifest columns follow
    assert set(features.column("id").to_pylist()) <= {row["id"] for row in manifest}

    dimensions = {f"{name}_embedding": summary["models"][name]["dimension"] for name in MODALITIES}
    dimensions["fused"] = summary["fusion"]["dimension"]
    for column, dimension in dimensions.items():
        present = [v for v in features.column(column).to_pylist() if v is not None]
        assert present, f"no {column} in the table"
        assert all(len(v) == dimension and all(math.isfinite(x) for x in v) for v in present), column
        assert any(any(x != 0 for x in v) for v in present), f"every {column} is zero"
    for modality in MODALITIES:
        has = features.column(f"has_{modality}").to_pylist()
        assert has == [v is not None for v in features.column(f"{modality}_embedding").to_pylist()]

    errors = _read_parts(run / "out", summary["tables"]["errors"])
    assert errors.num_rows == summary["error_rows"]
    failed = set(zip(errors.column("id").to_pylist(), errors.column("modality").to_pylist(), strict=True))
    broken = json.loads((run / "sample" / "expected_errors.json").read_text())
    assert broken and set(broken.items()) <= failed  # the sample's corrupt files, each an error row
