"""Manifest readers: JSONL, CSV (either may be gzipped) and Parquet files, and tar shards, become
plain rows, each tagged with where it came from; a row that cannot be parsed becomes an error row
instead of stopping the read."""

from __future__ import annotations

import _csv
import csv
import gzip
import io
import itertools
import json
import posixpath
import tarfile
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from mmfeatures.errors import ErrorRow, ManifestError, RecordError, ValidationError
from mmfeatures.limits import check_size
from mmfeatures.records import MODALITY_COLUMNS, TAR_COLUMNS, row_label

# What pyarrow raises for a corrupt or truncated Parquet file: ArrowInvalid and the other Arrow
# errors, OSError, and UnicodeDecodeError (a ValueError) for a column name that is not UTF-8.
_UNREADABLE_PARQUET = (pa.ArrowException, OSError, ValueError)

# What gzip raises for a damaged stream: BadGzipFile for bytes that are not gzip or fail the
# checksum or length check at its end, EOFError for a stream cut short, zlib.error for corrupt
# compressed data. Reading a plain file raises none of them: its I/O errors still escape as before.
_UNREADABLE_GZIP = (gzip.BadGzipFile, EOFError, zlib.error)

# The delimiters a CSV's header line is sniffed for, and how much of the line the sniffer reads.
_CSV_DELIMITERS = ",;\t|"
_SNIFF_CHARS = 4096

# Each accepted extension and the format it names; a manifest matches the first suffix it ends with.
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
    (".tar", "tar"),
    (".tar.gz", "tar"),
    (".tgz", "tar"),
)


@dataclass(frozen=True)
class ManifestRow:
    data: dict[str, Any]
    source: str  # "path:line" (1-based; Parquet counts rows), or "path:key" for a tar sample
    rejected: Mapping[str, RecordError] = field(default_factory=dict)  # modalities refused while reading


def manifest_format(path: str) -> str:
    lowered = path.lower()
    for suffix, kind in _FORMATS:
        if lowered.endswith(suffix):
            return kind
    accepted = ", ".join(suffix for suffix, _ in _FORMATS)
    raise ValueError(f"cannot tell the manifest format of {path!r}: use one of {accepted}")


def declared_column_types(path: str) -> dict[str, pa.DataType] | None:
    """A Parquet manifest's own column types; None for formats whose values carry no schema, and
    for a Parquet file whose schema cannot be read (``read_manifest`` reports that file)."""
    if manifest_format(path) != "parquet":
        return None
    fs, fs_path = url_to_fs(path)
    with fs.open(fs_path, "rb") as handle:
        try:
            return {field.name: field.type for field in pq.read_schema(handle)}
        except _UNREADABLE_PARQUET:
            return None


def read_manifest(path: str, max_member_bytes: int | None = None) -> Iterator[ManifestRow | ErrorRow]:
    """Stream the rows of one manifest file (the samples of a tar shard, whose members over
    ``max_member_bytes`` are refused unread)."""
    kind = manifest_format(path)
    if kind == "tar":
        yield from _read_tar(path, max_member_bytes)
        return
    readers = {"jsonl": _read_jsonl, "csv": _read_csv, "parquet": _read_parquet}
    yield from readers[kind](path)


def _row_error(exc: ManifestError, source: str) -> ErrorRow:
    return ErrorRow.from_exception(exc, record_id=None, modality=None, source=source)


def _unreadable(path: str, what: str, exc: Exception, lost: str = "", record_id: str | None = None) -> ErrorRow:
    """The one error row of a file that cannot be read past some damage (corrupt, truncated, not
    in its format): the rows read before it stay, and this row stands for all the rest."""
    error = ManifestError(f"the {what} cannot be read: {exc}{lost}", error_type="unreadable_manifest")
    return ErrorRow.from_exception(error, record_id=record_id, modality=None, source=path)


def _unreadable_gzip(path: str, exc: Exception, lines_read: int) -> ErrorRow:
    lost = f"; the lines after line {lines_read} are lost" if lines_read else ""
    return _unreadable(path, "gzip stream", exc, lost)


def _open_text_manifest(path: str) -> Any:
    """A JSONL or CSV manifest's bytes, gunzipped when its name ends in ".gz". fsspec.open, not
    ``fs.open``: only its context closes the file under the gzip reader too."""
    return fsspec.open(path, "rb", compression="infer")


