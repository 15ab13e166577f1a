"""A folder given as ``--input`` is read by one rule, checked in this order:

1. a Hugging Face ``save_to_disk`` dataset (``dataset_info.json``; a ``DatasetDict`` has
   ``dataset_dict.json`` and one such folder per split): its Arrow files, in the order its
   ``state.json`` lists them; a ``DatasetDict``'s split name fills ``split`` where a row has none;
2. a folder of manifests or shards: the files at its top level whose extension names a format,
   when no media file sits beside them; when its top level holds neither, the files below it that
   a format's extension names, if none is a media file (a Hugging Face Hub snapshot:
   ``README.md`` + ``data/*.parquet``);
3. otherwise a folder of media files, read recursively and grouped into records as ``samples``
   says, the key being a file's path up to its last dot (``a/123.jpg`` + ``a/123.txt`` +
   ``a/123.wav`` are record ``a/123``; ``2023.05.01.jpg`` is record ``2023.05.01``).

Names starting with "." are skipped (``.DS_Store``, ``.git/``); so are names starting with "_"
when looking for manifests and datasets, as Parquet and Spark readers skip them (``_SUCCESS``),
but not among media files, whose names may start so (``_DSC0001.JPG``).
"""

from __future__ import annotations

import functools
import json
import posixpath
from collections.abc import Callable, Iterator
from typing import Any

from fsspec import AbstractFileSystem
from fsspec.core import url_to_fs

from mmfeatures import storage
from mmfeatures.errors import ErrorRow, ManifestError
from mmfeatures.records import TAR_COLUMNS
from mmfeatures.sources.base import MEDIA_FOLDER, Input, ManifestRow, ReadOptions
from mmfeatures.sources.samples import Sample, add_member

_DATASET_INFO = "dataset_info.json"
_DATASET_DICT = "dataset_dict.json"
_DATASET_STATE = "state.json"


def _hidden(name: str) -> bool:
    """Not data, when looking for manifests: a dot file or a writer's marker (``_SUCCESS``)."""
    return name.startswith((".", "_"))


def split_file_name(relative: str) -> tuple[str, str]:
    """A media file's record key and extension, split at its name's last dot:
    "a/IMG.0002.JPG" -> ("a/IMG.0002", "jpg")."""
    key, extension = posixpath.splitext(relative)
    return key, extension[1:].lower()


def folder_inputs(folder: str, format_of: Callable[[str], str | None]) -> list[Input]:
    """What a folder holds, by the module's rule; ``format_of`` names a file's manifest format
    (None for a name no manifest reader takes)."""
    fs, root = url_to_fs(folder)
    root = root.rstrip("/")
    names = {posixpath.basename(info["name"].rstrip("/")): info for info in fs.ls(root, detail=True, refresh=True)}
    if _DATASET_DICT in names:
        splits = _dataset_json(fs, f"{root}/{_DATASET_DICT}", "splits")
        return [item for split in splits for item in _dataset_inputs(fs, folder, root, str(split))]
    if _DATASET_INFO in names:
        return _dataset_inputs(fs, folder, root, None)
    if all(_hidden(name) for name in names):
        raise FileNotFoundError(f"input folder {folder!r} holds nothing to read")
    files = sorted(name for name, info in names.items() if info["type"] == "file" and not _hidden(name))
    chosen = _manifests(files, format_of)
    if chosen == []:  # neither at the top: a Hugging Face Hub snapshot (README.md + data/*.parquet) or class folders
        below = sorted(path[len(root) + 1 :] for path in fs.find(root))
        chosen = _manifests([path for path in below if not any(map(_hidden, path.split("/")))], format_of)
    if chosen:
        return [Input(storage.join(folder, name), kind) for name, kind in chosen]
    return [Input(folder, MEDIA_FOLDER)]


def _is_media(name: str) -> bool:
    return split_file_name(name)[1] in TAR_COLUMNS


def _manifests(names: list[str], format_of: Callable[[str], str | None]) -> list[tuple[str, str]] | None:
    """The names that a format's extension names, with their formats (empty when none does), or
    None when a media file is among ``names``."""
    if any(_is_media(name) for name in names):
        return None
    return [(name, kind) for name in names if (kind := format_of(name))]


def _dataset_inputs(fs: AbstractFileSystem, folder: str, root: str, split: str | None) -> list[Input]:
    """The Arrow files of one ``save_to_disk`` dataset (a split's folder when ``split`` is set)."""
    if split is not None:
        folder, root = storage.join(folder, split), f"{root}/{split}"
    listed = {posixpath.basename(path.rstrip("/")) for path in fs.ls(root, detail=False)}
    try:
        files = _dataset_json(fs, f"{root}/{_DATASET_STATE}", "_data_files")
        names = [str(entry["filename"]) for entry in files]
    except FileNotFoundError:  # written by hand or by another tool: every Arrow file, in name order
        names = sorted(name for name in listed if name.endswith(".arrow"))
    except (KeyError, TypeError):
        raise ValueError(f"{root}/{_DATASET_STATE} does not list its files as datasets writes it") from None
    if not names:
        raise ValueError(f"the dataset folder {folder!r} holds no Arrow file")
    missing = [name for name in names if name not in listed]
    if missing:
        raise FileNotFoundError(f"the dataset folder {folder!r} lacks {', '.join(missing)}, which its state.json lists")
    return [Input(storage.join(folder, name), "arrow", split) for name in names]


def _dataset_json(fs: AbstractFileSystem, path: str, key: str) -> list[Any]:
    """The list under ``key`` in one of ``datasets``' JSON files; ``ValueError`` naming the file
    when it is not JSON or holds no such list."""
    try:
        value = json.loads(fs.cat_file(path))[key]
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{path} is not a {key!r} list as datasets writes it") from None
    if not isinstance(value, list):
        raise ValueError(f"{path} is not a {key!r} list as datasets writes it")
    return value


def read_media_folder(folder: str, options: ReadOptions) -> Iterator[ManifestRow | ErrorRow]:
    """The records of a folder of media files, in key order. Images and audio are referenced where
    they are (read when embedded); text, ``.cls`` and ``.json`` files are read here, refused unread
    over ``options.max_member_bytes``, and one that cannot be read fails as a tar member would."""
    fs, root = url_to_fs(folder)
    root = root.rstrip("/")
    members: dict[str, list[tuple[str, str, int]]] = {}
    for path, info in sorted(fs.find(root, detail=True).items()):
        relative = path[len(root) + 1 :]
        if any(part.startswith(".") for part in relative.split("/")):
            continue
        key, extension = split_file_name(relative)
        members.setdefault(key, []).append((relative, extension, info.get("size") or 0))
    for key in sorted(members):
        sample = Sample(key, f"{folder}:{key}")
        if options.label_from_folder and "/" in key:
            sample.fill("label", key.split("/", 1)[0])
        for relative, extension, size in members[key]:
            location = storage.join(folder, relative)
            if extension not in TAR_COLUMNS and extension != "json":
                kind = f".{extension} files" if extension else "files without an extension"
                error = ManifestError(
                    f"file {relative!r} skipped: no column takes {kind}", error_type="unsupported_member"
                )
                yield ErrorRow.from_exception(error, record_id=key, modality=None, source=f"{folder}:{relative}")
                continue  # its own row: the rest of the record goes on
            read = functools.partial(storage.read_bytes, location, options.max_member_bytes)
            add_member(sample, relative, extension, size, read, options.max_member_bytes, media_location=location)
        if sample.taken:  # a stray file alone (a README) is its error row, not also a record
            yield sample.row()
