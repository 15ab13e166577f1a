"""What one run is, resolved from its options before any data moves: the input files, the
modalities and their models, the fusion, the output layout, and the metadata the tables carry."""

from __future__ import annotations

import datetime
import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
from apache_beam.options.pipeline_options import GoogleCloudOptions, PipelineOptions, StandardOptions
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from mmfeatures import __version__, outputs, schema, storage
from mmfeatures.counts import RunCounts
from mmfeatures.errors import ConfigurationError
from mmfeatures.fusion import Fusion, parse_weights
from mmfeatures.incremental import PreviousTable, settings_fingerprint
from mmfeatures.limits import Limits
from mmfeatures.modalities import MODALITIES, Preprocessor
from mmfeatures.options import IN_PROCESS_RUNNERS, ExtractOptions, check_options, extract_option_values
from mmfeatures.records import MODALITY_COLUMNS, parse_column_map
from mmfeatures.redaction import redact, redact_all
from mmfeatures.settings import InferenceSettings, default_runtime, device_type
from mmfeatures.sources import Input, ReadOptions, checked_delimiter, checked_encoding, find_inputs


@dataclass
class Job:
    inputs: list[Input]
    read_options: ReadOptions
    output: str
    preprocessors: dict[str, Preprocessor]
    settings: dict[str, InferenceSettings]
    fusion: Fusion
    rows_per_file: int
    lease_seconds: int
    fingerprint: str  # of every setting that changes a vector (``incremental.settings_fingerprint``)
    incremental: bool
    drop_missing: bool
    previous: PreviousTable | None  # with --incremental: the table committed at OUTPUT, if any
    partition_by: str | None
    spread_records: bool  # shuffle records over the workers: not on an in-process runner
    limits: Limits
    location_policy: storage.LocationPolicy
    options: dict[str, Any]
    started: datetime.datetime = field(default_factory=lambda: datetime.datetime.now(datetime.timezone.utc))
    models: dict[str, Any] = field(default_factory=dict)
    run: str = field(default_factory=lambda: f"run-{uuid.uuid4().hex}")  # its staging folder and lease

    @classmethod
    def from_options(cls, options: PipelineOptions) -> Job:
        """Resolve a run from its options; anything wrong with them is a ``ConfigurationError``
        raised here, before any data moves."""
        started = datetime.datetime.now(datetime.timezone.utc)
        try:
            return cls._from_options(options, started)
        except (ValueError, OSError, ImportError) as exc:
            # OSError: an input or model folder that cannot be listed or copied is a configuration
            # problem too, and so is ImportError: a URL scheme whose fsspec library is missing.
            # ``from None``: the cause's text may hold a signed URL, which a printed traceback
            # would show; the message itself is redacted.
            raise ConfigurationError(redact(str(exc))) from None

    @classmethod
    def _from_options(cls, options: PipelineOptions, started: datetime.datetime) -> Job:
        extract = options.view_as(ExtractOptions)
        if not extract.input:
            raise ValueError("--input is required (a manifest path or glob)")
        if not extract.output:
            raise ValueError("--output is required (a local folder or fsspec URL)")
        check_options(extract)
        if options.view_as(GoogleCloudOptions).template_location:
            raise ValueError(
                "--template_location: a classic Dataflow template fixes the run's id, commit and lease when it is "
                "built, so its launches would share them; use a Flex Template, which builds the job at each launch"
            )
        limits = Limits(
            max_bytes=extract.max_bytes,
            max_pixels=extract.max_pixels,
            max_audio_seconds=extract.max_audio_seconds,
            max_text_chars=extract.max_text_chars,
        )
        weights = parse_weights(extract.fusion_weights)
        settings = {
            name: InferenceSettings.for_modality(
                name,
                MODALITIES[name].preprocessor.batch_cost,
                device=extract.device,
                precision=extract.precision,
                max_batch_cost=getattr(extract, f"{name}_batch_cost"),
                micro_batch_size=extract.micro_batch_size,
                threads=extract.torch_threads,
                model_copies=extract.model_copies,
                runtime=MODALITIES[name].runtime(extract.runtime or default_runtime(extract.device, extract.precision)),
            )
            for name in MODALITY_COLUMNS
        }
        columns = parse_column_map(extract.columns or "")
        read_options = ReadOptions(
            max_member_bytes=limits.max_bytes,
            csv_encoding=checked_encoding(extract.csv_encoding),
            csv_delimiter=checked_delimiter(extract.csv_delimiter),
            label_from_folder=extract.label_from_folder,
            columns=columns,
            timestamp_column=_checked_timestamp_column(extract.timestamp_column, columns),
        )
        _check_partition_column(extract.partition_by)
        if extract.drop_missing and not extract.incremental:
            raise ValueError("--drop-missing drops the rows of an incremental run's absent records: add --incremental")
        check_output(extract.output)  # before the preprocessors read their models' settings
        inputs = find_inputs(extract.input)  # a format no reader takes is refused here, not by a worker
        location_policy = storage.LocationPolicy.from_roots(_allowed_roots(extract.allowed_roots or [], inputs))
        preprocessors = {
            name: MODALITIES[name].preprocessor(getattr(extract, f"{name}_model"), limits) for name in MODALITY_COLUMNS
        }
        # Redacted once, here: a model folder may be a signed URL, and these go into every output.
        models = redact_all({name: MODALITIES[name].describe(p) for name, p in preprocessors.items()})
        fusion = Fusion(
            method=extract.fusion,
            dims={name: models[name]["dimension"] for name in MODALITY_COLUMNS},
            weights=weights,
            projection_dim=extract.fusion_dim,
            seed=extract.fusion_seed,
        )
        runtimes = {name: s.runtime for name, s in settings.items()}
        fingerprint = settings_fingerprint(
            models, fusion.describe(), extract.precision, device_type(extract.device), runtimes
        )
        previous = PreviousTable.at(extract.output, fingerprint) if extract.incremental else None
        if previous is not None and not previous.usable and not extract.drop_missing:
            raise ValueError(
                f"--incremental: the table at {extract.output} was made with other settings (models, "
                "preprocessing, fusion, precision or device), so every row is computed again, and the rows "
                "of records absent from this run's inputs cannot be kept: add --drop-missing, or run without "
                "--incremental"
            )
        recorded = extract_option_values(options)
        recorded["runner"] = str(options.view_as(StandardOptions).runner)
        recorded["micro_batch_size"] = ",".join(f"{name}={s.micro_batch_size}" for name, s in settings.items())
        recorded["runtime"] = ",".join(f"{name}={runtime}" for name, runtime in runtimes.items())
        recorded.update({f"{name}_batch_cost": s.max_batch_cost for name, s in settings.items()})
        return cls(
            inputs=inputs,
            read_options=read_options,
            output=extract.output,
            preprocessors=preprocessors,
            settings=settings,
            fusion=fusion,
            rows_per_file=extract.rows_per_file,
            lease_seconds=extract.lease_seconds,
            fingerprint=fingerprint,
            incremental=extract.incremental,
            drop_missing=extract.drop_missing,
            previous=previous,
            partition_by=extract.partition_by,
            spread_records=recorded["runner"] not in IN_PROCESS_RUNNERS,
            limits=limits,
            location_policy=location_policy,
            options=recorded,
            started=started,
            models=models,
        )

    def path(self, *parts: str) -> str:
        return storage.join(self.output, *parts)

    def staging(self, table: str) -> str:
        """Where the run stages ``table``'s parts until its commit."""
        return self.path(outputs.STAGING, self.run, table)

    @property
    def commit(self) -> str:
        """The name of the run's commit, which its parts carry: it sorts by start time, and stays
        the same if the commit step is retried."""
        return f"{self.started:%Y%m%dT%H%M%SZ}-{self.run[-8:]}"

    def metadata(self) -> dict[str, Any]:
        """The JSON every feature file carries under the ``mmfeatures`` key: how its vectors were
        made, the same for every run of the same settings, so that a part a later run keeps whole
        is copied as it is. When a run made it is in ``_run.json``."""
        return {
            "package_version": __version__,
            "schema_version": schema.SCHEMA_VERSION,
            "modalities": self.models,
            "fusion": self.fusion.describe(),
            "fingerprint": self.fingerprint,
        }

    def features_schema(self, carried: Mapping[str, pa.DataType]) -> pa.Schema:
        dims = {name: model["dimension"] for name, model in self.models.items()}
        dims["fused"] = self.fusion.output_dim
        table = schema.features_schema(dims, carried, self.metadata())
        if self.partition_by is not None:
            try:
                schema.partition_column(table, self.partition_by)
            except ValueError as exc:  # known only once the inputs' columns are: a run fails here
                raise ConfigurationError(f"--partition-by: {exc}") from None
        return table

    def summary(self, *, counts: RunCounts, features: Mapping[str, int], errors: Mapping[str, int]) -> dict[str, Any]:
        """``_run.json``: every count comes from the data the run produced and wrote. Every string
        in it is redacted (inputs, outputs, options, model references): no credential or signed
        URL is ever written there."""
        accepted = counts.records_accepted
        modalities: dict[str, dict[str, Any]] = {}
        for name in MODALITY_COLUMNS:
            modality = counts.modality(name)
            modalities[name] = {
                "present": modality.present,
                "embedded": modality.embedded,
                "shared": modality.shared,
                "kept": modality.kept,
                "failed": modality.failed,
                "absent": accepted - modality.present,
                "runtime": self.settings[name].runtime,
                # Where the runtime asked could not take the model: the records embedded on torch instead.
                "fallback": (
                    {"runtime": "torch", "embedded": modality.on_torch_instead, "reason": modality.fallback}
                    if modality.on_torch_instead
                    else None
                ),
            }
        records = {
            "read": counts.rows_read,
            "rejected": counts.rejected_rows,
            "accepted": accepted,
            "with_features": counts.records_with_features,
            "without_features": accepted - counts.records_with_features,
        }
        checks = {
            "every_row_accounted_for": records["read"] == records["rejected"] + accepted,
            "feature_rows_match": features["rows"] == counts.records_with_features + counts.rows_kept_absent,
            "error_rows_match": errors["rows"] == counts.error_rows,
            "modalities_reconcile": all(
                c["present"] == c["embedded"] + c["kept"] + c["failed"] for c in modalities.values()
            ),
        }
        changes = self._changes(counts) if self.incremental else None
        if changes is not None:
            checks["previous_rows_accounted_for"] = changes["previous_rows"] == sum(
                changes[kind] for kind in ("unchanged", "replaced", "dropped", "kept_absent")
            )
            checks["feature_rows_accounted_for"] = features["rows"] == sum(
                changes[kind] for kind in ("unchanged", "added", "replaced", "kept_absent")
            )
        return redact_all(
            {
                "records": records,
                "feature_rows": features["rows"],
                "feature_files": features["files"],
                "error_rows": errors["rows"],
                "errors_by_type": dict(sorted(counts.errors_by_type.items())),
                "modalities": modalities,
                "incremental": changes,
                "reconciles": all(checks.values()),
                "checks": checks,
                "models": self.models,
                "fusion": self.fusion.describe(),
                "fingerprint": self.fingerprint,
                "options": self.options,
                "inputs": [source.path for source in self.inputs],
                "outputs": {"features": self.path("features"), "errors": self.path("errors")},
                "started": self.started.isoformat(),
                "package_version": __version__,
            }
        )

    def _changes(self, counts: RunCounts) -> dict[str, Any]:
        """What an incremental run did to the table it replaces, row by row: each previous row is
        unchanged (kept), replaced, dropped or kept though its record is absent; each row of the
        new table is unchanged, added, replaced or kept absent."""
        previous = self.previous
        return {
            "previous_commit": previous.commit if previous else None,
            "previous_rows": previous.rows if previous else 0,
            "unchanged": counts.rows_unchanged,
            "added": counts.rows_added,
            "replaced": counts.rows_replaced,
            "dropped": counts.rows_dropped,
            "kept_absent": counts.rows_kept_absent,
        }


