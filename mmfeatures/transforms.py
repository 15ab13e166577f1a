"""The Beam composites of the job, in the order data flows through them:

ReadRecords -> EmbedModality (one per modality) -> JoinAndFuse -> sinks (see ``sinks.py``).
ReadRecords and EmbedModality return their main output and an ``errors`` PCollection of
``ErrorRow`` dicts; ReadRecords and JoinAndFuse also return ``counts`` for the run's summary.
"""

from __future__ import annotations

import collections
import copy
import datetime
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterable, Iterator, Mapping

import apache_beam as beam
import numpy as np
import pyarrow as pa
import torch
from apache_beam.ml.inference.base import RunInference
from apache_beam.metrics import Metrics
from apache_beam.utils.windowed_value import WindowedValue

from mmfeatures import storage
from mmfeatures.encoders.handler import BatchByCost, EmbeddingModelHandler, Outcome, device_type
from mmfeatures.errors import ERRORS_TAG, ErrorRow, Stage, ValidationError
from mmfeatures.fusion import Fusion
from mmfeatures.host import CPU_TURNS, available_cores, settle_worker_process
from mmfeatures.limits import check_size
from mmfeatures.modalities.base import Modality, Prepared, Window
from mmfeatures.progress import Progress
from mmfeatures.records import MODALITY_COLUMNS, Payload, Record, carried_column_name, parse_record, reported_id
from mmfeatures.schema import reserved_record_columns
from mmfeatures.sinks import add_value_types, merge_column_types
from mmfeatures.sources import declared_column_types, read_manifest

NAMESPACE = "mmfeatures"
COUNTS_TAG = "counts"  # dicts of counts, summed over the run for _run.json (see ``sum_counts``)
COLUMN_TYPES_TAG = "column_types"


def _error_output(row: ErrorRow) -> beam.pvalue.TaggedOutput:
    Metrics.counter(NAMESPACE, f"errors_{row.stage}").inc()
    return beam.pvalue.TaggedOutput(ERRORS_TAG, row.to_dict())


# -- read --------------------------------------------------------------------------------------


class _ReadManifest(beam.DoFn):
    """One manifest file to validated records (keyed by id, with their position for dedup), its
    counts (``rows_read``), and the types of its carried columns (its own schema for Parquet)."""

    def __init__(self, max_member_bytes: int | None):
        self.max_member_bytes = max_member_bytes

    def process(self, indexed_path: tuple[int, str]) -> Iterator[Any]:
        file_index, path = indexed_path
        manifest_dir = storage.parent(path)
        declared = declared_column_types(path)
        inferred: dict[str, pa.DataType | None] = {}
        rows = 0
        for row_number, item in enumerate(read_manifest(path, self.max_member_bytes)):
            rows += 1
            if isinstance(item, ErrorRow):
                yield _error_output(item)
                continue
            try:
                record = parse_record(item.data, source=item.source, manifest_dir=manifest_dir, rejected=item.rejected)
            except ValidationError as exc:
                yield _error_output(
                    ErrorRow.from_exception(
                        exc,
                        record_id=reported_id(item.data),
                        modality=None,
                        source=item.source,
                    )
                )
                continue
            if declared is None:
                add_value_types(inferred, record.carried)
            yield record.id, ((file_index, row_number), record)
        Metrics.counter(NAMESPACE, "rows_read").inc(rows)
        yield beam.pvalue.TaggedOutput(COUNTS_TAG, {"rows_read": rows})
        if declared is not None:
            reserved = reserved_record_columns()
            inferred = {carried_column_name(n): t for n, t in declared.items() if n not in reserved}
        yield beam.pvalue.TaggedOutput(COLUMN_TYPES_TAG, (file_index, inferred))


