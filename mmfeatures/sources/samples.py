"""Samples: the files that share a key, gathered into one record, as WebDataset lays them out.

A tar shard's members and a media folder's files are grouped the same way: the key is the file's
path up to its extension, and the extension says which column the content fills (``TAR_COLUMNS``:
".jpg" the image, ".txt" the text, ".cls" the label); a ".json" file holds an object of more
columns. A member that cannot be taken (too large, unreadable) fails its modality alone, or the
whole sample when it was to fill another column.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from mmfeatures.errors import ErrorRow, ManifestError, RecordError, ValidationError
from mmfeatures.limits import check_size
from mmfeatures.records import MODALITY_COLUMNS, REFERENCE_COLUMNS, TAR_COLUMNS, row_label
from mmfeatures.sources.base import ManifestRow


class Sample:
    """The members of one sample, gathered until the key changes."""

    def __init__(self, key: str, source: str) -> None:
        self.key = key
        self.source = source
        self.data: dict[str, Any] = {"id": key}
        self.rejected: dict[str, RecordError] = {}
        self.error: ManifestError | None = None
        self.taken = False  # whether any member was for a column: one that was not is its error row alone
        self.json_taken = False  # one ".json" member at most: each column holds one value, so a sample stays small

    def fill(self, column: str, value: Any) -> None:
        if column == "label" and column in self.data and _same_label(self.data[column], value):
            return  # the ".cls" member and the ".json" member's "label" agree: one label, no conflict
        if self._claim(column):
            self.data[column] = value

    def refuse(self, column: str | None, member: str, error: RecordError) -> None:
        """A member that cannot be taken (too large, unreadable): its modality fails alone and the
        rest of the sample goes on; a member for another column fails the whole sample."""
        if column in MODALITY_COLUMNS:
            if self._claim(column):
                self.rejected[column] = error
        else:
            self.fail(f"member {member!r}: {error}", error.error_type)

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
    ``max_bytes`` before anything is read; ``read`` raises ``RecordError`` for a member it cannot
    read."""
    sample.taken = True
    column = TAR_COLUMNS.get(extension)  # None: a ".json" member
    if media_location is not None and column in REFERENCE_COLUMNS:
        sample.fill(column, media_location)
        return
    if column is None:
        if sample.json_taken:
            sample.fail(f"member {name!r}: the sample has two .json members", "conflicting_member")
            return
        sample.json_taken = True
    try:
        check_size(size, max_bytes)
        data = read()
    except RecordError as exc:
        sample.refuse(column, name, exc)
        return
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
