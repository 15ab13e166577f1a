"""What every reader yields: rows tagged with where they came from, or error rows; and the
settings a run reads its inputs with."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mmfeatures import storage
from mmfeatures.errors import ErrorRow, ManifestError, RecordError


@dataclass(frozen=True)
class ManifestRow:
    data: dict[str, Any]
    source: str  # "path:line" (1-based; Parquet and Arrow count rows), or "path:key" for a tar sample
    rejected: Mapping[str, RecordError] = field(default_factory=dict)  # modalities refused while reading


# About how much of one large manifest one worker reads: a part of an uncompressed JSONL or CSV
# file holds at least this many bytes, one of a Parquet file row groups of about as many (see ``Part``).
PART_BYTES = 64 * 2**20


@dataclass(frozen=True)
class ReadOptions:
    """How a run reads its inputs; plain values, so it pickles to workers unchanged."""

    # --max-bytes: tar members, media-folder text files, manifest lines and Parquet or Arrow cells
    # over this are error rows, refused before they are read whole where the format allows it.
    max_member_bytes: int | None = None
    csv_encoding: str | None = None  # None: UTF-8 (a byte-order mark is skipped)
    csv_delimiter: str | None = None  # None: sniffed from the header line
    label_from_folder: bool = False  # media folders: a file's top folder under the input is its label
    columns: Mapping[str, str] = field(default_factory=dict)  # --columns: field -> input column
    timestamp_column: str | None = None  # --timestamp-column: the input column of each record's event time
    part_bytes: int = PART_BYTES  # how large a part of a manifest one worker reads (see ``Part``)


def row_error(exc: ManifestError, source: str, record_id: str | None = None) -> ErrorRow:
    """The error row of a row that cannot be read: ``source`` names its place; ``record_id`` its
    id, where the row had one that could still be read."""
    return ErrorRow.from_exception(exc, record_id=record_id, modality=None, source=source)


def unreadable(source: str, what: str, exc: Exception, lost: str = "", record_id: str | None = None) -> ErrorRow:
    """The one error row of a file that cannot be read past some damage (corrupt, truncated, not
    in its format): the rows read before it stay, and this row, whose ``source`` names the place
    of the damage, stands for all the rest."""
    error = ManifestError(f"the {what} cannot be read: {exc}{lost}", error_type="unreadable_manifest")
    return ErrorRow.from_exception(error, record_id=record_id, modality=None, source=source)


MEDIA_FOLDER = "media_folder"  # the format of a folder of media files grouped into records


@dataclass(frozen=True)
class Input:
    """One thing the job reads: a manifest file, a tar shard, a Parquet or Arrow file, or a folder
    of media files (``format`` MEDIA_FOLDER)."""

    path: str
    format: str
    split: str | None = None  # a save_to_disk DatasetDict's split, for rows that name none
    name: str | None = None  # the path under its --input pattern's fixed folder ("ds/train/x.arrow")

    @property
    def folder(self) -> str:
        """Where relative references are taken from: a manifest's folder, or a media folder itself."""
        return self.path.rstrip("/") if self.format == MEDIA_FOLDER else storage.parent(self.path)

    def derived_id(self, row_source: str) -> str:
        """The id of a row without one: its position in this input (``row_source`` is
        "path:position", as every reader writes it) after the input's name, so the id stays when
        the data set is moved (from a laptop to a bucket, say) and is read by the same pattern."""
        return (self.name or self.path) + row_source[len(self.path) :]


@dataclass(frozen=True)
class Part:
    """A piece of an input that one worker reads, so that a large manifest is read by several, as
    Beam's own text and Parquet sources split: the bytes ``[start, stop)`` of an uncompressed JSONL
    or CSV file, which begin and end on line boundaries (in a CSV, those that end rows), or the row
    groups ``[start, stop)`` of a Parquet file; ``first`` is the number of its first line or row in
    the whole file, so that its rows' sources, and the ids derived from them, are those of a read of
    the whole file. ``stop`` None: the whole input, the only part of any other input (see
    ``sources.cut_input``)."""

    source: Input
    index: int = 0  # its place among the input's parts
    start: int = 0
    stop: int | None = None
    first: int = 1