def _first_wins(keyed: tuple[str, Iterable[tuple[tuple[int, int], Record]]]) -> Iterator[Any]:
    """Duplicate ids: the first occurrence (by input order) is kept, the others are error rows. The
    kept record's rejected modalities become error rows here, so a duplicate's never count."""
    _, occurrences = keyed
    ordered = sorted(occurrences, key=lambda item: item[0])
    kept = ordered[0][1]
    yield kept
    for rejected in kept.rejected:
        yield _error_output(rejected)
    for _, duplicate in ordered[1:]:
        yield _error_output(
            ErrorRow(
                duplicate.id,
                None,
                Stage.VALIDATE,
                "duplicate_id",
                f"id {duplicate.id!r} first appears at {ordered[0][1].source}",
                duplicate.source,
            )
        )


class ReadRecords(beam.PTransform):
    """Manifest files (already expanded from globs) to unique, validated ``Record``s; a tar shard's
    members over ``max_member_bytes`` are refused unread."""

    def __init__(self, files: list[str], max_member_bytes: int | None = None):
        super().__init__()
        self.files = files
        self.max_member_bytes = max_member_bytes

    def expand(self, pbegin: beam.pvalue.PBegin) -> dict[str, beam.PCollection]:
        read = (
            pbegin
            | "Files" >> beam.Create(list(enumerate(self.files)))
            | "Spread" >> beam.Reshuffle()
            | "Parse"
            >> beam.ParDo(_ReadManifest(self.max_member_bytes)).with_outputs(
                ERRORS_TAG, COUNTS_TAG, COLUMN_TYPES_TAG, main="records"
            )
        )
        deduplicated = (
            read.records
            | "GroupById" >> beam.GroupByKey()
            | "FirstWins" >> beam.FlatMap(_first_wins).with_outputs(ERRORS_TAG, main="records")
        )
        errors = (read[ERRORS_TAG], deduplicated[ERRORS_TAG]) | "Errors" >> beam.Flatten()
        return {
            "records": deduplicated.records,
            ERRORS_TAG: errors,
            COUNTS_TAG: read[COUNTS_TAG],
            COLUMN_TYPES_TAG: read[COLUMN_TYPES_TAG],
        }


# -- embed -------------------------------------------------------------------------------------

# Records _Prepare keeps in flight, per device type of the model: enough to keep preparing while a
# GPU batch (512 images by default) runs, and a bound on memory (256 prepared 224x224 images are
# about 150 MB). On a CPU the preparing threads wait for the model anyway (see CoreTurns).
PREPARE_AHEAD = {"cpu": 256, "cuda": 2048}


def default_prepare_threads() -> int:
    """Threads preparing one modality: two per core, at least 4, as part of each is spent waiting
    for storage and part holding the GIL."""
    return max(4, 2 * available_cores())


