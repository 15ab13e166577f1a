"""``mmfeatures feast OUTPUT --repo DIR [--materialize] [--feast PATH]``: a Feast feature repository
for the feature table committed at OUTPUT and, with ``--materialize``, the rows its latest run
computed written into the repository's SQLite online store, whatever Feast's watermark says.

Feast pins ``pandas<3`` and the job needs pandas 3, so Feast lives in an environment of its own
(``requirements-feast.txt``). This file is both sides of the command. Imported in the job's
environment, ``main`` checks the options, reads ``_run.json`` and the table through the job's own
storage layer (so a bucket is read with the job's credentials), writes the repository and decides
what to load. It then runs this same file with the Feast environment's Python, which runs
``feast apply`` and writes the rows it is sent, as an Arrow IPC stream on its stdin, with
``FeatureStore.write_to_online_store``. Run that way, the file imports no ``mmfeatures`` module:
the Feast environment has none. See docs/feature-store.md.
"""

from __future__ import annotations

import argparse
import datetime
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, NoReturn

import pyarrow as pa
import pyarrow.compute as pc

if __name__ != "__main__":  # run as a script, this is the Feast environment's side (see above)
    from fsspec.core import url_to_fs
    from fsspec.implementations.local import LocalFileSystem

    from mmfeatures import outputs, storage
    from mmfeatures.redaction import redact
    from mmfeatures.schema import embedding_dimension, load_contract, part_schema, read_part

VIEW = "features"  # the feature view; its features are read as "features:<column>"
ENTITY = "record"  # the entity, joined on the table's ``id``
DEFINITIONS = "mmfeatures_definitions.py"
STATE = "mmfeatures_online.json"  # what --materialize last loaded into the online store
LOCK = ".mmfeatures_feast.lock"
MARK = "# Written by `mmfeatures feast`"  # the first line of every file the command writes
BATCH_ROWS = 1024  # rows per batch streamed and written to the online store


# -- the Feast environment's side ----------------------------------------------------------------
def _feast_side(repo: str, instructions: Mapping[str, Any]) -> int:
    """Run ``feast apply`` in ``repo``; then, when told to load, empty the view's online table
    first where ``reset`` says so, and write the rows streamed on stdin. Exit status 1 when the
    stream ends short of the rows announced (the sending side failed): the caller then records
    no load, so the next ``--materialize`` reloads the whole table."""
    from feast import FeatureStore  # type: ignore[import-not-found]
    from feast.cli.cli import cli  # type: ignore[import-not-found]

    cli.main(["--chdir", repo, "apply"], prog_name="feast", standalone_mode=False)
    if instructions.get("rows") is None:
        return 0
    store = FeatureStore(repo_path=repo)
    if instructions["reset"]:
        # Feast has no call that deletes online rows; dropping the view's online table (by
        # deleting the view) and applying it again empties it, and keeps its watermark.
        view, entity = store.get_feature_view(VIEW), store.get_entity(ENTITY)
        store.apply([], objects_to_delete=[view], partial=False)
        store.apply([entity, view])
    written = 0
    for batch in pa.ipc.open_stream(sys.stdin.buffer):
        store.write_to_online_store(VIEW, batch.to_pandas())
        written += batch.num_rows
    if written != instructions["rows"]:
        print(f"mmfeatures feast: the rows stopped after {written} of {instructions['rows']}", file=sys.stderr)
        return 1
    return 0


