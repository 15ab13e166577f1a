"""Batches weighed by cost: prepared records cut into the batches that ``RunInference`` embeds."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import apache_beam as beam
from apache_beam.utils.windowed_value import WindowedValue

from mmfeatures.modalities.base import Prepared, Preprocessor
from mmfeatures.records import Record
from mmfeatures.settings import InferenceSettings

Keyed = tuple[Record, Prepared | None]  # a record and its model input; None: it passes on

# Records that pass on without the model go out this many at a time, for RunInference's own
# cost per batch to weigh little.
PASSING_BATCH = 64


@dataclass
class _Bucket:
    items: list[tuple[Record, Prepared]] = field(default_factory=list)
    cost: int = 0
    windows: int = 0


class CostBatcher:
    """Cuts a stream of prepared records into batches of about ``max_batch_cost`` input values.

    Records are bucketed by the padded length of their longest window, so a batch holds records of
    one length and its micro-batches are full rows, not padding; a bucket goes out once it holds
    ``max_batch_cost`` or ``micro_batches_per_batch`` micro-batches (and at least one), cut to a
    whole number of micro-batches with the rest kept for the next batch. When all buckets together
    hold more than the preprocessor's ``buffered_batches`` batches' worth (memory stays bounded by
    the batch size, whatever the input's size or spread of lengths), the fullest goes out early. Records with
    nothing to embed go out in batches of their own (``PASSING_BATCH``). ``flush`` empties every
    bucket.
    """

    def __init__(self, preprocessor: Preprocessor, settings: InferenceSettings):
        self.preprocessor = preprocessor
        self.max_batch_cost = settings.max_batch_cost
        self.micro_batch_size = settings.micro_batch_size
        self.micro_batches_per_batch = settings.micro_batches_per_batch
        self._buckets: dict[int, _Bucket] = defaultdict(_Bucket)
        self._buffered_cost = 0
        self._passing: list[Keyed] = []

    def add(self, item: Keyed) -> Iterator[list[Keyed]]:
        """Buffer one record; yield the batches it completes."""
        prepared = item[1]
        if prepared is None:
            self._passing.append(item)
            if len(self._passing) >= PASSING_BATCH:
                yield self._passing
                self._passing = []
            return
        length = max(self.preprocessor.padded_length(window) for window in prepared.windows)
        bucket = self._buckets[length]
        bucket.items.append((item[0], prepared))
        bucket.cost += prepared.cost
        bucket.windows += len(prepared.windows)
        self._buffered_cost += prepared.cost
        rows = self.micro_batch_size
        enough = bucket.cost >= self.max_batch_cost or bucket.windows >= self.micro_batches_per_batch * rows
        if enough and bucket.windows >= rows:
            yield self._cut(length)
        while self._buffered_cost > self.preprocessor.buffered_batches * self.max_batch_cost:
            yield self._cut(max(self._buckets, key=lambda key: self._buckets[key].cost))

    def flush(self) -> Iterator[list[Keyed]]:
        """Every buffered record, one batch per bucket."""
        if self._passing:
            yield self._passing
            self._passing = []
        for length in sorted(self._buckets):
            bucket = self._buckets.pop(length)
            self._buffered_cost -= bucket.cost
            yield list(bucket.items)

    def _cut(self, length: int) -> list[Keyed]:
        """The bucket's oldest records that fill whole micro-batches (all of them if none do)."""
        bucket = self._buckets[length]
        take, windows = len(bucket.items), 0
        for index, (_, prepared) in enumerate(bucket.items, start=1):
            windows += len(prepared.windows)
            if windows % self.micro_batch_size == 0:
                take = index
        batch, bucket.items = bucket.items[:take], bucket.items[take:]
        cost = sum(prepared.cost for _, prepared in batch)
        bucket.cost -= cost
        bucket.windows -= sum(len(prepared.windows) for _, prepared in batch)
        self._buffered_cost -= cost
        if not bucket.items:
            del self._buckets[length]
        return list(batch)


class _BatchByCostFn(beam.DoFn):
    """A ``CostBatcher`` per window, emptied at the end of each bundle."""

    def __init__(self, preprocessor: Preprocessor, settings: InferenceSettings):
        self.preprocessor = preprocessor
        self.settings = settings

    def start_bundle(self) -> None:
        self._batchers: dict[Any, CostBatcher] = {}

    def process(self, item: Keyed, window: Any = beam.DoFn.WindowParam) -> Iterator[list[Keyed]]:
        if window not in self._batchers:
            self._batchers[window] = CostBatcher(self.preprocessor, self.settings)
        yield from self._batchers[window].add(item)

    def finish_bundle(self) -> Iterator[WindowedValue]:
        for window, batcher in self._batchers.items():
            for batch in batcher.flush():
                yield WindowedValue(batch, window.max_timestamp(), (window,))
        self._batchers = {}


class BatchByCost(beam.PTransform):
    """``(record, Prepared or None)`` pairs to batches of them (see ``CostBatcher``)."""

    def __init__(self, preprocessor: Preprocessor, settings: InferenceSettings):
        super().__init__()
        self.preprocessor = preprocessor
        self.settings = settings

    def expand(self, records: beam.PCollection) -> beam.PCollection:
        return records | beam.ParDo(_BatchByCostFn(self.preprocessor, self.settings))
