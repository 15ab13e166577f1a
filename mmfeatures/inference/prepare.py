"""The preparing step: each record's payload fetched, decoded and preprocessed into windows, in a
pool of threads that keeps the model supplied."""

from __future__ import annotations

import collections
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import apache_beam as beam
import torch
from apache_beam.utils.windowed_value import WindowedValue

from mmfeatures import storage
from mmfeatures.content import for_copies
from mmfeatures.counts import error_output
from mmfeatures.errors import ERRORS_TAG, ErrorRow
from mmfeatures.host import CPU_TURNS, available_cores, settle_worker_process
from mmfeatures.limits import check_size
from mmfeatures.modalities.base import Prepared, Preprocessor, Window
from mmfeatures.records import Payload, Record, media_digest

# Media bytes that records carry (tar members, binary columns) held ahead of the model, in files of
# --max-bytes: a few at most, however many records ``ahead`` allows.
CARRIED_FILES_AHEAD = 4


def default_prepare_threads() -> int:
    """Threads preparing one modality: two per core, at least 4, as part of each is spent waiting
    for storage and part holding the GIL."""
    return max(4, 2 * available_cores())


class Prepare(beam.DoFn):
    """Fetch (for media), decode and preprocess one modality of each record that embeds it, to
    ``(record, Prepared)``, or, where that fails, its error rows (and its copies') and ``(record``
    with the modality failed, ``None)``; any other record passes on at once as ``(record, None)``.

    The work runs in a pool of threads (``default_prepare_threads``) that keeps about ``ahead``
    records in flight, so remote fetches wait side by side, and decoding and preprocessing
    (OpenCV, soundfile, soxr, numpy and a tokenizer's batched calls release the GIL) run while the
    bundle's thread runs a GPU model downstream; beside a CPU model they take turns at the cores
    (``CoreTurns``), fetches excepted. Media bytes carried by the records in flight are held to
    ``CARRIED_FILES_AHEAD`` times ``--max-bytes``. Records go to the pool in groups of the preprocessor's
    ``preprocess_batch_size`` (texts are tokenized many at a time, media one by one). Results leave
    in input order, each in its own record's window; the bundle's end waits for the last ones.
    """

    def __init__(self, preprocessor: Preprocessor, policy: storage.LocationPolicy, ahead: int):
        self.preprocessor = preprocessor
        self.policy = policy
        self.ahead = ahead

    def setup(self) -> None:
        settle_worker_process()
        _ = self.preprocessor.resolved  # once, before the threads start: a remote model is copied once
        self._pool = ThreadPoolExecutor(
            default_prepare_threads(), f"prepare-{self.preprocessor.name}", initializer=self._start_thread
        )

    def _start_thread(self) -> None:
        """Each pool thread's set-up: its own tools, and torch single-threaded (feature extractors
        call it): the pool is the parallelism, and each thread's own OpenMP team would spin on the
        cores the model needs. A failure here breaks the pool, and so fails the bundle."""
        torch.set_num_threads(1)
        self.preprocessor.load_tools()

    def start_bundle(self) -> None:
        # Each group in flight: its future, its carried bytes and, per record, the window and
        # timestamp it leaves in.
        self._in_flight: collections.deque[tuple[Future[list[Any]], int, list[tuple[Any, Any]]]] = collections.deque()
        self._records_in_flight = 0
        self._bytes_in_flight = 0
        self._grouping: list[tuple[Record, Any, Any]] = []

    def process(
        self, record: Record, window: Any = beam.DoFn.WindowParam, timestamp: Any = beam.DoFn.TimestampParam
    ) -> Iterator[Any]:
        if not record.embeds(self.preprocessor.name):  # passes on at once, for the next modality
            yield record, None
            return
        self._grouping.append((record, window, timestamp))
        if len(self._grouping) >= self.preprocessor.preprocess_batch_size:
            self._submit_group()
        yield from self._completed(keep=self.ahead)

    def finish_bundle(self) -> Iterator[Any]:
        self._submit_group()
        yield from self._completed(keep=0)

    def teardown(self) -> None:
        self._pool.shutdown(cancel_futures=True)

    def _submit_group(self) -> None:
        if self._grouping:
            records = [record for record, _, _ in self._grouping]
            places = [(window, timestamp) for _, window, timestamp in self._grouping]
            # Every modality's: a record held here keeps all of its bytes alive, not only this one's.
            payloads = (payload for record in records for payload in record.payloads.values())
            carried = sum(len(payload) for payload in payloads if isinstance(payload, bytes))
            self._in_flight.append((self._pool.submit(self._prepare, records), carried, places))
            self._records_in_flight += len(records)
            self._bytes_in_flight += carried
            self._grouping = []

    def _completed(self, keep: int) -> Iterator[Any]:
        """The finished records at the head of the queue, waiting for the head while more than
        ``keep`` are in flight, or more carried bytes than ``CARRIED_FILES_AHEAD`` files' worth."""
        most_bytes = CARRIED_FILES_AHEAD * self.preprocessor.limits.max_bytes
        while self._in_flight and (
            self._records_in_flight > keep or self._bytes_in_flight > most_bytes or self._in_flight[0][0].done()
        ):
            future, carried, places = self._in_flight.popleft()
            self._records_in_flight -= len(places)
            self._bytes_in_flight -= carried
            for (record, result), (window, timestamp) in zip(future.result(), places, strict=True):
                if isinstance(result, ErrorRow):
                    for row in [result, *for_copies(result, record.copies.get(self.preprocessor.name, ()))]:
                        error = error_output(row)  # counted here: metrics belong to the bundle's thread
                        yield beam.pvalue.TaggedOutput(ERRORS_TAG, WindowedValue(error.value, timestamp, (window,)))
                    yield WindowedValue((record.with_failure(self.preprocessor.name), None), timestamp, (window,))
                else:
                    yield WindowedValue((record, result), timestamp, (window,))

    def _prepare(self, records: list[Record]) -> list[tuple[Record, Prepared | ErrorRow]]:
        """Each record with its windows, or with the error row that says why it has none: any
        failure is the record's, never the run's."""
        name = self.preprocessor.name
        decoded = [self._decode(record) for record in records]
        ready = [index for index, (_, raw, _) in enumerate(decoded) if not isinstance(raw, ErrorRow)]
        CPU_TURNS.wait_for_cores()  # a model's turn may have begun while the group was decoded
        windows = dict(zip(ready, preprocess_each(self.preprocessor, [decoded[i][1] for i in ready]), strict=True))
        results: list[tuple[Record, Prepared | ErrorRow]] = []
        for index, (record, (source, raw, digest)) in enumerate(zip(records, decoded, strict=True)):
            outcome = windows.get(index)
            if isinstance(raw, ErrorRow):
                results.append((record, raw))
            elif isinstance(outcome, Exception):
                results.append(
                    (record, ErrorRow.from_exception(outcome, record_id=record.id, modality=name, source=source))
                )
            else:
                assert outcome is not None
                results.append((record, Prepared(outcome, source, digest)))
        return results

    def _decode(self, record: Record) -> tuple[str | None, Any, str | None]:
        """The record's source, its decoded value (or the error row of its fetch or decode) and
        the digest of the bytes or text it was decoded from."""
        preprocessor = self.preprocessor
        source: str | None = record.source
        digest: str | None = None
        try:
            payload = record.payload(preprocessor.name)
            assert payload is not None  # records reach this step only for the modalities they hold
            data: Payload
            if preprocessor.inline or isinstance(payload, bytes):
                # inline text, or media bytes carried by the manifest itself (a tar shard)
                check_size(len(payload) if isinstance(payload, bytes) else None, preprocessor.limits.max_bytes)
                data = payload
            else:
                source = storage.resolve_reference(payload, record.manifest_dir)
                data = storage.read_bytes(source, preprocessor.limits.max_bytes, self.policy)
            digest = media_digest(data)
            CPU_TURNS.wait_for_cores()  # fetching overlaps a CPU model; decoding takes turns with it
            return source, preprocessor.decode(data), digest
        except Exception as exc:  # noqa: BLE001 - any failure is this record's, never the run's
            error = ErrorRow.from_exception(exc, record_id=record.id, modality=preprocessor.name, source=source)
            return source, error, digest


def preprocess_each(preprocessor: Preprocessor, raws: list[Any]) -> list[list[Window] | Exception]:
    """Each raw value's windows, or the exception that preprocessing it raised: several in one call
    (``Preprocessor.preprocess_batch``) and, where that call fails, each on its own, so that only
    the value that failed fails."""
    if len(raws) > 1:
        try:
            batched: list[list[Window] | Exception] = list(preprocessor.preprocess_batch(raws))
            if len(batched) == len(raws):
                return batched
        except Exception:  # noqa: BLE001 - found and reported per value below
            pass
    outcomes: list[list[Window] | Exception] = []
    for raw in raws:
        try:
            outcomes.append(preprocessor.preprocess(raw))
        except Exception as exc:  # noqa: BLE001 - this value's error row
            outcomes.append(exc)
    return outcomes
