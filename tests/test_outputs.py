"""The output folder as one commit: a commit cut short at any step, or failing on a full disk,
leaves the previous run's outputs whole and the next run cleans up; a run replaces only the
tables it can prove it wrote, and refuses, before any work, an output holding the user's own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmfeatures import __version__, outputs, schema, sinks, storage
from mmfeatures.errors import ConfigurationError
from mmfeatures.job import check_output
from mmfeatures.lease import Lease
from tests.committed_tables import COMMIT_STEPS, commit_tables, cut_commit_short

ERRORS = schema.errors_schema()


def table_of(ids: range) -> pa.Table:
    return pa.table({"id": [f"r{i}" for i in ids]})


def commit_run(output: str, ids: range) -> dict[str, Any]:
    return commit_tables(output, {"features": [table_of(ids)], "errors": [ERRORS.empty_table()]})


def ids_read(output: str) -> list[str]:
    return sorted(schema.read_features(storage.join(output, "features")).column("id").to_pylist())


def stage(output: str, run: str, ids: range) -> dict[str, list[tuple[str, int]]]:
    """A run's staged parts: two of features, one of errors."""
    half = ids.start + len(ids) // 2
    parts = {
        "features": [table_of(range(ids.start, half)), table_of(range(half, ids.stop))],
        "errors": [ERRORS.empty_table()],
    }
    return {
        name: [
            (sinks.write_staged_part(storage.join(output, outputs.STAGING, run, name), t), t.num_rows) for t in tables
        ]
        for name, tables in parts.items()
    }


def files_under(output: str) -> list[str]:
    fs, root = fsspec.core.url_to_fs(output)
    return sorted(path[len(root.rstrip("/")) + 1 :] for path in fs.find(root))


def listed(output: str) -> list[str]:
    fs, root = fsspec.core.url_to_fs(output)
    manifest = json.loads(fs.cat_file(f"{root.rstrip('/')}/_run.json"))
    return sorted(["_run.json"] + [part["path"] for table in manifest["tables"].values() for part in table["files"]])


