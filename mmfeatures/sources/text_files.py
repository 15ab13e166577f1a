"""JSONL and CSV manifests, plain or gzipped: one row per line (per CSV record), a line that
cannot be parsed or decoded an error row of its own."""

from __future__ import annotations

import _csv
import codecs
import contextlib
import csv
import gzip
import io
import itertools
import json
import zlib
from collections.abc import Iterator
from typing import Any, AnyStr, Generic

import fsspec
from fsspec.core import url_to_fs

from mmfeatures.errors import ErrorRow, ManifestError
from mmfeatures.sources.base import ManifestRow, ReadOptions, row_error, unreadable

# What gzip raises for a damaged stream: BadGzipFile for bytes that are not gzip or fail the
# checksum or length check at its end, EOFError for a stream cut short, zlib.error for corrupt
# compressed data. Reading a plain file raises none of them: its I/O errors still escape as before.
_UNREADABLE_GZIP = (gzip.BadGzipFile, EOFError, zlib.error)

# The delimiters a CSV's header line is sniffed for, and how much of the line the sniffer reads.
_CSV_DELIMITERS = ",;\t|"
_SNIFF_CHARS = 4096

# How much of a line over the limit is read at a time, to find its end without holding it.
_SKIP_CHUNK = 2**20
# How much of a JSONL file is scanned for line breaks at a time, to cut it into parts.
_SCAN_CHUNK = 2**22


def checked_encoding(name: str | None) -> str | None:
    """``--csv-encoding``, once Python is known to decode text in it; ``ValueError`` otherwise
    (``base64`` and ``rot13`` are codecs, but not of text)."""
    if name is not None:
        try:
            b"a".decode(name)  # empty bytes would decode without looking the codec up
        except LookupError:
            raise ValueError(f"--csv-encoding: {name!r} is not a text encoding Python knows") from None
        except UnicodeDecodeError:  # a text encoding all the same (UTF-16 wants two bytes)
            pass
    return name


def checked_delimiter(delimiter: str | None) -> str | None:
    """``--csv-delimiter``: one character that is no quote or line break, or "tab" (hard to type
    in a shell); ``ValueError`` otherwise."""
    delimiter = "\t" if delimiter == "tab" else delimiter
    if delimiter is not None and (len(delimiter) != 1 or delimiter in '"\r\n'):
        raise ValueError(
            f"--csv-delimiter must be one character (not a quote or line break) or 'tab', not {delimiter!r}"
        )
    return delimiter


class _Lines(Generic[AnyStr]):
    """The lines of an open manifest, bytes or text, each at most ``limit`` long with its line
    break (None: any length). Of a longer line no more than that is read: its rest is skipped a
    chunk at a time and ``next`` raises ``ManifestError`` ``line_too_long``, so that the line is
    never held whole, and the next call goes on with the line after it. ``number`` counts the
    lines read, a line too long included, from the start of the file."""

    def __init__(self, handle: Any, limit: int | None, unit: str, number: int = 0) -> None:
        self.handle = handle
        self.limit = limit
        self.unit = unit  # what ``limit`` counts, for the error's message
        self.number = number  # the lines before the first, in a part of a file

    def __iter__(self) -> _Lines[AnyStr]:
        return self

    def __next__(self) -> AnyStr:
        line: AnyStr = self.handle.readline(-1 if self.limit is None else self.limit + 1)
        if not line:
            raise StopIteration
        self.number += 1
        if self.limit is None or len(line) <= self.limit:
            return line
        ends: Any = ("\n", "\r") if isinstance(line, str) else b"\n"  # text is read with universal newlines
        while line and not line.endswith(ends):
            line = self.handle.readline(_SKIP_CHUNK)
        raise ManifestError(
            f"the line is longer than the limit of {self.limit} {self.unit}", error_type="line_too_long"
        )

    def each(self) -> Iterator[AnyStr | ManifestError]:
        """Each line, or the error of a line too long."""
        while True:
            try:
                yield next(self)
            except StopIteration:
                return
            except ManifestError as exc:
                yield exc


def _unreadable_gzip(path: str, exc: Exception, lines_read: int) -> ErrorRow:
    lost = f"; the lines after line {lines_read} are lost" if lines_read else ""
    return unreadable(f"{path}:{lines_read + 1}", "gzip stream", exc, lost)


def _open_text_manifest(path: str) -> Any:
    """A JSONL or CSV manifest's bytes, gunzipped when its name ends in ".gz". fsspec.open, not
    ``fs.open``: only its context closes the file under the gzip reader too."""
    return fsspec.open(path, "rb", compression="infer")


