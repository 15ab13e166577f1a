"""Every byte the job reads or writes goes through fsspec, so local paths and object stores
(gs://, s3://, http(s)://, memory://) behave the same from a laptop to a cluster."""

from __future__ import annotations

import os
import posixpath
from typing import Iterable

import fsspec
from fsspec.core import url_to_fs

from mmfeatures.errors import FetchError


CACHE_ENV = "MMFEATURES_CACHE"


def cache_root() -> str:
    """This machine's cache for copied models and sample sources (``$MMFEATURES_CACHE``)."""
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "mmfeatures")


def has_scheme(path: str) -> bool:
    return "://" in path


def join(base: str, *parts: str) -> str:
    """Join path parts under ``base``, which may be a local path or a URL."""
    if has_scheme(base):
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)


def parent(path: str) -> str:
    return posixpath.dirname(path) if has_scheme(path) else os.path.dirname(os.path.abspath(path))


def resolve_reference(reference: str, manifest_dir: str) -> str:
    """A media reference as a readable location: URLs and absolute paths stay as they are,
    relative paths are taken from the manifest's folder (which may itself be a URL)."""
    if has_scheme(reference) or os.path.isabs(reference):
        return reference
    return join(manifest_dir, reference)


def expand_inputs(patterns: Iterable[str]) -> list[str]:
    """Expand paths and globs into a sorted list of files; fail before any work if one matches
    nothing, since a scheduled job silently reading zero files is worse than a clear failure."""
    files: list[str] = []
    for pattern in patterns:
        fs, _ = url_to_fs(pattern)
        matches = sorted(fs.glob(pattern)) if fsspec.core.has_magic(pattern) else [pattern]
        matches = [m for m in matches if fs.isfile(m)]
        if not matches:
            raise FileNotFoundError(f"input {pattern!r} matches no file")
        files += [_with_protocol(fs, pattern, m) for m in matches]
    return files


def _with_protocol(fs: fsspec.AbstractFileSystem, pattern: str, path: str) -> str:
    """fsspec's glob drops the scheme; put it back so workers can open the file anywhere."""
    if not has_scheme(pattern):
        return os.path.abspath(path)  # workers may run in another folder
    return fs.unstrip_protocol(path)


def read_bytes(location: str, max_bytes: int | None = None) -> bytes:
    """Read a whole media file, mapping storage failures to ``FetchError`` codes."""
    try:
        fs, path = url_to_fs(location)
        if max_bytes is not None:
            size = fs.size(path)
            if size is not None and size > max_bytes:
                raise FetchError(
                    f"{size} bytes is over the {max_bytes}-byte limit", error_type="file_too_large"
                )
        with fs.open(path, "rb") as handle:
            return handle.read()
    except FetchError:
        raise
    except FileNotFoundError as exc:
        raise FetchError(f"no such file: {location}", error_type="missing_file") from exc
    except PermissionError as exc:
        raise FetchError(f"permission denied: {location}", error_type="permission_denied") from exc
    except IsADirectoryError as exc:
        raise FetchError(f"is a directory: {location}", error_type="not_a_file") from exc
    except OSError as exc:
        raise FetchError(f"could not read {location}: {exc}", error_type="fetch_failed") from exc