class _Prepare(beam.DoFn):
    """Fetch (for media), decode and preprocess one modality of each record.

    The work runs in a pool of threads (``default_prepare_threads``) that keeps about ``ahead``
    records in flight, so remote fetches wait side by side, and decoding and preprocessing
    (OpenCV, soundfile, soxr, numpy and a tokenizer's batched calls release the GIL) run while the
    bundle's thread runs a GPU model downstream; beside a CPU model they take turns at the cores
    (``CoreTurns``), fetches excepted. Records go to the pool in groups of the modality's
    ``preprocess_batch_size`` (texts are tokenized 64 at a time, media one by one). Results leave
    in input order, each in its own record's window; the bundle's end waits for the last ones.
    Each pool thread has its own copy of the modality, since tokenizers and feature extractors
    are not safe to share between threads.
    """

    def __init__(self, modality: Modality, policy: storage.LocationPolicy, ahead: int):
        self.modality = modality
        self.policy = policy
        self.ahead = ahead

    def setup(self) -> None:
        self.modality.setup()  # once, before the pool threads set up their copies from its files
        settle_worker_process()
        # Torch runs single-threaded in the pool (feature extractors call it): the pool is the
        # parallelism, and each thread's own OpenMP team would spin on the cores the model needs
        # (the Whisper encoder ran 30% slower beside them). The setting is per thread.
        self._pool = ThreadPoolExecutor(
            default_prepare_threads(),
            f"prepare-{self.modality.name}",
            initializer=torch.set_num_threads,
            initargs=(1,),
        )
        self._thread_state = threading.local()

    def start_bundle(self) -> None:
        # Each group in flight: its future and, per record, the window and timestamp it leaves in.
        self._in_flight: collections.deque[tuple[Future[list[Any]], list[tuple[Any, Any]]]] = collections.deque()
        self._records_in_flight = 0
        self._grouping: list[tuple[Record, Any, Any]] = []

    def process(
        self, record: Record, window: Any = beam.DoFn.WindowParam, timestamp: Any = beam.DoFn.TimestampParam
    ) -> Iterator[Any]:
        self._grouping.append((record, window, timestamp))
        if len(self._grouping) >= self.modality.preprocess_batch_size:
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
            self._in_flight.append((self._pool.submit(self._prepare, records), places))
            self._records_in_flight += len(records)
            self._grouping = []

    def _completed(self, keep: int) -> Iterator[Any]:
        """The finished records at the head of the queue, waiting for the head while more than
        ``keep`` are in flight."""
        while self._in_flight and (self._records_in_flight > keep or self._in_flight[0][0].done()):
            future, places = self._in_flight.popleft()
            self._records_in_flight -= len(places)
            for result, (window, timestamp) in zip(future.result(), places):
                if isinstance(result, ErrorRow):
                    error = _error_output(result)  # counted here: metrics belong to the bundle's thread
                    yield beam.pvalue.TaggedOutput(ERRORS_TAG, WindowedValue(error.value, timestamp, (window,)))
                else:
                    yield WindowedValue(result, timestamp, (window,))

    def _modality(self) -> Modality:
        """This thread's own copy of the modality."""
        modality = getattr(self._thread_state, "modality", None)
        if modality is None:
            modality = self._thread_state.modality = copy.deepcopy(self.modality)
            modality.setup()
        return modality

    def _prepare(self, records: list[Record]) -> list[tuple[str, Prepared] | ErrorRow]:
        """Each record's windows, or its error row: any failure is the record's, never the run's."""
        modality = self._modality()
        decoded = [self._decode(modality, record) for record in records]
        ready = [index for index, (_, raw) in enumerate(decoded) if not isinstance(raw, ErrorRow)]
        CPU_TURNS.wait_for_cores()  # a model's turn may have begun while the group was decoded
        windows = dict(zip(ready, _preprocess_each(modality, [decoded[index][1] for index in ready])))
        results: list[tuple[str, Prepared] | ErrorRow] = []
        for index, (record, (source, raw)) in enumerate(zip(records, decoded)):
            outcome = windows.get(index)
            if isinstance(raw, ErrorRow):
                results.append(raw)
            elif isinstance(outcome, Exception):
                results.append(
                    ErrorRow.from_exception(outcome, record_id=record.id, modality=modality.name, source=source)
                )
            else:
                results.append((record.id, Prepared(outcome, source)))
        return results

    def _decode(self, modality: Modality, record: Record) -> tuple[str | None, Any]:
        """The record's source and its decoded value, or the error row of its fetch or decode."""
        source = record.source
        try:
            payload = record.payload(modality.name)
            content = modality.inline or isinstance(payload, bytes)
            if not content:
                source = storage.resolve_reference(payload, record.manifest_dir)
                self.policy.check(source)
                data: Payload = storage.read_bytes(source, modality.limits.max_bytes)
            else:  # inline text, or media bytes carried by the manifest itself (a tar shard)
                check_size(len(payload) if isinstance(payload, bytes) else None, modality.limits.max_bytes)
                data = payload
            CPU_TURNS.wait_for_cores()  # fetching overlaps a CPU model; decoding takes turns with it
            return source, modality.decode(data)
        except Exception as exc:  # noqa: BLE001 - any failure is this record's, never the run's
            return source, ErrorRow.from_exception(exc, record_id=record.id, modality=modality.name, source=source)