class _Range(io.RawIOBase):
    """The next ``size`` bytes of ``handle``, read as if they were the whole file."""

    def __init__(self, handle: Any, size: int) -> None:
        self.handle = handle
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self.handle.read(min(len(buffer), self.left))
        buffer[: len(data)] = data
        self.left -= len(data)
        return len(data)


@contextlib.contextmanager
def _open_lines(path: str, start: int, stop: int | None) -> Iterator[io.BufferedIOBase]:
    """A JSONL or CSV manifest's bytes, or those of its part ``[start, stop)``, buffered: a buffered
    reader's readline takes a limit; fsspec's remote files' does not. Not a second buffer over
    gzip's own: reading ahead, it would meet a bad checksum lines early."""
    if stop is None:
        with _open_text_manifest(path) as raw:
            yield raw if isinstance(raw, io.BufferedIOBase) else io.BufferedReader(raw)
        return
    fs, fs_path = url_to_fs(path)
    with fs.open(fs_path, "rb") as raw:
        raw.seek(start)
        yield io.BufferedReader(_Range(raw, stop - start))


def _worth_cutting(path: str, part_bytes: int) -> bool:
    """Whether a JSONL or CSV file is cut into parts: not gzipped (a gzip stream cannot be read
    from its middle), and over ``part_bytes``."""
    if path.lower().endswith(".gz"):
        return False
    fs, fs_path = url_to_fs(path)
    size = fs.size(fs_path)  # None where the store does not say: read whole
    return size is not None and size > part_bytes


def _spans(cuts: list[tuple[int, int]], end: int) -> list[tuple[int, int, int]]:
    """The parts ``(start, stop, first line)`` from where each starts and the lines before it,
    the last one stopping at ``end``, the file's size."""
    if cuts[-1][0] == end:  # the last line or row ends the file: no part after it
        cuts = cuts[:-1]
    stops = [start for start, _ in cuts[1:]] + [end]
    return [(start, stop, before + 1) for (start, before), stop in zip(cuts, stops, strict=True)]


def jsonl_parts(path: str, part_bytes: int) -> list[tuple[int, int, int]]:
    """The parts ``(start, stop, first line)`` of an uncompressed JSONL file over ``part_bytes``:
    each ends at the first line break at least ``part_bytes`` after its start, or at the file's
    end. The whole file is scanned for line breaks, a chunk at a time, to number each part's first
    line; a file not over ``part_bytes``, or gzipped, is one part."""
    if not _worth_cutting(path, part_bytes):
        return []
    fs, fs_path = url_to_fs(path)
    cuts = [(0, 0)]  # where each part starts, and the lines before it
    position = lines = 0
    with fs.open(fs_path, "rb") as handle:
        while chunk := handle.read(_SCAN_CHUNK):
            counted = 0
            while (at := max(cuts[-1][0] + part_bytes - 1 - position, counted)) < len(chunk):
                found = chunk.find(b"\n", at)
                if found < 0:
                    break
                lines += chunk.count(b"\n", counted, found + 1)
                counted = found + 1
                cuts.append((position + counted, lines))
            lines += chunk.count(b"\n", counted)
            position += len(chunk)
    return _spans(cuts, position)


# A text stream's ``tell`` below this is a plain byte offset: CPython packs the decoder's flags and
# the bytes and characters it holds back above bit 64 of it (``_pyio.TextIOWrapper._pack_cookie``).
_PLAIN_OFFSETS = 2**64