# -- the job's side -------------------------------------------------------------------------------
class FeastCommandError(ValueError):
    """The command cannot work as asked; told in one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise FeastCommandError(message)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="mmfeatures feast",
        description="Write a Feast feature repository for the feature table committed at OUTPUT, apply it, "
        "and with --materialize load the rows the latest run computed into its SQLite online store.",
    )
    parser.add_argument("output", metavar="OUTPUT", help="The job's output folder (local or fsspec URL).")
    parser.add_argument("--repo", metavar="DIR", required=True, help="The Feast repository's folder (local).")
    parser.add_argument(
        "--materialize",
        action="store_true",
        help="Load the online store: the rows the latest run added or replaced, or the whole table where "
        "runs were missed, rows were dropped or the table was rewritten (Feast's watermark is not consulted).",
    )
    parser.add_argument(
        "--feast",
        metavar="PATH",
        help="The feast executable of Feast's environment (default: feast on PATH, else ./.venv-feast/bin/feast).",
    )
    return parser


def feast_python(given: str | None) -> str:
    """The Python of Feast's environment, found from its ``feast`` executable (``--feast``, else
    on PATH, else ``./.venv-feast/bin/feast``): the ``python`` beside it, else the one its ``#!``
    line names."""
    if given is not None:
        if not (os.path.isfile(given) and os.access(given, os.X_OK)):
            raise FeastCommandError(f"--feast {given}: no executable file there")
        executable = given
    else:
        found = shutil.which("feast") or os.path.abspath(os.path.join(".venv-feast", "bin", "feast"))
        if not os.access(found, os.X_OK):
            raise FeastCommandError(
                "no feast executable: none on PATH nor at ./.venv-feast/bin/feast; install Feast in its own "
                "environment (pip install -r requirements-feast.txt) and pass --feast PATH/TO/bin/feast"
            )
        executable = found
    executable = os.path.realpath(executable)
    beside = os.path.join(os.path.dirname(executable), "python")
    if os.access(beside, os.X_OK):
        return beside
    with open(executable, "rb") as handle:
        first = handle.readline(4096).decode("utf-8", "replace")
    named = first[2:].strip() if first.startswith("#!") else ""
    if os.path.isabs(named) and os.access(named, os.X_OK) and "python" in os.path.basename(named):
        return named
    raise FeastCommandError(
        f"--feast {executable}: cannot tell which Python runs it (no python beside it, no #! line naming one)"
    )


@dataclass(frozen=True)
class Committed:
    """The feature table one ``_run.json`` commits, as the command needs it."""

    output: str
    source: str  # the table folder for Feast's FileSource: an absolute path, or a URL
    commit: str
    started: datetime.datetime
    incremental: Mapping[str, Any] | None
    fs: Any  # an fsspec file system, which ``parts`` are in the terms of
    parts: tuple[str, ...]  # the parts _run.json lists, nothing else in the folder
    rows: int
    sent: pa.Schema  # the columns sent to Feast: the entity key, the features and both time columns
    embeddings: tuple[tuple[str, int], ...]  # (column, dimension), fused included
    flags: tuple[str, ...]  # the has_* columns

    def read(self, computed_only: bool, columns: Sequence[str] | None = None) -> Iterator[pa.Table]:
        """The ``columns`` (default: those sent; ``created_timestamp`` among them) one part at a
        time, as the job reads a part back (a partition column in its place): a part holds at most
        the job's ``--rows-per-file`` rows. ``computed_only``: only the rows the committing run
        computed, whose ``created_timestamp`` is its start."""
        started = pa.scalar(self.started, pa.timestamp("us", tz="UTC"))
        for part in self.parts:
            rows = read_part(self.fs, part, list(columns or self.sent.names))
            yield rows.filter(pc.equal(rows["created_timestamp"], started)) if computed_only else rows


def read_commit(output: str) -> Committed:
    """The feature table committed at ``output``; ``FeastCommandError`` where there is none, or
    where it lacks a column the repository needs (a table written before ``created_timestamp``)."""
    if redact(output) != output:
        raise FeastCommandError("OUTPUT's URL carries credentials, which Feast would store in its registry")
    fs, root = url_to_fs(output)
    root = root.rstrip("/")
    try:
        manifest = outputs.run_manifest(fs, root)
    except ValueError as exc:
        raise FeastCommandError(f"{redact(output)}: {exc}") from None
    table = outputs.tables_of(manifest, fs, root).get("features")
    if manifest is None or table is None:
        raise FeastCommandError(f"{redact(output)}: no committed feature table ({outputs.RUN_MANIFEST} lists none)")
    if not table.parts:
        raise FeastCommandError(f"{redact(output)}: the committed feature table has no parts to describe")
    stored = part_schema(fs, table.parts[0])  # every part of one commit has the same schema
    missing = {"id", "event_timestamp", "created_timestamp"} - set(stored.names)
    if missing:
        raise FeastCommandError(
            f"{redact(output)}: the feature table has no {', '.join(sorted(missing))} column "
            "(written by an earlier release); run the job again"
        )
    try:
        started = datetime.datetime.fromisoformat(str(manifest["started"]))
    except (KeyError, ValueError):
        raise FeastCommandError(f"{redact(output)}: {outputs.RUN_MANIFEST} holds no valid 'started' time") from None
    # The contract's embedding and flag columns, never a carried column that looks like one.
    declared = [field for field in load_contract("features")["fields"] if field["name"] in stored.names]
    embeddings = tuple(
        (field["name"], dim)
        for field in declared
        if field["type"] == "embedding" and (dim := embedding_dimension(stored.field(field["name"])))
    )
    flags = tuple(field["name"] for field in declared if field["type"] == "bool")
    sent = ["id", *(name for name, _ in embeddings), *flags, "event_timestamp", "created_timestamp"]
    return Committed(
        output=output,
        source=(
            os.path.join(os.path.abspath(root), "features")
            if isinstance(fs, LocalFileSystem)
            else storage.join(output, "features")
        ),
        commit=str(manifest["commit"]),
        started=started.astimezone(datetime.timezone.utc),
        incremental=manifest.get("incremental"),
        fs=fs,
        parts=tuple(table.parts),
        rows=table.rows,
        sent=pa.schema([stored.field(name) for name in sent]),
        embeddings=embeddings,
        flags=flags,
    )


def project_name(repo: Path) -> str:
    """The repository folder's name as a Feast project name (letters, digits and underscores,
    not starting with an underscore), as ``feast init NAME`` names a project after its folder."""
    name = re.sub(r"[^A-Za-z0-9_]+", "_", repo.resolve().name).lstrip("_")
    return name or "mmfeatures"


def repository_files(repo: Path, table: Committed) -> dict[str, str]:
    """``feature_store.yaml`` and the definitions file, by name. They name no commit: they stay
    the same from run to run of one table, so a change in them means a new view to load whole."""
    config = (
        f"{MARK} for {json.dumps(redact(table.output))}; it rewrites this file.\n"
        f"project: {project_name(repo)}\n"
        "registry: registry.db\n"
        "provider: local\n"
        "online_store:\n"
        "  type: sqlite\n"
        "  path: online_store.db\n"
        "offline_store:\n"
        "  type: file\n"
        "entity_key_serialization_version: 3\n"
    )
    fields = ['        Field(name="id", dtype=String),']
    fields += [
        f'        Field(name="{name}", dtype=Array(Float32), vector_length={dim}, tags={{"dimension": "{dim}"}}),'
        for name, dim in table.embeddings
    ]
    fields += [f'        Field(name="{name}", dtype=Bool),' for name in table.flags]  # names from the contract
    schema = "\n".join(fields)
    definitions = f'''{MARK} for {json.dumps(redact(table.output))}; it rewrites this file.
"""The feature table's entity, file source and feature view. Each embedding column is an
Array(Float32) of a fixed length: its vector_length and its "dimension" tag."""

from datetime import timedelta

from feast import Entity, FeatureView, Field, FileSource, ValueType
from feast.types import Array, Bool, Float32, String

{ENTITY} = Entity(name="{ENTITY}", join_keys=["id"], value_type=ValueType.STRING, description="A record of the job.")

features_source = FileSource(
    name="mmfeatures_features",
    path={json.dumps(table.source)},
    timestamp_field="event_timestamp",
    created_timestamp_column="created_timestamp",
)

{VIEW} = FeatureView(
    name="{VIEW}",
    entities=[{ENTITY}],
    ttl=timedelta(0),  # embeddings do not expire
    schema=[
{schema}
    ],
    source=features_source,
    online=True,
)
'''
    return {"feature_store.yaml": config, DEFINITIONS: definitions}


def check_repo(given: str) -> Path:
    """``--repo`` as an absolute path; refused where it is not a local folder, or holds a Feast
    repository this command did not write (its files would be overwritten)."""
    if storage.has_scheme(given):
        raise FeastCommandError(f"--repo {redact(given)}: must be a local folder (Feast runs in it)")
    repo = Path(given).absolute()
    if repo.exists() and not repo.is_dir():
        raise FeastCommandError(f"--repo {repo}: not a folder")
    for name in ("feature_store.yaml", DEFINITIONS):
        path = repo / name
        if path.exists() and not path.read_text("utf-8", "replace").startswith(MARK):
            raise FeastCommandError(f"--repo {repo}: its {name} was not written by mmfeatures feast; choose another")
    return repo


@contextmanager
def locked(repo: Path) -> Iterator[None]:
    """Hold the repository for this command, so two commands never load one online store at once."""
    with open(repo / LOCK, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FeastCommandError(f"--repo {repo}: another mmfeatures feast is using it") from None
        yield


@dataclass(frozen=True)
class Load:
    """What ``--materialize`` writes: nothing (``rows`` 0, ``whole`` False: loaded already), the
    whole table after emptying the view, or the rows the latest run computed."""

    whole: bool
    rows: int
    why: str

    @property
    def writes(self) -> bool:
        """Whether the online store changes: a whole load empties the view even of no rows."""
        return self.whole or self.rows > 0


def plan_load(table: Committed, state: Mapping[str, Any] | None, definitions: str) -> Load:
    """The load that makes the online store equal the committed table, given what was loaded
    before (``state``) and the repository's ``definitions`` (a hash).

    Only the latest run's rows are loaded when the online store holds exactly the commit that run
    started from and that run dropped no row; they are the rows whose ``created_timestamp`` is the
    run's start, and their number must be the ``added`` + ``replaced`` that ``_run.json`` counts.
    Otherwise the whole table is loaded into an emptied view, so ids no longer in it disappear."""
    incremental = table.incremental
    loaded = (state or {}).get("commit")
    if state is None or state.get("definitions") != definitions:
        why = "nothing was loaded before" if state is None else "the repository's definitions changed"
    elif loaded == table.commit:
        return Load(whole=False, rows=0, why=f"since it holds commit {table.commit} already")
    elif not incremental:
        why = f"commit {table.commit} rewrote the table whole"
    elif incremental.get("previous_commit") != loaded:
        why = (
            f"commit {table.commit} follows {incremental.get('previous_commit')}, "
            f"but the online store holds {loaded} (runs were committed since the last load)"
        )
    elif incremental.get("dropped"):
        why = f"commit {table.commit} dropped {incremental['dropped']} rows"
    else:
        computed = sum(rows.num_rows for rows in table.read(computed_only=True, columns=["created_timestamp"]))
        expected = int(incremental.get("added", 0)) + int(incremental.get("replaced", 0))
        if computed == expected:
            return Load(whole=False, rows=computed, why=f"the rows commit {table.commit} added or replaced")
        why = f"{computed} rows carry its start as created_timestamp, where {outputs.RUN_MANIFEST} counts {expected}"
    return Load(whole=True, rows=table.rows, why=why)


def _definitions_hash(files: Mapping[str, str]) -> str:
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def read_state(repo: Path) -> dict[str, Any] | None:
    try:
        state = json.loads((repo / STATE).read_text("utf-8"))
    except (FileNotFoundError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def _write_atomically(path: Path, text: str) -> None:
    """Write ``path`` (in the repository) whole or not at all, through a kill or a crash."""
    outputs.write_atomically(LocalFileSystem(), str(path), text.encode("utf-8"), scratch=str(path.parent))


def _send_rows(stdin: IO[bytes], table: Committed, load: Load) -> None:
    """Stream the rows of ``load`` in batches of ``BATCH_ROWS``: one part in memory at a time."""
    with pa.ipc.new_stream(stdin, table.sent) as writer:
        for rows in table.read(computed_only=not load.whole):
            for batch in rows.select(table.sent.names).to_batches(max_chunksize=BATCH_ROWS):
                writer.write_batch(pa.RecordBatch.from_arrays(batch.columns, schema=table.sent))


def run_feast(python: str, repo: Path, table: Committed, load: Load | None) -> int:
    """Run this file in the Feast environment: ``feast apply``, then the load, if any; its exit
    status. ``OSError`` where the table cannot be read (Feast then stops, short of its rows)."""
    load = load if load is not None and load.writes else None
    instructions = {"rows": None if load is None else load.rows, "reset": load is not None and load.whole}
    command = [python, "-I", os.path.abspath(__file__), str(repo), json.dumps(instructions)]
    process = subprocess.Popen(command, stdin=subprocess.PIPE)
    assert process.stdin is not None
    try:
        if load is not None:
            _send_rows(process.stdin, table, load)
    except BrokenPipeError:  # Feast stopped first; its own messages say why
        pass
    finally:
        with suppress(BrokenPipeError):
            process.stdin.close()
        status = process.wait()
    return status


def snippet(repo: Path, table: Committed) -> str:
    features = [f"{VIEW}:{name}" for name, _ in table.embeddings] + [f"{VIEW}:{name}" for name in table.flags]
    return (
        "read them back, in Feast's environment:\n"
        "  from feast import FeatureStore\n"
        f"  store = FeatureStore(repo_path={str(repo)!r})\n"
        f"  store.get_online_features(features={features!r}, entity_rows=[{{'id': 'ID'}}]).to_dict()"
    )


def main(argv: list[str]) -> int:
    """Exit status 0 when done; 2 for options, an OUTPUT or a ``--repo`` that cannot work, before
    any work; 1 when Feast fails (its own messages say why) or the table or ``--repo`` cannot be
    read or written."""
    try:
        args = _parser().parse_args(argv)
        python = feast_python(args.feast)
        repo = check_repo(args.repo)
        table = read_commit(args.output)
        repo.mkdir(parents=True, exist_ok=True)
        with locked(repo):
            return _apply_and_load(repo, table, python, args.materialize)
    except FeastCommandError as exc:
        print(f"mmfeatures feast: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # reading the table (a run that commits meanwhile deletes its parts), or the repository
        print(f"mmfeatures feast: error: {redact(str(exc))}", file=sys.stderr)
        return 1


def _apply_and_load(repo: Path, table: Committed, python: str, materialize: bool) -> int:
    files = repository_files(repo, table)
    for name, text in files.items():
        _write_atomically(repo / name, text)
    definitions = _definitions_hash(files)
    load = plan_load(table, read_state(repo), definitions) if materialize else None
    if load is not None and load.writes:
        # No record while the online store changes: a load cut short is followed by a whole one.
        (repo / STATE).unlink(missing_ok=True)
    status = run_feast(python, repo, table, load)
    if status != 0:
        print(
            f"mmfeatures feast: error: Feast failed (exit status {status}); its messages above say why", file=sys.stderr
        )
        return 1
    print(f"feature repository: {repo} (feature view {VIEW!r} on {redact(table.source)})")
    if load is None:
        print(f"online store not loaded; run with --materialize to load commit {table.commit}")
        return 0
    state = {
        "commit": table.commit,
        "started": table.started.isoformat(),
        "definitions": definitions,
        "whole": load.whole,
        "rows": load.rows,
    }
    _write_atomically(repo / STATE, json.dumps(state, indent=2) + "\n")
    what = f"the whole table, since {load.why}" if load.whole else load.why
    print(f"online store: {load.rows} rows written, {what}")
    print(snippet(repo, table))
    return 0


if __name__ == "__main__":
    sys.exit(_feast_side(sys.argv[1], json.loads(sys.argv[2])))
