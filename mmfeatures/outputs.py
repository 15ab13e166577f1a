"""The output folder: what a run writes there, how readers find the committed tables, and what a
run may replace or clean up.

    OUTPUT/_run.json          the commit: the run's summary and the parts of both tables
    OUTPUT/features/          Parquet parts only, so any reader takes the folder whole; with
                              --partition-by, in Hive-style folders (features/split=train/)
    OUTPUT/errors/            likewise
    OUTPUT/_staging/<run>/    a run's staged parts, and the intent of a commit in progress
    OUTPUT/_lease/            which run is writing here (``lease.py``)

``_run.json`` is written last, in one atomic step, so it always names one run's tables whole:
readers (``schema.read_features``, ``mmfeatures report``) follow it. A run deletes only files it
can prove a run of this job wrote: the parts ``_run.json`` lists, and the parts a commit that was
cut short recorded in its intent before moving them in. Anything else in ``features/`` or
``errors/`` is the user's, and the run refuses the folder before any work.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote

from fsspec import AbstractFileSystem
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

TABLES = ("features", "errors")
RUN_MANIFEST = "_run.json"
STAGING = "_staging"
INTENT = "commit.json"  # in a run's staging folder, written before its parts move in
PART_PREFIX = "part-"  # a committed Parquet part: part-<commit>-00000-of-00003.parquet
RUN_NAME = re.compile(r"run-[0-9a-f]{32}")  # a run's staging folder; nothing else there is removed
# A column a table can be partitioned by, as its folders spell it: readers take the name unescaped
# (pyarrow writes it so) and skip folders whose name starts with "_" or ".".
PARTITION_COLUMN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
NULL_PARTITION = "__HIVE_DEFAULT_PARTITION__"  # the folder of a null value, as Hive and pyarrow name it
# A Hive-style partition folder, ``<column>=<value>``, the value percent-encoded (``partition_folder``):
# one path segment, which its "=" keeps from ever being "." or "..".
PARTITION = re.compile(PARTITION_COLUMN.pattern + r"=([A-Za-z0-9_.~-]|%[0-9A-F]{2})*")
# The only files a run ever deletes: a part, by a name only a commit gives, in one of the tables
# (in one level of partition folders in features/). A name read from a manifest or an intent is
# taken only in this form, so it never leaves the table.
PART_NAME = re.compile(rf"(features/({PARTITION.pattern}/)?|errors/)part-[A-Za-z0-9_-]+(-[A-Za-z0-9_-]+)*\.parquet")
# Where earlier releases kept each table's manifest; a run takes these over and deletes them.
_LEGACY_MANIFESTS = ("_{table}_manifest.json", "{table}/_manifest.json")


def partition_folder(column: str, value: str | None) -> str:
    """The folder of the rows whose ``column`` reads ``value`` (as text), named as pyarrow's
    ``write_dataset`` names it, so that every Hive-style reader prunes by it: all but unreserved
    URI characters percent-encoded (``a/b=c d%`` as ``a%2Fb%3Dc%20d%25``), null as ``NULL_PARTITION``."""
    return f"{column}={NULL_PARTITION if value is None else quote(value, safe='')}"


def partition_of(path: str) -> str | None:
    """The partition folder (``split=train``) that holds the part at ``path``, or None."""
    folder = posixpath.basename(posixpath.dirname(path))
    return folder if PARTITION.fullmatch(folder) else None


def partition_value(folder: str) -> tuple[str, str | None]:
    """The column and the value (as text, or None) that a partition folder names."""
    column, _, text = folder.partition("=")
    return column, None if text == NULL_PARTITION else unquote(text)


def read_json(fs: AbstractFileSystem, path: str) -> Any:
    """The parsed JSON file at ``path``, or None where there is none."""
    try:
        return json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return None


def write_atomically(fs: AbstractFileSystem, path: str, data: bytes, scratch: str) -> None:
    """Replace the file at ``path`` in one step: readers see the old bytes or all the new ones,
    never a part, and a disk that fills up fails the write, not the file already there. On a
    local disk the bytes are written to a file in the folder ``scratch`` (on the same disk), then
    renamed over ``path``; an object store's PUT is atomic by itself."""
    if not isinstance(fs, LocalFileSystem):
        fs.pipe_file(path, data)
        return
    os.makedirs(scratch, exist_ok=True)
    written = os.path.join(scratch, f"{uuid.uuid4().hex}.tmp")
    try:
        with open(written, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())  # on disk before it is named: a crash never publishes a hole
        os.replace(written, path)
        folder = os.open(os.path.dirname(path), os.O_RDONLY)
        try:
            os.fsync(folder)  # the rename itself on disk, before anything it replaces is deleted
        finally:
            os.close(folder)
    finally:
        if os.path.exists(written):
            os.unlink(written)


