"""What each record holds, hashed before anything is embedded: per modality, the sha256 of its
text or media bytes (``records.media_digest``).

The digests serve twice. An incremental run keeps a record's previous row when the record's
content hash (``records.content_hash`` of its digests) is the row's (``incremental``). And content
that several records share (the same photo under two ids, the same caption) is embedded once:
``ShareContent`` groups the records to embed by (modality, digest), and the first of each group
(by input order) embeds it for the others (for ``MOST_COPIES`` of them at most). Like the
duplicate-id check, this moves only small keys (an id, its place and source), never a record, and
its result is small too: only records that share content are named in it.

Hashing a referenced file means fetching it here and again when it is embedded; local and
cached reads cost little beside the model, and the docs give the measured cost.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import apache_beam as beam

from mmfeatures import storage
from mmfeatures.errors import ErrorRow, Stage
from mmfeatures.host import available_cores
from mmfeatures.records import REFERENCE_COLUMNS, Record, media_digest

# What a record's content is before it is hashed: per modality, the digest of what the record
# carries (inline text, media bytes), or the location of the media still to fetch.
Pending = tuple[tuple[str, str, str], ...]  # (modality, "digest" | "fetch", digest or location)
Digests = tuple[tuple[str, str], ...]  # (modality, digest), in the record's modality order
PartKey = tuple[int, int]  # a part of an input: the input's index among the inputs, the part's among its parts
Place = tuple[PartKey, int]  # a row's part and position in it: places sort in input order
Copies = tuple[tuple[str, str], ...]  # the (id, source) of records that take another's vector

# Records one embedding is given to: content that a million records hold (a placeholder image) is
# embedded once per thousand of them, so that no record carries a million ids through the model.
MOST_COPIES = 1000

SHARES_TAG = "shares"  # per part: (position, modality, copies) of a record that embeds for copies
SERVED_TAG = "served"  # per part: (position, modality) whose vector another record embeds


def pending_content(record: Record) -> Pending | None:
    """What ``HashContent`` needs of ``record``: the digests of what it carries, the locations of
    the media to fetch; None for a record with a modality rejected while reading (its failure is
    reported, and it neither keeps a row nor shares a vector)."""
    if record.rejected:
        return None
    pending: list[tuple[str, str, str]] = []
    for name in record.modalities():
        payload = record.payloads[name]
        if isinstance(payload, bytes) or name not in REFERENCE_COLUMNS:
            pending.append((name, "digest", media_digest(payload)))
        else:
            try:
                pending.append((name, "fetch", storage.resolve_reference(payload, record.manifest_dir)))
            except (ValueError, OSError):
                return None  # a reference that cannot be resolved fails in the preparing step
    return tuple(pending)


Keyed = tuple[str, tuple[Place, str, Any]]  # (id, (place, source, pending content or its digests))


class _HashBatch(beam.DoFn):
    """Each record's digests, fetching its media in a pool of threads (reads wait side by side);
    a fetch that fails gives none, so the record is embedded alone and its error reported then."""

    def __init__(self, policy: storage.LocationPolicy, max_bytes: int | None):
        self.policy = policy
        self.max_bytes = max_bytes

    def setup(self) -> None:
        self._pool = ThreadPoolExecutor(max(4, 2 * available_cores()), "hash-content")

    def teardown(self) -> None:
        self._pool.shutdown(cancel_futures=True)

    def process(self, batch: list[Keyed]) -> Iterable[Keyed]:
        digests = self._pool.map(self._digests, [pending for _, (_, _, pending) in batch])
        return [
            (record_id, (place, source, found))
            for (record_id, (place, source, _)), found in zip(batch, digests, strict=True)
        ]

    def _digests(self, pending: Pending | None) -> Digests | None:
        if pending is None:
            return None
        digests = []
        for name, kind, value in pending:
            if kind == "fetch":
                try:
                    value = media_digest(storage.read_bytes(value, self.max_bytes, self.policy))
                except Exception:  # noqa: BLE001 - the preparing step fetches it again and reports why
                    return None
            digests.append((name, value))
        return tuple(digests)


class HashContent(beam.PTransform):
    """``(id, (place, source, pending))`` to ``(id, (place, source, digests or None))``."""

    def __init__(self, policy: storage.LocationPolicy, max_bytes: int | None):
        super().__init__()
        self.policy = policy
        self.max_bytes = max_bytes

    def expand(self, places: beam.PCollection) -> beam.PCollection:
        return (
            places
            | "Batch" >> beam.BatchElements(min_batch_size=16, max_batch_size=256)
            | "Hash" >> beam.ParDo(_HashBatch(self.policy, self.max_bytes))
        )


def _share(keyed: tuple[tuple[str, str], Iterable[tuple[Place, str, str]]]) -> Iterator[Any]:
    """The records of one (modality, digest): the first by place embeds it for the next
    ``MOST_COPIES``, the first after them for the next, and so on."""
    (modality, _), members = keyed
    ordered = sorted(members)
    for start in range(0, len(ordered), MOST_COPIES + 1):
        first, *copies = ordered[start : start + MOST_COPIES + 1]
        if not copies:
            return
        (part, position), _, _ = first
        named: Copies = tuple((record_id, source) for _, record_id, source in copies)
        yield beam.pvalue.TaggedOutput(SHARES_TAG, (part, (position, modality, named)))
        for (copy_part, copy_position), _, _ in copies:
            yield beam.pvalue.TaggedOutput(SERVED_TAG, (copy_part, (copy_position, modality)))


class ShareContent(beam.PTransform):
    """``((modality, digest), (place, id, source))`` of each record to embed, to what the second
    read needs per part of an input: ``shares`` and ``served`` (see above); both name only records that share."""

    def expand(self, content: beam.PCollection) -> beam.pvalue.DoOutputsTuple:
        return (
            content
            | "ByContent" >> beam.GroupByKey()
            | "Share" >> beam.FlatMap(_share).with_outputs(SHARES_TAG, SERVED_TAG)
        )


class Sharing:
    """What ``ShareContent`` found for one part of an input, for its second read: which of its
    records embed a modality for copies, and which take a modality's vector from another record."""

    def __init__(self, shares: Iterable[tuple[int, str, Copies]], served: Iterable[tuple[int, str]]):
        self._copies: dict[int, dict[str, Copies]] = {}
        for position, modality, copies in shares:
            self._copies.setdefault(position, {})[modality] = copies
        taken: dict[int, set[str]] = {}
        for position, modality in served:
            taken.setdefault(position, set()).add(modality)
        self._taken = {position: frozenset(modalities) for position, modalities in taken.items()}
        self._sent: set[int] = set()

    def mark(self, record: Record, position: int) -> Record:
        """The record read at ``position``, with what it shares; noted as sent."""
        copies, taken = self._copies.get(position), self._taken.get(position)
        if copies is None and taken is None:
            return record
        self._sent.add(position)
        return replace(record, copies=copies or {}, embedded_elsewhere=taken or frozenset())

    def unsent(self, source: str) -> Iterator[ErrorRow]:
        """An error row for each copy whose vector a record of this input was to embed but that
        was not sent (the part's input changed before its second read): nothing else would account for it."""
        for position, shared in self._copies.items():
            if position in self._sent:
                continue
            for modality, copies in shared.items():
                message = f"its {modality} is that of a record of {source}, which changed before it was read again"
                for record_id, copy_source in copies:
                    yield ErrorRow(record_id, modality, Stage.READ, "input_changed", message, copy_source)


def for_copies(row: ErrorRow, copies: Copies) -> list[ErrorRow]:
    """``row``, a failure of content that ``copies`` share, as each copy's own error row."""
    message = f"{row.message} (its {row.modality} is that of record {row.id})"
    return [replace(row, id=record_id, source=source, message=message) for record_id, source in copies]