def _read_jsonl(path: str) -> Iterator[ManifestRow | ErrorRow]:
    number = 0
    with _open_text_manifest(path) as raw:
        try:
            for number, raw_line in enumerate(raw, 1):
                source = f"{path}:{number}"
                try:
                    line = raw_line.decode("utf-8-sig" if number == 1 else "utf-8")
                except UnicodeDecodeError as exc:
                    error = ManifestError(f"the line is not valid UTF-8: {exc}", error_type="invalid_utf8")
                    yield _row_error(error, source)
                    continue
                if not line.strip():
                    continue
                try:
                    data = json.loads(line)
                except (ValueError, RecursionError) as exc:
                    # ValueError: JSONDecodeError, and integers over Python's 4300-digit limit;
                    # RecursionError: nesting deeper than the interpreter's stack.
                    yield _row_error(ManifestError(f"malformed JSON: {exc}", error_type="malformed_json"), source)
                    continue
                if not isinstance(data, dict):
                    error = ManifestError("a JSONL line must hold an object", error_type="malformed_json")
                    yield _row_error(error, source)
                    continue
                yield ManifestRow(data, source)
        except _UNREADABLE_GZIP as exc:
            yield _unreadable_gzip(path, exc, number)


def _read_csv(path: str) -> Iterator[ManifestRow | ErrorRow]:
    with _open_text_manifest(path) as raw:
        # surrogateescape, not replace: a byte that is not UTF-8 (a spreadsheet saved as cp1252)
        # stays in its row as an escape, and ``_csv_rows`` refuses that row alone.
        text = io.TextIOWrapper(raw, encoding="utf-8-sig", errors="surrogateescape", newline="")
        reader: _csv.Reader | None = None
        try:
            header_line = text.readline()
            reader = csv.reader(itertools.chain([header_line], text), delimiter=_sniff_delimiter(header_line))
            yield from _csv_rows(reader, path)
        except _UNREADABLE_GZIP as exc:
            yield _unreadable_gzip(path, exc, reader.line_num if reader is not None else 0)


def _sniff_delimiter(header_line: str) -> str:
    """The delimiter of a CSV's header line: spreadsheets in many European locales write ";". The
    sniffer prefers "," when the line holds several, and only reads the line's start: its regular
    expressions take time quadratic in their sample."""
    try:
        return csv.Sniffer().sniff(header_line[:_SNIFF_CHARS], delimiters=_CSV_DELIMITERS).delimiter
    except csv.Error:  # no delimiter at all: a single column, or an empty file
        return ","


def _not_utf8(cells: list[str]) -> str | None:
    """Why cells read with surrogateescape were not UTF-8 in the file, None when they were: the
    escaped bytes, put back, meet the strict decoder, which names the first bad one."""
    for number, cell in enumerate(cells, 1):
        try:
            cell.encode("utf-8", "surrogateescape").decode("utf-8")
        except UnicodeDecodeError as exc:
            return f"column {number}: {exc}"
    return None


def _csv_rows(reader: _csv.Reader, path: str) -> Iterator[ManifestRow | ErrorRow]:
    # csv.Error (a field over csv.field_size_limit(), 128 KiB) makes that row an error row and
    # the read goes on with the next line; a header that cannot be parsed or decoded ends the file.
    try:
        header = next(reader, [])  # an empty file has no columns, and no rows
    except csv.Error as exc:
        error = ManifestError(f"malformed CSV header: {exc}", error_type="malformed_csv")
        yield _row_error(error, f"{path}:{reader.line_num}")
        return
    reason = _not_utf8(header)
    if reason is not None:
        error = ManifestError(
            f"the CSV header is not valid UTF-8, so no row of the file is read (save it as UTF-8): {reason}",
            error_type="invalid_utf8",
        )
        yield _row_error(error, f"{path}:{reader.line_num}")
        return
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            error = ManifestError(f"malformed CSV: {exc}", error_type="malformed_csv")
            yield _row_error(error, f"{path}:{reader.line_num}")
            continue
        source = f"{path}:{reader.line_num}"
        if not any(cells):  # an empty line, or one of the blank rows ",,," spreadsheets append
            continue
        if len(cells) != len(header):
            error = ManifestError("the row's field count does not match the header", error_type="malformed_csv")
            yield _row_error(error, source)
            continue
        reason = _not_utf8(cells)
        if reason is not None:
            yield _row_error(ManifestError(f"the row is not valid UTF-8: {reason}", error_type="invalid_utf8"), source)
            continue
        # CSV has no nulls: an empty cell means the value is absent.
        yield ManifestRow({key: value or None for key, value in zip(header, cells, strict=True)}, source)


