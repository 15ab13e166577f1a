"""Tar shards in the WebDataset layout, streamed in one pass and never extracted.

The members of one sample sit next to each other and share a key, the member's path up to the
first dot of its file name ("a/0001.seg.jpg" is sample "a/0001"); ``samples`` says how they fill
the record. Members are read into memory, never written anywhere, and a member that could escape
a folder if it were (an absolute path, "..", a link, a device) is refused.
"""

from __future__ import annotations

import functools
import posixpath
import tarfile
import zlib
from collections.abc import Iterator

from fsspec.core import url_to_fs

from mmfeatures.errors import ErrorRow, ManifestError
from mmfeatures.records import TAR_COLUMNS
from mmfeatures.sources.base import ManifestRow, ReadOptions, row_error, unreadable
from mmfeatures.sources.samples import Sample, add_member

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


def read_tar(path: str, options: ReadOptions) -> Iterator[ManifestRow | ErrorRow]:
    fs, fs_path = url_to_fs(path)
    sample: Sample | None = None
    archive: tarfile.TarFile | None = None
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
            # is lost with the rest, and this one error row says so. Before any sample, the row
            # names the offset in the (uncompressed) tar stream where reading failed.
            if sample is not None:
                lost = f"; sample {sample.key!r} and any after it are lost"
                yield unreadable(sample.source, "tar file", exc, lost, sample.key)
            else:
                yield unreadable(f"{path}@{archive.offset if archive is not None else 0}", "tar file", exc)
            return
    if sample is not None and sample.taken:
        yield sample.row()


def _member_bytes(archive: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    handle = archive.extractfile(member)
    assert handle is not None  # a regular file: only other kinds of member have no content
    return handle.read()


def split_member_name(name: str) -> tuple[str, str]:
    """A member's sample key and extension, split at the file name's first dot, as WebDataset
    does: "a/0001.seg.JPG" -> ("a/0001", "seg.jpg")."""
    folder, base = posixpath.split(name)
    stem, _, extension = base.partition(".")
    return posixpath.join(folder, stem), extension.lower()
