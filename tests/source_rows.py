"""What a source read, sorted: its rows and its error rows."""

from collections.abc import Iterable

from mmfeatures.errors import ErrorRow
from mmfeatures.sources import ManifestRow


def split(items: list[ManifestRow | ErrorRow]) -> tuple[list[ManifestRow], list[ErrorRow]]:
    """The rows and the error rows, each in read order; nothing else may be among ``items``."""
    rows = [item for item in items if isinstance(item, ManifestRow)]
    errors = [item for item in items if isinstance(item, ErrorRow)]
    assert len(rows) + len(errors) == len(items)
    return rows, errors


def rows_only(items: Iterable[ManifestRow | ErrorRow]) -> list[ManifestRow]:
    """The rows of a source that must hold no error row."""
    rows, errors = split(list(items))
    assert errors == []
    return rows