def csv_parts(path: str, options: ReadOptions) -> list[tuple[int, int, int]]:
    """The parts ``(start, stop, first line)`` of an uncompressed CSV file over
    ``options.part_bytes``: each ends at the first end of a row at least ``part_bytes`` after its
    start, or at the file's end; a file not over ``part_bytes``, or gzipped, is one part.

    The rows' ends are found by reading the file as ``read_csv`` reads it whole: the same decoding,
    lines and limit, header, dialect and ``csv`` reader, malformed rows included. A row ends where
    that reader has just given it, or raised for it (the reader starts afresh on the next line
    either way), so each part starts where the whole read's reader starts a row, whatever the
    file's quotes. The offset there is the text stream's ``tell``, taken only where it is a plain
    byte offset: the decoder then holds nothing back, so a part decoded from that byte with a fresh
    decoder reads on as the whole file does. Hence UTF-8 (a part after the first is decoded as
    UTF-8 without a byte-order mark), single-byte code pages, Shift-JIS and the like, UTF-16-LE/BE
    and UTF-32-LE/BE are cut, and UTF-7 where its decoder is back in its first state. One part is a
    file whose fresh decoder has a state of its own (UTF-16 and UTF-32, which take their byte order
    from a byte-order mark; ISO-2022), one whose header cannot be read (a whole read ends there),
    one on a store whose files cannot tell their position, and one whose rows all end in a lone
    "\\r": the stream holds a "\\r" back to see whether "\\n" follows, so no offset after one is plain."""
    if not _worth_cutting(path, options.part_bytes):
        return []
    encoding = options.csv_encoding or "utf-8-sig"
    if codecs.getincrementaldecoder(_part_encoding(encoding))().getstate() != (b"", 0):
        return []
    cuts = [(0, 0)]  # where each part starts, and the lines before it
    with _open_lines(path, 0, None) as buffered:
        text = _decoded(buffered, encoding)
        lines: _Lines[str] = _Lines(text, options.max_member_bytes, "characters")
        header = _csv_header(lines, options.csv_delimiter, path, encoding)
        if isinstance(header, ErrorRow):
            return []
        reader, _ = header
        for _ in _csv_records(reader, lines):
            wanted = cuts[-1][0] + options.part_bytes
            # The bytes the text stream has taken in, which it may not have read out yet: the
            # exact (and slower) ``tell`` is only asked for once they reach the next part.
            if buffered.tell() < wanted:
                continue
            try:
                at = text.tell()
            except OSError:  # a file that cannot tell its position
                return []
            if wanted <= at < _PLAIN_OFFSETS:
                cuts.append((at, lines.number))
        return _spans(cuts, buffered.tell())


def read_jsonl(
    path: str, options: ReadOptions, start: int = 0, stop: int | None = None, first: int = 1
) -> Iterator[ManifestRow | ErrorRow]:
    """The rows of a JSONL manifest, or of its part ``[start, stop)`` whose first line is line
    ``first`` of the file (see ``jsonl_parts``)."""
    with _open_lines(path, start, stop) as buffered:
        lines: _Lines[bytes] = _Lines(buffered, options.max_member_bytes, "bytes", first - 1)
        try:
            for raw_line in lines.each():
                number = lines.number
                source = f"{path}:{number}"
                if isinstance(raw_line, ManifestError):
                    yield row_error(raw_line, source)
                    continue
                try:
                    line = raw_line.decode("utf-8-sig" if number == 1 else "utf-8")
                except UnicodeDecodeError as exc:
                    error = ManifestError(f"the line is not valid UTF-8: {exc}", error_type="invalid_utf8")
                    yield row_error(error, source)
                    continue
                if not line.strip():
                    continue
                try:
                    data = json.loads(line)
                except (ValueError, RecursionError) as exc:
                    # ValueError: JSONDecodeError, and integers over Python's 4300-digit limit;
                    # RecursionError: nesting deeper than the interpreter's stack.
                    yield row_error(ManifestError(f"malformed JSON: {exc}", error_type="malformed_json"), source)
                    continue
                if not isinstance(data, dict):
                    error = ManifestError("a JSONL line must hold an object", error_type="malformed_json")
                    yield row_error(error, source)
                    continue
                yield ManifestRow(data, source)
        except _UNREADABLE_GZIP as exc:
            yield _unreadable_gzip(path, exc, lines.number)


def read_csv(
    path: str, options: ReadOptions, start: int = 0, stop: int | None = None, first: int = 1
) -> Iterator[ManifestRow | ErrorRow]:
    """The rows of a CSV manifest, or of its part ``[start, stop)`` whose first line is line
    ``first`` of the file (see ``csv_parts``). A part after the first takes the header and the
    delimiter from the file's start, as the rows of a read of the whole file do, and reports no
    error of the header: the first part does."""
    encoding = options.csv_encoding or "utf-8-sig"
    with _open_lines(path, 0, stop if start == 0 else None) as buffered:
        lines: _Lines[str] = _Lines(_decoded(buffered, encoding), options.max_member_bytes, "characters")
        try:
            header = _csv_header(lines, options.csv_delimiter, path, encoding)
            if isinstance(header, ErrorRow):
                if start == 0:
                    yield header
                return
            reader, columns = header
            if start == 0:
                yield from _csv_rows(reader, lines, columns, path, encoding)
                return
        except _UNREADABLE_GZIP as exc:
            yield _unreadable_gzip(path, exc, lines.number)
            return
    with _open_lines(path, start, stop) as buffered:
        text = _decoded(buffered, _part_encoding(encoding))
        lines = _Lines(text, options.max_member_bytes, "characters", first - 1)
        yield from _csv_rows(csv.reader(lines, reader.dialect), lines, columns, path, encoding)