@pytest.fixture(params=["local", "memory"])
def output(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    if request.param == "local":
        yield str(tmp_path / "out")
        return
    url = f"memory://outputs-{uuid.uuid4().hex}/out"
    yield url
    fsspec.filesystem("memory").rm(url.split("://")[1].split("/")[0], recursive=True)


@pytest.mark.parametrize("step, after", COMMIT_STEPS)
def test_a_commit_cut_short_at_any_step_leaves_one_whole_run_and_the_next_run_cleans_up(
    output: str, step: str, after: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    commit_run(output, range(0, 5))
    previous = json.loads(fsspec.open(storage.join(output, "_run.json")).open().read())
    run = f"run-{uuid.uuid4().hex}"
    lease = Lease.take(output, run)
    staged = stage(output, run, range(20, 26))
    cut_commit_short(monkeypatch, output, step, after)
    with pytest.raises(OSError, match="cut short"):
        sinks.publish(lease, "new", staged, {"package_version": __version__})
    monkeypatch.undo()
    lease.release()  # then killed: nothing cleaned up

    published = step == "delete"
    assert ids_read(output) == [f"r{i}" for i in (range(20, 26) if published else range(0, 5))]
    manifest = json.loads(fsspec.open(storage.join(output, "_run.json")).open().read())
    assert (manifest["commit"] == "new") == published and (manifest == previous) != published

    assert outputs.recover(output)  # what the next run does first, holding the lease
    assert [f for f in files_under(output) if not f.startswith("_lease")] == listed(output)
    assert ids_read(output) == [f"r{i}" for i in (range(20, 26) if published else range(0, 5))]


def test_a_full_disk_fails_the_commit_and_leaves_the_previous_run_manifest_whole(tmp_path: Path) -> None:
    """The file-size limit makes the kernel refuse a write past it (EFBIG), as a full disk refuses
    one (ENOSPC): the new _run.json cannot be written, and the old one is neither emptied nor cut."""
    output = str(tmp_path / "out")
    commit_run(output, range(0, 5))
    previous = (tmp_path / "out" / "_run.json").read_bytes()
    run = f"run-{uuid.uuid4().hex}"
    staged = stage(output, run, range(20, 26))
    script = textwrap.dedent(
        f"""
        import json, resource, signal, sys
        from mmfeatures import sinks
        from mmfeatures.lease import Lease
        lease = Lease.take({output!r}, {run!r})
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        staged = json.loads(sys.argv[1])
        sinks.publish(lease, "new", staged, {{"package_version": "x", "padding": "x" * 8192}})
        """
    )
    failed = subprocess.run(
        [sys.executable, "-c", script, json.dumps(staged)], capture_output=True, text=True, cwd=os.getcwd()
    )
    assert failed.returncode != 0 and "File too large" in failed.stderr, failed.stderr[-2000:]
    assert (tmp_path / "out" / "_run.json").read_bytes() == previous
    assert ids_read(output) == [f"r{i}" for i in range(0, 5)]
    outputs.recover(output)
    assert [f for f in files_under(output) if not f.startswith("_lease")] == listed(output)


@pytest.mark.parametrize(
    "foreign",
    [
        "features/notes.txt",  # the user's own folder that happens to be called features
        "errors/2024/errors.csv",  # or errors, with a subfolder
        "features/part-00000-of-00001.parquet",  # even a Parquet part, if no commit lists it
    ],
)
def test_a_run_refuses_an_output_holding_files_it_did_not_write(tmp_path: Path, foreign: str) -> None:
    output = tmp_path / "out"
    commit_run(str(output), range(0, 3))
    (output / foreign).parent.mkdir(parents=True, exist_ok=True)
    (output / foreign).write_text("mine")
    with pytest.raises(ValueError, match=f"{foreign.split('/')[0]}/ holds 1 file"):
        check_output(str(output))
    assert (output / foreign).read_text() == "mine"


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("_run.json", "", "was not written by mmfeatures"),  # an earlier release's full disk left it empty
        ("_run.json", '{"mine": 1}', "was not written by mmfeatures"),
        ("features", "a file", "features is a file"),
    ],
)
def test_a_run_refuses_files_in_the_places_of_its_outputs(
    tmp_path: Path, name: str, content: str, message: str
) -> None:
    output = tmp_path / "out"
    output.mkdir()
    (output / name).write_text(content)
    with pytest.raises(ValueError, match=message):
        check_output(str(output))


def test_the_tables_of_earlier_layouts_are_taken_over_and_their_manifests_removed(tmp_path: Path) -> None:
    output = tmp_path / "out"
    for table, manifest in (("features", "_features_manifest.json"), ("errors", "errors/_manifest.json")):
        (output / table).mkdir(parents=True)
        pq.write_table(table_of(range(2)), output / table / "part-old-00000-of-00001.parquet")
        listing = {"commit": "old", "files": [{"path": "part-old-00000-of-00001.parquet", "rows": 2}]}
        (output / manifest).write_text(json.dumps(listing))
    (output / "_run.json").write_text(json.dumps({"package_version": "0.1.0"}))
    check_output(str(output))
    commit_run(str(output), range(5, 8))
    assert [f for f in files_under(str(output)) if not f.startswith("_lease")] == listed(str(output))
    assert ids_read(str(output)) == ["r5", "r6", "r7"]


