"""``mmfeatures feast``: the repository it writes, applied and loaded by the real Feast of
``.venv-feast``, and read back with ``get_online_features``, for tables committed by hand and
for the real job's, before and after an incremental run; which load each commit gets; and the
stale online store that Feast's own ``materialize_incremental`` leaves, made right."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from mmfeatures import feast, schema
from mmfeatures.column_types import rows_to_table
from tests.committed_tables import commit_tables
from tests.jobs import extract, png, write_manifest

ROOT = Path(__file__).resolve().parents[1]
FEAST = ROOT / ".venv-feast" / "bin" / "feast"
FEAST_PYTHON = ROOT / ".venv-feast" / "bin" / "python"
needs_feast = pytest.mark.skipif(
    not FEAST.exists(), reason=".venv-feast is absent: ./scripts/setup_feast_env.sh creates it (./run_tests.sh does)"
)

DIMS = {"text": 4, "image": 5, "audio": 3, "fused": 12}
EMBEDDINGS = ["text_embedding", "image_embedding", "audio_embedding", "fused"]
FEATURES = [*EMBEDDINGS, "has_text", "has_image", "has_audio"]
MARKER = [-7.0] * DIMS["fused"]  # a fused vector no load writes: where it stays, nothing was written
NOW = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)


# -- tables committed by hand ---------------------------------------------------------------------
def feature_row(
    record_id: str, seed: int, time: datetime.datetime, modalities: Sequence[str] = ("text", "image")
) -> dict:
    """A row whose vectors are random float32 values drawn from ``seed``, computed at ``time``."""
    rng = np.random.default_rng(seed)
    row: dict[str, Any] = {
        "id": record_id,
        "label": "a",
        "split": "train",
        "failed_modalities": [],
        "event_timestamp": time,
        "created_timestamp": time,
        "content_hash": f"{seed:064x}",
        "fused": rng.standard_normal(DIMS["fused"]).astype(np.float32).tolist(),
    }
    for name in ("text", "image", "audio"):
        row[f"has_{name}"] = name in modalities
        row[f"{name}_embedding"] = (
            rng.standard_normal(DIMS[name]).astype(np.float32).tolist() if name in modalities else None
        )
    return row


def commit(output: Path, rows: list[dict], started: datetime.datetime, incremental: Mapping[str, Any] | None) -> str:
    """Commit ``rows`` as the feature table of a run that started at ``started``; its commit."""
    tables = {
        "features": [rows_to_table(rows, schema.features_schema(DIMS))],
        "errors": [rows_to_table([], schema.errors_schema())],
    }
    summary = {"started": started.isoformat(), "incremental": dict(incremental) if incremental else None}
    return commit_tables(str(output), tables, summary)["commit"]


def incremental(previous: str | None, rows: int, added: int = 0, replaced: int = 0, dropped: int = 0) -> dict:
    """``_run.json``'s ``incremental`` for a run over a previous table of ``rows`` rows."""
    unchanged = rows - replaced - dropped
    return {
        "previous_commit": previous,
        "previous_rows": rows,
        "unchanged": unchanged,
        "added": added,
        "replaced": replaced,
        "dropped": dropped,
        "kept_absent": 0,
    }


# -- the command, and what Feast serves -----------------------------------------------------------
def materialize(output: Path, repo: Path, capfd: pytest.CaptureFixture[str]) -> str:
    """Run ``mmfeatures feast OUTPUT --repo DIR --materialize`` with the Feast of .venv-feast; its
    stdout (Feast's included)."""
    status = feast.main([str(output), "--repo", str(repo), "--materialize", "--feast", str(FEAST)])
    captured = capfd.readouterr()
    assert status == 0, captured.err[-3000:]
    return captured.out