def _preprocess_each(modality: Modality, raws: list[Any]) -> list[list[Window] | Exception]:
    """Each raw value's windows, or the exception that preprocessing it raised: several in one call
    (``Modality.preprocess_batch``) and, where that call fails, each on its own, so that only the
    value that failed fails."""
    if len(raws) > 1:
        try:
            batched = list(modality.preprocess_batch(raws))
            if len(batched) == len(raws):
                return batched
        except Exception:  # noqa: BLE001 - found and reported per value below
            pass
    outcomes: list[list[Window] | Exception] = []
    for raw in raws:
        try:
            outcomes.append(modality.preprocess(raw))
        except Exception as exc:  # noqa: BLE001 - this value's error row
            outcomes.append(exc)
    return outcomes


def _split_outcome(outcome: Outcome, modality: str) -> Iterator[Any]:
    if outcome.error is not None:
        yield _error_output(
            ErrorRow.from_exception(
                outcome.error, record_id=outcome.record_id, modality=modality, source=outcome.source
            )
        )
        return
    Metrics.counter(NAMESPACE, f"{modality}_embedded").inc()
    yield outcome.record_id, (modality, outcome.vector)


class EmbedModality(beam.PTransform):
    """Records holding ``modality`` to ``(id, (modality, vector))`` pairs: prepared in a pool of
    threads, batched by cost one length bucket at a time, and embedded by RunInference. The
    keyword arguments are ``EmbeddingModelHandler``'s (batch limits, device, precision, threads,
    model copies)."""

    def __init__(
        self,
        modality: Modality,
        *,
        location_policy: storage.LocationPolicy | None = None,
        **handler_options: Any,
    ):
        super().__init__()
        self.modality = modality
        self.location_policy = location_policy or storage.LocationPolicy()
        self.handler = EmbeddingModelHandler(modality, **handler_options)

    def expand(self, records: beam.PCollection) -> dict[str, beam.PCollection]:
        name = self.modality.name
        ahead = PREPARE_AHEAD[device_type(self.handler.device)]
        prepared = (
            records
            | "Holding" >> beam.Filter(lambda record, m=name: record.payload(m) is not None)
            | "Prepare"
            >> beam.ParDo(_Prepare(self.modality, self.location_policy, ahead)).with_outputs(
                ERRORS_TAG, main="prepared"
            )
        )
        embedded = (
            prepared.prepared
            | "BatchByCost" >> BatchByCost(self.handler)
            | "RunInference" >> RunInference(self.handler)
            | "Split" >> beam.FlatMap(_split_outcome, name).with_outputs(ERRORS_TAG, main="embeddings")
        )
        errors = (prepared[ERRORS_TAG], embedded[ERRORS_TAG]) | "Errors" >> beam.Flatten()
        return {"embeddings": embedded.embeddings, ERRORS_TAG: errors}


# -- join and fuse -----------------------------------------------------------------------------


def tally(record: Record, embedded: Iterable[str], failed: Iterable[str]) -> dict[str, int]:
    """One record's contribution to the run's counts."""
    embedded, failed = set(embedded), set(failed)
    counts = {"records_accepted": 1, "records_with_features": int(bool(embedded))}
    for modality in MODALITY_COLUMNS:
        counts[f"{modality}.present"] = int(record.payload(modality) is not None or modality in failed)
        counts[f"{modality}.embedded"] = int(modality in embedded)
        counts[f"{modality}.failed"] = int(modality in failed)
    return counts