def _part_encoding(encoding: str) -> str:
    """The encoding of a part after the first: not utf-8-sig, as a U+FEFF that begins a part is a
    character of its row, not a byte-order mark."""
    return "utf-8" if encoding == "utf-8-sig" else encoding


def _decoded(buffered: Any, encoding: str) -> io.TextIOWrapper:
    # surrogateescape, not replace: a byte that is not in the encoding (a spreadsheet saved as
    # cp1252 read as UTF-8) stays in its row as an escape, and ``_csv_rows`` refuses that row alone.
    return io.TextIOWrapper(buffered, encoding=encoding, errors="surrogateescape", newline="")


def _csv_header(
    lines: _Lines[str], delimiter: str | None, path: str, encoding: str
) -> tuple[_csv.Reader, list[str]] | ErrorRow:
    """The reader of a CSV's rows, its delimiter sniffed from the header line unless given, and
    the header's columns; or the error row of a header that cannot be read, which ends the file."""
    header_line = next(lines.each(), "")
    if isinstance(header_line, ManifestError):
        return row_error(header_line, f"{path}:1")
    reader = csv.reader(itertools.chain([header_line], lines), delimiter=delimiter or _sniff_delimiter(header_line))
    try:
        columns = next(reader, [])  # an empty file has no columns, and no rows
    except csv.Error as exc:
        error = ManifestError(f"malformed CSV header: {exc}", error_type="malformed_csv")
        return row_error(error, f"{path}:{lines.number}")
    reason = _not_decodable(columns, encoding)
    if reason is not None:
        consequence = ", so no row of the file is read (save it as UTF-8, or name its encoding with --csv-encoding)"
        return row_error(_encoding_error("the CSV header", reason, encoding, consequence), f"{path}:{lines.number}")
    return reader, columns


def _sniff_delimiter(header_line: str) -> str:
    """The delimiter of a CSV's header line: spreadsheets in many European locales write ";". The
    sniffer prefers "," when the line holds several, and only reads the line's start: its regular
    expressions take time quadratic in their sample."""
    try:
        return csv.Sniffer().sniff(header_line[:_SNIFF_CHARS], delimiters=_CSV_DELIMITERS).delimiter
    except csv.Error:  # no delimiter at all: a single column, or an empty file
        return ","


def _not_decodable(cells: list[str], encoding: str) -> str | None:
    """Why cells read with surrogateescape were not text in ``encoding`` in the file, None when
    they were: the escaped bytes, put back, meet the strict decoder, which names the first bad one."""
    for number, cell in enumerate(cells, 1):
        try:
            cell.encode(encoding, "surrogateescape").decode(encoding)
        except UnicodeDecodeError as exc:
            return f"column {number}: {exc}"
    return None


def _encoding_error(what: str, reason: str, encoding: str, consequence: str = "") -> ManifestError:
    name = "UTF-8" if encoding == "utf-8-sig" else encoding
    # One error type whatever the encoding: the name users already search for and count.
    return ManifestError(f"{what} is not valid {name}{consequence}: {reason}", error_type="invalid_utf8")


def _csv_records(reader: _csv.Reader, lines: _Lines[str]) -> Iterator[list[str] | ManifestError]:
    """Each row the reader gives, or the error of a malformed one: csv.Error (a field over
    csv.field_size_limit(), 128 KiB) or a line over the limit (raised by ``lines`` through the
    reader). After an error the reader starts afresh with the next line."""
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield ManifestError(f"malformed CSV: {exc}", error_type="malformed_csv")
            continue
        except ManifestError as exc:
            yield exc
            continue
        yield cells


def _csv_rows(
    reader: _csv.Reader, lines: _Lines[str], header: list[str], path: str, encoding: str
) -> Iterator[ManifestRow | ErrorRow]:
    # A row's source, and that of its error, is the line it ends on, as ``lines`` counts them: the
    # reader does not count a line that raised.
    for cells in _csv_records(reader, lines):
        source = f"{path}:{lines.number}"
        if isinstance(cells, ManifestError):
            yield row_error(cells, source)
            continue
        if not any(cells):  # an empty line, or one of the blank rows ",,," spreadsheets append
            continue
        if len(cells) != len(header):
            error = ManifestError("the row's field count does not match the header", error_type="malformed_csv")
            yield row_error(error, source)
            continue
        reason = _not_decodable(cells, encoding)
        if reason is not None:
            yield row_error(_encoding_error("the row", reason, encoding), source)
            continue
        # CSV has no nulls: an empty cell means the value is absent.
        yield ManifestRow({key: value or None for key, value in zip(header, cells, strict=True)}, source)