def run_manifest(fs: AbstractFileSystem, root: str) -> dict[str, Any] | None:
    """``_run.json`` under the output folder ``root`` (in ``fs``'s terms), or None where there is
    none. ``ValueError`` for one this job did not write, which no run may replace."""
    try:
        manifest = read_json(fs, f"{root}/{RUN_MANIFEST}")
    except ValueError:
        manifest = "not JSON"
    if manifest is not None and not (isinstance(manifest, dict) and "package_version" in manifest):
        raise ValueError(f"{RUN_MANIFEST} there was not written by mmfeatures (it holds no run summary)")
    return manifest


@dataclass(frozen=True)
class CommittedTable:
    """A table as ``_run.json`` lists it: its parts (in ``fs``'s terms), their rows and all its rows."""

    fs: Any  # an fsspec file system
    parts: list[str]
    part_rows: list[int]

    @property
    def rows(self) -> int:
        return sum(self.part_rows)


def committed_table(path: str, filesystem: AbstractFileSystem | None = None) -> CommittedTable | None:
    """The committed table in the folder ``path`` (a folder or URL; in ``filesystem``'s terms when
    one is given), or None where the ``_run.json`` beside it lists no such table: a single file,
    or a folder no run committed."""
    fs, table_dir = (filesystem, path) if filesystem else url_to_fs(path)
    root, name = posixpath.split(table_dir.rstrip("/"))
    try:
        manifest = run_manifest(fs, root)
    except ValueError:
        return None
    return tables_of(manifest, fs, root).get(name)


def tables_of(manifest: dict[str, Any] | None, fs: AbstractFileSystem, root: str) -> dict[str, CommittedTable]:
    """The tables one ``_run.json`` (read once, so they are of one commit) lists, by name."""
    tables = (manifest or {}).get("tables") or {}
    return {
        name: CommittedTable(
            fs,
            [f"{root}/{part['path']}" for part in table["files"]],
            [part["rows"] for part in table["files"]],
        )
        for name, table in tables.items()
    }


_LEGACY_NAMES = frozenset(pattern.format(table=table) for table in TABLES for pattern in _LEGACY_MANIFESTS)


def _parts(names: Iterable[str], root: str, legacy: bool = False) -> set[str]:
    """The paths under ``root`` of the ``names`` that are a commit's parts (``PART_NAME``), and,
    where ``legacy``, earlier layouts' manifests: nothing else a run may delete."""
    return {
        f"{root}/{name}"
        for name in names
        if isinstance(name, str) and (PART_NAME.fullmatch(name) or (legacy and name in _LEGACY_NAMES))
    }


def listed_parts(manifest: dict[str, Any] | None, root: str) -> set[str]:
    """Every part ``manifest`` (a ``_run.json``) lists, as paths under ``root``."""
    tables = (manifest or {}).get("tables") or {}
    return _parts((part["path"] for table in tables.values() for part in table["files"]), root)


def _legacy_files(fs: AbstractFileSystem, root: str) -> set[str]:
    """The manifests of earlier releases' layouts (a commit and its files) and the parts they list."""
    found: set[str] = set()
    for table in TABLES:
        for pattern in _LEGACY_MANIFESTS:
            path = f"{root}/{pattern.format(table=table)}"
            try:
                legacy = read_json(fs, path)
            except (ValueError, NotADirectoryError):
                continue
            if isinstance(legacy, dict) and "commit" in legacy and isinstance(legacy.get("files"), list):
                names = (f"{table}/{part.get('path')}" for part in legacy["files"] if isinstance(part, dict))
                found |= {path} | _parts(names, root)
    return found


