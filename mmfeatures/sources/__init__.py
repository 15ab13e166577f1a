"""Sources: the inputs a run is given, found and read into plain rows, each tagged with where it
came from; a row that cannot be parsed becomes an error row instead of stopping the read.

One module per family of formats: ``text_files`` (JSONL and CSV, either gzipped), ``columnar``
(Parquet and Arrow, Hugging Face ``datasets`` files among them), ``shards`` (WebDataset tar
shards) and ``folders`` (which rule reads a folder, and folders of media files).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator

import pyarrow as pa

from mmfeatures import storage
from mmfeatures.errors import ErrorRow
from mmfeatures.sources.base import MEDIA_FOLDER, Input, ManifestRow, Part, ReadOptions
from mmfeatures.sources.columnar import column_types, parquet_parts, read_columnar, read_schema
from mmfeatures.sources.folders import folder_inputs, read_media_folder
from mmfeatures.sources.shards import read_tar
from mmfeatures.sources.text_files import (
    checked_delimiter,
    checked_encoding,
    csv_parts,
    jsonl_parts,
    read_csv,
    read_jsonl,
)

__all__ = [
    "HEADED_FORMATS",
    "MEDIA_FOLDER",
    "Input",
    "ManifestRow",
    "Part",
    "ReadOptions",
    "checked_delimiter",
    "checked_encoding",
    "cut_input",
    "declared_column_types",
    "find_inputs",
    "manifest_format",
    "read_input",
    "read_manifest",
    "read_part",
]

# The formats whose every row holds every column of the file (its header or schema).
HEADED_FORMATS = frozenset({"csv", "parquet", "arrow"})

# Each accepted extension and the format it names; a file matches the first suffix it ends with.
_FORMATS = (
    (".jsonl", "jsonl"),
    (".json", "jsonl"),
    (".ndjson", "jsonl"),
    (".jsonl.gz", "jsonl"),
    (".json.gz", "jsonl"),
    (".ndjson.gz", "jsonl"),
    (".csv", "csv"),
    (".csv.gz", "csv"),
    (".parquet", "parquet"),
    (".pq", "parquet"),
    (".arrow", "arrow"),
    (".tar", "tar"),
    (".tar.gz", "tar"),
    (".tgz", "tar"),
)

_READERS: dict[str, Callable[[str, ReadOptions], Iterator[ManifestRow | ErrorRow]]] = {
    "jsonl": read_jsonl,
    "csv": read_csv,
    "parquet": read_columnar,
    "arrow": read_columnar,
    "tar": read_tar,
    MEDIA_FOLDER: read_media_folder,
}


def _known_format(path: str) -> str | None:
    lowered = path.lower()
    return next((kind for suffix, kind in _FORMATS if lowered.endswith(suffix)), None)


def manifest_format(path: str) -> str:
    """The format a file's name says it holds; ``ValueError`` naming the accepted ones otherwise."""
    kind = _known_format(path)
    if kind is None:
        accepted = ", ".join(suffix for suffix, _ in _FORMATS)
        raise ValueError(f"cannot tell the format of {path!r}: use one of {accepted}, or a folder")
    return kind


def find_inputs(patterns: Iterable[str]) -> list[Input]:
    """What ``--input`` names, before any work: each file with the format its name says (a name
    no reader takes fails here), each folder read by the rule in ``folders``; each named by its
    path under the folder that holds every pattern's fixed part (see ``Input.derived_id``), so
    the files of a glob the shell expanded are named as the glob's are."""
    patterns = list(patterns)
    roots = [storage.pattern_root(pattern) for pattern in patterns]
    common = storage.common_root(roots) if roots else None
    found: list[Input] = []
    for pattern, root in zip(patterns, roots, strict=True):
        for path in storage.expand_inputs([pattern]):
            if storage.is_folder_path(path):
                inputs = folder_inputs(path.rstrip("/"), _known_format)
            else:
                inputs = [Input(path, manifest_format(path))]
            found += [dataclasses.replace(item, name=storage.name_under(item.path, common or root)) for item in inputs]
    return found


def declared_column_types(source: Input) -> dict[str, pa.DataType] | None:
    """The column types a Parquet or Arrow file declares, as its rows are read; None for formats
    whose values carry no schema, and for a file whose schema cannot be read (its read reports it)."""
    if source.format not in ("parquet", "arrow"):
        return None
    schema = read_schema(source.path)
    return None if schema is None else column_types(schema)


def read_input(source: Input, options: ReadOptions) -> Iterator[ManifestRow | ErrorRow]:
    """Stream the rows of one input."""
    return _READERS[source.format](source.path, options)


def cut_input(source: Input, options: ReadOptions) -> list[Part]:
    """The parts of ``source`` that workers read apart (see ``Part``): a JSONL or CSV file is cut
    into byte ranges of about ``options.part_bytes``, a Parquet file into ranges of row groups; any
    other input (gzipped, Arrow, tar, a folder) is one part, as is a file not over ``part_bytes``
    and a CSV that ``csv_parts`` cannot cut (in UTF-16 with a byte-order mark, say)."""
    if source.format == "csv":
        spans = csv_parts(source.path, options)
    else:
        cut = {"jsonl": jsonl_parts, "parquet": parquet_parts}.get(source.format)
        spans = [] if cut is None else cut(source.path, options.part_bytes)
    if len(spans) < 2:
        return [Part(source)]
    return [Part(source, index, start, stop, first) for index, (start, stop, first) in enumerate(spans)]


def read_part(part: Part, options: ReadOptions) -> Iterator[ManifestRow | ErrorRow]:
    """Stream the rows of one part of an input."""
    if part.stop is None:
        return read_input(part.source, options)
    ranged = {"jsonl": read_jsonl, "csv": read_csv}.get(part.source.format)
    if ranged is not None:
        return ranged(part.source.path, options, part.start, part.stop, part.first)
    return read_columnar(part.source.path, options, range(part.start, part.stop), part.first)


def read_manifest(path: str, options: ReadOptions | None = None) -> Iterator[ManifestRow | ErrorRow]:
    """Stream the rows of one file, in the format its name says."""
    return read_input(Input(path, manifest_format(path)), options or ReadOptions())