def _check_partition_column(column: str | None) -> None:
    """``--partition-by``: refused before any work where no input could give the table such a
    column (``schema.check_partition_name``); its presence and type are known only from the data."""
    if column is not None:
        try:
            schema.check_partition_name(column)
        except ValueError as exc:
            raise ValueError(f"--partition-by: {exc}") from None


def _checked_timestamp_column(column: str | None, mapped: Mapping[str, str]) -> str | None:
    """``--timestamp-column``: a manifest column of its own, not one of the record's fields."""
    if column is None:
        return None
    if not column.strip() or column in schema.reserved_record_columns() or column in mapped.values():
        raise ValueError(
            f"--timestamp-column {column!r}: name a manifest column of its own, not a field of the record "
            f"({', '.join(sorted(schema.reserved_record_columns()))}) or a column --columns maps"
        )
    return column


def check_output(output: str) -> None:
    """Refuse an ``--output`` the run could not write, before any model loads, rather than once its
    work is done: one that is a file, one whose tables this job did not write (the user's own
    ``features/``, say) or, on a local disk, one that lies under a file or in a folder this user
    may not write. Nothing is created, so a refused run leaves no trace."""
    fs, path = url_to_fs(output)
    if isinstance(fs, LocalFileSystem):
        existing = path
        while not os.path.lexists(existing):
            existing = os.path.dirname(existing)
        if not os.path.isdir(existing):
            where = "is" if existing == path else f"lies under {existing}, which is"
            raise ValueError(f"--output {output} {where} a file, not a folder")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise ValueError(f"--output {output}: the folder {existing} is not writable")
    elif fs.isfile(path):
        raise ValueError(f"--output {output} is a file, not a folder")
    outputs.check_replaceable(output)


INPUTS_ROOT = "inputs"


def _allowed_roots(roots: list[str], inputs: list[Input]) -> list[str]:
    """``--allowed_roots`` with ``inputs`` replaced by the folders of the manifests (a folder of
    media files is its own root)."""
    folders = {source.folder for source in inputs}
    expanded: list[str] = []
    for root in roots:
        expanded += sorted(folders) if root == INPUTS_ROOT else [root]
    return expanded