def _staged_runs(fs: AbstractFileSystem, root: str) -> Iterator[str]:
    """The staging folders of runs, in ``fs``'s terms, as the store lists them now."""
    staging = f"{root}/{STAGING}"
    fs.invalidate_cache(root)
    if fs.isdir(staging):
        yield from (path for path in fs.ls(staging, detail=False) if RUN_NAME.fullmatch(posixpath.basename(path)))


def read_intent(fs: AbstractFileSystem, run_folder: str) -> dict[str, Any] | None:
    """The intent of the commit a run began, or None: none was written, or its write was cut
    short (it is written, whole or not at all, before any part moves)."""
    try:
        intent = read_json(fs, f"{run_folder}/{INTENT}")
    except ValueError:
        return None
    return intent if isinstance(intent, dict) and isinstance(intent.get("commit"), str) else None


def written_files(fs: AbstractFileSystem, root: str) -> set[str]:
    """Every file in the output folder that a run of this job can be shown to have written:
    the parts ``_run.json`` lists, those an unfinished commit moved in, and earlier layouts'."""
    files = listed_parts(run_manifest(fs, root), root) | _legacy_files(fs, root)
    for run_folder in _staged_runs(fs, root):
        intent = read_intent(fs, run_folder)
        if intent is not None:
            files |= _parts(intent["new"], root)
    return files


def check_replaceable(output: str) -> None:
    """Refuse an ``--output`` whose ``features/``, ``errors/`` or ``_run.json`` this job did not
    write: a run replaces its own tables only, never a user's folder that shares their names."""
    fs, root = url_to_fs(output)
    root = root.rstrip("/")
    try:
        owned = written_files(fs, root)
    except ValueError as exc:
        raise ValueError(f"--output {output}: {exc}; move it, or choose another --output") from None
    for table in TABLES:
        folder = f"{root}/{table}"
        if fs.isfile(folder):
            raise ValueError(f"--output {output}: {table} is a file, where the job writes its {table} table")
        foreign = sorted(set(fs.find(folder)) - owned) if fs.isdir(folder) else []
        if foreign:
            raise ValueError(
                f"--output {output}: {table}/ holds {len(foreign)} file(s) this job did not write "
                f"({posixpath.relpath(foreign[0], root)}...); a run replaces only tables it committed, "
                "so move them, or choose another --output"
            )


def recover(output: str, run: str | None = None) -> list[str]:
    """Clean up after runs that were killed or failed (or only after ``run``): finish a commit
    that published its ``_run.json`` (delete the files it replaced), undo one that did not (delete
    the parts it moved in), and remove the run's staging. Call it only while holding the output's
    lease, when no other run can be writing. Returns the staging folders removed."""
    fs, root = url_to_fs(output)
    root = root.rstrip("/")
    manifest = run_manifest(fs, root)
    keep = listed_parts(manifest, root)
    removed = []
    for run_folder in _staged_runs(fs, root):
        if run is not None and posixpath.basename(run_folder) != run:
            continue
        intent = read_intent(fs, run_folder)
        if intent is not None:
            if (manifest or {}).get("commit") == intent["commit"]:
                doomed = _parts(intent["old"], root, legacy=True)
            else:
                doomed = _parts(intent["new"], root)
            stale = sorted(doomed - keep)
            for path in stale:
                if fs.exists(path):
                    fs.rm_file(path)
            _remove_empty_folders(fs, {posixpath.dirname(path) for path in stale if partition_of(path)})
        fs.rm(run_folder, recursive=True)
        removed.append(run_folder)
    _remove_empty_folders(fs, {f"{root}/{STAGING}"})  # unless it holds something that is not a run's
    return removed


def _remove_empty_folders(fs: AbstractFileSystem, folders: Iterable[str]) -> None:
    """Remove those of ``folders`` that are empty: a partition whose parts a commit replaced, or
    the staging folder. Object stores keep no folders, so there is nothing to remove there."""
    for folder in sorted(folders):
        try:
            fs.rmdir(folder)
        except OSError:  # not empty (a part of the new commit, or the user's), or no such folder
            pass