class _Fuse(beam.DoFn):
    """A record joined with its embeddings and failures to its feature row. Its counts are summed
    per bundle and window, and leave once at the bundle's end: one dict per record, pickled across
    the stage boundary, had cost 0.1 s per 4,000 records."""

    def __init__(self, fusion: Fusion, event_timestamp: datetime.datetime):
        self.fusion = fusion
        self.event_timestamp = event_timestamp
        self._progress = Progress("records fused", every=1000)

    def start_bundle(self) -> None:
        self._counts: dict[Any, collections.Counter[str]] = collections.defaultdict(collections.Counter)

    def finish_bundle(self) -> Iterator[Any]:
        for window, counts in self._counts.items():
            yield beam.pvalue.TaggedOutput(COUNTS_TAG, WindowedValue(dict(counts), window.max_timestamp(), (window,)))

    def process(
        self, joined: tuple[str, Mapping[str, list[Any]]], window: Any = beam.DoFn.WindowParam
    ) -> Iterator[Any]:
        record_id, groups = joined
        self._progress.add()
        (record,) = groups["record"]
        embeddings: dict[str, np.ndarray] = dict(groups["embeddings"])
        failed = sorted(set(groups["failed"]))
        self._counts[window].update(tally(record, embeddings, failed))
        if not embeddings:  # every modality failed: the error rows alone account for the record
            return
        row: dict[str, Any] = dict(record.carried)
        row.update(
            id=record.id,
            label=record.label,
            split=record.split,
            fused=self.fusion.fuse(embeddings),
            failed_modalities=failed,
            event_timestamp=self.event_timestamp,
        )
        for modality in MODALITY_COLUMNS:
            row[f"{modality}_embedding"] = embeddings.get(modality)
            row[f"has_{modality}"] = modality in embeddings
        yield row


class JoinAndFuse(beam.PTransform):
    """Join each record with its embeddings and failures by id; emit feature rows and the records'
    counts (``tally``), summed per bundle."""

    def __init__(self, fusion: Fusion, event_timestamp: datetime.datetime):
        super().__init__()
        self.fusion = fusion
        self.event_timestamp = event_timestamp

    def expand(self, inputs: Mapping[str, beam.PCollection]) -> dict[str, beam.PCollection]:
        keyed_records = inputs["records"] | "KeyRecords" >> beam.Map(
            lambda record: (record.id, record.without_content())
        )
        failed = (
            inputs["errors"]
            | "ModalityFailures" >> beam.Filter(lambda row: row["modality"] is not None and row["id"] is not None)
            | "KeyFailures" >> beam.Map(lambda row: (row["id"], row["modality"]))
        )
        fused = (
            {"record": keyed_records, "embeddings": inputs["embeddings"], "failed": failed}
            | "Join" >> beam.CoGroupByKey()
            | "Fuse" >> beam.ParDo(_Fuse(self.fusion, self.event_timestamp)).with_outputs(COUNTS_TAG, main="features")
        )
        return {"features": fused.features, COUNTS_TAG: fused[COUNTS_TAG]}


# -- what the sinks need -----------------------------------------------------------------------


class FeatureSchema(beam.PTransform):
    """Per-manifest column types to the feature table's schema (a singleton): the declared
    columns, then the carried ones in input order, each with one type over the whole run."""

    def __init__(self, build: Callable[[Mapping[str, pa.DataType]], pa.Schema]):
        super().__init__()
        self.build = build

    def expand(self, column_types: beam.PCollection) -> beam.PCollection:
        return (
            column_types
            | "Gather" >> beam.combiners.ToList()
            | "Schema" >> beam.Map(lambda per_file: self.build(merge_column_types(t for _, t in sorted(per_file))))
        )


def sum_counts(tallies: Iterable[Mapping[str, int]]) -> dict[str, int]:
    """The run's counts, summed key by key: rows read per manifest, records' ``tally`` and error
    rows' ``error_tally`` go through one combine, as the three kinds never share a key."""
    total: collections.Counter[str] = collections.Counter()
    for counts in tallies:
        total.update(counts)
    return dict(total)