def _read_parquet(path: str) -> Iterator[ManifestRow | ErrorRow]:
    fs, fs_path = url_to_fs(path)
    with fs.open(fs_path, "rb") as handle:
        number = 0
        try:
            for batch in pq.ParquetFile(handle).iter_batches(batch_size=4096):
                for data in _batch_rows(batch):
                    number += 1
                    source = f"{path}:{number}"
                    yield _row_error(data, source) if isinstance(data, ManifestError) else ManifestRow(data, source)
        except _UNREADABLE_PARQUET as exc:
            # A corrupt or truncated file cannot be read row by row: the rest of it is one error row.
            yield _unreadable(path, "Parquet file", exc)


def _batch_rows(batch: pa.RecordBatch) -> list[dict[str, Any] | ManifestError]:
    """A batch's rows; a row holding a value Python cannot represent (a timestamp past year 9999,
    a string that is not UTF-8) is that row's error instead."""
    try:
        return batch.to_pylist()
    except (ValueError, OverflowError):
        pass
    rows: list[dict[str, Any] | ManifestError] = []
    for index in range(batch.num_rows):
        try:
            rows.append(batch.slice(index, 1).to_pylist()[0])
        except (ValueError, OverflowError) as exc:
            rows.append(ManifestError(f"a value cannot be read: {exc}"))
    return rows


# -- tar shards ----------------------------------------------------------------------------------
#
# The WebDataset layout: the members of one sample sit next to each other and share a key, the
# member's path up to the first dot of its file name; the rest of the name says what the member
# holds ("a/0001.jpg" is the image of sample "a/0001", see TAR_COLUMNS). A ".json" member holds an
# object of more columns (label, split, anything carried). Members are read into memory, never
# written anywhere, and a member that could escape a folder if it were (an absolute path, "..",
# a link, a device) is refused.

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


class _Sample:
    """The members of one sample, gathered until the key changes."""

    def __init__(self, key: str, source: str) -> None:
        self.key = key
        self.source = source
        self.data: dict[str, Any] = {"id": key}
        self.rejected: dict[str, RecordError] = {}
        self.error: ManifestError | None = None

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


def _read_tar(path: str, max_member_bytes: int | None) -> Iterator[ManifestRow | ErrorRow]:
    fs, fs_path = url_to_fs(path)
    sample: _Sample | None = None
    with fs.open(fs_path, "rb") as raw:
        try:
            with tarfile.open(fileobj=raw, mode="r|*") as archive:  # a stream: one pass, no seeking
                for member in archive:
                    reason = unsafe_member_reason(member)
                    if reason is not None:
                        error = ManifestError(f"tar member {member.name!r}: {reason}", error_type="unsafe_tar_member")
                        yield _row_error(error, f"{path}:{member.name}")
                        continue
                    if member.isdir():
                        continue
                    key, extension = split_member_name(member.name)
                    if sample is None or sample.key != key:
                        if sample is not None:
                            yield sample.row()
                        sample = _Sample(key, f"{path}:{key}")
                    if extension in TAR_COLUMNS or extension == "json":
                        _add_member(sample, archive, member, extension, max_member_bytes)
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
            yield _unreadable(path, "tar file", exc, lost, sample.key if sample else None)
            return
    if sample is not None:
        yield sample.row()


def _add_member(
    sample: _Sample, archive: tarfile.TarFile, member: tarfile.TarInfo, extension: str, max_bytes: int | None
) -> None:
    """Put one member's content in its sample: a modality's bytes as they are, a ".json" object's
    columns, another column's UTF-8 text (a ".cls" label)."""
    column = TAR_COLUMNS.get(extension)  # None: a ".json" member
    try:
        check_size(member.size, max_bytes)  # the size in the header: an oversized member is never read
    except RecordError as exc:
        if column in MODALITY_COLUMNS:
            sample.reject(column, exc)
        else:
            sample.fail(f"member {member.name!r}: {exc}", exc.error_type)
        return
    handle = archive.extractfile(member)
    assert handle is not None  # a regular file: only other kinds of member have no content
    data = handle.read()
    if column in MODALITY_COLUMNS:
        sample.fill(column, data)
        return
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        sample.fail(f"member {member.name!r} is not valid UTF-8: {exc}", "invalid_utf8")
        return
    if column is not None:
        sample.fill(column, text.strip())
        return
    try:
        columns = json.loads(text)
    except (ValueError, RecursionError) as exc:
        sample.fail(f"member {member.name!r}: malformed JSON: {exc}", "malformed_json")
        return
    if not isinstance(columns, dict):
        sample.fail(f"member {member.name!r}: the JSON must hold an object", "malformed_json")
        return
    for name, value in columns.items():
        sample.fill(name, value)
