"""Tar shards in the WebDataset layout, streamed in one pass and never extracted.

The members of one sample sit next to each other and share a key, the member's path up to the
first dot of its file name; the rest of the name says what the member holds ("a/0001.jpg" is the
image of sample "a/0001", see TAR_COLUMNS). A ".json" member holds an object of more columns
(label, split, anything carried). Members are read into memory, never written anywhere, and a
member that could escape a folder if it were (an absolute path, "..", a link, a device) is refused.
A folder of media files (``folders``) is grouped into samples by the same rules.
"""

from __future__ import annotations

import functools
import json
import posixpath
import tarfile
import zlib
from collections.abc import Callable, Iterator
from typing import Any

from fsspec.core import url_to_fs

from mmfeatures.errors import ErrorRow, ManifestError, RecordError, ValidationError
from mmfeatures.limits import check_size
from mmfeatures.records import MODALITY_COLUMNS, REFERENCE_COLUMNS, TAR_COLUMNS, row_label
from mmfeatures.sources.base import ManifestRow, ReadOptions, row_error, unreadable

# What tarfile raises for a corrupt, truncated or wrongly compressed shard; TypeError too, from
# its gzip stream reader on a header cut short (Python 3.11).
_UNREADABLE_TAR = (tarfile.TarError, OSError, EOFError, zlib.error, TypeError)


def unsafe_member_reason(member: tarfile.TarInfo) -> str | None:
    """Why a tar member is refused, or None when it is a plain file or folder with a safe name."""
    if not (member.isreg() or member.isdir()):
        return "links, devices and FIFOs are refused"
    name = member.name
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return "absolute paths are refused"
    if ".." in name.replace("\\", "/").split("/"):
        return "paths with '..' are refused"
    return None


def split_member_name(name: str) -> tuple[str, str]:
    """A member's sample key and extension: "a/0001.seg.JPG" -> ("a/0001", "seg.jpg")."""
    folder, base = posixpath.split(name)
    stem, _, extension = base.partition(".")
    return posixpath.join(folder, stem), extension.lower()


class Sample:
    """The members of one sample, gathered until the key changes."""

    def __init__(self, key: str, source: str) -> None:
        self.key = key
        self.source = source
        self.data: dict[str, Any] = {"id": key}
        self.rejected: dict[str, RecordError] = {}
        self.error: ManifestError | None = None
        self.taken = False  # whether any member was for a column: one that was not is its error row alone

    def fill(self, column: str, value: Any) -> None:
        if column == "label" and column in self.data and _same_label(self.data[column], value):
            return  # the ".cls" member and the ".json" member's "label" agree: one label, no conflict
        if self._claim(column):
            self.data[column] = value

    def reject(self, column: str, error: RecordError) -> None:
        """One modality failed (an oversized member): the rest of the sample goes on."""
        if self._claim(column):
            self.rejected[column] = error

    def _claim(self, column: str) -> bool:
        """True when ``column`` has no value yet; otherwise the sample fails (two values for one column)."""
        if column in self.data or column in self.rejected:
            self.fail(f"the sample has two values for {column!r}", "conflicting_member")
            return False
        return True

    def fail(self, message: str, error_type: str) -> None:
        self.error = self.error or ManifestError(message, error_type=error_type)

    def row(self) -> ManifestRow | ErrorRow:
        if self.error is not None:
            return ErrorRow.from_exception(self.error, record_id=self.key, modality=None, source=self.source)
        return ManifestRow(self.data, self.source, self.rejected)


def _same_label(first: Any, second: Any) -> bool:
    """Whether two label values are the one string the job stores: a JSON 3 is the ".cls" "3"."""
    try:
        return row_label({"label": first}) == row_label({"label": second})
    except ValidationError:  # a value no label can be (a list, an object): not the same label
        return False


def read_tar(path: str, options: ReadOptions) -> Iterator[ManifestRow | ErrorRow]:
    fs, fs_path = url_to_fs(path)
    sample: Sample | None = None
    with fs.open(fs_path, "rb") as raw:
        try:
            with tarfile.open(fileobj=raw, mode="r|*") as archive:  # a stream: one pass, no seeking
                for member in archive:
                    reason = unsafe_member_reason(member)
                    if reason is not None:
                        error = ManifestError(f"tar member {member.name!r}: {reason}", error_type="unsafe_tar_member")
                        yield row_error(error, f"{path}:{member.name}")
                        continue
                    if member.isdir():
                        continue
                    key, extension = split_member_name(member.name)
                    if sample is None or sample.key != key:
                        if sample is not None and sample.taken:
                            yield sample.row()
                        sample = Sample(key, f"{path}:{key}")
                    if extension in TAR_COLUMNS or extension == "json":
                        add_member(
                            sample,
                            member.name,
                            extension,
                            member.size,  # the size in the header: an oversized member is never read
                            functools.partial(_member_bytes, archive, member),
                            options.max_member_bytes,
                        )
                        continue
                    error = ManifestError(
                        f"member {member.name!r} skipped: no column takes .{extension} files",
                        error_type="unsupported_member",
                    )  # its own row: the rest of the sample goes on
                    yield ErrorRow.from_exception(error, record_id=key, modality=None, source=f"{path}:{member.name}")
        except _UNREADABLE_TAR as exc:
            # A corrupt or truncated shard cannot be read past the damage; the sample being read
            # is lost with the rest, and this one error row says so.
            lost = f"; sample {sample.key!r} and any after it are lost" if sample is not None else ""
            yield unreadable(path, "tar file", exc, lost, sample.key if sample else None)
            return
    if sample is not None and sample.taken:
        yield sample.row()


def _member_bytes(archive: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    handle = archive.extractfile(member)
    assert handle is not None  # a regular file: only other kinds of member have no content
    return handle.read()


def add_member(
    sample: Sample,
    name: str,
    extension: str,
    size: int,
    read: Callable[[], bytes],
    max_bytes: int | None,
    media_location: str | None = None,
) -> None:
    """Put one member's content in its sample: a modality's bytes as they are (or, for an image
    or audio file in a folder, its ``media_location``, read when it is embedded), a ".json"
    object's columns, another column's UTF-8 text (a ".cls" label). ``size`` is checked against
    ``max_bytes`` before anything is read."""
    sample.taken = True
    column = TAR_COLUMNS.get(extension)  # None: a ".json" member
    if media_location is not None and column in REFERENCE_COLUMNS:
        sample.fill(column, media_location)
        return
    try:
        check_size(size, max_bytes)
    except RecordError as exc:
        if column in MODALITY_COLUMNS:
            sample.reject(column, exc)
        else:
            sample.fail(f"member {name!r}: {exc}", exc.error_type)
        return
    data = read()
    if column in MODALITY_COLUMNS:
        sample.fill(column, data)
        return
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        sample.fail(f"member {name!r} is not valid UTF-8: {exc}", "invalid_utf8")
        return
    if column is not None:
        sample.fill(column, text.strip())
        return
    try:
        columns = json.loads(text)
    except (ValueError, RecursionError) as exc:
        sample.fail(f"member {name!r}: malformed JSON: {exc}", "malformed_json")
        return
    if not isinstance(columns, dict):
        sample.fail(f"member {name!r}: the JSON must hold an object", "malformed_json")
        return
    for key, value in columns.items():
        sample.fill(key, value)