def test_check_output_refuses_through_the_command_line_in_one_line(tmp_path: Path, capsys: Any) -> None:
    from pipelines.extract_features import main

    output = tmp_path / "out"
    (output / "features").mkdir(parents=True)
    (output / "features" / "mine.csv").write_text("a,b\n")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"id": "a", "text": "hello"}\n')
    assert main(["--input", str(manifest), "--output", str(output)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "features/ holds 1 file(s) this job did not write (features/mine.csv...)" in line
    assert sorted(os.listdir(output)) == ["features"] and os.listdir(output / "features") == ["mine.csv"]


def test_a_run_refused_at_the_start_raises_a_configuration_error(tmp_path: Path) -> None:
    from apache_beam.options.pipeline_options import PipelineOptions

    from mmfeatures.job import Job

    output = tmp_path / "out"
    (output / "errors").mkdir(parents=True)
    (output / "errors" / "x").write_text("")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"id": "a", "text": "hello"}\n')
    with pytest.raises(ConfigurationError, match="errors/ holds"):
        Job.from_options(PipelineOptions(["--input", str(manifest), "--output", str(output)]))


def test_names_a_manifest_gives_are_never_trusted_outside_the_tables(tmp_path: Path) -> None:
    """A manifest of an earlier layout, or a _run.json, that lists the user's file or a path out
    of the output proves nothing: the user's file keeps the folder refused, and nothing named by
    such a path is ever deleted."""
    victim = tmp_path / "victim.txt"
    victim.write_text("not the job's")
    output = tmp_path / "out"
    (output / "features").mkdir(parents=True)
    (output / "features" / "data.csv").write_text("mine")
    listing = {"commit": "old", "files": [{"path": "data.csv", "rows": 1}, {"path": "../../victim.txt", "rows": 1}]}
    (output / "features" / "_manifest.json").write_text(json.dumps(listing))
    with pytest.raises(ValueError, match="features/ holds 1 file"):
        check_output(str(output))

    (output / "features" / "data.csv").unlink()
    commit_run(str(output), range(0, 3))
    manifest = json.loads((output / "_run.json").read_text())
    manifest["tables"]["features"]["files"].append({"path": "features/../../victim.txt", "rows": 1})
    (output / "_run.json").write_text(json.dumps(manifest))
    commit_run(str(output), range(3, 6))
    assert victim.read_text() == "not the job's"
    assert [f for f in files_under(str(output)) if not f.startswith("_lease")] == listed(str(output))


def test_a_retried_commit_still_deletes_what_the_first_attempt_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    output = str(tmp_path / "out")
    commit_run(output, range(0, 5))
    run = f"run-{uuid.uuid4().hex}"
    lease = Lease.take(output, run)
    staged = stage(output, run, range(20, 26))
    original = fsspec.implementations.local.LocalFileSystem.rm_file

    def fails_once(self: Any, path: str) -> None:
        monkeypatch.undo()
        raise OSError("the first attempt dies after publishing")

    monkeypatch.setattr(fsspec.implementations.local.LocalFileSystem, "rm_file", fails_once)
    with pytest.raises(OSError, match="first attempt"):
        sinks.publish(lease, "new", staged, {"package_version": __version__})
    assert fsspec.implementations.local.LocalFileSystem.rm_file is original
    sinks.publish(lease, "new", staged, {"package_version": __version__})  # the retry, with the same parts
    assert [f for f in files_under(output) if not f.startswith("_lease")] == listed(output)
    assert ids_read(output) == [f"r{i}" for i in range(20, 26)]


def test_an_intent_cut_short_is_a_commit_that_never_began(tmp_path: Path) -> None:
    """The intent is written whole or not at all, before any part moves: one that cannot be read
    (a full disk under an earlier release, say) leaves nothing to undo, and does not lock the output."""
    output = tmp_path / "out"
    commit_run(str(output), range(0, 3))
    stale = output / "_staging" / f"run-{uuid.uuid4().hex}"
    (stale / "features").mkdir(parents=True)
    (stale / "features" / "x.parquet").write_bytes(b"staged")
    (stale / "commit.json").write_text('{"commit": "cut')
    check_output(str(output))
    assert outputs.recover(str(output)) == [str(stale)]
    assert not (output / "_staging").exists() and ids_read(str(output)) == ["r0", "r1", "r2"]


def test_a_classic_template_is_refused_before_any_work(tmp_path: Path) -> None:
    """Its launches would share the run id, commit and lease the template was built with."""
    from apache_beam.options.pipeline_options import PipelineOptions

    from mmfeatures.job import Job

    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"id": "a", "text": "hello"}\n')
    argv = ["--input", str(manifest), "--output", str(tmp_path / "out"), "--template_location", "gs://b/t"]
    with pytest.raises(ConfigurationError, match="--template_location: a classic Dataflow template"):
        Job.from_options(PipelineOptions(argv))