def in_feast(repo: Path, program: str, **values: Any) -> Any:
    """Run ``program`` with the Feast environment's Python, with ``store`` (the repository's
    FeatureStore) and ``values`` bound; returns what it leaves in ``result``, through JSON."""
    prelude = (
        "import datetime, json, sys\n"
        "import pandas as pd\n"
        "from feast import FeatureStore\n"
        "globals().update(json.loads(sys.stdin.read()))\n"
        "store = FeatureStore(repo_path=repo)\n"
    )
    completed = subprocess.run(
        [str(FEAST_PYTHON), "-I", "-c", f"{prelude}{program}\nprint(json.dumps(result, default=str))"],
        input=json.dumps({"repo": str(repo), **values}),
        capture_output=True,
        text=True,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


READ = """
response = store.get_online_features(
    features=[f"features:{name}" for name in features], entity_rows=[{"id": i} for i in ids]
).to_dict()
result = {
    "values": {i: {name: response[name][n] for name in features} for n, i in enumerate(ids)},
    "watermark": store.get_feature_view("features").most_recent_end_time,
    "fields": {f.name: [str(f.dtype), f.vector_length, f.tags] for f in store.get_feature_view("features").features},
}
"""
# After READ: overwrite the fused vector of every id served with the marker, as no load would.
MARK = """
served = [{**result["values"][i], "id": i, "fused": marker} for i in ids if result["values"][i]["fused"]]
now = pd.Timestamp.now(tz="UTC")
store.write_to_online_store("features", pd.DataFrame(served).assign(event_timestamp=now, created_timestamp=now))
"""


def online_vectors(repo: Path, ids: Sequence[str], before: str = "", after: str = "", **values: Any) -> dict[str, Any]:
    """What the repository's online store serves for ``ids`` (``get_online_features`` in the Feast
    environment): ``values``, each feature by id, None where it has none; Feast's ``watermark``;
    the view's ``fields``. ``before`` and ``after`` run in the same process, around the read, with
    ``values`` bound."""
    program = before + READ + after
    return in_feast(repo, program, ids=list(ids), features=FEATURES, marker=MARKER, **values)


def table_values(output: Path) -> dict[str, dict[str, Any]]:
    """The committed table's features, by id, as Python values (vectors as lists of floats)."""
    rows = schema.read_features(os.path.join(output, "features")).to_pylist()
    return {row["id"]: {name: row[name] for name in FEATURES} for row in rows}


def assert_online_is_table(online: Mapping[str, Any], output: Path) -> None:
    """Every id of the table is served with exactly its Parquet values, and every other id asked
    for is not served at all."""
    table = table_values(output)
    for record_id, values in online["values"].items():
        expected = table.get(record_id, dict.fromkeys(FEATURES))
        assert values == expected, record_id
    assert set(table) <= set(online["values"])


def state(repo: Path) -> dict[str, Any]:
    return json.loads((repo / feast.STATE).read_text())


# -- with the real Feast --------------------------------------------------------------------------
@needs_feast
def test_loads_whole_then_only_new_rows_then_whole_after_rows_were_dropped(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    output, repo = tmp_path / "out", tmp_path / "repo"
    ids = [f"r{i}" for i in range(9)]
    s1, s2, s3 = (NOW - datetime.timedelta(hours=h) for h in (3, 2, 1))
    modalities = [("text", "image"), ("text",), ("image", "audio"), ("audio",)]
    run1 = [feature_row(i, n, s1, modalities[n % 4]) for n, i in enumerate(ids[:8])]
    first = commit(output, run1, s1, None)

    out = materialize(output, repo, capfd)
    assert "8 rows written, the whole table, since nothing was loaded before" in out
    assert "store.get_online_features(features=['features:text_embedding'" in out
    assert f"repo_path={str(repo.absolute())!r}" in out
    assert state(repo)["commit"] == first
    online = online_vectors(repo, [*ids, "absent"], after=MARK)
    assert_online_is_table(online, output)  # r8 and "absent": not served
    assert online["values"]["r1"]["image_embedding"] is None and online["values"]["r1"]["has_image"] is False
    assert online["fields"]["text_embedding"] == ["Array(Float32)", 4, {"dimension": "4"}]
    assert online["fields"]["fused"] == ["Array(Float32)", 12, {"dimension": "12"}]
    assert online["fields"]["has_audio"][0] == "Bool"
    assert online["watermark"] is None  # never consulted, never moved

    # The next run replaces r1 and r2 and adds r8; the others keep their rows, times included.
    run2 = [*run1]
    run2[1], run2[2] = feature_row("r1", 101, s2), feature_row("r2", 102, s2, ("audio",))
    run2.append(feature_row("r8", 108, s2))
    second = commit(output, run2, s2, incremental(first, 8, added=1, replaced=2))
    out = materialize(output, repo, capfd)
    assert f"3 rows written, the rows commit {second} added or replaced" in out
    online = online_vectors(repo, ids, after=MARK)
    table = table_values(output)
    for record_id in ids:
        served = online["values"][record_id]
        if record_id in ("r1", "r2", "r8"):
            assert served == table[record_id]
        else:  # not written: still the marker
            assert served == {**table[record_id], "fused": MARKER}

    # A run that drops r0 and r5 (--drop-missing) and replaces r4: the whole table, into an
    # emptied view, so that every row is written again and r0 and r5 are no longer served.
    run3 = [row for row in run2 if row["id"] not in ("r0", "r5")]
    run3[2] = feature_row("r4", 104, s3)
    third = commit(output, run3, s3, incremental(second, 9, replaced=1, dropped=2))
    out = materialize(output, repo, capfd)
    assert f"7 rows written, the whole table, since commit {third} dropped 2 rows" in out
    online = online_vectors(repo, ids)
    assert_online_is_table(online, output)
    assert online["values"]["r0"] == online["values"]["r5"] == dict.fromkeys(FEATURES)
    assert state(repo) == {**state(repo), "commit": third, "whole": True, "rows": 7}


@needs_feast
def test_rows_behind_feast_watermark_are_loaded(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """The stale online store: Feast's ``materialize_incremental`` ran while a run was computing
    (its watermark passed the run's start, the event time of the rows it computes), so the next
    one skips every row of that run; ``mmfeatures feast --materialize`` loads them all the same."""
    output, repo = tmp_path / "out", tmp_path / "repo"
    ids = [f"r{i}" for i in range(6)]
    run1_start, run2_start, during_run2 = (NOW - datetime.timedelta(hours=h) for h in (3, 2, 1))
    run1 = [feature_row(i, n, run1_start) for n, i in enumerate(ids[:5])]
    first = commit(output, run1, run1_start, None)
    materialize(output, repo, capfd)

    # Feast materializes while run 2 computes: its watermark passes run 2's start.
    watermark = "store.materialize_incremental(end_date=datetime.datetime.fromisoformat(during))\n"
    online = online_vectors(repo, ids, before=watermark, during=during_run2.isoformat())
    assert online["watermark"] == str(during_run2)
    assert_online_is_table(online, output)

    run2 = [*run1]
    run2[0], run2[3] = feature_row("r0", 100, run2_start), feature_row("r3", 103, run2_start, ("audio",))
    run2.append(feature_row("r5", 105, run2_start))
    second = commit(output, run2, run2_start, incremental(first, 5, added=1, replaced=2))

    # Feast's next materialize_incremental starts at its watermark: run 2's rows are older.
    catch_up = "store.materialize_incremental(end_date=datetime.datetime.fromisoformat(now))\n"
    online = online_vectors(repo, ids, before=catch_up, now=datetime.datetime.now(datetime.timezone.utc).isoformat())
    table = table_values(output)
    stale = {i for i in ids if online["values"][i] != table[i]}
    assert stale == {"r0", "r3", "r5"}
    assert online["values"]["r0"] == {name: run1[0][name] for name in FEATURES}  # run 1's vectors
    assert online["values"]["r5"] == dict.fromkeys(FEATURES)  # never loaded
    watermark_after = online["watermark"]

    out = materialize(output, repo, capfd)
    assert f"3 rows written, the rows commit {second} added or replaced" in out
    online = online_vectors(repo, ids)
    assert_online_is_table(online, output)
    assert online["watermark"] == watermark_after  # Feast's watermark is left as it was


@needs_feast
def test_the_jobs_vectors_are_served_and_updated_after_an_incremental_run(
    corpus: dict[str, Any],
    tiny_model_options: list[str],
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """The real job, then the command: every vector served is the Parquet one, bit for bit; after
    an incremental run that changes two records and adds one, only those three rows are written,
    and the online store serves the new table."""
    output, repo = tmp_path / "out", tmp_path / "repo"
    rows = corpus["rows"]
    ids = [row["id"] for row in rows] + ["r8"]
    partitioned = ["--partition-by", "event_date"]
    first = extract(write_manifest(corpus["folder"], rows), str(output), tiny_model_options, *partitioned)
    out = materialize(output, repo, capfd)
    assert "8 rows written, the whole table, since nothing was loaded before" in out
    before = online_vectors(repo, ids)
    assert_online_is_table(before, output)
    assert before["values"]["r0"]["has_audio"] is False and before["values"]["r0"]["audio_embedding"] is None
    assert before["fields"]["fused"][1] == len(before["values"]["r0"]["fused"])

    changed = [dict(row) for row in rows]
    changed[0]["text"] = "record number zero, rewritten"
    Path(changed[1]["image"]).write_bytes(png(100))
    new_image = corpus["media"] / "new.png"
    new_image.write_bytes(png(200))
    changed.append({"id": "r8", "text": "a new record", "image": str(new_image), "label": "a"})
    manifest = write_manifest(corpus["folder"], changed)
    second = extract(manifest, str(output), tiny_model_options, *partitioned, "--incremental")
    assert second["incremental"]["previous_commit"] == first["commit"]
    assert (second["incremental"]["added"], second["incremental"]["replaced"]) == (1, 2)
    out = materialize(output, repo, capfd)
    assert f"3 rows written, the rows commit {second['commit']} added or replaced" in out
    after = online_vectors(repo, ids)
    assert_online_is_table(after, output)
    for record_id in ("r0", "r1"):
        assert after["values"][record_id]["fused"] != before["values"][record_id]["fused"], record_id
    assert after["values"]["r8"]["fused"] is not None


# -- which load each commit gets ------------------------------------------------------------------
def _committed(tmp_path: Path, rows: list[dict], started: datetime.datetime, inc: Mapping | None) -> feast.Committed:
    output = tmp_path / "out"
    commit(output, rows, started, inc)
    return feast.read_commit(str(output))


def test_plan_load_reloads_whole_unless_the_online_store_holds_the_previous_commit(tmp_path: Path) -> None:
    s1, s2 = NOW - datetime.timedelta(hours=2), NOW - datetime.timedelta(hours=1)
    rows = [feature_row("r0", 0, s1), feature_row("r1", 1, s2), feature_row("r2", 2, s2)]
    loaded = {"commit": "c1", "definitions": "d"}
    table = _committed(tmp_path, rows, s2, incremental("c1", 2, added=1, replaced=1))

    new_rows = feast.plan_load(table, loaded, "d")
    assert (new_rows.whole, new_rows.rows) == (False, 2)
    assert [i for rows in table.read(computed_only=True) for i in rows["id"].to_pylist()] == ["r1", "r2"]
    assert feast.plan_load(table, {**loaded, "commit": table.commit}, "d") == feast.Load(
        whole=False, rows=0, why=f"since it holds commit {table.commit} already"
    )
    whole = {
        "nothing loaded": (None, "nothing was loaded before"),
        "other definitions": ({**loaded, "definitions": "e"}, "the repository's definitions changed"),
        "a run skipped": ({**loaded, "commit": "c0"}, "but the online store holds c0"),
    }
    for case, (before, why) in whole.items():
        load = feast.plan_load(table, before, "d")
        assert (load.whole, load.rows) == (True, 3), case
        assert why in load.why, case

    dropped = _committed(tmp_path, rows, s2, incremental("c1", 3, added=1, replaced=1, dropped=1))
    assert feast.plan_load(dropped, loaded, "d").why == f"commit {dropped.commit} dropped 1 rows"
    full = _committed(tmp_path, rows, s2, None)
    assert feast.plan_load(full, loaded, "d").why == f"commit {full.commit} rewrote the table whole"
    miscounted = _committed(tmp_path, rows, s2, incremental("c1", 2, added=2, replaced=1))
    load = feast.plan_load(miscounted, loaded, "d")
    assert load.whole and "2 rows carry its start as created_timestamp, where _run.json counts 3" in load.why


# -- refused before any work ----------------------------------------------------------------------
def test_refusals_are_one_line_with_status_2_before_any_work(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    output, repo = tmp_path / "out", tmp_path / "repo"
    commit(output, [feature_row("r0", 0, NOW)], NOW, None)
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "feature_store.yaml").write_text("project: theirs\n")
    old = tmp_path / "old"
    old_schema = pa.schema([f for f in schema.features_schema(DIMS) if f.name != "created_timestamp"])
    commit_tables(str(old), {"features": [rows_to_table([feature_row("r0", 0, NOW)], old_schema)]}, {"started": "x"})
    fake = tmp_path / "feast"  # never run: every refusal comes first
    fake.write_text(f"#!{sys.executable}\n")
    fake.chmod(0o755)
    executable = ["--feast", str(fake)]
    refusals = {
        "unrecognized arguments: --materialise": [str(output), "--repo", str(repo), "--materialise", *executable],
        "the following arguments are required: --repo": [str(output), *executable],
        "--feast /nowhere/feast: no executable file there": [
            str(output),
            "--repo",
            str(repo),
            "--feast",
            "/nowhere/feast",
        ],
        "no committed feature table (_run.json lists none)": [str(tmp_path / "none"), "--repo", str(repo), *executable],
        "the feature table has no created_timestamp column": [str(old), "--repo", str(repo), *executable],
        "its feature_store.yaml was not written by mmfeatures feast": [str(output), "--repo", str(stray), *executable],
        "--repo s3://bucket/repo: must be a local folder": [str(output), "--repo", "s3://bucket/repo", *executable],
    }
    for message, argv in refusals.items():
        assert feast.main(argv) == 2, message
        err = capfd.readouterr().err
        assert err.count("\n") == 1 and err.startswith("mmfeatures feast: error: ") and message in err, err
    assert not repo.exists() and sorted(os.listdir(stray)) == ["feature_store.yaml"]

    empty = tmp_path / "empty"  # no feast on PATH, none in ./.venv-feast
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.chdir(empty)
    assert feast.main([str(output), "--repo", str(repo)]) == 2
    assert "no feast executable: none on PATH nor at ./.venv-feast/bin/feast" in capfd.readouterr().err


def test_a_load_cut_short_leaves_no_record_so_the_next_reloads_whole(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    output, repo, bin_dir = tmp_path / "out", tmp_path / "repo", tmp_path / "bin"
    commit(output, [feature_row(f"r{i}", i, NOW) for i in range(3)], NOW, None)
    repo.mkdir()
    (repo / feast.STATE).write_text(json.dumps({"commit": "c0", "definitions": "d"}))
    bin_dir.mkdir()
    for name, script in {"feast": "exit 0", "python": "cat > /dev/null; exit 3"}.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{script}\n")
        (bin_dir / name).chmod(0o755)

    assert feast.main([str(output), "--repo", str(repo), "--materialize", "--feast", str(bin_dir / "feast")]) == 1
    assert "Feast failed (exit status 3)" in capfd.readouterr().err
    assert not (repo / feast.STATE).exists()
